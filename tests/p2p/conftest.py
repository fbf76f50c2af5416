"""Swarms of real libp2p hosts on 127.0.0.1, each with its own Directory, all in one trio process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import pytest
import trio

from tensorlink.p2p.dht import Directory
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.records import Namespace, record_key

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
MESH_TIMEOUT_S = 60.0
MESH_CONCURRENCY = 16


@dataclass
class Swarm:
    nodes: list[Directory]
    servers: list[Directory]
    clients: list[Directory]
    stack: AsyncExitStack
    root: Path
    _count: list[int] = field(default_factory=lambda: [0])

    def holders(self, namespace: Namespace, peer_id: str) -> list[Directory]:
        """Nodes whose local store holds a record under the key (valid or not)."""
        key = record_key(namespace, peer_id).encode()
        return [node for node in self.nodes if key in node.dht.value_store.store]

    async def add_node(self, *, server: bool) -> Directory:
        """A new node, running until the swarm stops, that knows no one yet."""
        index = self._count[0]
        self._count[0] += 1
        data_dir = self.root / f"node{index}"
        data_dir.mkdir()
        key_pair = load_or_create_identity(data_dir)
        host = make_host(key_pair)
        await self.stack.enter_async_context(host.run([LOOPBACK]))
        node = Directory(host, key_pair, server=server)
        await self.stack.enter_async_context(node.running())
        self.nodes.append(node)
        (self.servers if server else self.clients).append(node)
        return node


async def connect_all(pairs: list[tuple[Directory, Directory]]) -> None:
    """Connect the pairs, MESH_CONCURRENCY at a time, and put each in the other's routing table."""
    limiter = trio.CapacityLimiter(MESH_CONCURRENCY)

    async def connect(a: Directory, b: Directory) -> None:
        async with limiter:
            assert await a.connect_bootstrap(b.addrs(), refresh=False), f"{a.peer_id} could not reach {b.peer_id}"
            if b.server and a.server:
                await b.add_peer(a.addrs()[0])

    with trio.fail_after(MESH_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for a, b in pairs:
                nursery.start_soon(connect, a, b)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@pytest.fixture
def dht_swarm(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[Swarm]]:
    """``async with dht_swarm(servers, clients) as s:`` starts the nodes and connects every pair.

    Every pair, because that is where a swarm of our nodes ends up anyway: make_host's connection
    settings give the AutoConnector a target of 104 connections, so about 10 s after start each node
    dials every peer its peerstore knows. Doing it up front keeps that dialing storm (about 40 ms of
    CPU per pair here) out of the timed parts of the tests.
    """

    @asynccontextmanager
    async def start(servers: int, clients: int = 0) -> AsyncIterator[Swarm]:
        try:
            async with AsyncExitStack() as stack:
                s = Swarm([], [], [], stack, tmp_path)
                for i in range(servers + clients):
                    await s.add_node(server=i < servers)
                pairs = [(a, b) for i, a in enumerate(s.nodes) for b in s.nodes[:i] if b.server]
                await connect_all(pairs)
                yield s
        except BaseExceptionGroup as group:
            # Each host and DHT nests a nursery, so a failed assert arrives ten groups deep, past what
            # the traceback printer shows. Raise the one real error instead.
            leaves = _leaves(group)
            if len(leaves) == 1 and not isinstance(leaves[0], trio.Cancelled):
                raise leaves[0] from None
            raise

    return start
