"""Circuit relay v2 and DCUtR hole punching: how peers behind NATs reach each other.

- A ``--relay`` node serves the relay v2 *hop* protocol with explicit limits (:class:`RelayPolicy`).
- Every node accepts relayed connections (*stop*), can dial ``<relay>/p2p/<R>/p2p-circuit/p2p/<B>``
  and runs DCUtR, which upgrades a relayed connection to a direct one by TCP hole punching (both
  sides dial at once from their listen ports; works through port-preserving NATs, not through
  port-randomising ones, where the relayed connection simply stays).
- A PRIVATE node reserves a slot on a relay (:meth:`NatTraversal.reserve`), keeps it alive (refresh
  at half its lifetime, re-reserve after the relay connection drops) and knows its circuit addresses
  (:meth:`NatTraversal.circuit_addrs`), which it should announce in place of its unreachable ones.

py-libp2p 0.8.1 details handled here (measured): a reservation adds no
``/p2p-circuit`` address to ``host.get_addrs()``, so circuit addresses are built here; the swarm never
dials relay addresses itself, so relayed dials go through the circuit transport directly; the stock
hop handler lets a client reserve a slot *for another peer id* and applies none of its per-IP limits,
so :class:`_HopProtocol` pins reservations to the connected peer and caps them per IP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from tensorlink.p2p._libp2p import ReserveHookedHop, drop_reservation, hole_punch_state, reservation_holders

log = logging.getLogger(__name__)

Kind = Literal["direct", "relayed"]
PROTECT_TAG = "tensorlink-relay"


@dataclass(frozen=True)
class RelayPolicy:
    """What a ``--relay`` node grants. A circuit carries a whole libp2p connection (control traffic,
    and the data-plane fallback for peers that cannot hole punch), so it is sized for real use, not
    go-libp2p's 2 min / 128 KiB "limited relay"."""

    circuit_duration_s: int = 3600  # a circuit is reset after this long
    circuit_bytes: int = 1 << 30  # ... or after this many bytes, both directions together
    circuits_per_peer: int = 8  # open circuits towards one reserved peer
    max_reservations: int = 64  # reserved peers on this relay
    reservations_per_ip: int = 8  # reserved peers behind one IP
    reservation_ttl_s: int = 900  # clients refresh at half of it

    def __post_init__(self) -> None:
        for name in ("circuit_duration_s", "circuit_bytes", "circuits_per_peer", "max_reservations"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RelayPolicy.{name} must be positive")
        if self.reservation_ttl_s < 30:
            raise ValueError("RelayPolicy.reservation_ttl_s must be at least 30 s")

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


class _HopProtocol(ReserveHookedHop):
    """The stock protocol, with reservations pinned to the requesting connection's peer and a cap per IP.

    libp2p 0.8.1 takes the reserved peer id from the RESERVE message when present
    (relay/circuit_v2/protocol.py:510), so anyone could fill every slot with made-up peer ids; the spec
    says RESERVE carries no peer. Its per-IP limits (config.py HopConfig) are never applied, and slots of
    peers that disconnected keep counting against ``max_reservations`` until they expire
    (resources.py:260), although a slot is only usable while its peer stays connected.
    """

    def __init__(self, host: IHost, policy: RelayPolicy, *, allow_hop: bool) -> None:
        super().__init__(host, limits=policy.limits(), allow_hop=allow_hop)
        self.policy = policy
        self._reservation_ips: dict[ID, str] = {}

    async def reserve(self, stream: INetStream, msg: HopMessage) -> None:
        msg.ClearField("peer")
        peer = stream.muxed_conn.peer_id
        remote = stream.get_remote_address()
        ip = remote[0] if remote else "?"
        manager = self.resource_manager
        for holder in reservation_holders(manager):
            if holder != peer and manager.get_reservation(holder) is None:  # expired, or its peer left
                drop_reservation(manager, holder)
        holders = set(reservation_holders(manager))
        self._reservation_ips = {p: i for p, i in self._reservation_ips.items() if p in holders}
        same_ip = sum(1 for p, i in self._reservation_ips.items() if i == ip and p != peer)
        if same_ip >= self.policy.reservations_per_ip:
            log.info("relay: refusing a reservation for %s: %d already from %s", peer, same_ip, ip)
            await write_delimited_msg(
                stream,
                HopMessage(type=HopMessage.STATUS, status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)),
            )
            return
        # Recorded first: the stock handler answers, then sleeps 0.1 s before returning.
        self._reservation_ips[peer] = ip
        try:
            await self.stock_reserve(stream, msg)
        finally:
            if self.resource_manager.get_reservation(peer) is None:
                self._reservation_ips.pop(peer, None)

    def reservation_count(self) -> int:
        return sum(1 for p in list(self._reservation_ips) if self.resource_manager.get_reservation(p) is not None)


@dataclass(frozen=True)
class Reservation:
    """A slot held on a relay: others reach us at ``circuit_addrs`` until ``expires_at`` (unix time)."""

    relay: str  # relay peer id
    relay_addr: str  # where we reach the relay, with /p2p/<relay>
    expires_at: float
    reserved_at: float
    circuit_addrs: tuple[str, ...]


class RelayError(Exception):
    """A reservation or relayed dial failed; the message says which and why."""


def _peer(peer: str | ID) -> ID:
    return peer if isinstance(peer, ID) else ID.from_base58(peer)


def _live_connections(host: IHost, peer: str | ID) -> list:
    try:
        conns = host.get_network().get_connections(_peer(peer))
    except Exception:
        return []
    return [c for c in conns if not getattr(c, "is_closed", False)]


def _is_relayed_conn(conn: object) -> bool:
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:  # type: ignore[attr-defined]
            return True
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())  # type: ignore[attr-defined]
    except Exception:
        return True  # cannot tell: never claim it is direct


def connection_kind(host: IHost, peer: str | ID) -> Kind | None:
    """``"direct"`` if some open connection to ``peer`` is a direct one, ``"relayed"`` if the only open
    ones run through a relay circuit, None when not connected. Streams prefer a direct connection when
    both exist (the swarm's default selection)."""
    conns = _live_connections(host, peer)
    if not conns:
        return None
    return "relayed" if all(_is_relayed_conn(c) for c in conns) else "direct"


def connection_addrs(host: IHost, peer: str | ID) -> list[str]:
    """The transport addresses of the open connections to ``peer`` (circuit addresses for relayed ones)."""
    out: list[str] = []
    for conn in _live_connections(host, peer):
        try:
            out.extend(str(a) for a in conn.get_transport_addresses())
        except Exception:
            continue
    return out


def is_circuit_addr(addr: str) -> bool:
    return "/p2p-circuit" in addr


class NatTraversal:
    """Relay and hole punching services on one host. Build it with :func:`open_nat_traversal`."""

    def __init__(
        self,
        host: IHost,
        protocol: _HopProtocol,
        transport: CircuitV2Transport,
        dcutr: DCUtRProtocol | None,
        nursery: trio.Nursery,
        *,
        relay: bool,
        poll_s: float,
    ) -> None:
        self.host = host
        self.relay = relay
        self._protocol = protocol
        self._transport = transport
        self._dcutr = dcutr
        self._nursery = nursery
        self._poll_s = poll_s
        self._reservations: dict[str, Reservation] = {}
        self._keepers: dict[str, trio.CancelScope] = {}

    # ------------------------------------------------------------------------------ reservations

    @property
    def reservations(self) -> list[Reservation]:
        now = time.time()
        return [r for r in self._reservations.values() if r.expires_at > now]

    def circuit_addrs(self) -> list[str]:
        """Addresses at which others reach this node through its relays (announce these)."""
        return [a for r in self.reservations for a in r.circuit_addrs]

    def relay_reservations(self) -> int:
        """On a relay: how many peers hold a slot here."""
        return self._protocol.reservation_count()

    def known_relays(self) -> list[str]:
        """Connected peers that said (in identify) they serve the relay hop protocol."""
        out = []
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if HOP_PROTOCOL in store.get_protocols(peer):
                    out.append(peer.to_base58())
            except Exception:
                continue
        return out

    async def reserve(self, relay_addr: str, *, keep_alive: bool = True, timeout_s: float = 10.0) -> Reservation:
        """Connect to the relay at ``relay_addr`` (a full multiaddr with /p2p/<relay id>) and reserve a
        slot. With ``keep_alive`` a background task refreshes it at half its lifetime and reserves again
        whenever the relay connection is lost, until :meth:`release` or shutdown."""
        relay_id, relay_ma = _split_p2p(relay_addr)
        with trio.move_on_after(timeout_s) as scope:
            reservation = await self._reserve_once(relay_id, relay_ma)
        if scope.cancelled_caught:
            raise RelayError(f"no reservation from relay {relay_addr} within {timeout_s:.0f} s")
        if keep_alive and relay_id.to_base58() not in self._keepers:
            keeper = trio.CancelScope()
            self._keepers[relay_id.to_base58()] = keeper
            self._nursery.start_soon(self._keep_alive, relay_id, relay_ma, keeper)
        return reservation

    async def release(self, relay: str) -> None:
        """Stop refreshing the reservation on ``relay`` (peer id); the relay drops it when it expires."""
        scope = self._keepers.pop(relay, None)
        if scope is not None:
            scope.cancel()
        self._reservations.pop(relay, None)
        try:
            self.host.get_network().unprotect(ID.from_base58(relay), PROTECT_TAG)
        except Exception:
            pass

    async def _reserve_once(self, relay_id: ID, relay_ma: multiaddr.Multiaddr) -> Reservation:
        if not _live_connections(self.host, relay_id):
            try:
                await self.host.connect(PeerInfo(relay_id, [relay_ma]))
            except Exception as exc:
                raise RelayError(f"cannot reach relay {relay_id} at {relay_ma}: {exc}") from exc
        try:
            self.host.get_network().protect(relay_id, PROTECT_TAG)  # the slot lives as long as this connection
        except Exception:
            pass
        try:
            stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL])
        except Exception as exc:
            raise RelayError(f"relay {relay_id} does not serve {HOP_PROTOCOL}: {exc}") from exc
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            response = await read_delimited_msg(stream, HopMessage)
        except Exception as exc:
            raise RelayError(f"reservation exchange with relay {relay_id} failed: {exc}") from exc
        finally:
            with trio.move_on_after(1.0):
                try:
                    await stream.close()
                except Exception:
                    pass
        status = StatusCode(response.status) if response.HasField("status") else StatusCode.OK
        if response.type != HopMessage.STATUS or status != StatusCode.OK or not response.HasField("reservation"):
            raise RelayError(f"relay {relay_id} refused the reservation: {status.name}")
        now = time.time()
        expires = float(response.reservation.expire) or now + 60.0
        relay_addrs = [str(relay_ma).split("/p2p/")[0]]
        for raw in response.reservation.addrs:
            try:
                text = str(multiaddr.Multiaddr(raw)).split("/p2p/")[0]
            except Exception:
                continue
            if text not in relay_addrs:
                relay_addrs.append(text)
        me = self.host.get_id().to_base58()
        rid = relay_id.to_base58()
        reservation = Reservation(
            relay=rid,
            relay_addr=f"{relay_addrs[0]}/p2p/{rid}",
            expires_at=expires,
            reserved_at=now,
            circuit_addrs=tuple(f"{a}/p2p/{rid}/p2p-circuit/p2p/{me}" for a in relay_addrs),
        )
        self._reservations[rid] = reservation
        log.info(
            "reserved a slot on relay %s for %.0f s; reachable at %s", rid, expires - now, reservation.circuit_addrs[0]
        )
        return reservation

    async def _keep_alive(self, relay_id: ID, relay_ma: multiaddr.Multiaddr, scope: trio.CancelScope) -> None:
        rid = relay_id.to_base58()
        backoff = 1.0
        with scope:
            while True:
                await trio.sleep(self._poll_s)
                current = self._reservations.get(rid)
                now = time.time()
                connected = bool(_live_connections(self.host, relay_id))
                due = current is None or now >= current.reserved_at + (current.expires_at - current.reserved_at) / 2
                if connected and not due:
                    continue
                if not connected:
                    log.info("lost the connection to relay %s; reserving again", rid)
                    self._reservations.pop(rid, None)
                try:
                    with trio.fail_after(15.0):
                        await self._reserve_once(relay_id, relay_ma)
                    backoff = 1.0
                except (RelayError, trio.TooSlowError) as exc:
                    log.warning("reservation on relay %s not renewed: %s (retrying in %.0f s)", rid, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)

    # ----------------------------------------------------------------------------- connections

    async def dial(self, addr: str, *, timeout_s: float = 15.0) -> str:
        """Connect to a peer at a full multiaddr and return its peer id. A circuit address
        (``<relay>/p2p/<R>/p2p-circuit/p2p/<B>``) goes through the relay; DCUtR then tries to upgrade
        the connection to a direct one in the background (see :meth:`wait_direct`)."""
        with trio.move_on_after(timeout_s) as scope:
            if is_circuit_addr(addr):
                try:
                    ma = multiaddr.Multiaddr(addr)
                    _relay_ma, dest = self._transport.parse_circuit_ma(ma)
                except Exception as exc:
                    raise RelayError(f"{addr!r} is not a circuit address <relay>/p2p-circuit/p2p/<id>: {exc}") from None
                if not _live_connections(self.host, dest):
                    try:
                        await self._transport.dial(ma)
                    except Exception as exc:
                        raise RelayError(f"relayed dial to {addr} failed: {exc}") from exc
            else:
                dest, direct_ma = _split_p2p(addr)
                try:
                    await self.host.connect(PeerInfo(dest, [direct_ma]))
                except Exception as exc:
                    raise RelayError(f"dial to {addr} failed: {exc}") from exc
            return dest.to_base58()
        assert scope.cancelled_caught
        raise RelayError(f"dial to {addr} did not finish within {timeout_s:.0f} s")

    def kind(self, peer: str) -> Kind | None:
        return connection_kind(self.host, peer)

    async def wait_direct(self, peer: str, timeout_s: float) -> bool:
        """Wait until the connection to ``peer`` is direct (DCUtR drives upgrades by itself every 2 s)."""
        with trio.move_on_after(timeout_s):
            while connection_kind(self.host, peer) != "direct":
                await trio.sleep(0.2)
            return True
        return False

    async def hole_punch(self, peer: str, *, timeout_s: float = 30.0) -> bool:
        """Run one DCUtR upgrade now (normally unnecessary: the background loop does it)."""
        if self._dcutr is None:
            return False
        with trio.move_on_after(timeout_s):
            return bool(await self._dcutr.initiate_hole_punch(_peer(peer)))
        return connection_kind(self.host, peer) == "direct"

    def hole_punch_attempts(self, peer: str) -> tuple[int, bool]:
        """(DCUtR attempts made towards ``peer``, whether one is running now); reads DCUtR's counters."""
        if self._dcutr is None:
            return 0, False
        return hole_punch_state(self._dcutr, _peer(peer))


def _split_p2p(addr: str) -> tuple[ID, multiaddr.Multiaddr]:
    """(peer id, address without /p2p) of ``<transport addr>/p2p/<id>``."""
    try:
        ma = multiaddr.Multiaddr(addr)
        peer = ma.value_for_protocol("p2p")
    except Exception as exc:
        raise RelayError(f"{addr!r} is not a multiaddr ending in /p2p/<peer id>: {exc}") from None
    if not peer:
        raise RelayError(f"{addr!r} has no /p2p/<peer id>")
    return ID.from_base58(peer), ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}"))


@asynccontextmanager
async def open_nat_traversal(
    host: IHost,
    *,
    relay: bool = False,
    hole_punch: bool = True,
    policy: RelayPolicy | None = None,
    dial_timeout_s: int = 3,
    poll_s: float = 2.0,
) -> AsyncIterator[NatTraversal]:
    """Start relay v2 on a running ``host`` — serving hop with ``policy`` when ``relay`` — and, with
    ``hole_punch``, DCUtR. Everything stops when the block exits."""
    policy = policy or RelayPolicy()
    protocol = _HopProtocol(host, policy, allow_hop=relay)
    roles = RelayRole.HOP | RelayRole.STOP if relay else RelayRole.STOP
    # CLIENT stays off: with it, CircuitV2Transport reserves a slot on the relay before every relayed
    # dial (transport.py:398); reservations are made on purpose, by reserve().
    transport = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=policy.limits()))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(background_trio_service(protocol))
        await protocol.event_started.wait()
        dcutr: DCUtRProtocol | None = None
        if hole_punch:
            dcutr = DCUtRProtocol(host, dial_timeout=dial_timeout_s)
            await stack.enter_async_context(background_trio_service(dcutr))
            await dcutr.event_started.wait()
        nursery = await stack.enter_async_context(trio.open_nursery())
        service = NatTraversal(host, protocol, transport, dcutr, nursery, relay=relay, poll_s=poll_s)
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()
