"""Control messages on libp2p streams: a 4-byte big-endian length, then one msgpack message.

Shared by every request/response protocol of the node (dial-back, data-plane channel set-up), so each
reads with the same caps and fails with the same StreamError."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, overload

import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from tensorlink.wire.messages import MAX_MESSAGE_BYTES, ErrorReply, Message, decode_message, encode_message


class Stream(Protocol):
    """What TensorLink uses of a libp2p stream (``INetStream`` is one): bytes in and out, close, reset.
    ``muxed_conn`` is the connection it runs on; ``remote_peer`` reads the authenticated peer id from it."""

    muxed_conn: Any

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


class StreamError(Exception):
    """The stream ended early, announced an oversized message or sent one of the wrong kind."""


# The stream a handler serves and the deadline its first message must meet (serve_protocol sets both).
_first_record: ContextVar[tuple[Stream, trio.CancelScope] | None] = ContextVar("first_record", default=None)


@contextmanager
def awaiting_first_record(stream: Stream, deadline: trio.CancelScope) -> Iterator[None]:
    """While inside, the first whole record read from ``stream`` (by ``read_record``) lifts ``deadline``:
    a served stream must say something soon, and may then wait as long as its protocol allows."""
    token = _first_record.set((stream, deadline))
    try:
        yield
    finally:
        _first_record.reset(token)


def error_record(code: str, reason: str) -> bytes:
    """An ErrorReply as a record: how the node's protocols (but the stage protocol) refuse a stream."""
    return encode_message(ErrorReply(code=code, message=reason[:1024]))


async def write_message(stream: Stream, msg: Message) -> None:
    await write_record(stream, encode_message(msg))


async def write_record(stream: Stream, data: bytes) -> None:
    """One length-prefixed record (an encoded message of any protocol's schema)."""
    await stream.write(len(data).to_bytes(4, "big") + data)


async def read_record(stream: Stream, max_bytes: int) -> bytes:
    size = int.from_bytes(await read_exactly(stream, 4), "big")
    if size > max_bytes:
        raise StreamError(f"message of {size} bytes announced, more than {max_bytes}")
    data = await read_exactly(stream, size)
    waiting = _first_record.get()
    if waiting is not None and waiting[0] is stream:
        waiting[1].deadline = math.inf
    return data


async def read_exactly(stream: Stream, n: int) -> bytes:
    """Exactly n bytes from the stream; StreamError if it ends (EOF or reset) first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF, StreamReset, ...
            raise StreamError(f"stream ended after {len(buf)} of {n} bytes ({type(exc).__name__})") from None
        if not chunk:
            raise StreamError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


_A = TypeVar("_A", bound=Message)
_B = TypeVar("_B", bound=Message)


@overload
async def read_message(stream: Stream, a: type[_A], /, *, max_bytes: int | None = None) -> _A: ...
@overload
async def read_message(stream: Stream, a: type[_A], b: type[_B], /, *, max_bytes: int | None = None) -> _A | _B: ...
@overload
async def read_message(stream: Stream, *expect: type[Message], max_bytes: int | None = None) -> Message: ...


async def read_message(stream: Stream, *expect: type[Message], max_bytes: int | None = None) -> Message:
    """One length-prefixed message, of one of the ``expect`` kinds when any are given. The size cap is
    the largest of those kinds' own caps unless ``max_bytes`` says otherwise, so a peer cannot make a
    small exchange buffer a job request's 2 MiB."""
    if max_bytes is None:
        max_bytes = max((kind.max_bytes for kind in expect), default=MAX_MESSAGE_BYTES)
    msg = decode_message(await read_record(stream, max_bytes))
    if expect and not isinstance(msg, expect):
        raise StreamError(f"unexpected {type(msg).__name__}")
    return msg


def is_relayed_stream(stream: Stream) -> bool:
    """Whether the stream runs over a relay circuit; True when that cannot be told."""
    conn = stream.muxed_conn
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return True


def remote_peer(stream: Stream) -> str:
    """The authenticated peer id (base58) on the other end of a stream."""
    return stream.muxed_conn.peer_id.to_base58()


async def close_stream(stream: Stream, timeout: float = 1.0) -> None:
    """Close politely, bounded in time; errors are ignored (the peer may be gone)."""
    with trio.move_on_after(timeout):
        try:
            await stream.close()
        except Exception:
            pass


async def open_stream(host: IHost, peer: str, protocol: str) -> INetStream:
    """A new stream to a connected (or dialable) peer, by base58 peer id."""
    return await host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])


def own_peer_id(host: IHost) -> str:
    return host.get_id().to_base58()
