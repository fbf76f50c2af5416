"""One-way throughput and round-trip latency of tensor frames between two processes on 127.0.0.1, for
the TensorLink data plane (ChannelService channels: AES-128-GCM sealed TCP by default, and its libp2p-stream
fallback), a raw TCP socket and a py-libp2p Noise+Yamux stream, all in the same run.

    python benchmarks/transport.py            # table with ratios (about 1.5 minutes on 2 cores)
    python benchmarks/transport.py --quick    # smaller run for smoke tests (about 25 s)
    python benchmarks/transport.py --json     # one JSON object (mb64_vs_raw_tcp, kb8_rtt_vs_raw_tcp, ...)

Set-up: the benchmark starts its peer itself (``transport.py --serve``, which prints its addresses on
stdout and then sinks or echoes whatever each command asks for; it exits when its stdin closes). With
two or more CPUs the driver is pinned to CPU 0 and the peer to CPU 1 (``--no-pin`` turns that off), the
same for every transport, and both run torch with one thread. Every payload is a float32 tensor of
8 KiB, 1 MiB or 64 MiB; every transport carries a small command (what to do, frame size, frame count)
in-band before the frames.

- raw TCP: plain blocking Python sockets with TCP_NODELAY; the sender ``sendall``s the tensor's memory
  (a memoryview, no copy), the receiver ``recv_into``s a preallocated buffer. No framing: the size is known.
- libp2p: one Noise+Yamux stream between two ``make_host`` hosts; the payload is written in 1 MiB pieces
  (``stream.write(bytes)``) and read until complete.
- tensorlink: ``ChannelService.open``/``accept`` channel, kind "direct" (sealed TCP): ``channel.send``
  and ``channel.recv`` of the tensor, so framing and AES-GCM are paid (the AEAD tag covers every payload
  byte, so direct channels skip the payload CRC32C; the fallback keeps it).
- tensorlink fallback: the same API on the libp2p stream (``TransportConfig(direct=False)``).

Throughput: the sender sends R frames back to back and the receiver acknowledges after the last; the
time runs from the first send to the ack; MB/s = R × size / time / 1e6. R is picked from a warm-up so a
measurement takes about ``--seconds`` (bounded per size). RTT: ping-pong of one frame (the peer echoes
it), the median of up to 500 pings (8 KiB) after a warm-up, in µs. Shared VMs are noisy from one second
to the next, so raw TCP and the data plane are measured in alternating rounds (3, ``--quick`` 2) and the
best round of each counts; the py-libp2p rows are slow enough to get one round.

GPU overlap (only where ``torch.cuda.is_available()``; else ``"gpu_overlap": null`` and the table says
why): the driver runs N micro-batches of a matmul-heavy "stage" on the GPU (on a compute stream of its
own) and sends each output, a CUDA tensor, over the direct channel to the sinking peer, while the next
micro-batch computes (``channel.send`` copies it to pinned memory on a side CUDA stream). The stage's
depth is calibrated so that compute and transfer take about as long. Measured: t_compute (N stages
alone), t_transfer (N precomputed CUDA outputs sent alone) and t_both (the pipeline), and

    hidden fraction = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer)

1.0 means the shorter of the two is completely hidden behind the longer; 0 means they serialize.
benchmarks/gpu_overlap.py measures the same on a DirectChannel without libp2p (for GPU machines whose
Python cannot install libp2p's pins).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import multiaddr
import torch
import trio
from gpu_overlap import ECHO, MAX_COMMANDS, SINK, channel_peer, command_tensor, measure_overlap
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import StreamError, read_exactly
from tensorlink.transport import Channel, ChannelService, TransportConfig
from tensorlink.wire.protocols import BENCH_TRANSPORT_PROTOCOL

KIB, MIB = 1 << 10, 1 << 20
SIZES = {"kb8": 8 * KIB, "mb1": MIB, "mb64": 64 * MIB}
SIZE_LABELS = {"kb8": "8 KiB", "mb1": "1 MiB", "mb64": "64 MiB"}
TRANSPORTS = {
    "raw_tcp": "raw TCP (blocking sockets, TCP_NODELAY)",
    "tensorlink": "TensorLink direct (AES-GCM sealed TCP)",  # the cipher is in the title and the JSON
    "libp2p": "py-libp2p Noise+Yamux stream",
    "fallback": "TensorLink fallback (libp2p stream)",
}
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
JOB = b"bench-transport!"
PIECE = MIB  # libp2p baseline: bytes per stream.write
COMMAND = struct.Struct("!IQQ")  # op, frame size, frame count (raw TCP and libp2p)
ACK = b"A"
MAX_CONNECTIONS = 64
IO_TIMEOUT_S = 60.0  # one blocking socket call of the raw TCP baseline
STEP_TIMEOUT_S = 120.0  # one measurement
PEER_LIFETIME_S = 900.0  # the peer exits by itself after this, whatever happens to the driver
PEER_START_TIMEOUT_S = 60.0

# Per size: warm-up frames and the bounds on R (throughput); warm-up pings and bounds on pings (RTT).
# R and the ping count follow from the warm-up's rate and the plan's seconds, within these bounds.
TPUT_WARMUP = {"kb8": 50, "mb1": 5, "mb64": 1}
TPUT_BOUNDS = {"kb8": (50, 50_000), "mb1": (5, 3_000), "mb64": (2, 48)}
RTT_WARMUP = {"kb8": 20, "mb1": 3, "mb64": 1}
RTT_BOUNDS = {"kb8": (50, 500), "mb1": (5, 300), "mb64": (1, 8)}


@dataclasses.dataclass(frozen=True)
class Plan:
    seconds: float  # target duration of one throughput or RTT measurement
    rounds: dict[str, int]  # transport -> rounds; the best round counts
    tput: dict[str, tuple[str, ...]]  # transport -> sizes measured for throughput
    rtt: dict[str, tuple[str, ...]]  # transport -> sizes measured for RTT
    gpu_micro_batches: int
    gpu_frame_mib: int
    cipher: str = "aes-128-gcm"  # AEAD of the direct channel (the opener picks it)


ALL = ("kb8", "mb1", "mb64")
FULL = Plan(
    seconds=1.0,
    rounds={"raw_tcp": 3, "tensorlink": 3, "libp2p": 1, "fallback": 1},
    tput={"raw_tcp": ALL, "tensorlink": ALL, "libp2p": ALL, "fallback": ALL},
    rtt={"raw_tcp": ALL, "tensorlink": ALL, "libp2p": ALL, "fallback": ("kb8", "mb1")},
    gpu_micro_batches=64,
    gpu_frame_mib=16,
)
QUICK = Plan(
    seconds=0.25,
    rounds={"raw_tcp": 2, "tensorlink": 2, "libp2p": 1, "fallback": 1},
    tput={"raw_tcp": ALL, "tensorlink": ALL, "libp2p": ALL, "fallback": ("kb8", "mb1")},
    rtt={"raw_tcp": ALL, "tensorlink": ALL, "libp2p": ("kb8", "mb1"), "fallback": ("kb8", "mb1")},
    gpu_micro_batches=16,
    gpu_frame_mib=16,
)


# --- shared helpers ----------------------------------------------------------------------------------------


def pin_to_cpu(cpu: int | None) -> None:
    """Pin every thread of this process (and so every later one) to one CPU."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass
    os.sched_setaffinity(0, {cpu})


def machine() -> str:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.machine()} {model}, {os.cpu_count()} CPUs{gpu}".strip()


def payload(size: int) -> torch.Tensor:
    return torch.randn(size // 4)


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def quiet_logs() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("tensorlink").setLevel(logging.WARNING)


def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError(f"connection closed after {got} of {len(view)} bytes")
        got += n


async def stream_read_into(stream: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        chunk = await stream.read(len(view) - got)
        if not chunk:
            raise StreamError(f"stream ended after {got} of {len(view)} bytes")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)


async def stream_write(stream: Any, view: memoryview) -> None:
    for start in range(0, len(view), PIECE):
        await stream.write(bytes(view[start : start + PIECE]))


# --- the peer process ----------------------------------------------------------------------------------------


def raw_peer(listener: socket.socket) -> None:
    """Raw TCP: commands on each accepted connection, one connection at a time."""
    buf = bytearray(0)
    for _ in range(MAX_CONNECTIONS):
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(IO_TIMEOUT_S)
            header = bytearray(COMMAND.size)
            try:
                for _ in range(MAX_COMMANDS):
                    recv_exactly_into(conn, memoryview(header))
                    op, size, count = COMMAND.unpack(header)
                    if len(buf) < size:
                        buf = bytearray(size)
                    view = memoryview(buf)[:size]
                    for _ in range(count):
                        recv_exactly_into(conn, view)
                        if op == ECHO:
                            conn.sendall(view)
                    if op == SINK:
                        conn.sendall(ACK)
            except (EOFError, OSError):
                continue  # the driver closed this connection


async def libp2p_peer(stream: Any) -> None:
    buf = bytearray(0)
    try:
        for _ in range(MAX_COMMANDS):
            op, size, count = COMMAND.unpack(await read_exactly(stream, COMMAND.size))
            if len(buf) < size:
                buf = bytearray(size)
            view = memoryview(buf)[:size]
            for _ in range(count):
                await stream_read_into(stream, view)
                if op == ECHO:
                    await stream_write(stream, view)
            if op == SINK:
                await stream.write(ACK)
    except Exception:
        pass  # the driver closed or reset the stream
    finally:
        try:
            await stream.close()
        except Exception:
            pass


async def serve_async(raw_port: int, data_dir: Path) -> None:
    host = make_host(load_or_create_identity(data_dir))
    async with host.run([LOOPBACK]), trio.open_nursery() as nursery:
        host.set_stream_handler(TProtocol(BENCH_TRANSPORT_PROTOCOL), libp2p_peer)
        service = ChannelService(PeerHost(host), TransportConfig(direct=True))
        await nursery.start(service.serve)
        addr = str(host.get_addrs()[0])
        if "/p2p/" not in addr:
            addr = f"{addr}/p2p/{host.get_id()}"
        print(json.dumps({"raw_port": raw_port, "addr": addr, "peer": host.get_id().to_base58()}), flush=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads the pipe any more: never block on it
        for _ in range(MAX_CONNECTIONS):
            nursery.start_soon(channel_peer, await service.accept())
        await trio.sleep_forever()


def serve(cpu: int | None, data_dir: Path) -> None:
    pin_to_cpu(cpu)
    torch.set_num_threads(1)
    quiet_logs()

    def exit_on_eof() -> None:
        sys.stdin.buffer.read()  # the driver closed our stdin (or died): stop at once
        os._exit(0)

    threading.Thread(target=exit_on_eof, daemon=True).start()
    watchdog = threading.Timer(PEER_LIFETIME_S, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_peer, args=(listener,), daemon=True).start()
    trio.run(serve_async, listener.getsockname()[1], data_dir)


class Peer:
    """The peer process: started, read for its addresses, always terminated."""

    def __init__(self, cpu: int | None, data_dir: Path) -> None:
        self.log = tempfile.TemporaryFile()
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", "--data-dir", str(data_dir)]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        try:
            self.info = self._read_info()
        except BaseException:
            self.proc.kill()  # not serving yet: it would notice the closed stdin only after its imports
            self.close()
            raise

    def _read_info(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + PEER_START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"the peer process did not start:\n{self.stderr_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"the peer process exited:\n{self.stderr_tail()}")
                line += chunk
        return json.loads(line)

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the peer exits on EOF
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=5)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.log.close()


# --- the driver's side of each transport -------------------------------------------------------------------
# sink(x, count) -> seconds from the first send to the ack; echo(x, count) -> seconds of each round trip.


class RawTcp:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(0)

    def _sink(self, x: torch.Tensor, count: int) -> float:
        view = byte_view(x)
        ack = bytearray(1)
        self.sock.sendall(COMMAND.pack(SINK, len(view), count))
        start = time.perf_counter()
        for _ in range(count):
            self.sock.sendall(view)
        recv_exactly_into(self.sock, memoryview(ack))
        return time.perf_counter() - start

    def _echo(self, x: torch.Tensor, count: int) -> list[float]:
        view = byte_view(x)
        if len(self.buf) < len(view):
            self.buf = bytearray(len(view))
        back = memoryview(self.buf)[: len(view)]
        self.sock.sendall(COMMAND.pack(ECHO, len(view), count))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.sock.sendall(view)
            recv_exactly_into(self.sock, back)
            times.append(time.perf_counter() - start)
        return times

    # Blocking I/O in a worker thread; the timing runs inside it, so the thread hop is not measured.
    # Cancelling abandons the thread; closing the socket then ends it.
    async def sink(self, x: torch.Tensor, count: int) -> float:
        return await trio.to_thread.run_sync(self._sink, x, count, abandon_on_cancel=True)

    async def echo(self, x: torch.Tensor, count: int) -> list[float]:
        return await trio.to_thread.run_sync(self._echo, x, count, abandon_on_cancel=True)

    async def aclose(self) -> None:
        self.sock.close()


class Libp2pStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray(0)

    async def sink(self, x: torch.Tensor, count: int) -> float:
        view = byte_view(x)
        await self.stream.write(COMMAND.pack(SINK, len(view), count))
        start = time.perf_counter()
        for _ in range(count):
            await stream_write(self.stream, view)
        await read_exactly(self.stream, 1)
        return time.perf_counter() - start

    async def echo(self, x: torch.Tensor, count: int) -> list[float]:
        view = byte_view(x)
        if len(self.buf) < len(view):
            self.buf = bytearray(len(view))
        back = memoryview(self.buf)[: len(view)]
        await self.stream.write(COMMAND.pack(ECHO, len(view), count))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await stream_write(self.stream, view)
            await stream_read_into(self.stream, back)
            times.append(time.perf_counter() - start)
        return times

    async def aclose(self) -> None:
        try:
            await self.stream.close()
        except Exception:
            pass


class ChannelLink:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def sink(self, x: torch.Tensor, count: int) -> float:
        await self.channel.send(command_tensor(SINK, x.nbytes, count))
        start = time.perf_counter()
        for _ in range(count):
            await self.channel.send(x)
        await self.channel.recv()
        return time.perf_counter() - start

    async def echo(self, x: torch.Tensor, count: int) -> list[float]:
        await self.channel.send(command_tensor(ECHO, x.nbytes, count))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await self.channel.send(x)
            frame = await self.channel.recv()
            times.append(time.perf_counter() - start)
            del frame
        return times

    async def aclose(self) -> None:
        await self.channel.aclose()


# --- measuring -------------------------------------------------------------------------------------------------


class Bench:
    """Measures every (transport, size) of the plan. For each size and kind (throughput, RTT) the transports
    are calibrated once, then measured in alternating rounds, so raw TCP and the data plane see the same
    moments of a noisy machine; the best round counts (highest MB/s, lowest median RTT)."""

    def __init__(self, plan: Plan, links: dict[str, Any], progress: Progress) -> None:
        self.plan = plan
        self.links = links
        self.progress = progress
        self.results: dict[str, Any] = {}
        self.tensors = {name: payload(size) for name, size in SIZES.items()}
        self.task = progress.add_task("starting", total=sum(n for _, _, n in self._cases("tput") + self._cases("rtt")))

    def _cases(self, kind: str) -> list[tuple[str, str, int]]:
        sizes = self.plan.tput if kind == "tput" else self.plan.rtt
        return [(t, s, self.plan.rounds[t]) for s in SIZES for t in self.links if s in sizes.get(t, ())]

    async def run(self) -> None:
        for kind in ("tput", "rtt"):
            for size in SIZES:
                cases = [(t, rounds) for t, s, rounds in self._cases(kind) if s == size]
                counts: dict[str, int] = {}
                for name, _ in cases:
                    self.progress.update(self.task, description=f"{name}: {SIZE_LABELS[size]} {kind} warm-up")
                    with trio.fail_after(STEP_TIMEOUT_S):
                        counts[name] = await self._calibrate(kind, name, size)
                for r in range(max((rounds for _, rounds in cases), default=0)):
                    for name, rounds in cases:
                        if r >= rounds:
                            continue
                        self.progress.update(self.task, description=f"{name}: {SIZE_LABELS[size]} {kind} #{r + 1}")
                        with trio.fail_after(STEP_TIMEOUT_S):
                            await self._measure(kind, name, size, counts[name])
                        self.progress.advance(self.task)

    async def _calibrate(self, kind: str, name: str, size: str) -> int:
        """Warm up and pick the count that makes one measurement last about plan.seconds."""
        link, x = self.links[name], self.tensors[size]
        if kind == "tput":
            per_frame = await link.sink(x, TPUT_WARMUP[size]) / TPUT_WARMUP[size]
            lo, hi = TPUT_BOUNDS[size]
        else:
            per_frame = statistics.median(await link.echo(x, RTT_WARMUP[size]))
            lo, hi = RTT_BOUNDS[size]
        return max(lo, min(hi, math.ceil(self.plan.seconds / max(per_frame, 1e-9))))

    async def _measure(self, kind: str, name: str, size: str, count: int) -> None:
        link, x, r = self.links[name], self.tensors[size], self.results
        if kind == "tput":
            mbps = round(count * x.nbytes / await link.sink(x, count) / 1e6, 1)
            r.setdefault(f"{name}_{size}_mbps_rounds", []).append(mbps)
            r[f"{name}_{size}_mbps"] = max(r[f"{name}_{size}_mbps_rounds"])
            r[f"{name}_{size}_frames"] = count
        else:
            rtt_us = round(statistics.median(await link.echo(x, count)) * 1e6, 1)
            r.setdefault(f"{name}_{size}_rtt_us_rounds", []).append(rtt_us)
            r[f"{name}_{size}_rtt_us"] = min(r[f"{name}_{size}_rtt_us_rounds"])
            r[f"{name}_{size}_pings"] = count


async def open_channel(nursery: trio.Nursery, host: Any, peer: str, *, direct: bool, cipher: str) -> Channel:
    # A second service on the same host re-registers the set-up protocol's handler; this side only opens.
    service = ChannelService(PeerHost(host), TransportConfig(direct=direct, cipher=cipher))  # type: ignore[arg-type]
    await nursery.start(service.serve)
    with trio.fail_after(30):
        channel = await service.open(peer, JOB)
    expected = "direct" if direct else "libp2p"
    if channel.kind != expected:
        raise RuntimeError(f"expected a {expected} channel, got {channel.kind} ({channel.path})")
    return channel


async def drive(plan: Plan, info: dict[str, Any], progress: Progress) -> dict[str, Any]:
    raw = RawTcp(info["raw_port"])
    try:
        with tempfile.TemporaryDirectory(prefix="tl-bench-driver-") as tmp:
            host = make_host(load_or_create_identity(Path(tmp)))
            async with host.run([LOOPBACK]), trio.open_nursery() as nursery:
                with trio.fail_after(30):
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(info["addr"])))
                    stream = await host.new_stream(ID.from_base58(info["peer"]), [TProtocol(BENCH_TRANSPORT_PROTOCOL)])
                peer = info["peer"]
                direct = ChannelLink(await open_channel(nursery, host, peer, direct=True, cipher=plan.cipher))
                fallback = ChannelLink(await open_channel(nursery, host, peer, direct=False, cipher=plan.cipher))
                links = {"raw_tcp": raw, "tensorlink": direct, "libp2p": Libp2pStream(stream), "fallback": fallback}
                bench = Bench(plan, links, progress)
                await bench.run()
                progress.update(bench.task, description="GPU overlap")
                bench.results.update(await gpu_overlap(direct, plan))
                nursery.cancel_scope.cancel()  # closes the channels; the peer's handlers end
    finally:
        await raw.aclose()
    return bench.results


async def interruptible(plan: Plan, info: dict[str, Any], progress: Progress) -> dict[str, Any] | None:
    """drive(), stopped cleanly by Ctrl-C or SIGTERM (a KeyboardInterrupt raised wherever the signal lands
    would come out of py-libp2p's nurseries wrapped in exception groups). None when interrupted."""
    result: dict[str, Any] | None = None

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        result = await drive(plan, info, progress)
        nursery.cancel_scope.cancel()
    return result


# --- GPU: transfer hidden behind compute -----------------------------------------------------------------------


async def gpu_overlap(link: ChannelLink, plan: Plan) -> dict[str, Any]:
    """The same measurement as benchmarks/gpu_overlap.py, on this run's ChannelService channel."""
    return await measure_overlap(link.channel, plan.gpu_micro_batches, plan.gpu_frame_mib)


# --- reporting -------------------------------------------------------------------------------------------------


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: str, b: str, digits: int = 3) -> float | None:
        if r.get(a) is None or not r.get(b):
            return None
        return round(r[a] / r[b], digits)

    out: dict[str, Any] = {
        "mb64_vs_raw_tcp": ratio("tensorlink_mb64_mbps", "raw_tcp_mb64_mbps"),
        "kb8_rtt_vs_raw_tcp": ratio("tensorlink_kb8_rtt_us", "raw_tcp_kb8_rtt_us"),
        "libp2p_mb64_vs_raw_tcp": ratio("libp2p_mb64_mbps", "raw_tcp_mb64_mbps"),
        "mb64_vs_libp2p": ratio("tensorlink_mb64_mbps", "libp2p_mb64_mbps", 1),
    }
    for t in ("tensorlink", "libp2p", "fallback"):
        for s in SIZES:
            prefix = "" if t == "tensorlink" else f"{t}_"
            out.setdefault(f"{prefix}{s}_vs_raw_tcp", ratio(f"{t}_{s}_mbps", f"raw_tcp_{s}_mbps"))
            out.setdefault(f"{prefix}{s}_rtt_vs_raw_tcp", ratio(f"{t}_{s}_rtt_us", f"raw_tcp_{s}_rtt_us"))
    return {k: v for k, v in out.items() if v is not None}


TARGETS = [
    ("mb64_vs_raw_tcp", "≥", 0.6, "TensorLink 64 MiB throughput / raw TCP"),
    ("kb8_rtt_vs_raw_tcp", "≤", 2.0, "TensorLink 8 KiB round trip / raw TCP"),
    ("libp2p_mb64_vs_raw_tcp", "", None, "py-libp2p stream 64 MiB throughput / raw TCP (≈ 0.07 expected)"),
    ("gpu_overlap", "≥", 0.8, "transfer time hidden behind GPU compute"),
]


def print_table(r: dict[str, Any], console: Console) -> None:
    rounds = r["rounds"]
    table = Table(
        title=f"Tensor frames between two processes on 127.0.0.1 ({r['machine']}; "
        f"{'pinned to CPUs ' + ' and '.join(map(str, r['cpus'])) if r['pinned'] else 'not pinned'}; best of "
        f"{rounds['raw_tcp']} rounds for raw TCP and TensorLink direct, {rounds['libp2p']} for the libp2p rows; "
        f"direct channel cipher {r['cipher']})"
    )
    columns = ("transport", "frame", "MB/s", "vs raw TCP", "frames", "RTT µs (median)", "vs raw TCP", "pings")
    for column in columns:
        table.add_column(column, justify="left" if column in ("transport", "frame") else "right")
    for t, label in TRANSPORTS.items():
        for s, size_label in SIZE_LABELS.items():
            mbps, rtt = r.get(f"{t}_{s}_mbps"), r.get(f"{t}_{s}_rtt_us")
            if mbps is None and rtt is None:
                continue
            raw_mbps, raw_rtt = r.get(f"raw_tcp_{s}_mbps"), r.get(f"raw_tcp_{s}_rtt_us")
            table.add_row(
                label,
                size_label,
                "" if mbps is None else f"{mbps:,.0f}",
                "" if mbps is None or not raw_mbps or t == "raw_tcp" else f"{mbps / raw_mbps:.2f}×",
                "" if mbps is None else str(r[f"{t}_{s}_frames"]),
                "" if rtt is None else f"{rtt:,.0f}",
                "" if rtt is None or not raw_rtt or t == "raw_tcp" else f"{rtt / raw_rtt:.2f}×",
                "" if rtt is None else str(r[f"{t}_{s}_pings"]),
            )
        table.add_section()
    console.print(table)
    console.print("An empty cell was not measured in this plan (a libp2p 64 MiB ping-pong takes seconds).")
    for key, op, target, text in TARGETS:
        value = r.get(key)
        if value is None:
            reason = r.get(f"{key}_reason", "not measured")
            console.print(f"{key} = n/a: {reason} ({text}; target {op} {target})")
            continue
        if target is None:
            console.print(f"{key} = {value:.3f} ({text})")
            continue
        met = value >= target if op == "≥" else value <= target
        mark = "[green]met[/]" if met else "[red]missed[/]"
        console.print(f"{key} = {value:.3f} (target {op} {target}) {mark}  {text}")
    if r.get("gpu_overlap") is not None:
        console.print(
            f"GPU: {r['gpu_micro_batches']} micro-batches of {r['gpu_frame_mib']} MiB, "
            f"{r['gpu_matmuls_per_stage']} matmuls each: compute {r['gpu_compute_s']} s, transfer "
            f"{r['gpu_transfer_s']} s, both {r['gpu_both_s']} s"
        )
    console.print(
        f"TensorLink 64 MiB is {r.get('mb64_vs_libp2p', 'n/a')}× the py-libp2p stream; run took {r['wall_s']} s; "
        f"load average {r['loadavg_before']} before, {r['loadavg_after']} after"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="a smaller, shorter run (smoke tests)")
    parser.add_argument("--seconds", type=float, help="target seconds per measurement (default 1.0; --quick 0.25)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the two processes to CPUs 0 and 1")
    parser.add_argument(
        "--cipher",
        choices=["aes-128-gcm", "aes-256-gcm"],
        default="aes-128-gcm",
        help="AEAD of the direct channel (default: aes-128-gcm, the data plane's default)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the peer process's role
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.cpu, args.data_dir)
        return

    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if not 0 < args.seconds <= 10:
            parser.error("--seconds must be in (0, 10]")
        plan = dataclasses.replace(plan, seconds=args.seconds)
    plan = dataclasses.replace(plan, cipher=args.cipher)
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    cpus = sorted(os.sched_getaffinity(0))[:2] if pin else [None, None]
    pin_to_cpu(cpus[0])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    quiet_logs()

    started = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="tl-bench-peer-") as peer_dir:
        peer = Peer(cpus[1], Path(peer_dir) / "identity")
        try:
            with Progress(console=Console(stderr=True), transient=True, disable=args.json) as progress:
                measured = trio.run(interruptible, plan, peer.info, progress)
            if measured is None:
                raise KeyboardInterrupt
        except BaseException:
            if peer.proc.poll() is not None:
                print(f"the peer process exited:\n{peer.stderr_tail()}", file=sys.stderr)
            raise
        finally:
            peer.close()
    result: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "pinned": pin,
        "cpus": cpus if pin else None,
        "seconds_per_measurement": plan.seconds,
        "rounds": plan.rounds,
        "torch": torch.__version__,
        "cipher": plan.cipher,
        **ratios(measured),
        **measured,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": round(os.getloadavg()[0], 2),
    }
    result.setdefault("gpu_overlap", None)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, Console(width=max(Console().width, 130)))


if __name__ == "__main__":
    main()
