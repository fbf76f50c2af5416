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
"""

from __future__ import annotations

import argparse
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
from tensorlink.p2p.reachability import DialBackConfig, open_dial_back
from tensorlink.p2p.relay import RelayPolicy, connection_addrs, connection_kind, open_nat_traversal

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
