"""One TensorLink peer for the NAT tests, run as its own process (inside a network namespace).

    python tests/netns/peer.py --listen /ip4/10.77.1.2/tcp/4001 [--relay]

Builds a host with make_host, serves dial-back, relay v2 (hop with --relay) and DCUtR, and an echo
protocol for carrying test data. It prints one JSON line ``{"event": "ready", ...}`` on stdout, then
answers JSON commands read line by line on stdin, one JSON reply line each (same ``id``):

    connect {addr}            direct or relayed dial to a full multiaddr
    check {servers}           dial-back reachability check against those peers
    reserve {relay}           reserve a slot on the relay at that multiaddr
    dial {addr, size}         dial (e.g. a circuit address), then echo ``size`` bytes
    echo {peer, size}         echo ``size`` random bytes on a new stream, report the connection it used
    wait_direct {peer, timeout}
    wait_peer {peer, timeout} wait until connected to that peer
    attempts {peer}           DCUtR attempts made so far and whether one is running
    quit

The data plane (tensorlink.transport, imported on first use so the other commands start as before):

    channel_serve                          start a ChannelService (direct=True) on the --listen IP
    channel_open {peer, job, dial?}        open a channel to a peer (job: 32 hex digits); with ``dial``,
                                           dial that address (e.g. a circuit address) first
    channel_accept {timeout}               the next channel a peer opened here
    channel_exchange {channel, send, expect, timeout}
                                           on one channel at once: send the tensors ``send`` describes
                                           and receive ``len(expect)`` frames, each compared with
                                           torch.equal to the tensor its ``expect`` entry describes
    channel_status                         ChannelService.status()

A tensor is described by ``{"dtype", "shape", "seed"}`` (optionally ``"transposed": true``, sent as a
non-contiguous view) and built by ``make_tensor`` the same way in every peer, so a receiver checks what
arrived without the sender shipping a copy; SHA-256 digests of both ends are reported as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import multiaddr
import trio

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.reachability import DialBackConfig, open_dial_back
from tensorlink.p2p.relay import NatTraversal, RelayPolicy, connection_addrs, connection_kind, open_nat_traversal

ECHO = "/tensorlink-test/echo/1.0.0"
MAX_ECHO = 4 << 20


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def echo_handler(stream: Any) -> None:
    try:
        with trio.fail_after(20):
            size = int.from_bytes(await read_exactly(stream, 4), "big")
            if size > MAX_ECHO:
                await stream.reset()
                return
            await stream.write(await read_exactly(stream, size))
            await stream.close()
    except Exception:
        try:
            await stream.reset()
        except Exception:
            pass


def make_tensor(spec: dict[str, Any]) -> Any:
    """The deterministic tensor ``spec`` describes (the same bytes in every process)."""
    import torch

    dtype = getattr(torch, spec["dtype"])
    shape = [int(n) for n in spec["shape"]]
    numel = 1
    for n in shape:
        numel *= n
    base = (torch.arange(numel, dtype=torch.int64) * 40503 + int(spec.get("seed", 0)) * 977) % 65521
    if dtype is torch.bool:
        values = base % 3 == 0
    elif dtype.is_floating_point:
        values = (base.to(torch.float64) / 13.0 - 2520.0).to(dtype)
    elif dtype in (torch.uint8, torch.int8):
        values = (base % 251 - (0 if dtype is torch.uint8 else 125)).to(dtype)
    else:
        values = (base - 32760).to(dtype)
    tensor = values.reshape(shape)
    if spec.get("transposed"):
        tensor = tensor.reshape(shape[::-1]).t()  # the same shape, as a non-contiguous view
    return tensor


def digest(tensor: Any) -> str:
    """SHA-256 of the tensor's bytes in row-major order."""
    import torch

    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class Channels:
    """The data-plane commands: one ChannelService on this host and the channels it opened or accepted."""

    def __init__(self, host: Any, listen_ip: str, nursery: trio.Nursery) -> None:
        self.host = host
        self.listen_ip = listen_ip
        self.nursery = nursery
        self.service: Any = None
        self.channels: dict[int, Any] = {}
        self.log: list[str] = []  # what the service logged: why each channel is direct or not

    def _record(self) -> None:
        logs = self.log

        class Recorder(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                logs.append(record.getMessage())

        logging.getLogger("tensorlink.transport.service").addHandler(Recorder(logging.INFO))

    def _describe(self, channel: Any, key: int, started: float, logged: int) -> dict[str, Any]:
        return {
            "channel": key,
            "kind": channel.kind,
            "path": channel.path,
            "peer": channel.peer,
            "job": channel.job.hex(),
            "ms": round((time.monotonic() - started) * 1000, 1),
            "log": [line for line in self.log[logged:] if channel.peer in line],
        }

    def _keep(self, channel: Any) -> int:
        key = len(self.channels) + 1
        self.channels[key] = channel
        return key

    async def serve(self) -> dict[str, Any]:
        from tensorlink.transport import ChannelService, TransportConfig

        if self.service is None:
            self._record()
            service = ChannelService(PeerHost(self.host), TransportConfig(listen_ip=self.listen_ip, direct=True))
            await self.nursery.start(service.serve)
            self.service = service
        return {"data_port": self.service.data_port, "data_addrs": self.service.data_addrs()}

    async def open(self, peer: str, job: str, dial: NatTraversal | None = None, addr: str = "") -> dict[str, Any]:
        """Open a channel to ``peer``; with ``dial`` and ``addr``, dial that address first, in the same task
        (a circuit address: the channel's stream then goes on the relayed connection, before DCUtR can
        replace it, which needs a few round trips through the relay)."""
        logged = len(self.log)
        connection = None
        if dial is not None and addr:
            if await dial.dial(addr) != peer:
                raise ValueError(f"{addr} is not an address of {peer}")
            connection = connection_kind(self.host, peer)
        started = time.monotonic()
        with trio.fail_after(30):  # the service bounds set-up itself (setup_timeout_s); this bounds the rest
            channel = await self.service.open(peer, bytes.fromhex(job))
        return self._describe(channel, self._keep(channel), started, logged) | {"connection": connection}

    async def accept(self, timeout: float) -> dict[str, Any]:
        logged = len(self.log)
        started = time.monotonic()
        with trio.fail_after(timeout):
            channel = await self.service.accept()
        return self._describe(channel, self._keep(channel), started, logged)

    async def exchange(
        self, key: int, send: list[dict[str, Any]], expect: list[dict[str, Any]], timeout: float
    ) -> dict[str, Any]:
        """Send ``send`` and receive ``len(expect)`` frames at the same time on one channel."""
        import torch

        from tensorlink.wire.frame import Route

        channel = self.channels[key]
        sent: list[dict[str, Any]] = []
        received: list[dict[str, Any]] = []
        times: dict[str, float] = {}

        async def sender() -> None:
            started = time.monotonic()
            for i, spec in enumerate(send):
                tensor = make_tensor(spec)
                route = Route(channel.job, step=int(spec.get("seed", 0)), micro_batch=i, stage=1)
                t0 = time.monotonic()
                await channel.send(tensor, route)
                ms = round((time.monotonic() - t0) * 1000, 1)
                sent.append({"sha256": digest(tensor), "bytes": tensor.numel() * tensor.element_size(), "ms": ms})
            times["send_ms"] = round((time.monotonic() - started) * 1000, 1)

        async def receiver() -> None:
            started = time.monotonic()
            for i, spec in enumerate(expect):
                t0 = time.monotonic()
                tensor, route = await channel.recv()
                ms = round((time.monotonic() - t0) * 1000, 1)
                want = make_tensor(spec)
                same = tensor.dtype == want.dtype and tensor.shape == want.shape and torch.equal(tensor, want)
                where = (route.job, route.step, route.micro_batch, route.stage)
                received.append(
                    {
                        "equal": same,
                        "dtype": str(tensor.dtype).removeprefix("torch."),
                        "shape": list(tensor.shape),
                        "sha256": digest(tensor),
                        "route_ok": where == (channel.job, int(spec.get("seed", 0)), i, 1),
                        "ms": ms,
                    }
                )
                del tensor  # its pool buffer goes back
            times["recv_ms"] = round((time.monotonic() - started) * 1000, 1)

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)
        return {"sent": sent, "received": received, **times}

    def status(self) -> dict[str, Any]:
        return {"channels": self.service.status() if self.service is not None else []}


def peer_object(host: Any, peer: str) -> Any:
    """The libp2p ID of a connected peer, found without importing libp2p here."""
    for pid in host.get_connected_peers():
        if pid.to_base58() == peer:
            return pid
    raise LookupError(f"not connected to {peer}")


async def echo(host: Any, peer: str, size: int) -> dict[str, Any]:
    payload = os.urandom(size)
    started = time.monotonic()
    with trio.fail_after(20):
        stream = await host.new_stream(peer_object(host, peer), [ECHO])
        conn_addrs = [str(a) for a in stream.muxed_conn.get_transport_addresses()]
        await stream.write(size.to_bytes(4, "big") + payload)
        back = await read_exactly(stream, size)
        await stream.close()
    return {
        "ok": back == payload,
        "ms": round((time.monotonic() - started) * 1000, 1),
        "stream_conn": conn_addrs,
        "kind": connection_kind(host, peer),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--relay", action="store_true")
    parser.add_argument("--psk", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    libp2p_log = logging.getLogger("libp2p")  # import libp2p detaches it from the root logger
    libp2p_log.handlers.clear()
    libp2p_log.propagate = True
    logging.getLogger("libp2p.relay.circuit_v2.dcutr").setLevel(logging.INFO)
    data_dir = Path(tempfile.mkdtemp(prefix="tl-peer-"))
    host = make_host(load_or_create_identity(data_dir), psk_hex=args.psk)
    async with host.run([multiaddr.Multiaddr(args.listen)]):
        host.set_stream_handler(ECHO, echo_handler)
        config = DialBackConfig(dial_timeout_s=3.0, request_timeout_s=8.0)
        async with (
            open_dial_back(host, psk_hex=args.psk, config=config) as dial_back,
            open_nat_traversal(host, relay=args.relay, policy=RelayPolicy(reservation_ttl_s=60)) as nat,
        ):
            me = host.get_id().to_base58()
            emit(
                {
                    "event": "ready",
                    "peer_id": me,
                    "addrs": [f"{str(a).split('/p2p/')[0]}/p2p/{me}" for a in host.get_addrs()],
                }
            )
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buffer = b""
            async with trio.open_nursery() as nursery:
                channels = Channels(host, args.listen.split("/")[2], nursery)

                async def handle(cmd: dict[str, Any]) -> None:
                    reply: dict[str, Any] = {"id": cmd.get("id")}
                    try:
                        reply.update(await run_command(cmd))
                    except Exception as exc:
                        reply["error"] = f"{type(exc).__name__}: {exc}"
                        reply["trace"] = traceback.format_exc(limit=4)
                    emit(reply)
                    if cmd.get("cmd") == "quit":
                        nursery.cancel_scope.cancel()

                async def run_command(cmd: dict[str, Any]) -> dict[str, Any]:
                    op = cmd["cmd"]
                    if op == "connect":
                        return {"peer": await nat.dial(cmd["addr"])}
                    if op == "wait_peer":
                        with trio.fail_after(float(cmd.get("timeout", 10))):
                            while connection_kind(host, cmd["peer"]) is None:
                                await trio.sleep(0.05)
                        return {"kind": connection_kind(host, cmd["peer"])}
                    if op == "check":
                        report = await dial_back.check(cmd["servers"])
                        return {
                            "status": report.status.value,
                            "results": [r.__dict__ | {"dialed": list(r.dialed)} for r in report.results],
                        }
                    if op == "reserve":
                        reservation = await nat.reserve(cmd["relay"])
                        return {"circuit_addrs": list(reservation.circuit_addrs), "expires_at": reservation.expires_at}
                    if op == "dial":
                        peer = await nat.dial(cmd["addr"])
                        kind = connection_kind(host, peer)
                        return {"peer": peer, "kind": kind, "echo": await echo(host, peer, int(cmd.get("size", 65536)))}
                    if op == "echo":
                        return await echo(host, cmd["peer"], int(cmd.get("size", 65536)))
                    if op == "wait_direct":
                        direct = await nat.wait_direct(cmd["peer"], float(cmd["timeout"]))
                        return {
                            "direct": direct,
                            "kind": connection_kind(host, cmd["peer"]),
                            "addrs": connection_addrs(host, cmd["peer"]),
                        }
                    if op == "attempts":
                        attempts, running = nat.hole_punch_attempts(cmd["peer"])
                        return {"attempts": attempts, "running": running, "kind": connection_kind(host, cmd["peer"])}
                    if op == "kind":
                        return {
                            "kind": connection_kind(host, cmd["peer"]),
                            "addrs": connection_addrs(host, cmd["peer"]),
                        }
                    if op == "channel_serve":
                        return await channels.serve()
                    if op == "channel_open":
                        return await channels.open(cmd["peer"], cmd["job"], nat, cmd.get("dial", ""))
                    if op == "channel_accept":
                        return await channels.accept(float(cmd.get("timeout", 20)))
                    if op == "channel_exchange":
                        return await channels.exchange(
                            int(cmd["channel"]), cmd["send"], cmd["expect"], float(cmd.get("timeout", 30))
                        )
                    if op == "channel_status":
                        return channels.status()
                    if op == "quit":
                        return {"bye": True}
                    raise ValueError(f"unknown command {op!r}")

                while True:
                    chunk = await stdin.receive_some(65536)
                    if not chunk:
                        nursery.cancel_scope.cancel()
                        break
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            nursery.start_soon(handle, json.loads(line))


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    os._exit(0)  # skip libp2p's slow, noisy interpreter teardown
