"""Bad input from the network is dropped and logged; the node stays up and keeps serving.

A real node process is attacked by a libp2p host in this test process: garbage, oversized length
prefixes and half-written messages on every protocol the node speaks, streams left stalled, and a
flood of streams. Afterwards the node must still answer /status, still accept honest peers, and still
run its DHT (an honest peer can read the node's record).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import multiaddr
import pytest
import trio
from nodes import NodeProcess

from tensorlink.p2p.dht import Directory
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.records import WORKERS

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

PROTOCOLS = [
    "/ipfs/kad/1.0.0",
    "/meshsub/1.2.0",
    "/meshsub/1.1.0",
    "/tensorlink/dialback/1.0.0",
    "/tensorlink/channel/1.0.0",
    "/tensorlink/stage/1.0.0",
    "/tensorlink/assign/1.0.0",
    "/tensorlink/challenge/1.0.0",
    "/tensorlink/job/1.0.0",
    "/tensorlink/validator-proof/1.0.0",
    "/ipfs/id/1.0.0",
]
PAYLOADS = [
    os.urandom(64 * 1024),  # garbage
    b"\xff\xff\xff\xff\x0f" + os.urandom(100),  # a varint length prefix claiming ~4 GiB
    b"\x80" * 20,  # a varint that never ends
    b"\x05abc",  # a message cut short
]


async def attack(target: str, rounds: int) -> dict[str, int]:
    """Hit every protocol with every payload, leave streams stalled, then flood; count what happened."""
    counts = {"streams": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as tmp:
        host = make_host(load_or_create_identity(Path(tmp)))
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            peer = multiaddr.Multiaddr(target)
            from libp2p.peer.peerinfo import info_from_p2p_addr

            info = info_from_p2p_addr(peer)
            await host.connect(info)

            async def one(protocol: str, payload: bytes, stall: float) -> None:
                try:
                    with trio.fail_after(10):
                        stream = await host.new_stream(info.peer_id, [protocol])
                        counts["streams"] += 1
                        await stream.write(payload)
                        await trio.sleep(stall)
                        await stream.close()
                except Exception:
                    counts["refused"] += 1

            async with trio.open_nursery() as nursery:
                for _ in range(rounds):
                    for protocol in PROTOCOLS:
                        for payload in PAYLOADS:
                            nursery.start_soon(one, protocol, payload, 0.0)
                for protocol in PROTOCOLS:  # stalled: opened, half a message, then nothing for 6 s
                    for _ in range(4):
                        nursery.start_soon(one, protocol, b"\x10\x08", 6.0)
            async with trio.open_nursery() as nursery:  # a flood of streams on the DHT protocol
                for _ in range(150):
                    nursery.start_soon(one, "/ipfs/kad/1.0.0", os.urandom(200), 0.0)
    return counts


async def honest_peer_reads(target: str, peer_id: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        key_pair = load_or_create_identity(Path(tmp))
        host = make_host(key_pair)
        directory = Directory(host, key_pair, server=False)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), directory.running():
            with trio.fail_after(20):
                assert await directory.connect_bootstrap([target])
                return await directory.fetch(WORKERS, peer_id) is not None


@pytest.mark.timeout(180)
def test_node_survives_garbage_stalls_and_floods(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("victim")
    buddy = start_node("buddy", "--bootstrap", node.addr)
    node.wait_for(lambda s: buddy.peer_id in s["peers"], 15, "the buddy connected")
    counts = trio.run(attack, node.addr, 3)
    assert counts["streams"] > 0
    assert node.proc.poll() is None, "the node died:\n" + node.output
    status = node.status()
    assert status["peer_id"] == node.peer_id
    assert buddy.peer_id in status["peers"], "the honest peer was dropped by the attack"
    assert trio.run(honest_peer_reads, node.addr, node.peer_id), "the DHT stopped serving"
    assert node.stop() < 2.0
    assert "Traceback" not in node.output, node.output[-5000:]
