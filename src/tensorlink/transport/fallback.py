"""The fallback data plane: the same frames on a libp2p stream, for peers reachable only through a relay
or a punched hole (Noise already encrypts and authenticates the stream).

py-libp2p's Yamux resets a stream when its writer waits more than 5 s for a window update, which a busy
receiver would cause (measured with py-libp2p 0.8.1). So the receiver here always drains the
stream into memory at once, and memory stays bounded by credit instead: a side may only send frames
the other side has granted room for. A receiver that is slow for minutes makes the sender wait for
credit, outside Yamux, with no timer.

Records on the stream: ``b"F"`` + 128-byte frame header + payload, or ``b"C"`` + 8-byte big-endian
credit grant. Each side first grants its window; a frame larger than the window may be sent only when
the receiver holds nothing else of ours (all credit back), so any frame up to max_payload gets through.

The reader screens each header with the channel's acceptor before reading the payload. Frames that came
before an acceptor was set (credit bounds them) are screened when taken; a frame larger than the window
waits for an acceptor or a recv before its payload is read, so no frame is read unscreened past the window
(its sender's writes stall meanwhile, as with any receiver that does not read: a link sets its acceptor at once).
"""

from __future__ import annotations

import math
from typing import Any

import trio

from tensorlink import _C
from tensorlink.p2p.host import reset_stream
from tensorlink.p2p.streams import StreamError, close_stream, read_exactly
from tensorlink.transport.channel import Acceptor, Channel
from tensorlink.transport.errors import FrameRefused
from tensorlink.wire.errors import ChecksumError, WireError
from tensorlink.wire.frame import HEADER_SIZE, EncodedFrame, FrameHeader, decode_header

FRAME, CREDIT = b"F", b"C"
WRITE_PIECE = 1 << 20  # bytes per stream.write: Yamux splits further; this bounds each copy
READ_PIECE = 1 << 20
# 16 MiB is ~200 ms of what a libp2p stream carries (≈80 MB/s), far above its bandwidth-delay product,
# and bounds what one channel can make its receiver buffer.
DEFAULT_WINDOW = 16 << 20
# (header, payload buffer, credit charged, whether the acceptor saw it) or the error
_Received = tuple[FrameHeader, Any, int, bool]
_Item = _Received | BaseException


class StreamChannel(Channel):
    kind = "libp2p"

    def __init__(
        self,
        stream: Any,
        *,
        peer: str,
        job: bytes,
        path: str,
        pool: _C.BufferPool,
        max_payload: int,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        super().__init__(peer=peer, job=job, path=path, pool=pool, max_payload=max_payload)
        self._stream = stream
        self._window = window
        self._write_lock = trio.Lock()
        # unbounded in count; credit bounds the bytes in it
        self._frames_in, self._frames_out = trio.open_memory_channel[_Item](math.inf)
        self._credit = 0  # bytes we may still send
        self._peer_window: int | None = None  # the peer's first grant: "all credit back"
        self._credit_changed = trio.Event()
        self._granted_unused = window  # bytes the peer may still send us
        self._screening = trio.Event()  # set once an acceptor is set or recv is called: see the module docstring
        self._counts = {"bytes_sent": 0, "bytes_received": 0, "frames_sent": 0, "frames_received": 0}

    # trio 0.35 has TaskStatus; libp2p's trio-typing 0.10 stubs (which mypy reads first) predate it
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[name-defined]
        """The reader: run it in a nursery for the channel's lifetime (ChannelService does)."""
        try:
            await self._write(CREDIT + self._window.to_bytes(8, "big"))
            task_status.started()
            while True:
                kind = await read_exactly(self._stream, 1)
                if kind == CREDIT:
                    self._on_credit(int.from_bytes(await read_exactly(self._stream, 8), "big"))
                elif kind == FRAME:
                    self._frames_in.send_nowait(await self._read_frame())
                else:
                    raise WireError(f"unknown record kind {kind!r} on the channel stream")
        except Exception as exc:
            error = exc if isinstance(exc, FrameRefused) else self._failed(exc)
            self._frames_in.send_nowait(error)
            self._credit_changed.set()
            with trio.CancelScope(shield=True):
                await reset_stream(self._stream)  # the peer's end must learn that the channel is gone

    def _on_credit(self, grant: int) -> None:
        if grant <= 0 or grant > 1 << 40:
            raise WireError(f"credit grant of {grant} bytes is out of range")
        if self._peer_window is None:
            self._peer_window = grant
        self._credit += grant
        if self._credit > self._peer_window:
            raise WireError("peer granted more credit than its window")
        self._credit_changed.set()

    async def _read_frame(self) -> _Received:
        header = decode_header(await read_exactly(self._stream, HEADER_SIZE), max_payload=self.max_payload)
        size = 1 + HEADER_SIZE + header.payload_len
        if size > self._granted_unused and self._granted_unused != self._window:
            raise WireError(f"peer sent a {size}-byte frame with only {self._granted_unused} bytes of credit")
        if size > self._granted_unused and self.accept is None:
            await self._screening.wait()  # past what credit bounds: not read before it can be screened
        screened = self.accept is not None
        self._admit(header)
        charged = min(size, self._granted_unused)  # the sender charges its credit the same way
        self._granted_unused -= charged
        buffer: Any = None
        if header.payload_len:
            try:
                buffer = self.pool.acquire(header.payload_len, timeout=0)
            except _C.PoolExhausted:
                buffer = bytearray(header.payload_len)  # credit bounds this; stalling would let Yamux reset
            view = memoryview(buffer).cast("B")
            got = 0
            while got < header.payload_len:
                piece = await self._stream.read(min(READ_PIECE, header.payload_len - got))
                if not piece:
                    raise StreamError(f"stream ended {got} bytes into a {header.payload_len}-byte payload")
                view[got : got + len(piece)] = piece
                got += len(piece)
            if _C.crc32c(view) != header.payload_crc:
                raise ChecksumError(f"payload checksum mismatch (corrupted in transit) in {header!r}")
        self._counts["bytes_received"] += size
        self._counts["frames_received"] += 1
        return header, buffer, charged, screened

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            await self._stream.write(data)

    async def _send_frame(self, frame: EncodedFrame) -> None:
        size = 1 + frame.nbytes
        while True:
            self._check_open()
            window = self._peer_window
            if window is not None and (self._credit >= size or self._credit == window):
                break
            self._credit_changed = trio.Event()
            await self._credit_changed.wait()
        self._credit -= min(size, self._credit)
        try:
            async with self._write_lock:
                payload = frame.payload
                first = WRITE_PIECE - 1 - len(frame.header)  # one write for a small frame: no Nagle wait
                await self._stream.write(FRAME + frame.header + bytes(payload[:first]))
                for start in range(first, payload.nbytes, WRITE_PIECE):
                    await self._stream.write(bytes(payload[start : start + WRITE_PIECE]))
        except trio.Cancelled:
            self._mark_closed("a send was cancelled in the middle of a frame")
            with trio.CancelScope(shield=True):
                await close_stream(self._stream)
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        self._counts["bytes_sent"] += size
        self._counts["frames_sent"] += 1

    def set_acceptor(self, accept: Acceptor) -> None:
        super().set_acceptor(accept)
        self._screening.set()

    async def _recv_frame(self) -> tuple[FrameHeader, Any]:
        self._screening.set()
        item = await self._frames_out.receive()
        if isinstance(item, BaseException):
            raise item
        header, buffer, charged, screened = item
        if not screened:
            try:
                self._admit(header)  # it came before the acceptor was set
            except FrameRefused:
                with trio.CancelScope(shield=True):
                    await reset_stream(self._stream)
                raise
        self._granted_unused += charged
        try:
            with trio.CancelScope(shield=True):  # the frame is taken: a cancel here must not drop it
                await self._write(CREDIT + charged.to_bytes(8, "big"))
        except Exception as exc:
            raise self._failed(exc) from exc
        return header, buffer

    async def _close_transport(self) -> None:
        self._frames_in.send_nowait(self._failed(ConnectionError("closed by this side")))
        self._credit_changed.set()
        await close_stream(self._stream)

    def _counters(self) -> dict[str, int]:
        return dict(self._counts)
