"""Links: how a stage exchanges tensors with its neighbours, by lane and by (step, micro-batch, index).

A job has one data-plane channel per pair of peers; several kinds of traffic share it (a worker's
owner may also be its previous stage in private mode). Every frame's route says its lane and slot, a
reader task files arriving tensors in a mailbox, and whoever needs one waits for its key, so the order
in which frames arrive never matters. A LocalLink pair connects two stages in one process.

The mailbox takes or refuses each frame from what its header announces (key, dtype, shape, bytes), before
the channel reads its payload: a peer cannot make this side allocate for a frame it would refuse.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import trio

from tensorlink.transport import Channel, ChannelError, FrameRefused
from tensorlink.wire.dtypes import dtype_of
from tensorlink.wire.frame import FrameHeader, Route

log = logging.getLogger(__name__)
Key = tuple[int, int, int, int]  # lane, step, micro-batch, index


class Lane(enum.IntEnum):
    FWD = 0  # activations from the previous stage
    BWD = 1  # gradients from the next stage
    USER_IN = 2  # the owner's inputs to a stage
    USER_GRAD = 3  # gradients of the owner's inputs, back to the owner
    USER_OUT = 4  # model outputs, to the owner
    OUT_GRAD = 5  # gradients of the model outputs, from the owner to the last stage
    BLOB = 6  # programs, weights and gradients fetched or set by the owner
    CONTROL = 7  # a step's command (RunStep, encoded) from the owner: no libp2p round trip before a stage starts


class LinkClosed(Exception):
    """The link's channel failed; the message names the peer and why."""


class Announced(NamedTuple):
    """What a frame carries, as its header announces it (or a local tensor is): enough to refuse it unread."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int  # of the tensor it decodes to, which is what a mailbox buffers

    @staticmethod
    def of_header(header: FrameHeader) -> Announced:
        dtype = dtype_of(header.dtype)
        return Announced(dtype, header.shape, header.numel * dtype.itemsize)

    @staticmethod
    def of_tensor(tensor: torch.Tensor) -> Announced:
        return Announced(tensor.dtype, tuple(tensor.shape), tensor.nbytes)


Check = Callable[[Announced], str | None]  # what is wrong with an arriving frame, or None


def key_of(step: int, micro_batch: int, stage: int) -> Key:
    """A mailbox key from a route's fields: its ``stage`` field packs the lane (top 8 bits) and the index."""
    return stage >> 24, step, micro_batch, stage & 0xFFFFFF


def describe_key(key: Key) -> str:
    lane, step, micro_batch, index = key
    return f"{Lane(lane).name if lane in Lane._value2member_map_ else f'lane {lane}'} frame of step {step}, " + (
        f"micro-batch {micro_batch}, index {index}"
    )


class Mailbox:
    """Tensors that arrived, by key, until someone takes them. Each is first admitted (``admit``), from its
    frame's header where it comes over a channel, then filed (``put``).

    A strict mailbox (the owner's, facing workers it does not trust) admits only the keys announced with
    ``expect``, each once and only when its check passes, so what it buffers is bounded by what the
    schedule asked for; anything else raises FrameRefused. ``room`` bounds the bytes any mailbox admits."""

    def __init__(self, *, strict: bool = False) -> None:
        self._items: dict[Key, torch.Tensor] = {}
        self._waiting: dict[Key, trio.Event] = {}
        self._expected: dict[Key, Check] | None = {} if strict else None
        self.error: str | None = None
        self.buffered_bytes = 0
        # Bytes this mailbox may still take, asked with the size of an arriving frame (a worker's stage: what its
        # reservation has left, or can grow to); None: unbounded.
        self.room: Callable[[int], int] | None = None

    def expect(self, key: Key, check: Check) -> None:
        if self._expected is not None:
            self._expected[key] = check

    def retire(self, lane: Lane, step: int) -> None:
        """Expect nothing more of ``lane`` at ``step`` (a fetch of an unknown count is complete)."""
        if self._expected is not None:
            for key in [k for k in self._expected if k[0] == lane and k[1] == step]:
                del self._expected[key]

    def admit(self, key: Key, frame: Announced) -> None:
        """Take the frame for ``key`` or raise FrameRefused, before its payload is read. Its bytes count as
        buffered from here on (frames on their way count against ``room`` too)."""
        if key in self._items:  # a second copy would be filed over the first and its bytes counted twice
            raise FrameRefused(f"a duplicate {describe_key(key)} (the first one is still unread)")
        if self._expected is not None:
            check = self._expected.pop(key, None)
            if check is None:
                raise FrameRefused(f"an unsolicited {describe_key(key)} (never asked for, or a duplicate)")
            wrong = check(frame)
            if wrong is not None:
                raise FrameRefused(f"a wrong {describe_key(key)}: {wrong}")
        if self.room is not None and frame.nbytes > (room := self.room(frame.nbytes)):
            raise FrameRefused(f"a {describe_key(key)} of {frame.nbytes} bytes, over the {room} bytes left to buffer")
        self.buffered_bytes += frame.nbytes

    def put(self, key: Key, tensor: torch.Tensor, *, copy: bool = False) -> None:
        """File an admitted ``tensor`` (a copy of it with ``copy``)."""
        self._items[key] = tensor.clone() if copy else tensor
        event = self._waiting.pop(key, None)
        if event is not None:
            event.set()

    async def get(self, key: Key) -> torch.Tensor:
        while key not in self._items:
            if self.error is not None:
                raise LinkClosed(self.error)
            event = self._waiting.setdefault(key, trio.Event())
            await event.wait()
        tensor = self._items.pop(key)
        self.buffered_bytes -= tensor.nbytes
        return tensor

    def fail(self, reason: str) -> None:
        self.error = reason
        for event in self._waiting.values():
            event.set()
        self._waiting.clear()

    def drop_before(self, step: int, lanes: tuple[Lane, ...]) -> None:
        """Forget activations and gradients of earlier steps nobody will read (e.g. gradients sent for
        inputs whose producer needed none)."""
        for key in [k for k in self._items if k[0] in lanes and k[1] < step]:
            self.buffered_bytes -= self._items.pop(key).nbytes


class Link(Protocol):
    mailbox: Mailbox

    async def send(self, lane: Lane, step: int, micro_batch: int, index: int, tensor: torch.Tensor) -> None: ...

    async def recv(self, lane: Lane, step: int, micro_batch: int, index: int) -> torch.Tensor: ...


class Audit:
    """What arrived on a link: dtypes per lane and a digest of every tensor (the last ``keep``), so an
    operator or a test can check what a job's owner really sends."""

    def __init__(self, keep: int = 4096) -> None:
        self.frames = 0
        self.dtypes: dict[str, set[str]] = {}
        self.integer_shapes: dict[str, set[tuple[int, ...]]] = {}  # token ids would show up here
        self.digests: collections.deque[str] = collections.deque(maxlen=keep)

    def record(self, lane: int, tensor: torch.Tensor) -> None:
        self.frames += 1
        name = Lane(lane).name
        self.dtypes.setdefault(name, set()).add(str(tensor.dtype).removeprefix("torch."))
        if not tensor.is_floating_point():
            self.integer_shapes.setdefault(name, set()).add(tuple(tensor.shape))
        self.digests.append(tensor_digest(tensor))

    def view(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "dtypes": {lane: sorted(names) for lane, names in self.dtypes.items()},
            "integer_shapes": {lane: sorted(map(list, shapes)) for lane, shapes in self.integer_shapes.items()},
            "digests": list(self.digests),
        }


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous, CPU), as an owner would compute it for its own inputs."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return hashlib.sha256(data).hexdigest()


class ChannelLink:
    """A link over a data-plane channel; ``run`` (in a nursery) files incoming frames. The mailbox screens each
    frame by its header (the channel's acceptor); a refused one closes the link with the reason. ``strict``:
    take only expected frames (see Mailbox)."""

    def __init__(self, channel: Channel, job: bytes, audit: Audit | None = None, *, strict: bool = False) -> None:
        self.channel = channel
        self.job = job
        self.mailbox = Mailbox(strict=strict)
        self.audit = audit
        channel.set_acceptor(self._admit)

    def _admit(self, header: FrameHeader) -> None:
        self.mailbox.admit(key_of(header.step, header.micro_batch, header.stage), Announced.of_header(header))

    async def run(self) -> None:
        try:
            while True:
                tensor, route = await self.channel.recv()
                key = key_of(route.step, route.micro_batch, route.stage)
                if self.audit is not None and key[0] != Lane.CONTROL:  # commands, not data (as on the stage stream)
                    self.audit.record(key[0], tensor)
                # Out of the channel's pool at once: a stage may keep activations for many micro-batches.
                self.mailbox.put(key, tensor, copy=True)
        except ChannelError as exc:
            self.mailbox.fail(f"channel to {self.channel.peer} closed: {exc.reason}")
        except FrameRefused as exc:
            log.warning("closing the link to %s: it sent %s", self.channel.peer, exc)
            self.mailbox.fail(f"{self.channel.peer} sent {exc}; link closed")
            await self.channel.aclose()
        except Exception as exc:  # a frame this side cannot handle ends this link, never the node
            self.mailbox.fail(f"link to {self.channel.peer} failed: {type(exc).__name__}: {exc}")
            await self.channel.aclose()
        except trio.Cancelled:
            self.mailbox.fail(f"link to {self.channel.peer} stopped")
            raise

    async def send(self, lane: Lane, step: int, micro_batch: int, index: int, tensor: torch.Tensor) -> None:
        route = Route(self.job, step, micro_batch, (int(lane) << 24) | index)
        try:
            await self.channel.send(tensor.detach().contiguous(), route)
        except ChannelError as exc:
            raise LinkClosed(f"channel to {self.channel.peer} closed: {exc.reason}") from None

    async def recv(self, lane: Lane, step: int, micro_batch: int, index: int) -> torch.Tensor:
        return await self.mailbox.get((int(lane), step, micro_batch, index))


class LocalLink:
    """One end of an in-process link (two stages, or a stage and its owner, in one process)."""

    def __init__(self) -> None:
        self.mailbox = Mailbox()
        self.peer: LocalLink = self

    @staticmethod
    def pair() -> tuple[LocalLink, LocalLink]:
        a, b = LocalLink(), LocalLink()
        a.peer, b.peer = b, a
        return a, b

    async def send(self, lane: Lane, step: int, micro_batch: int, index: int, tensor: torch.Tensor) -> None:
        key, mailbox = (int(lane), step, micro_batch, index), self.peer.mailbox
        mailbox.admit(key, Announced.of_tensor(tensor))
        mailbox.put(key, tensor.detach().clone())

    async def recv(self, lane: Lane, step: int, micro_batch: int, index: int) -> torch.Tensor:
        return await self.mailbox.get((int(lane), step, micro_batch, index))


NONE_MARKER = torch.empty(0)  # sent where a gradient is None, so the receiver never waits for nothing


def from_marker(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``None`` for the marker (a gradient that does not exist), else the tensor."""
    return None if tensor.numel() == 0 and like.numel() != 0 else tensor
