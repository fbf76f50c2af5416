"""SealedSocket (csrc/sealed_socket.{h,cpp}): AES-256-GCM tensor frames over real sockets.

What is checked, against the record format in the header comment of csrc/sealed_socket.h:
round trips of many dtypes and shapes in both directions at once with exact byte counters; interop with
an independent AES-GCM (``cryptography``) in both directions; tampering, replays, reordering, wrong keys,
truncation and garbage all fail closed; a header that authenticates but is invalid is refused before any
pool allocation; the CRC32C check after decryption; a 256 MiB frame; resumable non-blocking pumps;
pool backpressure and timeouts that keep partial progress; shutdown() waking a blocked pump; and one
sender and one receiver pumping the same channel at once.

Every blocking call has a timeout and every loop a deadline, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from background import Background
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorlink import _C
from tensorlink.wire import Route, decode_payload, encode_frame
from tensorlink.wire.dtypes import CODE_BY_DTYPE
from tensorlink.wire.frame import EncodedFrame

KiB = 1024
MiB = 1024 * KiB
HEADER: int = _C.HEADER_SIZE
CHUNK: int = _C.SEAL_CHUNK
TAG: int = _C.SEAL_TAG
HEADER_RECORD = HEADER + TAG
CAP = 1 << 30  # max_payload where the cap is not the subject
IO_TIMEOUT = 20.0  # bound on any single blocking pump in these tests

PairFactory = Callable[..., tuple[socket.socket, socket.socket]]

KEY_AB = bytes(range(32))  # A -> B
KEY_BA = bytes(range(100, 132))  # B -> A


# ------------------------------------------------------------------------------------------ helpers


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server side); bufsize shrinks both kernel buffers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if bufsize is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        listener.settimeout(5)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if bufsize is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        client.settimeout(5)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(None)
    server.settimeout(None)
    return client, server


@pytest.fixture
def sockets() -> Iterator[PairFactory]:
    """A factory of TCP pairs; every pair it made is closed after the test."""
    made: list[socket.socket] = []

    def make(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
        a, b = tcp_pair(bufsize)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def pool(capacity: int = 64 * MiB) -> _C.BufferPool:
    return _C.BufferPool(capacity, pin=False)


def sealed(
    sock: socket.socket,
    send_key: bytes = KEY_AB,
    recv_key: bytes = KEY_BA,
    *,
    buffers: _C.BufferPool | None = None,
    max_payload: int = CAP,
    verify_crc: bool = True,
) -> _C.SealedSocket:
    return _C.SealedSocket(sock.fileno(), send_key, recv_key, buffers or pool(), max_payload, verify_crc)


def ends(a: socket.socket, b: socket.socket, **kwargs: Any) -> tuple[_C.SealedSocket, _C.SealedSocket]:
    """Matching SealedSockets on both sides of a pair: A sends with KEY_AB, B with KEY_BA."""
    return sealed(a, KEY_AB, KEY_BA, **kwargs), sealed(b, KEY_BA, KEY_AB, **kwargs)


def wire_len(payload_len: int) -> int:
    """Bytes one frame takes on the wire: header record, then each chunk with its tag."""
    return HEADER_RECORD + payload_len + TAG * math.ceil(payload_len / CHUNK)


def assert_read_at_most_read_ahead(rx: _C.SealedSocket, upto: int) -> None:
    """The receiver read the records up to `upto` and at most its fixed read-ahead buffer beyond: bytes
    past a refused or deferred header are never put in a pool buffer or processed."""
    assert upto <= rx.bytes_received <= upto + _C.SEAL_READ_AHEAD


def send_frame(ss: _C.SealedSocket, frame: EncodedFrame, timeout: float = IO_TIMEOUT) -> None:
    ss.start_send(frame.header, frame.payload)
    assert ss.pump_send(True, timeout) is True
    assert not ss.sending


def recv_frame(ss: _C.SealedSocket, timeout: float = IO_TIMEOUT) -> tuple[_C.FrameHeader, torch.Tensor]:
    assert ss.pump_recv(True, timeout) == 1
    header, buf = ss.take_frame()
    return header, tensor_of(header, buf)


def tensor_of(header: _C.FrameHeader, buf: _C.PooledBuffer | None) -> torch.Tensor:
    if buf is None:
        assert header.payload_len == 0
        return decode_payload(header, b"", verify=False)
    assert len(buf) == header.payload_len
    return decode_payload(header, buf, verify=False)


def route_of(header: _C.FrameHeader) -> Route:
    return Route(header.job, header.step, header.micro_batch, header.stage)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def nonce(counter: int) -> bytes:
    """The documented nonce: 4 zero bytes || 64-bit record counter, little endian."""
    return bytes(4) + counter.to_bytes(8, "little")


class RefSealer:
    """An independent sender of the record format, on cryptography's AES-GCM."""

    def __init__(self, key: bytes, counter: int = 1) -> None:
        self.aead = AESGCM(key)
        self.counter = counter

    def record(self, plaintext: bytes) -> bytes:
        out = self.aead.encrypt(nonce(self.counter), plaintext, None)
        self.counter += 1
        return out

    def frame(self, header: bytes, payload: bytes) -> bytes:
        assert len(header) == HEADER
        parts = [self.record(header)]
        parts += [self.record(payload[off : off + CHUNK]) for off in range(0, len(payload), CHUNK)]
        return b"".join(parts)


class RefOpener:
    """An independent receiver of the record format: records its chunk sizes as it opens them."""

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.counter = 1

    def record(self, data: bytes, pos: int, n: int) -> bytes:
        sealed_record = data[pos : pos + n + TAG]
        assert len(sealed_record) == n + TAG, "stream ends inside a record"
        out = self.aead.decrypt(nonce(self.counter), sealed_record, None)
        self.counter += 1
        return out

    def frame(self, data: bytes, pos: int) -> tuple[bytes, bytes, list[int], int]:
        """(header plaintext, payload plaintext, chunk sizes, position after the frame)."""
        header = self.record(data, pos, HEADER)
        pos += HEADER_RECORD
        payload_len = _C.decode_header(header, CAP).payload_len
        chunks, payload = [], []
        while sum(chunks) < payload_len:
            n = min(CHUNK, payload_len - sum(chunks))
            payload.append(self.record(data, pos, n))
            chunks.append(n)
            pos += n + TAG
        return header, b"".join(payload), chunks, pos


def read_until_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def capture(frames: list[EncodedFrame], make_pair: PairFactory) -> bytes:
    """The exact bytes a SealedSocket (sending with KEY_AB) writes for frames, read raw from its peer."""
    a, b = make_pair()
    tx = sealed(a, KEY_AB, KEY_BA)

    def send_all() -> None:
        for f in frames:
            send_frame(tx, f)
        a.shutdown(socket.SHUT_WR)

    sender = Background(send_all)
    raw = read_until_eof(b)
    sender.join()
    assert tx.bytes_sent == len(raw) == sum(wire_len(f.payload.nbytes) for f in frames)
    return raw


def feed(sock: socket.socket, data: bytes, *, close: bool = False) -> Background:
    """Writes data to a raw socket from a thread; a peer that fails and shuts down is not an error here."""

    def run() -> None:
        sock.settimeout(IO_TIMEOUT)
        try:
            sock.sendall(data)
            if close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    return Background(run)


def hang_up(sock: socket.socket) -> None:
    """Shut a raw socket down both ways, waking any thread blocked on it (closing it would not); a peer
    that already reset the connection is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    """nbytes of seeded pseudo-random uint8."""
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen(seed))


def sample_tensors(seed: int) -> list[tuple[torch.Tensor, Route]]:
    """Several dtypes and shapes, an empty tensor, a scalar and sizes on and around the chunk boundary."""
    g = gen(seed)
    tensors = [
        torch.randn(3, 5, generator=g),
        torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        torch.randint(-(2**62), 2**62, (7,), dtype=torch.int64, generator=g),
        torch.randint(0, 2, (4, 4), generator=g).bool(),
        torch.empty(0, 3),
        torch.tensor(3.5),
        torch.randn(CHUNK // 4, generator=g),  # exactly one whole chunk: no empty trailing record
        torch.randn(300_001, generator=g),  # five chunks, the last one short and odd-sized
    ]
    return [
        (t, Route(job=bytes([seed, i]) * 8, step=1000 + i, micro_batch=seed * 10 + i, stage=i % 4))
        for i, t in enumerate(tensors)
    ]


def assert_channel_dead(ss: _C.SealedSocket, reason: str) -> None:
    """After a failure every call names the reason and nothing moves."""
    assert ss.broken is not None and reason in ss.broken
    frame = encode_frame(torch.zeros(4))
    for call in (
        lambda: ss.pump_recv(False),
        lambda: ss.pump_recv(True, 1.0),
        lambda: ss.start_send(frame.header, frame.payload),
        lambda: ss.pump_send(True, 1.0),
    ):
        with pytest.raises(_C.ChannelBroken, match="channel is closed"):
            call()


def assert_fresh_channel_works(make_pair: PairFactory) -> None:
    """The process is unharmed: a new channel still carries a frame."""
    a, b = make_pair()
    tx, rx = ends(a, b)
    t = torch.arange(1000, dtype=torch.float32)
    send_frame(tx, encode_frame(t))
    assert same(recv_frame(rx)[1], t)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.timeout(30)
def test_round_trip_both_directions_at_once(sockets: PairFactory) -> None:
    """Every dtype/shape arrives equal with its route, both ways at once (a sender and a receiver thread
    per end), and the byte counters match the documented record overhead exactly."""
    a, b = sockets()
    sa, sb = ends(a, b)
    a_to_b, b_to_a = sample_tensors(seed=1), sample_tensors(seed=2)
    frames_ab = [encode_frame(t, r) for t, r in a_to_b]
    frames_ba = [encode_frame(t, r) for t, r in b_to_a]

    def sender(ss: _C.SealedSocket, frames: list[EncodedFrame]) -> None:
        for f in frames:
            send_frame(ss, f)

    def receiver(ss: _C.SealedSocket, n: int) -> list[tuple[_C.FrameHeader, torch.Tensor]]:
        return [recv_frame(ss) for _ in range(n)]

    jobs = [
        Background(lambda: sender(sa, frames_ab)),
        Background(lambda: sender(sb, frames_ba)),
        Background(lambda: receiver(sb, len(frames_ab))),
        Background(lambda: receiver(sa, len(frames_ba))),
    ]
    results = [job.join() for job in jobs]
    got_at_b, got_at_a = results[2], results[3]

    for sent, got in ((a_to_b, got_at_b), (b_to_a, got_at_a)):
        assert len(got) == len(sent)
        for (tensor, route), (header, received) in zip(sent, got, strict=True):
            assert same(received, tensor), (tensor.dtype, tuple(tensor.shape))
            assert route_of(header) == route
            assert header.dtype == CODE_BY_DTYPE[tensor.dtype]

    for tx, rx, frames in ((sa, sb, frames_ab), (sb, sa, frames_ba)):
        assert tx.frames_sent == rx.frames_received == len(frames)
        assert tx.bytes_sent == rx.bytes_received == sum(wire_len(f.payload.nbytes) for f in frames)
        assert not tx.sending and not rx.receiving
        assert tx.broken is None and rx.broken is None


@pytest.mark.timeout(30)
def test_counters_per_frame_match_record_overhead(
    sockets: PairFactory,
) -> None:
    """bytes_sent grows by exactly 144 + payload + 16 per chunk for each frame, at chunk edges too."""
    a, b = sockets()
    tx, rx = ends(a, b)
    for i, nbytes in enumerate([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 3]):
        t = pattern(nbytes, seed=i)
        before_tx, before_rx = tx.bytes_sent, rx.bytes_received
        recv = Background(lambda: recv_frame(rx))
        send_frame(tx, encode_frame(t))
        header, got = recv.join()
        assert same(got, t)
        assert tx.bytes_sent - before_tx == rx.bytes_received - before_rx == wire_len(nbytes), nbytes
        assert tx.frames_sent == rx.frames_received == i + 1


def test_api_misuse_is_refused(sockets: PairFactory) -> None:
    """Wrong key lengths, a second start_send while one is queued, a bad header size or take_frame with no
    frame are refused without breaking the channel."""
    a, b = sockets()
    with pytest.raises(ValueError, match="both be 16 bytes .* or both 32 bytes .* got 16 and 32"):
        _C.SealedSocket(a.fileno(), bytes(16), KEY_BA, pool(), CAP)
    with pytest.raises(ValueError, match="got 32 and 33"):
        _C.SealedSocket(a.fileno(), KEY_AB, bytes(33), pool(), CAP)
    with pytest.raises(ValueError, match="got 24 and 24"):
        _C.SealedSocket(a.fileno(), bytes(24), bytes(24), pool(), CAP)
    tx, rx = ends(a, b)
    frame = encode_frame(torch.arange(10))
    assert tx.pump_send(False) is True  # nothing queued
    with pytest.raises(_C.WireError, match="128 bytes"):
        tx.start_send(frame.header[:-1], frame.payload)
    tx.start_send(frame.header, frame.payload)
    assert tx.sending
    with pytest.raises(RuntimeError, match="already being sent"):
        tx.start_send(frame.header, frame.payload)
    with pytest.raises(RuntimeError, match="no complete frame"):
        rx.take_frame()
    assert tx.pump_send(True, IO_TIMEOUT)
    assert rx.pump_recv(True, IO_TIMEOUT) == 1
    assert rx.pump_recv(False) == 1  # still ready until taken
    assert same(tensor_of(*rx.take_frame()), torch.arange(10))
    assert tx.broken is None and rx.broken is None


# ------------------------------------------------------------------------------------------ interop


@pytest.mark.timeout(30)
def test_wire_bytes_open_with_independent_aes_gcm(
    sockets: PairFactory,
) -> None:
    """What a SealedSocket writes opens with cryptography's AESGCM at counters 1, 2, ...: the header
    plaintext is the encoded header, chunks are SEAL_CHUNK bytes with the last shorter, nothing else."""
    payloads = [pattern(2 * CHUNK + 12_345, seed=3), torch.arange(7, dtype=torch.int16), torch.empty(0)]
    frames = [encode_frame(t, Route(step=i)) for i, t in enumerate(payloads)]
    raw = capture(frames, sockets)

    # Counter 0 is the handshake's: the first record must not open with it.
    with pytest.raises(InvalidTag):
        AESGCM(KEY_AB).decrypt(nonce(0), raw[:HEADER_RECORD], None)
    assert raw[:HEADER] != frames[0].header  # it is encrypted

    opener = RefOpener(KEY_AB)
    pos = 0
    for frame in frames:
        header, payload, chunks, pos = opener.frame(raw, pos)
        assert header == frame.header
        assert payload == frame.payload.tobytes()
        n = frame.payload.nbytes
        expected = [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else [])
        assert chunks == expected
    assert pos == len(raw)
    assert opener.counter == 1 + sum(1 + math.ceil(f.payload.nbytes / CHUNK) for f in frames)


@pytest.mark.timeout(30)
def test_sixteen_byte_keys_select_aes_128_gcm(sockets: PairFactory) -> None:
    """16-byte keys select AES-128-GCM (the data plane's default): what one SealedSocket writes opens
    with cryptography's AES-128-GCM at counter 1, and frames sealed by it are received intact."""
    key_ab, key_ba = KEY_AB[:16], KEY_BA[:16]
    t = pattern(CHUNK + 99, seed=8)
    frame = encode_frame(t, Route(step=4))
    a, b = sockets()
    tx = sealed(a, key_ab, key_ba)
    send_frame(tx, frame)
    b.settimeout(IO_TIMEOUT)
    raw = b""
    while len(raw) < wire_len(frame.payload.nbytes):
        raw += b.recv(1 << 20)
    header, payload, _, pos = RefOpener(key_ab).frame(raw, 0)
    assert header == frame.header and payload == frame.payload.tobytes() and pos == len(raw)
    with pytest.raises(InvalidTag):  # not the 256-bit cipher under a zero-padded key
        AESGCM(key_ab + bytes(16)).decrypt(nonce(1), raw[:HEADER_RECORD], None)

    rx = sealed(a, key_ab, key_ba)  # receives what B seals with key_ba
    writer = feed(b, RefSealer(key_ba).frame(frame.header, frame.payload.tobytes()))
    got_header, got = recv_frame(rx)
    assert same(got, t) and got_header.step == 4
    writer.join()


@pytest.mark.timeout(30)
def test_receives_frames_sealed_independently(sockets: PairFactory) -> None:
    """Frames sealed by cryptography's AESGCM (counters from 1) are received intact and in order."""
    a, b = sockets()
    rx = sealed(b, KEY_BA, KEY_AB)
    tensors = [torch.randn(5, 7, generator=gen(4)), pattern(3 * CHUNK + 1, seed=5), torch.tensor(True)]
    ref = RefSealer(KEY_AB)
    wire = b"".join(
        ref.frame(f.header, f.payload.tobytes())
        for f in (encode_frame(t, Route(step=i, stage=2)) for i, t in enumerate(tensors))
    )
    writer = feed(a, wire)
    for i, t in enumerate(tensors):
        header, got = recv_frame(rx)
        assert same(got, t)
        assert (header.step, header.stage) == (i, 2)
    writer.join()
    assert rx.bytes_received == len(wire)
    assert rx.frames_received == len(tensors)


# ------------------------------------------------------------------------------------------ failing closed

TAMPER_PAYLOAD = 2 * CHUNK + 100  # header record, two full chunks and a short one
_TAMPER_LEN = wire_len(TAMPER_PAYLOAD)
TAMPER_POSITIONS = {
    "header first byte": 0,
    "header last ciphertext byte": HEADER - 1,
    "header tag first byte": HEADER,
    "header tag last byte": HEADER_RECORD - 1,
    "chunk 0 first byte": HEADER_RECORD,
    "chunk 0 middle": HEADER_RECORD + CHUNK // 2,
    "chunk 0 tag": HEADER_RECORD + CHUNK + 3,
    "chunk 1 last ciphertext byte": HEADER_RECORD + 2 * CHUNK + TAG - 1,
    "last chunk first byte": HEADER_RECORD + 2 * (CHUNK + TAG),
    "last byte of the stream": _TAMPER_LEN - 1,
}


@pytest.fixture(scope="module")
def tamper_wire() -> tuple[torch.Tensor, bytes]:
    """A three-chunk tensor and its sealed frame, made by an independent sealer."""
    t = pattern(TAMPER_PAYLOAD, seed=6)
    f = encode_frame(t)
    wire = RefSealer(KEY_AB).frame(f.header, f.payload.tobytes())
    assert len(wire) == _TAMPER_LEN
    return t, wire


def expect_auth_failure(
    make_pair: PairFactory,
    wire: bytes,
    recv_key: bytes = KEY_AB,
) -> tuple[_C.SealedSocket, BaseException]:
    """Feed wire to a fresh receiver and return it with the error its blocking pump raised."""
    a, b = make_pair()
    rx = sealed(b, KEY_BA, recv_key)
    writer = feed(a, wire)
    with pytest.raises(_C.AuthError) as info:
        for _ in range(4):
            recv_frame(rx, timeout=5.0)
    hang_up(a)  # wakes the writer if the receiver stopped reading
    writer.join()
    return rx, info.value


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", list(TAMPER_POSITIONS))
def test_flipped_byte_fails_authentication(
    where: str,
    tamper_wire: tuple[torch.Tensor, bytes],
    sockets: PairFactory,
) -> None:
    """One flipped bit anywhere in a record (ciphertext or tag) is an AuthError, the channel is dead
    afterwards with the reason, no data is handed out, and the process carries on."""
    _, wire = tamper_wire
    pos = TAMPER_POSITIONS[where]
    bad = bytearray(wire)
    bad[pos] ^= 0x01
    rx, err = expect_auth_failure(sockets, bytes(bad))
    assert isinstance(err, _C.WireError) and isinstance(err, ValueError)
    if pos < HEADER_RECORD:
        assert "frame header failed authentication" in str(err)
    else:
        chunk_offset = (pos - HEADER_RECORD) // (CHUNK + TAG) * CHUNK
        assert f"payload chunk at offset {chunk_offset} failed authentication" in str(err)
    assert rx.frames_received == 0
    assert_channel_dead(rx, "failed authentication")
    assert_fresh_channel_works(sockets)


@pytest.mark.timeout(60)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_fails_authentication(
    data: st.DataObject,
    tamper_wire: tuple[torch.Tensor, bytes],
    sockets: PairFactory,
) -> None:
    """Any non-zero xor mask at any position of the stream is rejected (never a wrong tensor)."""
    _, wire = tamper_wire
    pos = data.draw(st.integers(0, len(wire) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    bad = bytearray(wire)
    bad[pos] ^= mask
    rx, _ = expect_auth_failure(sockets, bytes(bad))
    assert rx.broken is not None and rx.frames_received == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("order", ["replayed", "reordered", "dropped"])
def test_replayed_reordered_or_dropped_frame_fails(order: str, sockets: PairFactory) -> None:
    """Frames a SealedSocket really sent, fed back replayed (same bytes twice), swapped, or with one left
    out: every frame before the mismatch arrives, the mismatching one is an AuthError."""
    tensors = [torch.arange(100, dtype=torch.int32) + i for i in range(3)]
    frames = [encode_frame(t, Route(step=i)) for i, t in enumerate(tensors)]
    raw = capture(frames, sockets)
    cuts = [0]
    for f in frames:
        cuts.append(cuts[-1] + wire_len(f.payload.nbytes))
    rec = [raw[cuts[i] : cuts[i + 1]] for i in range(3)]
    wire, good = {
        "replayed": (rec[0] + rec[0], 1),
        "reordered": (rec[0] + rec[2] + rec[1], 1),
        "dropped": (rec[1] + rec[2], 0),
    }[order]
    a, b = sockets()
    rx = sealed(b, KEY_BA, KEY_AB)
    writer = feed(a, wire)
    for i in range(good):
        assert same(recv_frame(rx)[1], tensors[i])
    with pytest.raises(_C.AuthError, match="frame header failed authentication"):
        recv_frame(rx, timeout=5.0)
    hang_up(a)
    writer.join()
    assert rx.frames_received == good
    assert_channel_dead(rx, "failed authentication")


@pytest.mark.timeout(30)
def test_wrong_key_fails_on_first_header(sockets: PairFactory) -> None:
    """A peer with another key is refused at the first header record, before any payload buffer is taken:
    only the fixed read-ahead buffer (the bytes that came with the header) ever held its data."""
    a, b = sockets()
    tx = sealed(a, KEY_AB, KEY_BA)
    rx = sealed(b, KEY_BA, bytes(reversed(KEY_AB)), buffers=(buffers := pool()))
    sender = Background(lambda: send_frame(tx, encode_frame(pattern(8 * MiB, seed=7)), timeout=5.0))
    with pytest.raises(_C.AuthError, match="frame header failed authentication"):
        recv_frame(rx, timeout=5.0)
    assert_read_at_most_read_ahead(rx, HEADER_RECORD)
    assert buffers.in_use == 0
    assert_channel_dead(rx, "frame header failed authentication")
    hang_up(a)  # the sender, blocked on a peer that stopped reading, ends too
    join_quietly(sender)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cut,mid_frame",
    [(0, False), (50, True), (HEADER_RECORD, True), (HEADER_RECORD + 1000, True), (HEADER_RECORD + CHUNK + TAG, True)],
)
def test_truncated_stream_is_connection_closed(
    cut: int, mid_frame: bool, tamper_wire: tuple[torch.Tensor, bytes], sockets: PairFactory
) -> None:
    """A peer that closes between frames or inside one (header, payload, at a record edge) is
    ConnectionClosed, not an authentication error and not a hang."""
    _, wire = tamper_wire
    a, b = sockets()
    rx = sealed(b, KEY_BA, KEY_AB, buffers=(buffers := pool()))
    feed(a, wire[:cut], close=True).join()
    with pytest.raises(_C.ConnectionClosed) as info:
        recv_frame(rx, timeout=5.0)
    assert not isinstance(info.value, _C.ChannelBroken)
    assert ("middle of a frame" in str(info.value)) == mid_frame
    assert rx.bytes_received == cut
    assert_channel_dead(rx, "peer closed the channel")
    del rx, info  # the traceback holds the channel too
    gc.collect()
    assert buffers.in_use == 0  # a half-received payload buffer goes back with the channel


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["random bytes", "plaintext frame"])
def test_garbage_without_handshake_fails_authentication(kind: str, sockets: PairFactory) -> None:
    """Random bytes, or a valid but unencrypted frame (a peer that skipped the handshake), are refused
    at the first header record."""
    if kind == "random bytes":
        wire = random.Random(8).randbytes(4 * KiB)
    else:
        wire = encode_frame(torch.arange(1000, dtype=torch.float32)).to_bytes()
    rx, err = expect_auth_failure(sockets, wire)
    assert "frame header failed authentication" in str(err)
    assert_read_at_most_read_ahead(rx, HEADER_RECORD)
    assert_channel_dead(rx, "failed authentication")


# ------------------------------------------------------------------------------------------ invalid headers


def bad_header_plaintexts() -> dict[str, bytes]:
    f32 = CODE_BY_DTYPE[torch.float32]
    over_cap = _C.FrameHeader(dtype=f32, shape=[512 * KiB], payload_len=2 * MiB)
    huge = _C.FrameHeader(dtype=CODE_BY_DTYPE[torch.uint8], shape=[1 << 40], payload_len=1 << 40)
    good = encode_frame(torch.zeros(4)).header
    return {
        "payload over max_payload": _C.encode_header(over_cap, 1 << 62),
        "1 TiB payload": _C.encode_header(huge, 1 << 62),
        "bad magic": bytes([good[0] ^ 0xFF]) + good[1:],
        "header checksum mismatch": good[:40] + bytes([good[40] ^ 1]) + good[41:],  # the step field
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize("which", list(bad_header_plaintexts()))
def test_authentic_but_invalid_header_is_refused_before_allocation(which: str, sockets: PairFactory) -> None:
    """A header sealed with the right key but invalid (over max_payload, malformed) is a WireError,
    not an AuthError, and nothing is taken from the pool."""
    plaintext = bad_header_plaintexts()[which]
    assert len(plaintext) == HEADER
    a, b = sockets()
    buffers = pool(4 * MiB)
    rx = sealed(b, KEY_BA, KEY_AB, buffers=buffers, max_payload=1 * MiB)
    writer = feed(a, RefSealer(KEY_AB).record(plaintext) + bytes(64 * KiB))
    with pytest.raises(_C.WireError) as info:
        recv_frame(rx, timeout=5.0)
    assert not isinstance(info.value, _C.AuthError)
    assert buffers.in_use == 0 and buffers.cached == 0
    assert_read_at_most_read_ahead(rx, HEADER_RECORD)
    assert rx.broken is not None
    assert_channel_dead(rx, "")
    hang_up(a)
    writer.join()


# ------------------------------------------------------------------------------------------ CRC after decrypt


def frame_with_crc(tensor: torch.Tensor, crc_xor: int) -> EncodedFrame:
    """tensor's frame with its header CRC xored by crc_xor (0: the correct CRC)."""
    payload = memoryview(tensor.numpy()).cast("B")
    header = _C.FrameHeader(
        dtype=CODE_BY_DTYPE[tensor.dtype],
        shape=list(tensor.shape),
        payload_len=payload.nbytes,
        payload_crc=_C.crc32c(payload) ^ crc_xor,
        step=77,
    )
    return EncodedFrame(_C.encode_header(header, CAP), payload)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("verify_crc", [True, False])
def test_sender_framed_bad_crc(verify_crc: bool, sockets: PairFactory) -> None:
    """A frame that authenticates but whose payload does not match its header CRC (the sender framed
    corrupt data) is a ChecksumError with verify_crc=True and accepted as-is with verify_crc=False."""
    t = torch.randn(3 * CHUNK // 4 + 5, generator=gen(9))  # spans chunks: the CRC is accumulated per chunk
    a, b = sockets()
    tx, rx = ends(a, b, verify_crc=verify_crc)
    sender = Background(lambda: send_frame(tx, frame_with_crc(t, crc_xor=0x80)))
    if verify_crc:
        with pytest.raises(_C.ChecksumError, match="checksum mismatch after decryption"):
            recv_frame(rx, timeout=5.0)
        assert_channel_dead(rx, "checksum mismatch")
    else:
        header, got = recv_frame(rx)
        assert same(got, t) and header.step == 77
        assert rx.broken is None
    sender.join()


# ------------------------------------------------------------------------------------------ large frame


@pytest.mark.timeout(60)
def test_256_mib_frame(sockets: PairFactory) -> None:
    """A 256 MiB float32 tensor (1024 chunks) arrives intact into one pool buffer, memory stays bounded
    (sender tensor + receiver buffer, no copies of the frame), and the buffer returns to the pool."""
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = 64 * MiB  # float32 elements: 256 MiB
    t = torch.arange(n, dtype=torch.float32)
    t[1::2] *= -1.0  # not monotonic, so a swapped chunk could not pass
    frame = encode_frame(t, Route(step=5))
    a, b = sockets()
    buffers = pool(300 * MiB)
    tx, rx = ends(a, b, buffers=buffers, max_payload=512 * MiB)
    start = time.monotonic()
    sender = Background(functools.partial(send_frame, tx, frame, 50.0))
    header, got = recv_frame(rx, timeout=50)
    sender.join()
    elapsed = time.monotonic() - start
    assert header.payload_len == 256 * MiB and header.step == 5
    assert torch.equal(got, t)
    assert tx.bytes_sent == rx.bytes_received == wire_len(256 * MiB)
    assert buffers.in_use == _C.BufferPool.size_class(256 * MiB)
    del got, frame, t
    gc.collect()
    assert buffers.in_use == 0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    assert grown_kib < 2 * MiB, f"peak RSS grew by {grown_kib / KiB:.0f} MiB"  # ru_maxrss is in KiB
    print(f"256 MiB sealed frame in {elapsed:.2f} s ({256 / elapsed:.0f} MiB/s)")


# ------------------------------------------------------------------------------------------ non-blocking pumps


@pytest.mark.timeout(30)
def test_nonblocking_pumps_resume_in_one_thread(
    sockets: PairFactory,
) -> None:
    """With tiny kernel buffers, a 4 MiB frame moves by alternating non-blocking pump_send/pump_recv in
    one thread (poll between): each call moves what fits and returns, the next resumes exactly there."""
    a, b = sockets(bufsize=8 * KiB)
    tx, rx = ends(a, b)
    t = pattern(4 * MiB + 3, seed=10)
    tx.start_send(*encode_frame(t, Route(micro_batch=3)).parts)
    sent, got = False, None
    send_calls = recv_calls = send_partial = recv_partial = 0
    seen_mid_frame = False
    deadline = time.monotonic() + 20
    while got is None:
        assert time.monotonic() < deadline, f"stuck after {send_calls} sends / {recv_calls} receives"
        if not sent:
            sent = tx.pump_send(False)
            send_calls += 1
            send_partial += not sent
        status = rx.pump_recv(False)
        recv_calls += 1
        if status == 1:
            got = rx.take_frame()
            break
        assert status == 0
        recv_partial += 1
        if not sent and rx.receiving and tx.sending:
            seen_mid_frame = True
        readable, writable, _ = select.select([b], [] if sent else [a], [], 1.0)
        assert readable or writable, "neither end can make progress"
    header, buf = got
    assert same(tensor_of(header, buf), t) and header.micro_batch == 3
    assert sent and not tx.sending and not rx.receiving
    assert send_partial >= 10 and recv_partial >= 10, (send_partial, recv_partial)
    assert seen_mid_frame
    assert tx.bytes_sent == rx.bytes_received == wire_len(4 * MiB + 3)


def test_read_ahead_delivers_queued_small_frames_without_more_reads(sockets: PairFactory) -> None:
    """Small frames that arrived together are read in one recvmsg: the first pump takes them all into the
    read-ahead buffer, and the next frames come out of it whole, with no read in between (one read per
    burst of small frames is what keeps an 8 KiB round trip short)."""
    a, b = sockets()
    tx, rx = ends(a, b)
    frames = [pattern(n, seed=40 + n) for n in (1000, 8 * KiB, 3)]
    for i, x in enumerate(frames):
        send_frame(tx, encode_frame(x, Route(step=i)))
    total = sum(wire_len(x.numel()) for x in frames)  # all of it is queued on the socket by now
    assert select.select([b], [], [], 10)[0]
    got = []
    for _ in frames:
        assert rx.pump_recv(False) == 1
        assert rx.bytes_received == total  # the first pump read the whole burst
        header, buf = rx.take_frame()
        got.append((header.step, tensor_of(header, buf)))
    assert [step for step, _ in got] == [0, 1, 2]
    assert all(same(t, x) for (_, t), x in zip(got, frames, strict=True))
    assert rx.pump_recv(False) == 0 and not rx.receiving


@pytest.mark.timeout(30)
def test_max_inline_stops_after_a_large_header(sockets: PairFactory) -> None:
    """pump_recv(False, max_inline=n) finishes a frame of at most n payload bytes inline, but returns 0
    right after a header announcing more (incoming says how much, nothing taken from the pool yet) so the
    caller can move that payload in a thread, where a blocking pump completes it intact."""
    a, b = sockets()
    buffers = pool()
    tx, rx = ends(a, b, buffers=buffers)
    small, big = pattern(4 * KiB, seed=17), pattern(2 * MiB + 1, seed=18)

    def send_both() -> None:
        for i, x in enumerate((small, big)):
            send_frame(tx, encode_frame(x, Route(step=i)))

    sender = Background(send_both)

    def pump_inline(until: Callable[[int], bool]) -> int:
        deadline = time.monotonic() + 10
        while not until(status := rx.pump_recv(False, max_inline=4 * KiB)):
            assert status == 0
            assert time.monotonic() < deadline
            select.select([b], [], [], 0.5)
        return status

    assert rx.incoming == 0
    assert pump_inline(lambda status: status == 1) == 1  # exactly max_inline: still inline
    assert rx.incoming == 4 * KiB
    header, buf = rx.take_frame()
    assert header.step == 0 and same(tensor_of(header, buf), small)
    del buf
    assert rx.incoming == 0

    assert pump_inline(lambda status: rx.incoming != 0) == 0
    assert rx.incoming == 2 * MiB + 1 and rx.receiving
    assert_read_at_most_read_ahead(rx, wire_len(4 * KiB) + HEADER_RECORD)  # it stopped after the header
    assert buffers.in_use == 0
    header, got = Background(lambda: recv_frame(rx)).join()
    assert header.step == 1 and same(got, big)
    sender.join()
    assert rx.broken is None and rx.frames_received == 2


@pytest.mark.timeout(30)
def test_blocking_send_timeout_keeps_progress(sockets: PairFactory) -> None:
    """A blocking pump_send that times out with the peer not reading raises TimeoutError, leaves the
    channel usable with the frame still queued, and a later pump finishes it intact."""
    a, b = sockets(bufsize=16 * KiB)
    tx, rx = ends(a, b)
    t = pattern(2 * MiB, seed=11)
    tx.start_send(*encode_frame(t).parts)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        tx.pump_send(True, 0.2)
    assert 0.15 <= time.monotonic() - start < 2.0
    assert tx.broken is None and tx.sending
    partial = tx.bytes_sent
    assert 0 < partial < wire_len(2 * MiB)
    receiver = Background(lambda: recv_frame(rx))
    assert tx.pump_send(True, IO_TIMEOUT)
    assert same(receiver.join()[1], t)
    assert tx.bytes_sent == rx.bytes_received == wire_len(2 * MiB)


# ------------------------------------------------------------------------------------------ backpressure / timeouts


@dataclass
class HeldFirstFrame:
    """A receiver whose pool holds one 1 MiB frame but not two, with the first frame received and held
    and the second on its way."""

    rx: _C.SealedSocket
    rx_sock: socket.socket
    buffers: _C.BufferPool
    tensors: list[torch.Tensor]
    sender: Background
    held: list[torch.Tensor]


def held_first_frame(make_pair: PairFactory) -> HeldFirstFrame:
    n = 1 * MiB
    cls = _C.BufferPool.size_class(n)
    buffers = pool(cls + cls // 2)
    a, b = make_pair()
    tx, rx = ends(a, b, buffers=buffers)
    tensors = [pattern(n, seed=12), pattern(n, seed=13)]
    frames = [encode_frame(x, Route(step=i)) for i, x in enumerate(tensors)]

    def send_both() -> None:
        for f in frames:
            send_frame(tx, f, timeout=5.0)

    sender = Background(send_both)
    header, first = recv_frame(rx)
    assert header.step == 0 and same(first, tensors[0])
    assert buffers.in_use == cls
    return HeldFirstFrame(rx, b, buffers, tensors, sender, [first])


def pump_until_pool_full(rx: _C.SealedSocket, sock: socket.socket) -> None:
    """Non-blocking pumps (poll between) until the second header is in and the pool says full."""
    deadline = time.monotonic() + 10
    while (status := rx.pump_recv(False)) != 2:
        assert status == 0, "the second frame cannot be ready: the pool is full"
        assert time.monotonic() < deadline, "the second header never arrived"
        select.select([sock], [], [], 0.5)


def join_quietly(job: Background) -> None:
    """Join a helper thread whose channel a test broke on purpose: its connection error is expected."""
    try:
        job.join()
    except OSError:  # ConnectionError and the native ConnectionClosed included
        pass


@pytest.mark.timeout(30)
def test_pool_full_backpressure(sockets: PairFactory) -> None:
    """While the first frame's buffer is held, a non-blocking pump on the second reports 2 (pool full)
    once its header is in, repeatedly, without breaking; after the buffer is released a blocking pump
    finishes the second frame."""
    s = held_first_frame(sockets)
    pump_until_pool_full(s.rx, s.rx_sock)
    assert s.rx.receiving and s.rx.broken is None
    assert s.rx.bytes_received >= HEADER_RECORD
    for _ in range(3):
        assert s.rx.pump_recv(False) == 2
    assert s.buffers.in_use == _C.BufferPool.size_class(1 * MiB)
    s.held.clear()
    gc.collect()
    assert s.buffers.in_use == 0
    header, second = recv_frame(s.rx, timeout=5.0)
    assert header.step == 1 and same(second, s.tensors[1])
    s.sender.join()
    assert s.rx.broken is None and s.rx.frames_received == 2


@pytest.mark.timeout(30)
def test_blocking_pump_waits_for_pool_space(sockets: PairFactory) -> None:
    """A blocking pump waiting for pool space wakes when another thread releases the held buffer."""
    s = held_first_frame(sockets)
    releaser = threading.Timer(0.3, s.held.clear)
    releaser.start()
    start = time.monotonic()
    header, second = recv_frame(s.rx, timeout=10.0)
    waited = time.monotonic() - start
    releaser.join()
    assert 0.2 <= waited < 5.0
    assert header.step == 1 and same(second, s.tensors[1])
    s.sender.join()


@pytest.mark.timeout(30)
def test_blocking_pump_pool_timeout_keeps_progress(
    sockets: PairFactory,
) -> None:
    """Timing out while the pool is full is a TimeoutError that keeps the channel and the frame in
    progress; once space comes back a later pump finishes the frame."""
    s = held_first_frame(sockets)
    try:
        with pytest.raises(TimeoutError):
            s.rx.pump_recv(True, 0.2)
        assert s.rx.broken is None, f"the channel broke on a pool timeout: {s.rx.broken}"
        s.held.clear()
        gc.collect()
        header, second = recv_frame(s.rx, timeout=5.0)
        assert header.step == 1 and same(second, s.tensors[1])
    finally:
        s.rx.shutdown("test over")
        join_quietly(s.sender)


@pytest.mark.timeout(30)
def test_frame_larger_than_pool_fails_without_blocking(
    sockets: PairFactory,
) -> None:
    """A frame that can never fit the pool should fail at once, not wait for space that never comes."""
    a, b = sockets()
    tx, rx = ends(a, b, buffers=pool(256 * KiB))
    sender = Background(lambda: send_frame(tx, encode_frame(pattern(1 * MiB, seed=14)), timeout=5.0))
    try:
        deadline = time.monotonic() + 5
        outcome: object = None
        while outcome is None and time.monotonic() < deadline:
            try:
                if rx.pump_recv(False) == 2 and rx.pump_recv(False) == 2:
                    outcome = "2 (pool full)"
            except (_C.PoolExhausted, _C.WireError) as exc:
                outcome = exc
            select.select([b], [], [], 0.5)
        assert isinstance(outcome, Exception), f"non-blocking pump_recv reported {outcome}"
    finally:
        rx.shutdown("test over")
        hang_up(a)
        join_quietly(sender)


@pytest.mark.timeout(30)
def test_idle_receive_timeout_keeps_channel(tamper_wire: tuple[torch.Tensor, bytes], sockets: PairFactory) -> None:
    """pump_recv(True, 0.2) on an idle socket raises TimeoutError after ~0.2 s without breaking the
    channel; timing out inside a header or a chunk keeps the bytes already read, and the frame then
    completes."""
    t, wire = tamper_wire
    a, b = sockets()
    rx = sealed(b, KEY_BA, KEY_AB)
    a.settimeout(5)
    # Idle, then stalled inside the header record, inside chunk 0, inside chunk 0's tag.
    cuts = [0, 100, HEADER_RECORD + 5000, HEADER_RECORD + CHUNK + TAG - 1]
    for cut, nxt in zip(cuts, cuts[1:], strict=False):
        assert rx.bytes_received == cut
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            rx.pump_recv(True, 0.2)
        assert 0.15 <= time.monotonic() - start < 2.0
        assert rx.broken is None
        assert rx.receiving == (cut > 0)
        a.sendall(wire[cut:nxt])
        _wait_received(rx, nxt)
    with pytest.raises(TimeoutError):
        rx.pump_recv(True, 0.2)
    writer = feed(a, wire[cuts[-1] :])
    header, got = recv_frame(rx, timeout=5.0)
    writer.join()
    assert same(got, t)
    assert rx.frames_received == 1 and rx.broken is None
    assert rx.bytes_received == len(wire)


def _wait_received(rx: _C.SealedSocket, total: int) -> None:
    """Non-blocking pumps until rx has read total bytes (all that was written so far)."""
    deadline = time.monotonic() + 5
    while rx.bytes_received < total:
        assert rx.pump_recv(False) == 0
        assert time.monotonic() < deadline
        time.sleep(0.001)


# ------------------------------------------------------------------------------------------ shutdown


@pytest.mark.timeout(30)
def test_shutdown_wakes_blocked_receive(sockets: PairFactory) -> None:
    """shutdown(why) from another thread ends a pump_recv blocked forever (timeout=None) within 1 s with
    a connection error, and the channel reports why afterwards."""
    a, b = sockets()
    rx = sealed(b, KEY_BA, KEY_AB)
    waiter = Background(lambda: rx.pump_recv(True))
    time.sleep(0.2)
    assert waiter.alive()
    start = time.monotonic()
    rx.shutdown("node is leaving")
    err = waiter.error(timeout=1.0)
    assert time.monotonic() - start < 1.0
    assert isinstance(err, ConnectionError)
    assert rx.broken == "node is leaving"
    assert_channel_dead(rx, "node is leaving")
    rx.shutdown("again")  # idempotent: the first reason stays
    assert rx.broken == "node is leaving"


@pytest.mark.timeout(30)
def test_shutdown_wakes_blocked_send(sockets: PairFactory) -> None:
    """A pump_send blocked on a full socket (peer not reading) is woken by shutdown too."""
    a, b = sockets(bufsize=16 * KiB)
    tx = sealed(a, KEY_AB, KEY_BA)
    tx.start_send(*encode_frame(pattern(8 * MiB, seed=15)).parts)
    waiter = Background(lambda: tx.pump_send(True))
    time.sleep(0.2)
    assert waiter.alive() and tx.sending
    start = time.monotonic()
    tx.shutdown("cancelled")
    err = waiter.error(timeout=1.0)
    assert time.monotonic() - start < 1.0
    assert isinstance(err, ConnectionError | OSError)
    assert tx.broken == "cancelled"


@pytest.mark.timeout(30)
def test_shutdown_wakes_pump_waiting_for_pool(sockets: PairFactory) -> None:
    """shutdown() should also end a blocking pump that waits for pool space."""
    s = held_first_frame(sockets)
    waiter = Background(lambda: s.rx.pump_recv(True, 3.0))
    time.sleep(0.2)
    assert waiter.alive()
    start = time.monotonic()
    s.rx.shutdown("node is leaving")
    try:
        err = waiter.error(timeout=5.0)
        woken_after = time.monotonic() - start
        assert woken_after < 1.0, f"woken only after {woken_after:.1f} s (by {type(err).__name__}: {err})"
    finally:
        join_quietly(s.sender)


# ------------------------------------------------------------------------------------------ full duplex


@pytest.mark.timeout(60)
def test_full_duplex_send_and_receive_threads(sockets: PairFactory) -> None:
    """On each end one thread pumps sends while another pumps receives on the same SealedSocket:
    50 frames of 1 B..3 MiB each way all arrive intact and in order."""
    rng = random.Random(16)
    edge = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * MiB]

    def plan(seed: int) -> list[torch.Tensor]:
        sizes = edge + [rng.randint(1, 3 * MiB) if rng.random() < 0.4 else rng.randint(1, 4 * KiB) for _ in range(45)]
        rng.shuffle(sizes)
        out = []
        for i, n in enumerate(sizes):
            x = pattern(n, seed=seed * 1000 + i)
            if n % 4 == 0 and i % 2:
                x = x.view(torch.float32)  # raw bit patterns, NaNs included: compared bitwise below
            out.append(x)
        return out

    a, b = sockets()
    sa, sb = ends(a, b, buffers=None)
    to_b, to_a = plan(1), plan(2)

    def sender(ss: _C.SealedSocket, tensors: list[torch.Tensor]) -> None:
        for i, x in enumerate(tensors):
            send_frame(ss, encode_frame(x, Route(step=i)))

    def receiver(ss: _C.SealedSocket, expected: list[torch.Tensor]) -> int:
        for i, x in enumerate(expected):
            header, got = recv_frame(ss)
            assert header.step == i, f"frame {header.step} arrived at position {i}"
            assert got.dtype == x.dtype and got.shape == x.shape
            assert torch.equal(got.view(torch.uint8), x.view(torch.uint8)), f"frame {i} differs"
            del got
        return len(expected)

    jobs = [
        Background(lambda: sender(sa, to_b)),
        Background(lambda: receiver(sa, to_a)),
        Background(lambda: sender(sb, to_a)),
        Background(lambda: receiver(sb, to_b)),
    ]
    assert [job.join(timeout=50) for job in jobs] == [None, 50, None, 50]
    for tx, rx, sent in ((sa, sb, to_b), (sb, sa, to_a)):
        assert tx.frames_sent == rx.frames_received == 50
        assert tx.bytes_sent == rx.bytes_received == sum(wire_len(x.numel() * x.element_size()) for x in sent)
        assert tx.broken is None and rx.broken is None
