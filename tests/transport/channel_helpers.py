"""Hosts, services and helpers shared by the data-plane tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiaddr
import torch
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.transport import Channel, ChannelService, TransportConfig
from tensorlink.transport.direct import DirectChannel
from tensorlink.transport.fallback import StreamChannel
from tensorlink.wire.frame import Route

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

KiB = 1024
MiB = 1024 * KiB
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
KINDS = ("direct", "fallback")  # what the ``kind`` fixture parametrizes over
CHANNEL_KIND = {"direct": "direct", "fallback": "libp2p"}  # Channel.kind for each
CHANNEL_PATH = {"direct": "tcp", "fallback": "direct"}  # Channel.path on loopback (never relayed here)
DEFAULT_CONFIG = TransportConfig()
NO_ROUTE = Route()


def job_id(*parts: int) -> bytes:
    """A 16-byte job id whose first bytes are ``parts``: readable in failures, distinct per test case."""
    return bytes(parts).ljust(16, b"\x00")


JOB = job_id(0xAB)


def direct(channel: Channel) -> DirectChannel:
    """The channel as the direct kind, for tests that reach past the API to its socket."""
    assert isinstance(channel, DirectChannel), channel.kind
    return channel


def fallback(channel: Channel) -> StreamChannel:
    """The channel as the libp2p-stream kind, for tests that reach past the API to its stream."""
    assert isinstance(channel, StreamChannel), channel.kind
    return channel


def config_for(kind: str, **overrides: Any) -> TransportConfig:
    """The TransportConfig of a ``kind``: direct TCP offered and tried, or libp2p streams only."""
    return TransportConfig(direct=kind == "direct", **overrides)


@dataclass
class Node:
    """One host and its data plane."""

    host: Any
    service: ChannelService
    peer_id: str

    def p2p_addr(self) -> multiaddr.Multiaddr:
        addr = str(self.host.get_addrs()[0])
        return multiaddr.Multiaddr(addr if "/p2p/" in addr else f"{addr}/p2p/{self.peer_id}")


@dataclass
class Mesh:
    nodes: list[Node]

    async def pair(self, a: int, b: int, job: bytes = JOB) -> tuple[Channel, Channel]:
        """A channel opened by node a to node b, as (a's end, b's end). Only for tests that open no other
        channel to b at the same time: b's end is simply the next channel b accepts."""
        opened = await self.nodes[a].service.open(self.nodes[b].peer_id, job)
        accepted = await self.nodes[b].service.accept()
        assert (accepted.peer, accepted.job) == (self.nodes[a].peer_id, job)
        return opened, accepted


MeshFactory = Callable[..., AbstractAsyncContextManager[Mesh]]


@asynccontextmanager
async def _serving(service: ChannelService) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve)
        yield
        nursery.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def open_mesh(
    root: Path,
    n: int,
    config: TransportConfig = DEFAULT_CONFIG,
    *,
    configs: Sequence[TransportConfig] | None = None,
    admit: Callable[[str, bytes], bool] | None = None,
) -> AsyncIterator[Mesh]:
    """n hosts with ChannelServices, every pair connected on the control plane. ``configs`` gives each
    node its own TransportConfig; ``admit`` goes to every service."""
    configs = list(configs) if configs is not None else [config] * n
    try:
        async with AsyncExitStack() as stack:
            hosts = []
            for i in range(n):
                host = make_host(load_or_create_identity(root / f"node{i}"))
                await stack.enter_async_context(host.run([LOOPBACK]))
                hosts.append(host)
            nodes = []
            # Entered after the hosts, so the services stop (closing their channels) while the hosts run.
            for host, cfg in zip(hosts, configs, strict=True):
                service = ChannelService(PeerHost(host), cfg, admit=admit)
                await stack.enter_async_context(_serving(service))
                nodes.append(Node(host, service, host.get_id().to_base58()))
            with trio.fail_after(30):
                for i, a in enumerate(nodes):
                    for b in nodes[i + 1 :]:
                        await a.host.connect(info_from_p2p_addr(b.p2p_addr()))
            yield Mesh(nodes)
    except BaseExceptionGroup as group:
        # Hosts and services nest nurseries, so a failed assert arrives several groups deep.
        leaves = _leaves(group)
        if len(leaves) == 1 and not isinstance(leaves[0], trio.Cancelled):
            raise leaves[0] from None
        raise


def open_in_status(service: ChannelService) -> list[dict[str, Any]]:
    """The ``service.status()`` entries of open channels."""
    return [entry for entry in service.status() if entry["closed"] is None]


def assert_closed_in_status(service: ChannelService, *channels: Channel) -> None:
    """Each channel is closed and no longer listed as open; where the status still lists it (a recently
    closed channel may stay, so an operator can read why it closed), the entry names its reason."""
    entries = service.status()
    for channel in channels:
        assert channel.closed
        mine = [
            entry
            for entry in entries
            if (entry["peer"], entry["job"], entry["opened_at"]) == (channel.peer, channel.job.hex(), channel.opened_at)
        ]
        assert all(entry["closed"] == channel.closed_reason for entry in mine), mine


async def exchange(
    sender: Channel, receiver: Channel, tensor: torch.Tensor, route: Route = NO_ROUTE, **send_kwargs: Any
) -> tuple[torch.Tensor, Route]:
    """Send one tensor while the other end receives it (a large send returns only once the peer has
    taken most of it, so the two must run concurrently); (tensor, route) as received."""
    got: list[Any] = []

    async def receive() -> None:
        got.append(await receiver.recv())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await sender.send(tensor, route, **send_kwargs)
    return got[0].tensor, got[0].route


async def assert_node_unharmed(mesh: Mesh) -> None:
    """The services that saw an attack still open channels between the same peers, both ways."""
    for opener, acceptor in ((0, 1), (1, 0)):
        a, b = await mesh.pair(opener, acceptor, job_id(3, 1))
        x = torch.randn(1000)
        got, _ = await exchange(a, b, x)
        assert torch.equal(got, x)
        got, _ = await exchange(b, a, x * 3)
        assert torch.equal(got, x * 3)
        await a.aclose()
        await b.aclose()


async def read_raw(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes straight from a (non-blocking) channel socket, bypassing the channel."""
    buf = bytearray()
    while len(buf) < n:
        await trio.lowlevel.wait_readable(sock)
        try:
            chunk = sock.recv(n - len(buf))
        except BlockingIOError:
            continue
        assert chunk, f"socket closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def write_raw(sock: socket.socket, data: bytes) -> None:
    """All of data straight onto a (non-blocking) channel socket, bypassing the channel."""
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(sock)
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            continue
