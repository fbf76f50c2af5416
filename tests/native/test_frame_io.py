"""Whole-frame socket I/O (csrc/frame_io.cpp and the bindings in csrc/module.cpp): gathered sends and
scattered receives over real sockets (socketpair and loopback TCP), frame receive into a BufferPool with
header validation before allocation and payload checksum after, timeouts, closed peers and signals."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from background import Background

from tensorlink import _C
from tensorlink.wire import ChecksumError, Compression, Route, WireError, decode_payload, encode_frame
from tensorlink.wire.compression import int8_error_bound
from tensorlink.wire.dtypes import CODE_BY_DTYPE

KiB = 1024
MiB = 1024 * KiB
HEADER = _C.HEADER_SIZE
CAP = 1 << 30  # max_payload for the tests that are not about the cap


# ------------------------------------------------------------------------------------------ helpers


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def big_pattern(n: int, seed: int) -> np.ndarray:
    """n pseudo-random bytes, fast: a 1 MiB + 7 random block tiled (the odd period exposes any offset slip)."""
    block = np.frombuffer(random_bytes(MiB + 7, seed), dtype=np.uint8)
    return np.resize(block, n)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    client.settimeout(None)
    server.settimeout(None)
    return client, server


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = tcp_pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def pool(capacity: int = 64 * MiB) -> _C.BufferPool:
    return _C.BufferPool(capacity, pin=False)


# ------------------------------------------------------------------------------- send_parts / recv_into


def exchange(sender: socket.socket, receiver: socket.socket, send_sizes: list[int], recv_sizes: list[int]) -> None:
    """Send parts of send_sizes, receive into parts of recv_sizes (same total, other boundaries), compare."""
    assert sum(send_sizes) == sum(recv_sizes)
    data = random_bytes(sum(send_sizes), seed=len(send_sizes) * 31 + sum(send_sizes))
    parts, pos = [], 0
    kinds = [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, dtype=np.uint8)]
    for i, n in enumerate(send_sizes):
        parts.append(kinds[i % len(kinds)](data[pos : pos + n]))
        pos += n
    sends = Background(lambda: _C.send_parts(sender.fileno(), parts, timeout=20))
    outs = [bytearray(n) for n in recv_sizes]
    _C.recv_into(receiver.fileno(), outs, timeout=20)
    sends.join()
    assert b"".join(outs) == data


@pytest.mark.timeout(60)
def test_scatter_gather_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    """Parts of 0, 1, 8 KiB and 3 MiB one way, received into differently cut parts, then back."""
    a, b = pair
    sizes = [0, 1, 8 * KiB, 3 * MiB]
    exchange(a, b, sizes, [3, 0, 5000, 3 * MiB + 8 * KiB + 1 - 5003])
    exchange(b, a, sizes[::-1], [sum(sizes)])
    exchange(a, b, [3 * MiB + 8 * KiB + 1], [0, 1, 0, 8 * KiB, 3 * MiB, 0])


def _split(total: int, pieces: int, rng: np.random.Generator) -> list[int]:
    cuts = np.sort(rng.integers(0, total + 1, pieces - 1))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [total]]))]


@pytest.mark.timeout(60)
def test_more_parts_than_iov_max(pair: tuple[socket.socket, socket.socket]) -> None:
    """Thousands of parts (IOV_MAX is 1024 on Linux), zero-length ones among them, are moved in several
    gathered calls and land in order, whichever side has them."""
    rng = np.random.default_rng(8)
    send = [int(n) for n in rng.integers(0, 6, 3000)]
    exchange(*pair, send, _split(sum(send), 2500, rng))
    exchange(*pair, send, [sum(send)])
    exchange(*pair, [sum(send)], send)


def test_empty_transfers_return_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    _C.send_parts(a.fileno(), [], timeout=0)
    _C.send_parts(a.fileno(), [b"", bytearray()], timeout=0)
    _C.recv_into(b.fileno(), [bytearray()], timeout=0)
    _C.recv_into(b.fileno(), [], timeout=0)


def test_receive_parts_must_be_writable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"abc")
    with pytest.raises(TypeError, match="writable"):
        _C.recv_into(b.fileno(), [bytearray(1), b"ab"], timeout=1)
    with pytest.raises(TypeError, match="contiguous"):
        _C.send_parts(a.fileno(), [memoryview(b"abcd")[::2]], timeout=1)
    assert b.recv(3) == b"abc"  # refused before reading anything


@pytest.mark.timeout(120)
def test_256_mib_concurrent_send_and_receive_release_the_gil(pair: tuple[socket.socket, socket.socket]) -> None:
    """256 MiB cannot sit in a socket buffer: the sender thread and the receiving main thread must both
    run at once, which only happens if each call drops the GIL while it waits. A GIL-holding version
    deadlocks until the timeouts fire and fails."""
    a, b = pair
    n = 256 * MiB
    data = big_pattern(n, seed=256)
    out = bytearray(n)
    t0 = time.monotonic()
    sends = Background(lambda: _C.send_parts(a.fileno(), [data[:12345], data[12345:]], timeout=40))
    _C.recv_into(b.fileno(), [memoryview(out)[: n // 3], memoryview(out)[n // 3 :]], timeout=40)
    sends.join(timeout=45)
    elapsed = time.monotonic() - t0
    assert _C.crc32c(out) == _C.crc32c(data)
    assert np.array_equal(np.frombuffer(out, dtype=np.uint8), data)
    assert elapsed < 40


@pytest.mark.timeout(30)
def test_main_thread_runs_python_while_a_recv_blocks(pair: tuple[socket.socket, socket.socket]) -> None:
    """Direct GIL check: Python code keeps running while another thread waits inside recv_into."""
    a, b = pair
    buf = bytearray(4)
    recv = Background(lambda: _C.recv_into(b.fileno(), [buf], timeout=10))
    spins, deadline = 0, time.monotonic() + 0.3
    while time.monotonic() < deadline:
        spins += 1
    assert spins > 1000
    a.sendall(b"done")
    recv.join(timeout=10)
    assert buf == b"done"


# --------------------------------------------------------------------------------------- recv_frame


def tensors() -> list[tuple[str, torch.Tensor, Compression]]:
    g = torch.Generator().manual_seed(11)
    return [
        ("f32", torch.randn(257, 33, generator=g), Compression.NONE),
        ("i64", torch.randint(-(2**62), 2**62, (1000,), generator=g), Compression.NONE),
        ("bool", torch.rand(3, 5, 7, generator=g) > 0.5, Compression.NONE),
        ("scalar", torch.tensor(2.5, dtype=torch.float64), Compression.NONE),
        ("empty", torch.empty(4, 0, 3), Compression.NONE),
        ("int8", torch.randn(5000, generator=g) * 100, Compression.INT8),
        ("bf16", torch.randn(64, 64, generator=g, dtype=torch.float64), Compression.BF16),
        ("big", torch.randn(3 * MiB // 4 + 5, generator=g), Compression.NONE),  # > socket buffer
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,tensor,compression", tensors(), ids=[t[0] for t in tensors()])
def test_recv_frame_round_trip(
    pair: tuple[socket.socket, socket.socket], name: str, tensor: torch.Tensor, compression: Compression
) -> None:
    """A frame from encode_frame, sent with send_parts(EncodedFrame.parts), arrives as a validated header
    and a pool buffer that decode_payload turns back into the tensor without a copy."""
    a, b = pair
    route = Route(job=bytes(range(16)), step=2**40 + 9, micro_batch=3, stage=6)
    frame = encode_frame(tensor, route, compression=compression, block_size=64)
    p = pool()
    sends = Background(lambda: _C.send_parts(a.fileno(), frame.parts, timeout=20))
    header, buf = _C.recv_frame(b.fileno(), p, CAP, timeout=20)
    sends.join()

    assert header.dtype == CODE_BY_DTYPE[tensor.dtype]
    assert header.shape == tuple(tensor.shape)
    assert header.compression == int(compression)
    assert header.payload_len == frame.payload.nbytes == len(buf) == buf.nbytes
    assert header.payload_crc == _C.crc32c(frame.payload)
    assert (header.job, header.step, header.micro_batch, header.stage) == (route.job, route.step, 3, 6)
    assert isinstance(buf, _C.PooledBuffer) and buf.address % 4096 == 0
    assert p.in_use == buf.capacity

    out = decode_payload(header, buf)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    if compression is Compression.NONE:
        assert torch.equal(out, tensor)
        if tensor.numel():
            assert out.data_ptr() == buf.address  # zero-copy over the pool buffer
    elif compression is Compression.INT8:
        assert bool(((out - tensor).abs() <= int8_error_bound(tensor, 64) * (1 + 2**-12)).all())
    else:
        assert torch.equal(out, tensor.to(torch.bfloat16).to(tensor.dtype))
    del buf, out
    assert p.in_use == 0


@pytest.mark.timeout(30)
def test_back_to_back_frames_on_one_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    """Each recv_frame consumes exactly one frame: the next one starts where it stopped."""
    a, b = pair
    ts = [torch.arange(n, dtype=torch.int32) * (i + 1) for i, n in enumerate([0, 1, 1000, 77])]
    frames = [encode_frame(t, Route(step=i)) for i, t in enumerate(ts)]
    _C.send_parts(a.fileno(), [part for f in frames for part in f.parts], timeout=5)
    p = pool()
    for i, t in enumerate(ts):
        header, buf = _C.recv_frame(b.fileno(), p, CAP, timeout=5)
        assert header.step == i
        assert torch.equal(decode_payload(header, buf), t)


def corrupt(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.timeout(30)
def test_corrupted_payload_raises_checksum_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = encode_frame(torch.randn(1000))
    p = pool()
    a.sendall(frame.header + corrupt(frame.payload.tobytes(), 1234))
    with pytest.raises(ChecksumError, match="payload checksum mismatch") as info:
        _C.recv_frame(b.fileno(), p, CAP, timeout=5)
    assert isinstance(info.value, WireError)
    assert p.in_use == 0, "the buffer of a refused frame was not given back"

    # verify=False hands the corrupted bytes over; checking them later still catches the corruption
    a.sendall(frame.header + corrupt(frame.payload.tobytes(), 0))
    header, buf = _C.recv_frame(b.fileno(), p, CAP, timeout=5, verify=False)
    with pytest.raises(ChecksumError):
        decode_payload(header, buf)


@pytest.mark.timeout(30)
def test_corrupted_header_raises_checksum_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = encode_frame(torch.randn(10))
    p = pool()
    a.sendall(corrupt(frame.header, 20) + frame.payload.tobytes())  # a flipped payload-length bit
    with pytest.raises(ChecksumError, match="header"):
        _C.recv_frame(b.fileno(), p, CAP, timeout=5)
    assert (p.in_use, p.cached) == (0, 0)


@pytest.mark.timeout(30)
def test_payload_over_the_cap_is_refused_before_reading_or_allocating(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A header declaring more than max_payload raises WireError having read only the header: no pool
    buffer was taken and the payload bytes are still in the socket."""
    a, b = pair
    frame = encode_frame(torch.arange(5000, dtype=torch.float32))
    p = pool()
    a.sendall(frame.to_bytes())
    with pytest.raises(WireError, match="exceeds the cap") as info:
        _C.recv_frame(b.fileno(), p, 19_999, timeout=5)
    assert not isinstance(info.value, ChecksumError)
    assert (p.in_use, p.cached) == (0, 0)
    rest = bytearray(20_000)
    _C.recv_into(b.fileno(), [rest], timeout=5)
    assert rest == frame.payload.tobytes()


@pytest.mark.timeout(30)
def test_forged_huge_payload_is_refused_without_allocating(pair: tuple[socket.socket, socket.socket]) -> None:
    """A well-formed header declaring a 2**47-byte tensor fails the cap check; nothing is allocated."""
    a, b = pair
    h = _C.FrameHeader(dtype=CODE_BY_DTYPE[torch.uint8], shape=[2**47], payload_len=2**47)
    a.sendall(_C.encode_header(h, 2**48))
    p = pool()
    with pytest.raises(WireError, match="exceeds the cap"):
        _C.recv_frame(b.fileno(), p, 4 << 30, timeout=5)
    assert (p.in_use, p.cached) == (0, 0)


@pytest.mark.timeout(30)
def test_payload_larger_than_the_pool_fails_without_waiting(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = encode_frame(torch.zeros(MiB, dtype=torch.uint8))
    a.sendall(frame.header)  # the payload is never read: the pool refuses it first
    t0 = time.monotonic()
    with pytest.raises(_C.PoolExhausted, match="never fit"):
        _C.recv_frame(b.fileno(), pool(MiB // 2), CAP, timeout=10)
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------------------------------ closed peers


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sent", [0, 50, HEADER, HEADER + 1000])
def test_peer_closing_mid_frame_raises_connection_closed(sent: int) -> None:
    """The error says how far the read got: within the header or within the payload."""
    a, b = socket.socketpair()
    try:
        frame = encode_frame(torch.randn(2000))  # 8000-byte payload
        a.sendall(frame.to_bytes()[:sent])
        a.close()
        p = pool()
        with pytest.raises(_C.ConnectionClosed) as info:
            _C.recv_frame(b.fileno(), p, CAP, timeout=5)
        assert isinstance(info.value, ConnectionError)
        if sent < HEADER:
            assert f"after {sent} of {HEADER} bytes" in str(info.value)
        else:
            assert f"after {sent - HEADER} of 8000 bytes" in str(info.value)
        assert p.in_use == 0
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_recv_into_names_bytes_received_before_close(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"x" * 300)
    a.shutdown(socket.SHUT_WR)
    bufs = [bytearray(100), bytearray(1000)]
    with pytest.raises(_C.ConnectionClosed, match="after 300 of 1100 bytes"):
        _C.recv_into(b.fileno(), bufs, timeout=5)
    assert bufs[0] == b"x" * 100 and bufs[1][:200] == b"x" * 200


@pytest.mark.timeout(30)
def test_send_to_closed_peer_raises_connection_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(_C.ConnectionClosed, match="during send"):
        _C.send_parts(a.fileno(), [b"hello"], timeout=5)


@pytest.mark.timeout(60)
def test_send_to_closed_peer_does_not_raise_sigpipe() -> None:
    """Python ignores SIGPIPE, which would hide a missing MSG_NOSIGNAL; so restore the default action (which
    kills the process) in a child and check that it survives with ConnectionClosed, on both socket kinds."""
    code = textwrap.dedent(
        """
        import signal, socket
        from tensorlink import _C
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        a, b = socket.socketpair()
        b.close()
        try:
            _C.send_parts(a.fileno(), [b"x" * 100_000], timeout=5)
        except _C.ConnectionClosed:
            print("socketpair: ConnectionClosed", flush=True)
        with socket.create_server(("127.0.0.1", 0)) as srv:
            c = socket.create_connection(srv.getsockname(), timeout=5)
            s, _ = srv.accept()
        s.close()
        try:
            for _ in range(100):  # the first write may be accepted before the RST comes back
                _C.send_parts(c.fileno(), [b"x" * 65536], timeout=5)
        except _C.ConnectionClosed:
            print("tcp: ConnectionClosed", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, f"child died with {proc.returncode} (-13 is SIGPIPE): {proc.stderr}"
    assert proc.stdout.split("\n")[:2] == ["socketpair: ConnectionClosed", "tcp: ConnectionClosed"], proc.stdout


# --------------------------------------------------------------------------------------- timeouts


@pytest.mark.timeout(30)
def test_recv_on_silent_socket_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    for call in (
        lambda: _C.recv_into(b.fileno(), [bytearray(10)], timeout=0.3),
        lambda: _C.recv_frame(b.fileno(), pool(), CAP, timeout=0.3),
    ):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            call()
        elapsed = time.monotonic() - t0
        assert type(info.value) is TimeoutError, type(info.value)  # not PoolExhausted, not ConnectionClosed
        assert 0.25 <= elapsed < 2.0, f"{elapsed:.3f} s for a 0.3 s timeout"


@pytest.mark.timeout(30)
def test_partial_data_then_silence_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"12345")
    buf = bytearray(10)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="recv timed out"):
        _C.recv_into(b.fileno(), [buf], timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert buf[:5] == b"12345"


@pytest.mark.timeout(30)
def test_send_to_a_peer_that_never_reads_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="send timed out"):
        _C.send_parts(a.fileno(), [bytes(64 * MiB)], timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0


@pytest.mark.timeout(30)
def test_zero_timeout_reads_what_is_there(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"ready")
    buf = bytearray(5)
    _C.recv_into(b.fileno(), [buf], timeout=0)
    assert buf == b"ready"
    with pytest.raises(TimeoutError):
        _C.recv_into(b.fileno(), [buf], timeout=0)


@pytest.mark.timeout(30)
def test_signal_handler_exception_interrupts_a_blocking_recv(pair: tuple[socket.socket, socket.socket]) -> None:
    """A recv with no data and a long timeout is interrupted by a signal whose Python handler raises
    (what Ctrl-C does): the EINTR path takes the GIL and runs the handler."""
    a, b = pair

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGUSR1))
    try:
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(Interrupted):
            _C.recv_into(b.fileno(), [bytearray(10)], timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)


# -------------------------------------------------------------------------------- socket flavours


@pytest.mark.timeout(60)
def test_non_blocking_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    """Calls use MSG_DONTWAIT + poll, so an fd in non-blocking mode (or with a Python-level timeout,
    which is non-blocking underneath) behaves the same: it waits up to the call's own timeout."""
    a, b = pair
    a.setblocking(False)
    b.setblocking(False)
    exchange(a, b, [0, 1, 8 * KiB, 3 * MiB], [3 * MiB, 8 * KiB + 1])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        _C.recv_into(b.fileno(), [bytearray(1)], timeout=0.3)
    assert time.monotonic() - t0 >= 0.25
    a.settimeout(0.001)
    b.settimeout(0.001)
    exchange(b, a, [3 * MiB], [1, 3 * MiB - 1])
    frame = encode_frame(torch.randn(300_000))
    sends = Background(lambda: _C.send_parts(a.fileno(), frame.parts, timeout=10))
    header, buf = _C.recv_frame(b.fileno(), pool(), CAP, timeout=10)
    sends.join()
    assert bytes(memoryview(buf)) == frame.payload.tobytes()
    for sock in (a, b):  # the fds' flags are left alone (settimeout keeps O_NONBLOCK set underneath)
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


@pytest.mark.timeout(60)
def test_loopback_tcp(tcp: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp
    exchange(client, server, [0, 1, 8 * KiB, 3 * MiB], [5, 3 * MiB + 8 * KiB - 4])
    exchange(server, client, [3 * MiB], [3 * MiB])
    t = torch.randn(1000, 300)
    frame = encode_frame(t, Route(stage=4))
    p = pool()
    sends = Background(lambda: _C.send_parts(client.fileno(), frame.parts, timeout=20))
    header, buf = _C.recv_frame(server.fileno(), p, CAP, timeout=20)
    sends.join()
    assert header.stage == 4 and torch.equal(decode_payload(header, buf), t)


@pytest.mark.timeout(30)
def test_tcp_reset_is_connection_closed() -> None:
    """A peer that aborts (RST, via SO_LINGER 0) gives ConnectionClosed, not a bare OSError."""
    client, server = tcp_pair()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sendall(b"partial")
        client.close()
        with pytest.raises(_C.ConnectionClosed):
            _C.recv_into(server.fileno(), [bytearray(100)], timeout=5)
    finally:
        client.close()
        server.close()


def test_bad_file_descriptors_raise_os_error() -> None:
    with pytest.raises(OSError) as info:
        _C.send_parts(-1, [b"x"], timeout=1)
    assert info.value.errno == errno.EBADF
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            _C.send_parts(w, [b"x"], timeout=1)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.timeout(20)
def test_recv_frame_timeout_bounds_the_whole_call(pair: tuple[socket.socket, socket.socket]) -> None:
    """A peer that trickles a frame (header now, payload late) cannot stretch one call past its timeout:
    the header read, the pool wait and the payload read share a single deadline."""
    a, b = pair
    frame = encode_frame(torch.zeros(1024))
    a.sendall(frame.header)

    def trickle() -> None:
        time.sleep(0.3)
        a.sendall(bytes(frame.payload)[:100])

    sender = threading.Thread(target=trickle)
    sender.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        _C.recv_frame(b.fileno(), pool(), 1 << 20, timeout=0.5)
    elapsed = time.monotonic() - start
    sender.join()
    assert 0.45 <= elapsed < 0.9, f"recv_frame took {elapsed:.2f} s for a 0.5 s timeout"
