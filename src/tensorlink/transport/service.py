"""ChannelService: opens and accepts data-plane channels between peers of the control plane.

Set-up, on a libp2p stream of ``CHANNEL_PROTOCOL`` (Noise-authenticated, so each side knows the other's peer id):

1. opener → ``ChannelOffer{job, ephemeral_key, nonce}``
2. acceptor → ``ChannelAccept{job, ephemeral_key, token, addrs}`` (``addrs``: its data-plane TCP
   addresses, empty when it offers no direct path), or ``ErrorReply``
3. both derive the channel keys (transport/keys.py). If the acceptor offered addresses and the libp2p
   connection between them is direct (not relayed), the opener connects by TCP and sends the sealed
   hello; the acceptor checks it against the pending channel and answers with its own sealed reply.
4. opener → ``ChannelSelect{direct}``: with ``direct`` the stream closes and the TCP connection carries
   the frames (DirectChannel); otherwise the stream itself does (StreamChannel), and the status says so.

A hello for an unknown channel id, a wrong key or a garbled hello closes that TCP connection and
nothing else. A pending channel accepts a few failed hellos before it is dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tensorlink import _C
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import (
    Stream,
    StreamError,
    close_stream,
    is_relayed_stream,
    read_message,
    remote_peer,
    write_message,
)
from tensorlink.transport.channel import Channel
from tensorlink.transport.direct import DirectChannel
from tensorlink.transport.errors import ChannelError, ChannelRefused
from tensorlink.transport.fallback import DEFAULT_WINDOW, StreamChannel
from tensorlink.transport.keys import (
    HELLO_BYTES,
    HELLO_REPLY_BYTES,
    ChannelKeys,
    Ephemeral,
    HandshakeError,
    check_hello,
    check_reply,
    parse_hello,
    seal_hello,
    seal_reply,
)
from tensorlink.wire.errors import WireError
from tensorlink.wire.limits import MAX_FRAME_PAYLOAD
from tensorlink.wire.messages import ChannelAccept, ChannelOffer, ChannelSelect, Cipher, ErrorReply
from tensorlink.wire.protocols import CHANNEL_PROTOCOL

log = logging.getLogger(__name__)

NO_JOB = bytes(16)
MAX_HELLO_FAILURES = 3
MAX_UNVERIFIED = 64  # TCP connections on the data port that have not sent a valid hello yet
CLOSED_KEPT_S = 60.0  # closed channels stay in the status this long, so the reason can be read
SETUPS_PER_PEER = 4  # channel set-ups one peer may have in progress here at once


@dataclass(frozen=True)
class TransportConfig:
    """How this node's data plane listens and connects."""

    listen_ip: str = "127.0.0.1"
    data_port: int = 0  # 0: any free port
    direct: bool = True  # offer and try direct TCP connections; False: libp2p streams only
    # AEAD of direct channels this node opens (it accepts either): AES-128-GCM, the TLS 1.3 default, is
    # ~20 % faster than AES-256-GCM on CPUs without VAES, which is the difference between ~0.55 and ~0.69
    # of raw TCP on a 2-core machine (benchmarks/RESULTS.md).
    cipher: Cipher = "aes-128-gcm"
    connect_timeout_s: float = 3.0
    setup_timeout_s: float = 15.0
    max_payload: int = MAX_FRAME_PAYLOAD
    pool_bytes: int = 1 << 30
    window_bytes: int = DEFAULT_WINDOW  # fallback credit window per channel and direction
    max_channels_per_peer: int = 16  # channels a peer may open here (a pipeline needs one or two)
    max_channels: int = 256


@dataclass
class _Pending:
    keys: ChannelKeys
    ready: trio.Event = field(default_factory=trio.Event)
    sock: socket.socket | None = None
    failures: int = 0


def tcp_endpoint(addr: str) -> tuple[str, int] | None:
    """(ip, port) of ``/ip4/<ip>/tcp/<port>`` or ``/ip6/<ip>/tcp/<port>``; None for anything else."""
    parts = addr.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    if ip.version != (4 if parts[1] == "ip4" else 6) or not 0 < port < 65536 or ip.is_unspecified:
        return None
    return str(ip), port


class ChannelService:
    """Run ``serve`` in a nursery, then ``open`` channels to peers and ``accept`` the ones peers open.

    ``admit(peer, job)`` decides who may open a channel here (default: any authenticated peer)."""

    def __init__(
        self,
        host: PeerHost,
        config: TransportConfig = TransportConfig(),
        *,
        pool: _C.BufferPool | None = None,
        admit: Callable[[str, bytes], bool] | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self.pool = pool if pool is not None else _C.BufferPool(config.pool_bytes)
        self.admit = admit or (lambda peer, job: True)
        self.offer_direct = config.direct  # the node turns this off while it is not publicly reachable
        self.data_port: int | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._channels: list[Channel] = []
        self._incoming_in, self._incoming_out = trio.open_memory_channel[Channel](math.inf)
        self._nursery: trio.Nursery | None = None
        # TCP connections that have not proven a channel yet; past the cap the oldest is dropped, so idle
        # connections cannot hold every slot and push real channels onto the slow fallback.
        self._unverified: dict[trio.SocketStream, trio.CancelScope] = {}
        # Set-ups this node runs to each peer; past SETUPS_PER_PEER the peer would refuse them, so they queue.
        self._setups: dict[str, trio.Semaphore] = {}

    # --- lifecycle -----------------------------------------------------------------------------------

    # trio 0.35 has TaskStatus; libp2p's trio-typing 0.10 stubs (which mypy reads first) predate it
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[name-defined]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.config.direct:
                listeners = await trio.open_tcp_listeners(self.config.data_port, host=self.config.listen_ip)
                self.data_port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, self._on_tcp, listeners)
                log.info("data plane listening on %s:%d", self.config.listen_ip, self.data_port)
            self.host.serve(CHANNEL_PROTOCOL, self._on_stream, limit=32, per_peer=SETUPS_PER_PEER)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    for channel in self._channels:
                        await channel.aclose()

    def data_addrs(self) -> list[str]:
        """This node's direct data-plane addresses: the IPs it announces on libp2p, at the data port."""
        if not (self.offer_direct and self.data_port):
            return []
        ips: list[str] = []
        for text in self.host.addrs():
            if "/p2p-circuit" in text:
                continue
            endpoint = tcp_endpoint("/".join(text.split("/")[:5]))
            if endpoint and endpoint[0] not in ips:
                ips.append(endpoint[0])
        return [f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{self.data_port}" for ip in ips[:8]]

    def channels(self) -> list[Channel]:
        """Open channels."""
        return [c for c in self._channels if not c.closed]

    def status(self) -> list[dict[str, Any]]:
        """Open channels and those closed in the last CLOSED_KEPT_S, with the reason they closed."""
        self._prune()
        return [c.stats() for c in self._channels]

    def _prune(self) -> None:
        now = time.time()
        self._channels = [c for c in self._channels if c.closed_at is None or now - c.closed_at < CLOSED_KEPT_S]

    # --- opening -------------------------------------------------------------------------------------

    async def open(self, peer: str, job: bytes = NO_JOB) -> Channel:
        """A channel to ``peer`` (connected on the control plane) for ``job``: direct TCP when the peer
        offers it and the connection to it is direct, else the libp2p stream."""
        if self._nursery is None:
            raise RuntimeError("start ChannelService.serve in a nursery before opening channels")
        setups = self._setups.setdefault(peer, trio.Semaphore(SETUPS_PER_PEER))
        try:
            async with setups:
                return await self._open(peer, job)
        finally:
            if setups.value == SETUPS_PER_PEER:
                self._setups.pop(peer, None)

    async def _open(self, peer: str, job: bytes) -> Channel:
        try:
            with trio.fail_after(self.config.setup_timeout_s):
                stream = await self.host.open(peer, CHANNEL_PROTOCOL)
        except trio.TooSlowError:
            raise ChannelError(f"no stream to {peer} within {self.config.setup_timeout_s} s") from None
        except Exception as exc:  # libp2p's errors: unknown peer, no route, protocol not supported
            raise ChannelError(
                f"cannot reach {peer} on the control plane ({type(exc).__name__}: {exc}); connect to it first "
                "(bootstrap or host.connect) and check that it runs a TensorLink node"
            ) from exc
        try:
            with trio.fail_after(self.config.setup_timeout_s):
                sock, keys, why = await self._negotiate(stream, peer, job)
        except BaseException as exc:
            await close_stream(stream)
            if isinstance(exc, trio.TooSlowError):
                raise ChannelError(f"channel set-up with {peer} took over {self.config.setup_timeout_s} s") from None
            if isinstance(exc, (StreamError, WireError, HandshakeError)):
                raise ChannelError(f"could not open a channel to {peer}: {exc}") from exc
            raise
        return await self._start_channel(stream, sock, keys, peer=peer, job=job, why=why)

    async def _negotiate(self, stream: Stream, peer: str, job: bytes) -> tuple[socket.socket | None, ChannelKeys, str]:
        """The opener's side of the set-up: keys, then a direct connection if one can be had."""
        eph = Ephemeral()
        nonce = secrets.token_bytes(32)
        offer = ChannelOffer(job=job, ephemeral_key=eph.public, nonce=nonce, cipher=self.config.cipher)
        await write_message(stream, offer)
        reply = await read_message(stream, ChannelAccept, ErrorReply)
        if isinstance(reply, ErrorReply):
            raise ChannelRefused(f"{peer} refused a channel: {reply.message} ({reply.code})")
        keys = eph.derive(
            reply.ephemeral_key,
            opener=self.host.peer_id,
            acceptor=peer,
            job=job,
            nonce=nonce,
            token=reply.token,
            cipher=offer.cipher,
            is_opener=True,
        )
        sock, why = await self._connect_direct(peer, reply.addrs, keys, relayed=is_relayed_stream(stream))
        try:
            await write_message(stream, ChannelSelect(direct=sock is not None, reason=why[:256]))
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return sock, keys, why

    async def _connect_direct(
        self, peer: str, addrs: list[str], keys: ChannelKeys, *, relayed: bool
    ) -> tuple[socket.socket | None, str]:
        """A TCP connection to the peer's data plane that passed the sealed hello, or (None, why not)."""
        if not self.config.direct:
            return None, "direct connections are off on this node"
        if not addrs:
            return None, "the peer offers no direct address"
        if relayed:
            return None, "the control-plane connection to the peer is relayed"
        # Only the IP we already reach the peer on: its other addresses are usually private ones behind
        # a NAT, where a connect attempt just waits out the timeout.
        reached = {
            e[0] for e in (tcp_endpoint("/".join(a.split("/")[:5])) for a in self.host.connection_addrs(peer)) if e
        }
        endpoints = [e for e in map(tcp_endpoint, addrs) if e is not None and e[0] in reached]
        if not endpoints:
            return None, "the peer's data-plane addresses are not on the IP its connection comes from (NAT)"
        errors: list[str] = []
        for ip, port in endpoints[:3]:
            try:
                with trio.fail_after(self.config.connect_timeout_s):
                    tcp = await trio.open_tcp_stream(ip, port)
                    try:
                        await tcp.send_all(seal_hello(keys))
                        check_reply(keys, await _receive_exactly(tcp, HELLO_REPLY_BYTES))
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
                return socket.socket(fileno=tcp.socket.detach()), f"direct TCP to {ip}:{port}"
            except (OSError, trio.TooSlowError, HandshakeError, EOFError) as exc:
                errors.append(f"{ip}:{port}: {type(exc).__name__} {exc}".strip())
        return None, "direct connection failed (" + "; ".join(errors) + ")"

    # --- accepting -----------------------------------------------------------------------------------

    async def accept(self) -> Channel:
        """The next channel a peer opened to this node."""
        return await self._incoming_out.receive()

    async def _on_stream(self, stream: Stream) -> None:
        peer = remote_peer(stream)
        me = self.host.peer_id
        keys: ChannelKeys | None = None
        try:
            with trio.fail_after(self.config.setup_timeout_s):
                offer = await read_message(stream, ChannelOffer)
                refusal = self._refusal(peer, offer.job)
                if refusal is not None:
                    await write_message(stream, refusal)
                    await close_stream(stream)
                    return
                eph = Ephemeral()
                token = secrets.token_bytes(32)
                keys = eph.derive(
                    offer.ephemeral_key,
                    opener=peer,
                    acceptor=me,
                    job=offer.job,
                    nonce=offer.nonce,
                    token=token,
                    cipher=offer.cipher,
                    is_opener=False,
                )
                relayed = is_relayed_stream(stream)
                addrs = [] if relayed else self.data_addrs()
                pending = _Pending(keys)
                if addrs:
                    self._pending[keys.channel_id] = pending
                await write_message(
                    stream, ChannelAccept(job=offer.job, ephemeral_key=eph.public, token=token, addrs=addrs)
                )
                select = await read_message(stream, ChannelSelect)
                if select.direct:
                    if not addrs:
                        raise StreamError("the opener chose a direct connection that was never offered")
                    await pending.ready.wait()  # the hello completed before the opener selected direct
        finally:
            if keys is not None:
                self._pending.pop(keys.channel_id, None)
        channel = await self._start_channel(
            stream, pending.sock if select.direct else None, keys, peer=peer, job=offer.job, why=select.reason
        )
        self._incoming_in.send_nowait(channel)

    def _refusal(self, peer: str, job: bytes) -> ErrorReply | None:
        """Why a channel from peer for job is refused, or None. The caps bound what peers can make this
        node hold: every channel may buffer up to its window of received frames."""
        if not self.admit(peer, job):
            return ErrorReply(code="not_admitted", message=f"no channel for job {job.hex()} here")
        open_channels = self.channels()
        if sum(c.peer == peer for c in open_channels) >= self.config.max_channels_per_peer:
            return ErrorReply(
                code="too_many_channels",
                message=f"{self.config.max_channels_per_peer} channels from this peer are open; close one first",
            )
        if len(open_channels) >= self.config.max_channels:
            return ErrorReply(code="too_many_channels", message=f"{self.config.max_channels} channels are open here")
        return None

    async def _on_tcp(self, tcp: trio.SocketStream) -> None:
        with trio.CancelScope() as evicted:
            self._unverified[tcp] = evicted
            if len(self._unverified) > MAX_UNVERIFIED:
                self._unverified.pop(next(iter(self._unverified))).cancel()
            try:
                with trio.fail_after(self.config.connect_timeout_s + 2):
                    channel_id, sealed_token = parse_hello(await _receive_exactly(tcp, HELLO_BYTES))
                    pending = self._pending.get(channel_id)
                    if pending is None or pending.sock is not None:
                        raise HandshakeError("hello for no pending channel")
                    try:
                        check_hello(pending.keys, sealed_token)
                    except HandshakeError:
                        pending.failures += 1
                        if pending.failures >= MAX_HELLO_FAILURES:
                            self._pending.pop(channel_id, None)
                        raise
                    await tcp.send_all(seal_reply(pending.keys))
            except (HandshakeError, EOFError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                log.info("data plane: refused a TCP connection: %s", exc)
                return  # serve_listeners closes it
            finally:
                self._unverified.pop(tcp, None)
            pending.sock = socket.socket(fileno=tcp.socket.detach())
            pending.ready.set()

    # --- both sides ----------------------------------------------------------------------------------

    async def _start_channel(
        self, stream: Stream, sock: socket.socket | None, keys: ChannelKeys, *, peer: str, job: bytes, why: str
    ) -> Channel:
        assert self._nursery is not None
        channel: Channel
        if sock is not None:
            await close_stream(stream)
            channel = DirectChannel(sock, keys, peer=peer, job=job, pool=self.pool, max_payload=self.config.max_payload)
            log.info("channel to %s: direct (%s)", peer, why)
        else:
            path = "relayed" if is_relayed_stream(stream) else "direct"
            channel = StreamChannel(
                stream,
                peer=peer,
                job=job,
                path=path,
                pool=self.pool,
                max_payload=self.config.max_payload,
                window=self.config.window_bytes,
            )
            await self._nursery.start(channel.run)
            log.info("channel to %s: libp2p stream over a %s connection (%s)", peer, path, why)
        self._prune()
        self._channels.append(channel)
        return channel


async def _receive_exactly(tcp: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await tcp.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
