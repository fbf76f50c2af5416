"""Run inside a private network namespace by test_netns_dead_peer.py: two hosts with a direct data-plane
channel on the namespace's own loopback; then every packet of the channel's TCP connection is dropped
(iptables, in this namespace only), as if the peer had lost power. Prints one JSON line: how long the
receive took to fail and why."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.transport import ChannelError, ChannelService, TransportConfig

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        a = make_host(load_or_create_identity(Path(tmp) / "a"))
        b = make_host(load_or_create_identity(Path(tmp) / "b"))
        async with a.run([LOOPBACK]), b.run([LOOPBACK]), trio.open_nursery() as nursery:
            sa, sb = ChannelService(PeerHost(a), TransportConfig()), ChannelService(PeerHost(b), TransportConfig())
            await nursery.start(sa.serve)
            await nursery.start(sb.serve)
            await a.connect(info_from_p2p_addr(multiaddr.Multiaddr(f"{b.get_addrs()[0]}/p2p/{b.get_id()}")))
            with trio.fail_after(20):
                channel = await sa.open(b.get_id().to_base58())
                await sb.accept()
            assert channel.kind == "direct", channel.kind
            port = sb.data_port
            for chain, flag in (("INPUT", "--dport"), ("INPUT", "--sport")):
                subprocess.run(["iptables", "-A", chain, "-p", "tcp", flag, str(port), "-j", "DROP"], check=True)
            started = time.monotonic()
            outcome: dict[str, object] = {}
            with trio.move_on_after(90):
                try:
                    await channel.recv()
                    outcome = {"error": None}
                except ChannelError as exc:
                    outcome = {"error": exc.reason}
            outcome["seconds"] = round(time.monotonic() - started, 1)
            nursery.cancel_scope.cancel()
    return outcome


if __name__ == "__main__":
    print(json.dumps(trio.run(main)), flush=True)
    sys.exit(0)
