"""A node process serves data-plane channels, and its status endpoint says how each one travels.

The peer on the other side is a libp2p host with a ChannelService in this test process. A worker admits
channels only for jobs a validator assigned it (tests/pipeline run real jobs); a validator runs no stages
and admits any authenticated peer, which is enough to see the set-up (keys over libp2p, then a sealed TCP
connection to the node's data port, or the libp2p stream when direct channels are off) and the status
the operator sees.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import multiaddr
import pytest
import torch
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nodes import NodeProcess

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.transport import ChannelRefused, ChannelService, TransportConfig

pytestmark = [pytest.mark.swarm]
JOB = bytes(range(16))


async def open_channel_to(node: NodeProcess) -> tuple[str, str, dict[str, object]]:
    """Open a channel to the node and send a tensor on it (no stage reads it); (kind, path) seen here and
    the node's view of the channel, or ("refused", the refusal, {}) when the node turns it down."""
    with tempfile.TemporaryDirectory() as tmp:
        host = make_host(load_or_create_identity(Path(tmp)))
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
            service = ChannelService(PeerHost(host), TransportConfig())
            await nursery.start(service.serve)
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addr)))
            try:
                with trio.fail_after(15):
                    channel = await service.open(node.peer_id, JOB)
            except ChannelRefused as exc:
                nursery.cancel_scope.cancel()
                return "refused", str(exc), {}
                await channel.send(torch.arange(1000, dtype=torch.float32))
                assert channel.stats()["frames_sent"] == 1
            me = host.get_id().to_base58()
            seen: dict[str, object] = {}
            with trio.fail_after(10):
                while not seen:
                    views = await trio.to_thread.run_sync(lambda: node.status()["data_plane"]["channels"])
                    seen = next((v for v in views if v["peer"] == me), {})
                    await trio.sleep(0.1)
            kind, path = channel.kind, channel.path
            await channel.aclose()
            nursery.cancel_scope.cancel()
    return kind, path, seen


def test_status_shows_a_direct_channel(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("validator", "--role", "validator")
    status = node.status()["data_plane"]
    assert status["direct"] is True and status["port"], status
    assert any(a.endswith(f"/tcp/{status['port']}") for a in status["addrs"]), status
    assert "data plane:   tcp port" in node.output
    kind, path, seen = trio.run(open_channel_to, node)
    assert (kind, path) == ("direct", "tcp")
    assert seen["kind"] == "direct" and seen["job"] == JOB.hex(), seen
    assert seen["closed"] is None, seen
    assert node.stop() < 2.0
    assert "Traceback" not in node.output, node.output[-5000:]


def test_status_shows_the_libp2p_fallback(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("validator", "--role", "validator", "--no-direct-channels")
    assert node.status()["data_plane"]["direct"] is False
    assert "libp2p streams only" in node.output
    kind, path, seen = trio.run(open_channel_to, node)
    assert (kind, path) == ("libp2p", "direct")  # the stream runs on a direct (not relayed) libp2p connection
    assert seen["kind"] == "libp2p" and seen["path"] == "direct", seen
    assert node.stop() < 2.0
    assert "Traceback" not in node.output, node.output[-5000:]


def test_worker_refuses_channels_of_jobs_it_was_not_assigned(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("worker")

    kind, refusal, _ = trio.run(open_channel_to, node)
    assert kind == "refused" and "not_admitted" in refusal, refusal
    assert node.status()["data_plane"]["channels"] == []
    assert node.stop() < 2.0
    assert "Traceback" not in node.output, node.output[-5000:]
