"""Is this node reachable from the internet? A dial-back protocol of our own.

py-libp2p's AutoNAT v1 tells a NATed peer it is public: its server "dials back" with ``host.connect()``,
which returns at once on the connection the request came in on (measured with py-libp2p 0.8.1).
Here the server dials back over a FRESH connection, from a separate prober host with its own ephemeral
identity (and the same network key), so no existing connection can stand in for a real inbound one:

1. The requester sends ``DialBackRequest{nonce, addrs}`` on ``/tensorlink/dialback/1.0.0``; ``addrs``
   are its own announced addresses.
2. The server dials only the requester's own IP, the one the request arrived from (see
   :func:`plan_dial_back`), at most ``max_targets`` addresses, each within ``dial_timeout_s``.
   Noise authenticates the requester's peer id on the new connection.
3. Over that connection the prober sends ``DialBackProbe{nonce}`` on ``/tensorlink/dialback-probe/1.0.0``;
   the requester echoes it only for a nonce it is waiting on, and notes that a probe reached it on an
   inbound connection from a peer other than the server.
4. The server answers ``DialBackResponse{status: ok|failed|refused}``. The requester counts an ``ok``
   only if it saw the probe itself, so a lying server cannot make it believe it is public.

Verdict (:class:`ReachabilityReport`): PUBLIC with at least one confirmed dial-back, PRIVATE when no
dial-back got through and at least one server tried and failed, UNKNOWN when no server answered.

Ask servers outside your own network: a server on the same LAN reaches the requester's LAN address
and confirms it (``DialBackResult.addr`` shows which address answered).

Abuse: a server never dials an address a peer names on another IP (no port scanning or amplification
against third parties), refuses requests arriving over relayed connections, limits requests per peer id
and per IP (token buckets) and the dial-backs it runs at once, and bounds every step in time.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.rcmgr.metrics import Direction

from tensorlink.p2p.host import make_host, reset_stream, serve_protocol
from tensorlink.p2p.streams import StreamError, close_stream, is_relayed_stream, read_message, write_message
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import (
    DialBackProbe,
    DialBackRequest,
    DialBackResponse,
    ErrorReply,
    Message,
)
from tensorlink.wire.protocols import DIALBACK_PROBE_PROTOCOL, DIALBACK_PROTOCOL

log = logging.getLogger(__name__)

MAX_FRAME = 8192  # largest message on these protocols (a DialBackResponse)


class Reachability(str, enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DialBackConfig:
    """Timeouts and limits; defaults suit a node on the internet."""

    dial_timeout_s: float = 4.0  # server: one dial plus the probe exchange on it
    request_timeout_s: float = 10.0  # requester: one whole request to one server
    io_timeout_s: float = 5.0  # one message read or write
    max_targets: int = 4  # addresses one request may make a server dial
    peer_burst: int = 3  # requests per peer id, then one more every peer_refill_s
    peer_refill_s: float = 20.0
    ip_burst: int = 8  # requests per source IP (peer ids are cheap)
    ip_refill_s: float = 5.0
    max_concurrent: int = 8  # dial-backs one server runs at once

    def __post_init__(self) -> None:
        if self.request_timeout_s <= self.dial_timeout_s + 1.0:
            raise ValueError("request_timeout_s must exceed dial_timeout_s by more than a second")
        if not 1 <= self.max_targets <= 8:
            raise ValueError("max_targets must be between 1 and 8 (DialBackRequest carries at most 8 addresses)")


Outcome = Literal["confirmed", "failed", "refused", "unverified", "error", "timeout"]


@dataclass(frozen=True)
class DialBackResult:
    """What one server said. ``confirmed``: it dialled us and we saw its probe arrive; ``failed``: it
    dialled and nothing answered; the rest are no evidence either way."""

    server: str
    outcome: Outcome
    addr: str | None = None  # the address that answered (confirmed) — how the internet reaches us
    observed: str | None = None  # our address as the server saw it
    dialed: tuple[str, ...] = ()
    prober: str | None = None  # peer id of the prober whose fresh connection reached us (confirmed)
    detail: str = ""


@dataclass(frozen=True)
class ReachabilityReport:
    status: Reachability
    results: tuple[DialBackResult, ...] = ()

    @property
    def public_addrs(self) -> list[str]:
        """Addresses at which a dial-back reached us (worth announcing)."""
        return sorted({r.addr for r in self.results if r.outcome == "confirmed" and r.addr})


def verdict(results: Sequence[DialBackResult]) -> Reachability:
    if any(r.outcome == "confirmed" for r in results):
        return Reachability.PUBLIC
    if any(r.outcome == "failed" for r in results):
        return Reachability.PRIVATE
    return Reachability.UNKNOWN


# ---------------------------------------------------------------------------------------------------
# What a server may dial


def _tcp_parts(addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, str | None] | None:
    """(ip, port, peer id or None) of /ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]; None for anything else."""
    try:
        ma = multiaddr.Multiaddr(addr)
        names = [p.name for p in ma.protocols()]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"], ["ip4", "tcp", "p2p"], ["ip6", "tcp", "p2p"]):
            return None
        ip = ipaddress.ip_address(ma.value_for_protocol(names[0]))
        port = int(ma.value_for_protocol("tcp"))
        peer = ma.value_for_protocol("p2p") if "p2p" in names else None
    except Exception:
        return None
    if ip.is_unspecified or ip.is_multicast or not 0 < port < 65536:
        return None
    return ip, port, peer


def _fmt(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def plan_dial_back(
    addrs: Sequence[str], *, requester: str, observed_ip: str, max_targets: int = 4
) -> tuple[list[str], list[str]]:
    """Split a requester's addresses into (targets to dial, refused), never dialling anyone else.

    Every target is on ``observed_ip``, the IP the request arrived from over an authenticated
    connection. An address on that IP is dialled as given. An address on a non-global IP (private,
    loopback, link-local, shared) that differs names the requester's LAN behind a NAT: the server
    dials the same port at ``observed_ip`` instead, which is what a peer on the internet would reach
    if the NAT forwarded that port. Anything else — another global IP, another peer id, DNS, relay
    circuits, other transports, another address family — is refused and never dialled.
    """
    observed = ipaddress.ip_address(observed_ip)
    targets: list[str] = []
    refused: list[str] = []
    for addr in addrs:
        parts = _tcp_parts(addr)
        if parts is None:
            refused.append(addr)
            continue
        ip, port, peer = parts
        if peer is not None and peer != requester:
            refused.append(addr)
            continue
        if ip == observed or (ip.version == observed.version and not ip.is_global):
            target = _fmt(observed, port)
            if target not in targets:
                if len(targets) >= max_targets:
                    refused.append(addr)
                    continue
                targets.append(target)
        else:
            refused.append(addr)
    return targets, refused


class _TokenBuckets:
    """Per-key token buckets with a bounded number of keys (least recently used dropped)."""

    def __init__(self, burst: int, refill_s: float, max_keys: int = 4096) -> None:
        self.burst, self.refill_s, self.max_keys = burst, refill_s, max_keys
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._state.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) / self.refill_s)
        allowed = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._state) > self.max_keys:
            self._state.popitem(last=False)
        return allowed


# ---------------------------------------------------------------------------------------------------
def _parse_server(server: str) -> tuple[ID, multiaddr.Multiaddr | None]:
    """(peer id, address without /p2p or None) of a peer id or a full multiaddr ending in /p2p/<id>."""
    try:
        if not server.startswith("/"):
            return ID.from_base58(server), None
        ma = multiaddr.Multiaddr(server)
        peer = ma.value_for_protocol("p2p")
        return ID.from_base58(peer), ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}"))
    except Exception as exc:
        raise ValueError(f"{server!r} is neither a peer id nor a multiaddr ending in /p2p/<id> ({exc})") from None


def _is_inbound(host: IHost, stream: INetStream) -> bool:
    """Whether the stream's connection was dialled by the remote side (accepted by our listener)."""
    try:
        for conn in host.get_network().get_connections(stream.muxed_conn.peer_id):
            if conn.muxed_conn is stream.muxed_conn:
                return getattr(conn, "direction", None) == Direction.INBOUND  # SwarmConn's; INetConn lacks it
    except Exception:
        pass
    return False


# ---------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    server: ID
    probed: trio.Event = field(default_factory=trio.Event)
    probed_from: str = ""


class DialBack:
    """Both sides of the dial-back protocol on one host. Build it with :func:`open_dial_back`."""

    def __init__(self, host: IHost, *, prober: IHost | None, config: DialBackConfig) -> None:
        self.host = host
        self.prober = prober
        self.config = config
        self.last_report: ReachabilityReport | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._peer_buckets = _TokenBuckets(config.peer_burst, config.peer_refill_s)
        self._ip_buckets = _TokenBuckets(config.ip_burst, config.ip_refill_s)
        self._slots = trio.Semaphore(config.max_concurrent)
        self._in_flight: set[ID] = set()
        self.refused_requests = 0  # counters for the status endpoint / tests
        self.served_requests = 0

    @property
    def serving(self) -> bool:
        return self.prober is not None

    # ----------------------------------------------------------------------------- requester side

    def own_addrs(self) -> list[str]:
        """This host's announced direct addresses, without /p2p (what a request carries by default)."""
        out: list[str] = []
        for addr in self.host.get_addrs():
            text = str(addr)
            if "/p2p-circuit" in text:
                continue
            text = text.split("/p2p/")[0]
            if _tcp_parts(text) is not None and text not in out:
                out.append(text)
        return out[:8]

    async def check(
        self, servers: Sequence[str], *, addrs: Sequence[str] | None = None, timeout_s: float | None = None
    ) -> ReachabilityReport:
        """Ask each server to dial us back, all at once, and combine the answers. A server is a peer id
        (connected, or dialable from the peerstore) or a full multiaddr ending in /p2p/<id> (connected
        first). ``addrs`` defaults to :meth:`own_addrs`. Returns within ``timeout_s`` (default:
        ``request_timeout_s``) plus a moment."""
        want = list(addrs) if addrs is not None else self.own_addrs()
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        me = self.host.get_id().to_base58()
        unique = [s for s in dict.fromkeys(servers) if s != me and not s.endswith(f"/p2p/{me}")]
        results: list[DialBackResult] = []

        async def one(server: str) -> None:
            results.append(await self._ask(server, want, timeout))

        async with trio.open_nursery() as nursery:
            for server in unique:
                nursery.start_soon(one, server)
        report = ReachabilityReport(verdict(results), tuple(sorted(results, key=lambda r: r.server)))
        self.last_report = report
        log.info(
            "reachability %s (%s)",
            report.status.value,
            ", ".join(f"{r.server[-8:]}: {r.outcome}" for r in report.results) or "no servers",
        )
        return report

    async def _ask(self, server: str, addrs: list[str], timeout: float) -> DialBackResult:
        try:
            server_id, server_addr = _parse_server(server)
        except ValueError as exc:
            return DialBackResult(server, "error", detail=str(exc))
        server = server_id.to_base58()
        nonce = secrets.token_bytes(16)
        pending = _Pending(server_id)
        self._pending[nonce] = pending
        stream: INetStream | None = None
        try:
            with trio.move_on_after(timeout):
                try:
                    if server_addr is not None and not self.host.get_network().get_connections(server_id):
                        await self.host.connect(PeerInfo(server_id, [server_addr]))
                    stream = await self.host.new_stream(server_id, [TProtocol(DIALBACK_PROTOCOL)])
                    await write_message(stream, DialBackRequest(nonce=nonce, addrs=addrs[:8]))
                    reply = await read_message(stream, DialBackResponse, ErrorReply, max_bytes=MAX_FRAME)
                except (StreamError, WireError) as exc:
                    return DialBackResult(server, "error", detail=str(exc))
                except Exception as exc:
                    return DialBackResult(server, "error", detail=f"{type(exc).__name__}: {exc}")
                if isinstance(reply, ErrorReply):
                    return DialBackResult(server, "refused", detail=f"{reply.code}: {reply.message}")
                assert isinstance(reply, DialBackResponse)
                if reply.nonce != nonce:
                    return DialBackResult(server, "error", detail="reply carries another nonce")
                common: dict[str, Any] = {
                    "observed": reply.observed,
                    "dialed": tuple(reply.dialed),
                    "detail": reply.reason,
                }
                if reply.status == "ok":
                    if not pending.probed.is_set():
                        # The server claims success, but no probe with our nonce reached us.
                        log.warning("dial-back server %s said ok without a probe reaching us", server)
                        return DialBackResult(server, "unverified", addr=reply.addr, **common)
                    return DialBackResult(server, "confirmed", addr=reply.addr, prober=pending.probed_from, **common)
                if reply.status == "failed":
                    return DialBackResult(server, "failed", **common)
                return DialBackResult(server, "refused", **common)
            return DialBackResult(server, "timeout", detail=f"no answer within {timeout:.1f} s")
        finally:
            self._pending.pop(nonce, None)
            if stream is not None:
                await close_stream(stream)

    async def _answer_probe(self, stream: INetStream) -> None:
        """A prober dialled us: echo its nonce if it is one we are waiting on."""
        try:
            with trio.fail_after(self.config.io_timeout_s):
                probe = await read_message(stream, DialBackProbe, max_bytes=MAX_FRAME)
                assert isinstance(probe, DialBackProbe)
                pending = self._pending.get(probe.nonce)
                remote = stream.muxed_conn.peer_id
                if (
                    pending is None
                    or remote == pending.server
                    or is_relayed_stream(stream)
                    or not _is_inbound(self.host, stream)
                ):
                    # Unknown nonce; or not a fresh direct connection dialled to us: the one our request
                    # went out on (the server's own id), one through a relay, or one we dialled.
                    await reset_stream(stream)
                    return
                pending.probed_from = remote.to_base58()
                pending.probed.set()
                await write_message(stream, probe)
        except Exception as exc:  # timeouts, bad frames, resets: drop it
            log.debug("dial-back probe dropped: %s", exc)
            await reset_stream(stream)
            return
        await close_stream(stream)

    # -------------------------------------------------------------------------------- server side

    async def _serve(self, stream: INetStream) -> None:
        requester = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(self.config.io_timeout_s):
                request = await read_message(stream, DialBackRequest, max_bytes=MAX_FRAME)
            assert isinstance(request, DialBackRequest)
            reply = await self._decide(stream, requester, request)
            with trio.fail_after(self.config.io_timeout_s):
                await write_message(stream, reply)
        except Exception as exc:  # timeouts, bad frames, resets: drop it
            log.debug("dial-back request from %s dropped: %s", requester, exc)
            await reset_stream(stream)
            return
        await close_stream(stream)

    def _refuse(self, code: str, message: str) -> ErrorReply:
        self.refused_requests += 1
        return ErrorReply(code=code, message=message)

    async def _decide(self, stream: INetStream, requester: ID, request: DialBackRequest) -> Message:
        if self.prober is None:
            return self._refuse("not_serving", "this node does not serve dial-backs")
        if is_relayed_stream(stream):
            return self._refuse("relayed", "request came through a relay; cannot tell your address")
        remote = stream.get_remote_address()
        if not remote:
            return self._refuse("no_address", "cannot tell the address of your connection")
        observed_ip = remote[0]
        if not self._peer_buckets.allow(requester.to_base58()) or not self._ip_buckets.allow(observed_ip):
            return self._refuse("rate_limited", "too many dial-back requests; try again later")
        try:
            observed = _fmt(ipaddress.ip_address(observed_ip), int(remote[1]))
        except ValueError:
            return self._refuse("no_address", f"unusable remote address {remote!r}")
        targets, refused = plan_dial_back(
            request.addrs,
            requester=requester.to_base58(),
            observed_ip=observed_ip,
            max_targets=self.config.max_targets,
        )
        if refused:
            log.info("dial-back for %s: refusing %s (not on %s)", requester, refused, observed_ip)
        if not targets:
            self.refused_requests += 1
            return DialBackResponse(
                nonce=request.nonce,
                status="refused",
                observed=observed,
                reason=f"no address on {observed_ip} to dial",
            )
        if requester in self._in_flight:
            return self._refuse("busy", "a dial-back to you is already running")
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return self._refuse("busy", "too many dial-backs running; try again later")
        self._in_flight.add(requester)
        try:
            answered = await self._probe(requester, targets, request.nonce)
        finally:
            self._in_flight.discard(requester)
            self._slots.release()
        self.served_requests += 1
        if answered:
            return DialBackResponse(nonce=request.nonce, status="ok", addr=answered, observed=observed, dialed=targets)
        return DialBackResponse(
            nonce=request.nonce, status="failed", observed=observed, dialed=targets, reason="no address answered"
        )

    async def _probe(self, peer: ID, targets: list[str], nonce: bytes) -> str | None:
        """Dial each target from the prober (fresh connections, Noise checks the peer id), run the
        nonce exchange on the first that connects; the address that answered, or None."""
        assert self.prober is not None
        prober = self.prober
        network = prober.get_network()
        answered: list[str] = []
        lock = trio.Lock()  # one nonce exchange at a time (they share the prober's connection table)

        async def attempt(target: str, cancel: trio.CancelScope) -> None:
            try:
                with trio.fail_after(self.config.dial_timeout_s):
                    await network.dial_addr(multiaddr.Multiaddr(target), peer)
                    async with lock:
                        if answered:
                            return
                        stream = await prober.new_stream(peer, [TProtocol(DIALBACK_PROBE_PROTOCOL)])
                        try:
                            await write_message(stream, DialBackProbe(nonce=nonce))
                            echo = await read_message(stream, DialBackProbe, max_bytes=MAX_FRAME)
                        finally:
                            await close_stream(stream)
                        if isinstance(echo, DialBackProbe) and echo.nonce == nonce:
                            answered.append(target)
                            cancel.cancel()
            except BaseException as exc:
                if isinstance(exc, trio.Cancelled):
                    raise
                log.debug("dial-back to %s at %s failed: %s", peer, target, exc)

        try:
            async with trio.open_nursery() as nursery:
                for target in targets:
                    nursery.start_soon(attempt, target, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await network.close_peer(peer)
                except Exception:
                    pass
            try:  # else the prober's auto-connector would keep dialling the peer from its peerstore
                prober.get_peerstore().clear_addrs(peer)
            except Exception:
                pass
        return answered[0] if answered else None


@asynccontextmanager
async def open_dial_back(
    host: IHost,
    *,
    serve: bool = True,
    psk_hex: str | None = None,
    config: DialBackConfig | None = None,
) -> AsyncIterator[DialBack]:
    """Register the dial-back protocols on a running ``host``; with ``serve``, also start the prober
    (a second host with an ephemeral identity and the same network key ``psk_hex``, listening nowhere)
    and answer other peers' requests. Every node should serve: checks need servers."""
    config = config or DialBackConfig()
    async with trio.open_nursery() as nursery:
        prober: IHost | None = None
        if serve:
            prober = make_host(create_new_key_pair(), psk_hex=psk_hex)
            ready = trio.Event()
            done = trio.Event()

            async def run_prober() -> None:
                assert prober is not None
                async with prober.run([]):
                    ready.set()
                    await done.wait()

            nursery.start_soon(run_prober)
            await ready.wait()
        service = DialBack(host, prober=prober, config=config)
        # serve_protocol: nothing a peer sends can stop the swarm, and floods are cut at ``limit``.
        serve_protocol(host, DIALBACK_PROBE_PROTOCOL, service._answer_probe, limit=16)
        serve_protocol(host, DIALBACK_PROTOCOL, service._serve, limit=2 * config.max_concurrent)
        try:
            yield service
        finally:
            for proto in (DIALBACK_PROTOCOL, DIALBACK_PROBE_PROTOCOL):
                try:
                    host.remove_stream_handler(TProtocol(proto))
                except Exception:
                    pass
            if serve:
                done.set()
