"""PeerHost: the libp2p host as the rest of TensorLink sees it, by base58 peer ids and address strings.

Packages outside ``p2p`` hold a PeerHost and never a libp2p object: they connect, remember addresses,
open and serve streams of a protocol, and read the host's own addresses and connections. p2p's own
services (Directory, Gossip, dial-back, relaying) are built by the composition root on ``libp2p``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair

from tensorlink.p2p.host import (
    FIRST_MESSAGE_S,
    PER_PEER,
    connect_addr,
    make_host,
    parse_multiaddr,
    remember_addrs,
    serve_protocol,
)
from tensorlink.p2p.relay import Kind, connection_addrs, connection_kind
from tensorlink.p2p.streams import Stream, error_record, open_stream, own_peer_id


class PeerHost:
    """A libp2p host behind the few operations other packages need; ``libp2p`` is the host itself, for p2p."""

    def __init__(self, host: IHost) -> None:
        self.libp2p = host

    @classmethod
    def create(cls, key_pair: KeyPair, *, announce: Sequence[str] = (), psk_hex: str | None = None) -> PeerHost:
        """A new host with TensorLink's mandatory settings (``make_host``); not listening until ``run``."""
        return cls(make_host(key_pair, announce=announce, psk_hex=psk_hex))

    @property
    def peer_id(self) -> str:
        return own_peer_id(self.libp2p)

    def addrs(self) -> list[str]:
        """The addresses the host announces (without /p2p/<peer id>)."""
        return [str(a) for a in self.libp2p.get_addrs()]

    def connected(self) -> list[str]:
        """The peers connected now."""
        return [p.to_base58() for p in self.libp2p.get_connected_peers()]

    def connection_kind(self, peer: str) -> Kind | None:
        return connection_kind(self.libp2p, peer)

    def connection_addrs(self, peer: str) -> list[str]:
        return connection_addrs(self.libp2p, peer)

    @asynccontextmanager
    async def run(self, listen: Sequence[str]) -> AsyncIterator[None]:
        """Listen on ``listen`` (multiaddrs; AddressError names a bad one) while inside."""
        addrs = [parse_multiaddr(a, what="listen address") for a in listen]
        async with self.libp2p.run(addrs):
            yield

    async def connect(self, addr: str, timeout_s: float) -> str:
        """Dial a full multiaddr (…/p2p/<peer id>); the peer id reached (errors: ``connect_addr``)."""
        return await connect_addr(self.libp2p, addr, timeout_s)

    def remember_addrs(self, peer: str, addrs: Sequence[str], ttl_s: float) -> None:
        remember_addrs(self.libp2p, peer, addrs, ttl_s)

    async def open(self, peer: str, protocol: str) -> Stream:
        """A new stream of ``protocol`` to a connected (or dialable) peer."""
        return await open_stream(self.libp2p, peer, protocol)

    def serve(
        self,
        protocol: str,
        handler: Callable[[Stream], Awaitable[None]],
        *,
        limit: int = 16,
        per_peer: int = PER_PEER,
        first_message_s: float = FIRST_MESSAGE_S,
        refuse: Callable[[str, str], bytes] = error_record,
    ) -> None:
        """Serve ``protocol`` with ``handler``, guarded and bounded as ``serve_protocol`` says."""
        serve_protocol(
            self.libp2p,
            protocol,
            handler,
            limit=limit,
            per_peer=per_peer,
            first_message_s=first_message_s,
            refuse=refuse,
        )
