"""Every patch of py-libp2p 0.8.1 and every use of its private members, in one module.

The rest of ``tensorlink.p2p`` calls the named functions and classes here instead of touching a libp2p
object's ``_members``. ``RELIED_ON`` lists each private member used (owner, name, expected parameters,
and what in TensorLink depends on it); tests/p2p/test_libp2p_canary.py checks that list against the
installed library and checks that this module uses nothing private that the list leaves out. On a
libp2p upgrade, run that test first: it names what broke and who depends on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayResourceManager
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Private:
    """A private member of a py-libp2p class (or module) that TensorLink relies on.

    ``params``: the parameter names a method must have (``self`` included), or None for a data attribute
    (an instance attribute is found by ``self.<name> =`` in the class's source)."""

    owner: Any
    name: str
    params: tuple[str, ...] | None
    used_by: str


RELIED_ON: tuple[Private, ...] = (
    Private(muxer_multistream, "Yamux", None, "install_yamux: the module-level name py-libp2p builds Yamux by"),
    Private(Yamux, "_write_frame", ("self", "data"), "ReadLoopSafeYamux: control frames off the read loop"),
    Private(Yamux, "_nursery", None, "ReadLoopSafeYamux: where control frames are sent from"),
    Private(RpcQueue, "_queue", None, "SizedRpcQueues: gossip's per-peer outbound queue size"),
    Private(Pubsub, "_is_msg_seen", ("self", "msg"), "pubsub_has_seen: gossip skips checking duplicates"),
    Private(Pubsub, "_handle_dead_peer", ("self", "peer_id"), "pubsub_forget_peer: gossip drops a garbage peer"),
    Private(
        CircuitV2Protocol, "_handle_reserve", ("self", "stream", "msg"), "ReserveHookedHop: relay reservation policy"
    ),
    Private(RelayResourceManager, "_reservations", None, "relay: per-IP caps, slots of departed peers freed"),
    Private(DCUtRProtocol, "_hole_punch_attempts", None, "hole_punch_state: NatTraversal.hole_punch_attempts"),
    Private(DCUtRProtocol, "_in_progress", None, "hole_punch_state: NatTraversal.hole_punch_attempts"),
    Private(
        ValueStore,
        "_get_from_peer",
        ("self", "peer_id", "key", "return_record", "return_closer_peers"),
        "get_from_peer: Directory's own DHT walk (GET_VALUE)",
    ),
    Private(ValueStore, "_store_at_peer", ("self", "peer_id", "key", "value"), "store_at_peer: Directory.publish"),
    Private(
        ProviderStore,
        "_get_providers_from_peer_with_closers",
        ("self", "peer_id", "key"),
        "providers_from_peer: Directory's provider walk (publishers, provide)",
    ),
    Private(ProviderStore, "_send_add_provider", ("self", "peer_id", "key"), "send_add_provider: Directory.provide"),
)

# Public methods TensorLink's subclasses override, relying on when the library calls them (checked like the above).
OVERRIDDEN: tuple[Private, ...] = (
    Private(Yamux, "handle_incoming", ("self",), "ReadLoopSafeYamux: the read loop's task"),
    Private(Pubsub, "push_msg", ("self", "msg_forwarder", "msg"), "gossip._Pubsub: signature check, drop counts"),
    Private(Pubsub, "stream_handler", ("self", "stream"), "gossip._Pubsub: a garbage stream cannot stop the host"),
    Private(Pubsub, "notify_subscriptions", ("self", "publish_message"), "gossip._Pubsub: delivery to subscribers"),
    Private(Pubsub, "peer_queues", None, "SizedRpcQueues: replaces the per-peer outbound queue table"),
)


# -- stream muxer ------------------------------------------------------------------------------------


class ReadLoopSafeYamux(Yamux):
    """py-libp2p 0.8.1's Yamux with a read loop that never waits on the connection's writer.

    The stock read loop answers pings (and stream SYNs) inline. While both directions carry bulk data the
    writer can be stuck on a full TCP send buffer, because the peer's read loop is stuck in the same way:
    neither side reads, and the connection deadlocks (seen with 16 busy data-plane fallback channels on
    one connection, tests/transport/test_channel_concurrency.py). Here frames the read loop sends go out
    from a task of their own. Relies on ``Yamux._write_frame`` (every frame goes out through it) and
    ``Yamux._nursery`` (the connection's nursery, set while it runs)."""

    _read_loop: trio.lowlevel.Task | None = None

    async def handle_incoming(self) -> None:
        self._read_loop = trio.lowlevel.current_task()
        await super().handle_incoming()

    async def _write_frame(self, data: bytes) -> None:
        if self._nursery is not None and trio.lowlevel.current_task() is self._read_loop:
            self._nursery.start_soon(self._write_frame_quietly, data)
            return
        await super()._write_frame(data)

    async def _write_frame_quietly(self, data: bytes) -> None:
        try:
            await super()._write_frame(data)
        except Exception as exc:  # the connection closed meanwhile: the read loop will see it too
            log.debug("yamux: a control frame was not sent: %s", exc)


def install_yamux() -> None:
    """Make py-libp2p build ReadLoopSafeYamux connections. py-libp2p 0.8.1 builds Yamux connections by the
    module-level name ``muxer_multistream.Yamux``, whatever ``muxer_opt`` says; the pin in pyproject.toml
    keeps this in step with the library."""
    muxer_multistream.Yamux = ReadLoopSafeYamux  # type: ignore[misc]


# -- pubsub ------------------------------------------------------------------------------------------


class SizedRpcQueues(dict[ID, RpcQueue]):
    """A value for ``Pubsub.peer_queues`` that gives each new per-peer outbound queue our size before
    anything is queued. py-libp2p builds each queue with ``RpcQueue()`` (32 entries, bound at definition
    time, no setting); the size lives in the private ``RpcQueue._queue.max_size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self.size
        super().__setitem__(key, queue)


def pubsub_has_seen(pubsub: Pubsub, msg: rpc_pb2.Message) -> bool:
    """Whether ``pubsub`` has already handled ``msg`` (its seen-messages cache, ``Pubsub._is_msg_seen``)."""
    return pubsub._is_msg_seen(msg)


def pubsub_forget_peer(pubsub: Pubsub, peer_id: ID) -> None:
    """Drop ``peer_id`` from ``pubsub`` as if its stream had died (``Pubsub._handle_dead_peer``)."""
    pubsub._handle_dead_peer(peer_id)


# -- relay -------------------------------------------------------------------------------------------


class ReserveHookedHop(CircuitV2Protocol):
    """CircuitV2Protocol whose RESERVE handling a subclass replaces by overriding the public ``reserve``;
    ``stock_reserve`` is the library's own handling (``CircuitV2Protocol._handle_reserve``, which the
    protocol's stream handler calls for every RESERVE message)."""

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        await self.reserve(stream, msg)

    async def reserve(self, stream: INetStream, msg: HopMessage) -> None:
        await self.stock_reserve(stream, msg)

    async def stock_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        await super()._handle_reserve(stream, msg)


def reservation_holders(manager: RelayResourceManager) -> list[ID]:
    """The peers holding (or having held, until swept) a reservation (``RelayResourceManager._reservations``)."""
    return list(manager._reservations)


def drop_reservation(manager: RelayResourceManager, peer: ID) -> None:
    """Free ``peer``'s slot now. The library only frees slots when they expire (resources.py:260), so a
    peer that disconnected keeps counting against ``max_reservations`` although its slot is unusable."""
    del manager._reservations[peer]


def hole_punch_state(dcutr: DCUtRProtocol, peer: ID) -> tuple[int, bool]:
    """(DCUtR attempts made towards ``peer``, whether one is running now): DCUtR's private counters."""
    return dcutr._hole_punch_attempts.get(peer, 0), peer in dcutr._in_progress


# -- DHT ---------------------------------------------------------------------------------------------
# KadDHT's public put/get/provide run a FIND_NODE lookup that fails for our 66-byte keys (dht.py _put);
# Directory walks the DHT itself and sends single requests through these.


async def get_from_peer(store: ValueStore, peer: ID, key: bytes) -> Any:
    """One GET_VALUE request to ``peer``: (record or None, closer peers), or what the library returns on
    failure (not a tuple)."""
    return await store._get_from_peer(peer, key, return_record=True, return_closer_peers=True)


async def store_at_peer(store: ValueStore, peer: ID, key: bytes, value: bytes) -> bool:
    """One PUT_VALUE request to ``peer``; whether it was stored."""
    return await store._store_at_peer(peer, key, value)


async def providers_from_peer(store: ProviderStore, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]]:
    """One GET_PROVIDERS request to ``peer``: (providers, closer peers); ([], []) when it failed."""
    return await store._get_providers_from_peer_with_closers(peer, key)


async def send_add_provider(store: ProviderStore, peer: ID, key: bytes) -> bool:
    """One ADD_PROVIDER message to ``peer`` (fire-and-forget); whether it was sent."""
    return await store._send_add_provider(peer, key)

