"""The Channel API shared by the direct (sealed TCP) and the fallback (libp2p stream) data planes."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import trio

from tensorlink import _C
from tensorlink.transport.errors import ChannelError, FrameRefused
from tensorlink.transport.staging import DeviceStager
from tensorlink.wire.compression import Compression
from tensorlink.wire.frame import EncodedFrame, Frame, FrameHeader, Route, decode_payload, encode_frame

NO_ROUTE = Route()
# Screens a frame by its validated header before its payload is read (and before any buffer is taken for it):
# returns to take the frame, raises FrameRefused to refuse it. Called once per frame, so keep it cheap.
Acceptor = Callable[[FrameHeader], None]


class Turn:
    """A FIFO mutex for one direction of a channel, so concurrent senders never interleave frames.

    Not trio.Lock: ``async with lock`` always yields to the scheduler, and even its ``acquire_nowait``
    spends ~2 µs per frame on cancellation bookkeeping; an 8 KiB round trip takes four turns. Here an
    uncontended turn is two attribute writes, and a release hands the turn straight to the first waiter."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        if self._held or self._waiters:
            await self._waiters.park()  # woken by release() with the turn already ours
        else:
            self._held = True

    def release(self) -> None:
        if self._waiters:
            self._waiters.unpark()  # _held stays True: ownership passes to the woken task
        else:
            self._held = False


class Channel(abc.ABC):
    """A bidirectional tensor channel to one peer for one job.

    ``send`` and ``recv`` may run at the same time (one task each); several senders queue on a lock, so
    frames never interleave. A failure in either direction closes the whole channel, and every later call
    raises ChannelError naming the first failure (``closed_reason``).

    With an acceptor (``set_acceptor``) the receiver decides from each frame's header whether it wants the
    frame, so a peer cannot make it allocate for a frame it would refuse; a refusal closes the channel."""

    kind: ClassVar[str]
    cipher: str = "noise (libp2p)"  # what encrypts the bytes on the wire
    # Whether frames carry a payload CRC: off where an AEAD tag already covers every byte.
    checksum: ClassVar[bool] = True

    def __init__(self, *, peer: str, job: bytes, path: str, pool: _C.BufferPool, max_payload: int) -> None:
        self.peer = peer
        self.job = job
        self.path = path  # how the bytes travel: "tcp" (direct), "direct" or "relayed" libp2p connection
        self.pool = pool
        self.max_payload = max_payload
        self.opened_at = time.time()
        self.remote: str | None = None  # the peer's ip:port for a direct connection
        self.closed_reason: str | None = None
        self.closed_at: float | None = None
        self._send_turn = Turn()
        self._recv_turn = Turn()
        self._stagers: dict[torch.device, DeviceStager] = {}
        self.accept: Acceptor | None = None
        self._refusal: FrameRefused | None = None  # what closed the channel, if its acceptor did

    # --- the API -------------------------------------------------------------------------------------

    async def send(
        self, tensor: torch.Tensor, route: Route = NO_ROUTE, *, compression: Compression = Compression.NONE
    ) -> None:
        """Send one tensor (CPU or CUDA; non-contiguous ones are made contiguous). Returns once the frame
        is handed to the kernel (direct) or the stream (fallback); waits while the receiver is slow."""
        self._check_open()
        if tensor.is_cuda:
            host, copied = self._stager(tensor.device).to_host(tensor)
            await trio.to_thread.run_sync(copied.synchronize)
            tensor = host
        frame = encode_frame(
            tensor.contiguous(), route, compression=compression, max_payload=self.max_payload, checksum=self.checksum
        )
        await self._send_turn.acquire()
        try:
            await self._send_frame(frame)
        finally:
            self._send_turn.release()

    async def recv(self, device: torch.device | str | None = None) -> Frame:
        """The next tensor and its route. The tensor lives in a pool buffer that returns to the pool when
        the tensor is freed; with a CUDA ``device`` it is copied there on the copy stream. FrameRefused when
        the acceptor refused a frame (this one or an earlier one: the channel is closed)."""
        if self._refusal is not None:
            raise FrameRefused(str(self._refusal))
        self._check_open()
        await self._recv_turn.acquire()
        try:
            header, buffer = await self._recv_frame()
        finally:
            self._recv_turn.release()
        tensor = decode_payload(header, buffer if buffer is not None else b"", verify=False)
        route = Route(header.job, header.step, header.micro_batch, header.stage)
        if device is not None and torch.device(device).type == "cuda":
            tensor = self._stager(torch.device(device)).to_device(tensor)
        return Frame(tensor, route)

    def set_acceptor(self, accept: Acceptor) -> None:
        """Screen every frame not yet received by its header (see Acceptor)."""
        self.accept = accept

    async def aclose(self) -> None:
        self._mark_closed("closed by this side")
        await self._close_transport()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def stats(self) -> dict[str, Any]:
        """For the status endpoint and logs."""
        return {
            "peer": self.peer,
            "job": self.job.hex(),
            "kind": self.kind,
            "path": self.path,
            "cipher": self.cipher,
            "remote": self.remote,
            "opened_at": self.opened_at,
            "closed": self.closed_reason,
            **self._counters(),
        }

    # --- for subclasses ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _send_frame(self, frame: EncodedFrame) -> None: ...

    @abc.abstractmethod
    async def _recv_frame(self) -> tuple[FrameHeader, _C.PooledBuffer | bytearray | None]: ...

    @abc.abstractmethod
    async def _close_transport(self) -> None: ...

    @abc.abstractmethod
    def _counters(self) -> dict[str, int]: ...

    def _mark_closed(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self.closed_at = time.time()

    def _admit(self, header: FrameHeader) -> None:
        """The acceptor's verdict on a frame whose payload is unread. A refusal marks the channel closed with a
        reason naming the header and why, and propagates; the subclass then ends its transport."""
        if self.accept is None:
            return
        try:
            self.accept(header)
        except FrameRefused as exc:
            self._refusal = exc
            self._mark_closed(f"refused {header!r}: {exc}")
            raise

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise ChannelError(f"channel to {self.peer} is closed: {self.closed_reason}", reason=self.closed_reason)

    def _failed(self, exc: BaseException) -> ChannelError:
        """Record a failure that closed the channel and the error to raise for it."""
        self._mark_closed(f"{type(exc).__name__}: {exc}")
        assert self.closed_reason is not None
        return ChannelError(f"channel to {self.peer} closed: {self.closed_reason}", reason=self.closed_reason)

    def _stager(self, device: torch.device) -> DeviceStager:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._stagers:
            self._stagers[device] = DeviceStager(self.pool, device)
        return self._stagers[device]
