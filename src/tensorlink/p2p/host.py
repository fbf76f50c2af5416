"""make_host(): the one place a libp2p host is built, with the settings that are not optional.

Measured with py-libp2p 0.8.1: the stock host also accepts plaintext and SECIO
peers, adds 250 ms to every connect with its default of 3 connections per peer, and advertises
/ip4/0.0.0.0 when it listens on a wildcard. Here: Noise only, Yamux only, one connection per peer,
concrete announce addresses, and an optional pre-shared network key.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.utils.address_validation import expand_wildcard_address

from tensorlink.p2p._libp2p import ReadLoopSafeYamux, install_yamux
from tensorlink.p2p.streams import Stream, awaiting_first_record, error_record, write_record

log = logging.getLogger(__name__)

# Sized for a TensorLink swarm, not for the public IPFS network the defaults assume. The AutoConnector
# aims at the midpoint of the watermarks (20 here); with the stock 16/192 it dials ~100 peers, i.e.
# every peer a node hears of, which costs a 30-node swarm about 20 s of CPU.
CONNECTIONS = ConnectionConfig(
    max_connections_per_peer=1,
    max_connections=256,
    min_connections=4,
    low_watermark=8,
    high_watermark=32,
    dial_timeout=5.0,
)


# Before any host is built: py-libp2p must build our Yamux (see _libp2p.install_yamux).
install_yamux()


class AddressError(ValueError):
    """A listen, announce or bootstrap address that cannot be used; the message says how to fix it."""


def parse_multiaddr(text: str, *, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:
        raise AddressError(f"{what} {text!r} is not a multiaddr ({exc}); example: /ip4/127.0.0.1/tcp/4001") from None


def _is_wildcard(addr: multiaddr.Multiaddr) -> bool:
    for proto in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(addr.value_for_protocol(proto)).is_unspecified
        except Exception:
            continue
    return False


def concrete_addrs(candidates: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """What to advertise when no --announce is given: listen addresses with wildcards expanded to the
    machine's interfaces, and only the transport's own addresses (observed ones are unconfirmed)."""
    out: list[multiaddr.Multiaddr] = []
    seen: set[str] = set()
    for addr in candidates:
        for concrete in expand_wildcard_address(addr) if _is_wildcard(addr) else [addr]:
            if not _is_wildcard(concrete) and str(concrete) not in seen:
                seen.add(str(concrete))
                out.append(concrete)
    return out


async def connect_addr(host: IHost, addr: str, timeout_s: float) -> str:
    """Dial a full multiaddr (ending in /p2p/<peer id>) within ``timeout_s``; the peer id reached.
    A malformed address raises ValueError naming it; a peer not reached raises ConnectionError."""
    try:
        info = info_from_p2p_addr(parse_multiaddr(addr, what="peer address"))
    except ValueError:
        raise
    except Exception as exc:  # libp2p's own address errors
        raise ValueError(f"peer address {addr!r} needs /p2p/<peer id> at the end: {exc}") from None
    try:
        with trio.fail_after(timeout_s):
            await host.connect(info)
    except Exception as exc:  # refused, unreachable, handshake failed, too slow
        raise ConnectionError(f"could not reach {addr}: {type(exc).__name__}: {exc}") from None
    return info.peer_id.to_base58()


def remember_addrs(host: IHost, peer: str, addrs: Sequence[str], ttl_s: float) -> None:
    """Keep ``peer``'s addresses (full multiaddrs from its signed record) so the host can dial it later;
    addresses that do not parse or name another peer are skipped."""
    for addr in addrs:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:
            continue
        if info.peer_id.to_base58() == peer:
            host.get_peerstore().add_addrs(info.peer_id, info.addrs, int(ttl_s))


def check_bootstrap(addrs: Sequence[str]) -> None:
    """Bootstrap addresses must be full: a transport address and the peer id to expect there."""
    for addr in addrs:
        parsed = parse_multiaddr(addr, what="bootstrap address")
        if "p2p" not in [p.name for p in parsed.protocols()]:
            raise AddressError(f"bootstrap address {addr} has no /p2p/<peer id>; copy it from the node's start log")


def make_host(
    key_pair: KeyPair,
    *,
    announce: Sequence[str] = (),
    psk_hex: str | None = None,
) -> IHost:
    """A libp2p host with TensorLink's mandatory settings. Listen addresses go to ``host.run()``; bootstrap
    peers are dialled by the caller (Directory.connect_bootstrap), which retries and reports."""
    announce_addrs = [parse_multiaddr(a, what="announce address") for a in announce]
    for addr in announce_addrs:
        if _is_wildcard(addr):
            raise AddressError(f"announce address {addr} is a wildcard; give the address peers should dial")
    if psk_hex is not None and (len(psk_hex) != 64 or not all(c in "0123456789abcdefABCDEF" for c in psk_hex)):
        raise AddressError("network key must be 64 hex characters (32 bytes); generate one with `openssl rand -hex 32`")
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_ID): Noise(key_pair, noise_privkey=new_noise_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): ReadLoopSafeYamux},
        connection_config=CONNECTIONS,
        announce_addrs=announce_addrs or None,
        addrs_factory=None if announce_addrs else concrete_addrs,
        psk=psk_hex,
        enable_mDNS=False,
        enable_upnp=False,
        enable_quic=False,
    )


FIRST_MESSAGE_S = 5.0  # honest openers write their first message at once; measured in tests/node/test_protocol_slots.py
PER_PEER = 4  # streams of one protocol one peer may hold at once


def serve_protocol(
    host: IHost,
    protocol: str,
    handler: Callable[[INetStream], Awaitable[None]],
    *,
    limit: int = 16,
    per_peer: int = PER_PEER,
    first_message_s: float = FIRST_MESSAGE_S,
    refuse: Callable[[str, str], bytes] = error_record,
) -> None:
    """Register a stream handler that can never take the node down, nor be starved by one peer.

    In py-libp2p 0.8.1 an exception escaping a stream handler propagates into the Swarm and stops it,
    so one malformed stream from one peer would kill the node. Here every exception is logged and the
    stream reset. At most ``limit`` streams of the protocol are handled at once, at most ``per_peer`` of
    them from one peer, and a stream whose first message (read with ``read_record``) has not arrived
    within ``first_message_s`` is ended, so idle streams cannot hold the slots honest peers need.
    A refused stream is told why with ``refuse(code, reason)``: a record of the protocol's error message.
    """
    slots = trio.Semaphore(limit)
    held: dict[str, int] = {}

    async def guarded(stream: INetStream) -> None:
        peer = _remote(stream)
        if held.get(peer, 0) >= per_peer:
            await _refuse(stream, refuse, "busy", f"peer {peer} already holds {per_peer} streams of {protocol}")
            return
        if slots.value == 0:
            await _refuse(stream, refuse, "busy", f"all {limit} streams of {protocol} here are busy; try again later")
            return
        held[peer] = held.get(peer, 0) + 1
        try:
            async with slots:
                await _handle(stream, peer)
        finally:
            held[peer] -= 1
            if not held[peer]:
                del held[peer]

    async def _handle(stream: INetStream, peer: str) -> None:
        with trio.CancelScope(deadline=trio.current_time() + first_message_s) as waiting:
            try:
                with awaiting_first_record(stream, waiting):
                    await handler(stream)
            except trio.Cancelled:
                raise
            except Exception as exc:
                log.info("%s: dropped a stream from %s: %s", protocol, peer, exc)
                await reset_stream(stream)
        if waiting.cancelled_caught:
            log.info("%s: no first message from %s within %.1f s; stream closed", protocol, peer, first_message_s)
            await _refuse(stream, refuse, "too_slow", f"no first message within {first_message_s:.1f} s on {protocol}")

    host.set_stream_handler(TProtocol(protocol), guarded)


async def _refuse(stream: Stream, refuse: Callable[[str, str], bytes], code: str, reason: str) -> None:
    """Tell the peer why, then reset; at most ~2 s. Yamux drops what a stream buffered when a reset
    arrives, so the reset waits for the peer to read and close."""
    log.debug("refused a stream from %s: %s", _remote(stream), reason)
    with trio.move_on_after(1.0):
        try:
            await write_record(stream, refuse(code, reason))
            await stream.close()
            while await stream.read(4096):
                pass
        except Exception:
            pass
    await reset_stream(stream)


def _remote(stream: Stream) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:
        return "an unknown peer"


async def reset_stream(stream: Stream) -> None:
    """Reset a stream we are done with because of the peer; never raises, never waits more than 1 s."""
    with trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass
