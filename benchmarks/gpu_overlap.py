"""How much of a CUDA stage's transfer time the direct data plane hides behind the stage's compute, with
no libp2p in either process, so it runs on GPU machines whose Python has no wheels for libp2p's pins
(fastecdsa 2.3.2 has none for Python 3.12).

    python benchmarks/gpu_overlap.py            # table
    python benchmarks/gpu_overlap.py --json     # one JSON object ("gpu_overlap", ...)

Set-up: the driver listens on 127.0.0.1 and starts its peer (``gpu_overlap.py --serve PORT``, channel
keys on stdin); both wrap the one TCP connection in a ``DirectChannel`` with fresh random AES-128-GCM
keys. The libp2p handshake that agrees such keys in the product is skipped: it runs once per channel
and costs nothing per frame. The peer sinks frames and acknowledges each batch (the same in-band
commands as benchmarks/transport.py, which measures this on a ChannelService channel).

Always measured: host-to-host one-way throughput of the channel for CPU tensors of ``--frame-mib``.
Where ``torch.cuda.is_available()``, the overlap: the driver runs N micro-batches of a matmul-heavy
"stage" on a compute stream of its own and sends each output, a CUDA tensor, while the next micro-batch
computes (``channel.send`` copies it to pinned memory on a side CUDA stream). The stage's depth is
calibrated so that one micro-batch computes about as long as it transfers. With t_compute (N stages
alone), t_transfer (N precomputed outputs sent alone) and t_both (the pipeline):

    hidden fraction = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer)

1.0: the shorter of the two is completely hidden behind the longer; 0: they serialize. Target ≥ 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import trio
from rich.console import Console
from rich.table import Table

from tensorlink import _C
from tensorlink.transport.channel import Channel
from tensorlink.transport.direct import DirectChannel
from tensorlink.transport.errors import ChannelError
from tensorlink.transport.keys import ChannelKeys
from tensorlink.wire.errors import WireError

MIB = 1 << 20
SINK, ECHO = 1, 2  # in-band commands: sink `count` frames then ack, or echo each one back
MAX_COMMANDS = 10_000  # per channel of the peer
STEP_TIMEOUT_S = 120.0  # one measurement
PEER_LIFETIME_S = 900.0  # the peer exits by itself after this, whatever happens to the driver
POOL_BYTES = 1 << 30
JOB = b"bench-gpu-ovrlap"  # 16 bytes


def command_tensor(op: int, size: int, count: int) -> torch.Tensor:
    return torch.tensor([op, size, count], dtype=torch.int64)


async def channel_peer(channel: Channel) -> None:
    """The peer's side of every channel benchmark: read a command, then sink or echo its frames."""
    ack = torch.zeros(1)
    try:
        for _ in range(MAX_COMMANDS):
            op, _, count = (await channel.recv()).tensor.tolist()
            for _ in range(count):
                frame = await channel.recv()
                if op == ECHO:
                    await channel.send(frame.tensor)
                del frame  # the pool buffer goes back at once
            if op == SINK:
                await channel.send(ack)
    except (ChannelError, WireError):
        pass  # the driver closed the channel
    finally:
        await channel.aclose()


async def measure_overlap(channel: Channel, n: int, frame_mib: int) -> dict[str, Any]:
    """The hidden fraction on a channel whose peer runs channel_peer (see the module docstring)."""
    if not torch.cuda.is_available():
        return {"gpu_overlap": None, "gpu_overlap_reason": "no CUDA device (torch.cuda.is_available() is False)"}
    with trio.fail_after(STEP_TIMEOUT_S * 2):
        return await _measure_overlap(channel, n, frame_mib)


async def _measure_overlap(channel: Channel, n: int, frame_mib: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    hidden = 4096
    rows = frame_mib * MIB // (4 * hidden)
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, device=device)
    w = torch.randn(hidden, hidden, device=device) / hidden**0.5
    compute = torch.cuda.Stream(device)
    compute.wait_stream(torch.cuda.current_stream(device))
    default = torch.cuda.current_stream(device)

    def stage(depth: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Enqueue one micro-batch (``depth`` matmuls) on the compute stream; never waits."""
        with torch.cuda.stream(compute):
            h = x
            for _ in range(depth):
                h = torch.tanh(h @ w)
            return h, compute.record_event()

    async def send_all(ys: trio.MemoryReceiveChannel) -> None:
        async with ys:
            async for y, ready in ys:
                default.wait_event(ready)  # channel.send stages after the work on the current stream
                await channel.send(y)

    async def sink(count: int) -> None:
        await channel.send(command_tensor(SINK, rows * hidden * 4, count))

    # Warm-up: kernels, the staging stream, pinned pool buffers, the peer's receive path.
    y, ready = stage(2)
    default.wait_event(ready)
    await sink(2)
    for _ in range(2):
        await channel.send(y)
    await channel.recv()
    torch.cuda.synchronize(device)

    # Transfer alone: N precomputed CUDA outputs.
    await sink(n)
    start = time.perf_counter()
    for _ in range(n):
        await channel.send(y)
    await channel.recv()
    t_transfer = time.perf_counter() - start

    # Calibrate the stage so one micro-batch computes about as long as it transfers.
    probe = 8
    stage(probe)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    stage(probe)
    torch.cuda.synchronize(device)
    per_matmul = (time.perf_counter() - start) / probe
    depth = max(1, min(20_000, round(t_transfer / n / per_matmul)))

    # Compute alone.
    start = time.perf_counter()
    for _ in range(n):
        stage(depth)
    torch.cuda.synchronize(device)
    t_compute = time.perf_counter() - start

    # Both: the producer runs at most two micro-batches ahead of the sender.
    await sink(n)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        ys_in, ys_out = trio.open_memory_channel[tuple[torch.Tensor, torch.cuda.Event]](2)
        nursery.start_soon(send_all, ys_out)
        async with ys_in:
            for _ in range(n):
                await ys_in.send(stage(depth))
    await channel.recv()
    torch.cuda.synchronize(device)
    t_both = time.perf_counter() - start

    hidden_fraction = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer)
    return {
        "gpu_overlap": round(hidden_fraction, 3),
        "gpu_device": torch.cuda.get_device_name(device),
        "gpu_micro_batches": n,
        "gpu_frame_mib": frame_mib,
        "gpu_matmuls_per_stage": depth,
        "gpu_compute_s": round(t_compute, 4),
        "gpu_transfer_s": round(t_transfer, 4),
        "gpu_both_s": round(t_both, 4),
        "gpu_staging_pinned": bool(channel.pool.pinned),  # pageable staging would make the copies synchronous
    }


# --- the standalone run: a DirectChannel between two processes, no libp2p ----------------------------------


def direct_channel(sock: socket.socket, send: bytes, recv: bytes, pool: _C.BufferPool) -> DirectChannel:
    keys = ChannelKeys(send=send, recv=recv, channel_id=bytes(16), token=bytes(16), cipher="aes-128-gcm")
    return DirectChannel(sock, keys, peer="bench-peer", job=JOB, pool=pool, max_payload=POOL_BYTES // 2)


def serve(port: int) -> None:
    """The peer process: keys from stdin, connect, sink what the driver sends; exit when stdin closes."""
    driver_send, driver_recv = (bytes.fromhex(h) for h in sys.stdin.readline().split())
    torch.set_num_threads(1)

    def exit_on_eof() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_on_eof, daemon=True).start()
    watchdog = threading.Timer(PEER_LIFETIME_S, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    trio.run(channel_peer, direct_channel(sock, driver_recv, driver_send, _C.BufferPool(POOL_BYTES)))


async def drive(sock: socket.socket, send: bytes, recv: bytes, n: int, frame_mib: int) -> dict[str, Any]:
    channel = direct_channel(sock, send, recv, _C.BufferPool(POOL_BYTES))
    try:
        x = torch.randn(frame_mib * MIB // 4)
        with trio.fail_after(STEP_TIMEOUT_S):
            await channel.send(command_tensor(SINK, x.nbytes, 2))  # warm-up
            for _ in range(2):
                await channel.send(x)
            await channel.recv()
            await channel.send(command_tensor(SINK, x.nbytes, n))
            start = time.perf_counter()
            for _ in range(n):
                await channel.send(x)
            await channel.recv()
            host_mbps = n * x.nbytes / (time.perf_counter() - start) / 1e6
        return {
            "host_frame_mib": frame_mib,
            "host_mbps": round(host_mbps, 1),
            **await measure_overlap(channel, n, frame_mib),
        }
    finally:
        await channel.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--micro-batches", type=int, default=64, help="N (default 64)")
    parser.add_argument("--frame-mib", type=int, default=16, help="MiB per micro-batch output (default 16)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the peer process's role
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    if not 1 <= args.micro_batches <= 1024 or not 1 <= args.frame_mib <= 256:
        parser.error("--micro-batches must be in 1..1024 and --frame-mib in 1..256")

    torch.set_num_threads(1)
    send, recv = secrets.token_bytes(16), secrets.token_bytes(16)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    peer = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", str(listener.getsockname()[1])],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdin is not None
        peer.stdin.write(f"{send.hex()} {recv.hex()}\n")
        peer.stdin.flush()
        sock, _ = listener.accept()
        started = time.perf_counter()
        result = trio.run(drive, sock, send, recv, args.micro_batches, args.frame_mib)
    finally:
        if peer.stdin is not None:
            peer.stdin.close()  # the peer exits on EOF
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
        listener.close()
    result = {"torch": torch.__version__, "wall_s": round(time.perf_counter() - started, 1), **result}
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title="Direct data plane between two processes on 127.0.0.1 (AES-128-GCM, no libp2p)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    console = Console()
    console.print(table)
    overlap = result.get("gpu_overlap")
    if overlap is None:
        console.print(f"gpu_overlap = n/a: {result.get('gpu_overlap_reason')} (target ≥ 0.8)")
    else:
        mark = "[green]met[/]" if overlap >= 0.8 else "[red]missed[/]"
        console.print(f"gpu_overlap = {overlap:.3f} (target ≥ 0.8) {mark}")


if __name__ == "__main__":
    main()
