"""The direct data plane: tensor frames sealed with AES-GCM on a TCP connection of their own.

The record format and the I/O live in the native SealedSocket (csrc/sealed_socket.h). Frames up to
INLINE_BYTES move on the event loop with non-blocking pumps, waiting for the socket with trio, so small
frames never pay a thread hop (≈0.1–0.25 ms here, more than a loopback round trip); larger ones move in a
worker thread with the GIL released, so the event loop and other channels keep running. Blocking on a
slow receiver is ordinary TCP backpressure: there is no timer that could break the channel.

With an acceptor the pumps stop at every header (max_inline=0), and the acceptor sees it before a payload
buffer is taken: a refused frame closes the channel having cost this side no memory of its own.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from tensorlink import _C
from tensorlink.transport.channel import Channel
from tensorlink.transport.errors import FrameRefused
from tensorlink.transport.keys import ChannelKeys
from tensorlink.wire.frame import EncodedFrame, FrameHeader

INLINE_BYTES = 4 << 20  # up to here a frame moves on the event loop (≈1.5 ms of AES + copy at most)
# A receive that finds no data keeps polling through the scheduler this long before sleeping in epoll:
# a small frame's reply usually comes within it, and waking a sleeping core (a VM's vCPU above all)
# costs more than the round trip itself.
SPIN_S = 200e-6
FRAME_READY, NEED_DATA, NEED_POOL = 1, 0, 2
T = TypeVar("T")


# A peer that vanishes (power loss, a cable, a NAT that forgets us) sends no FIN: without these a
# receive would wait for the kernel's default two hours. Silence is probed after KEEPALIVE_IDLE_S and
# the connection dropped after KEEPALIVE_PROBES unanswered probes; data left unacknowledged for
# UNACKED_TIMEOUT_S also drops it. A slow receiver answers probes, so backpressure never trips these.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3
UNACKED_TIMEOUT_S = 30


def tune_socket(sock: socket.socket) -> None:
    """Small frames go out at once (no Nagle delay); dead peers are noticed within about 30 s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sys.platform == "linux":  # other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKED_TIMEOUT_S * 1000)
    sock.setblocking(False)


class DirectChannel(Channel):
    kind = "direct"
    checksum = False  # every payload byte is under an AES-GCM tag; a CRC pass would only cost time

    def __init__(
        self,
        sock: socket.socket,
        keys: ChannelKeys,
        *,
        peer: str,
        job: bytes,
        pool: _C.BufferPool,
        max_payload: int,
    ) -> None:
        super().__init__(peer=peer, job=job, path="tcp", pool=pool, max_payload=max_payload)
        tune_socket(sock)
        self._sock = sock
        self.cipher = keys.cipher
        self._sealed = _C.SealedSocket(sock.fileno(), keys.send, keys.recv, pool, max_payload, verify_crc=False)
        # The fd is closed only when no worker thread can still be inside a syscall on it.
        self._fd_lock = threading.Lock()
        self._threads = 0
        # Threads of this channel only (its one sender and one receiver): with trio's shared default
        # limiter, 40 sends blocked on slow peers would starve every other channel's receives.
        self._limiter = trio.CapacityLimiter(2)
        self._close_requested = False
        self._screened = False  # whether the acceptor took the frame being received (its header is in)
        try:
            ip, port = sock.getpeername()[:2]
            self.remote = f"{ip}:{port}"
        except OSError:
            pass  # already reset by the peer; the first pump will say so

    async def _send_frame(self, frame: EncodedFrame) -> None:
        sealed = self._sealed
        try:
            sealed.start_send(frame.header, frame.payload)
            if frame.nbytes <= INLINE_BYTES:
                while not sealed.pump_send(False):
                    await trio.lowlevel.wait_writable(self._sock.fileno())
            else:
                await self._in_thread(sealed.pump_send, True)
        except trio.Cancelled:
            if sealed.sending:  # part of a frame may be on the wire: the stream cannot be resumed
                self._break("a send was cancelled in the middle of a frame")
            raise
        except Exception as exc:
            self._break(str(exc))
            raise self._failed(exc) from exc

    async def _recv_frame(self) -> tuple[FrameHeader, _C.PooledBuffer | None]:
        sealed = self._sealed
        spin_until: float | None = None
        try:
            while True:
                screen = self.accept is not None and not self._screened
                status = sealed.pump_recv(False, max_inline=0 if screen else INLINE_BYTES)
                if status == FRAME_READY:
                    break
                if screen and sealed.incoming:  # a header is in, no buffer taken for its payload yet
                    head = sealed.header
                    assert head is not None  # incoming is non-zero only once the header is in
                    self._admit(head)
                    self._screened = True
                    if sealed.incoming <= INLINE_BYTES:
                        continue  # the payload may wait in the read-ahead, not the socket: pump before waiting
                if status == NEED_POOL or sealed.incoming > INLINE_BYTES:
                    await self._in_thread(sealed.pump_recv, True)
                    break
                if spin_until is None:
                    spin_until = time.perf_counter() + SPIN_S
                if time.perf_counter() < spin_until:
                    await trio.lowlevel.checkpoint()  # other tasks run; this core stays awake and warm
                else:
                    await trio.lowlevel.wait_readable(self._sock.fileno())  # cancelling here loses nothing
            header, buffer = sealed.take_frame()
            screened, self._screened = self._screened, False
            if not screened:
                self._admit(header)  # an empty payload (nothing was allocated), or an acceptor set mid-frame
        except trio.Cancelled:
            raise
        except FrameRefused:
            self._close_fd()  # _admit recorded why
            raise
        except Exception as exc:
            self._break(str(exc))
            raise self._failed(exc) from exc
        return header, buffer

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking pump in a worker thread. Cancelling it breaks the channel: the thread is woken
        by the socket shutdown and the frame it was moving cannot be resumed by anyone else."""
        with self._fd_lock:
            self._threads += 1

        def run() -> T:
            try:
                return fn(*args)
            finally:
                with self._fd_lock:
                    self._threads -= 1
                    if self._close_requested and self._threads == 0:
                        self._sock.close()

        try:
            # libp2p's trio-typing 0.10 stubs (read before trio's own types) still call this `cancellable`
            return await trio.to_thread.run_sync(  # type: ignore[call-arg]
                run, abandon_on_cancel=True, limiter=self._limiter
            )
        except trio.Cancelled:
            self._break("a transfer was cancelled in the middle of a frame")
            raise

    def _break(self, reason: str) -> None:
        """Close the channel after a failure: the peer sees the connection end, the fd is released."""
        self._mark_closed(reason)
        self._close_fd()

    async def _close_transport(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        self._sealed.shutdown(self.closed_reason or "closed")
        with self._fd_lock:
            if self._close_requested:
                return
            self._close_requested = True
            fd = self._sock.fileno()
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)  # tasks waiting on the fd wake with ClosedResourceError
            if self._threads == 0:
                self._sock.close()

    def _counters(self) -> dict[str, int]:
        s = self._sealed
        return {
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "frames_sent": s.frames_sent,
            "frames_received": s.frames_received,
        }
