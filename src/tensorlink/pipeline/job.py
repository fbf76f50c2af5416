"""Job: the owner's view of a running pipeline, on the client's loop.

It opens the data plane (a channel to every worker; workers open theirs to the next worker), the
control stream of every remote stage, and, in private mode, runs the first and the last stage in this
process with the same Session code the workers run. Every command goes to the stages concurrently;
a Failed reply or a broken link raises PipelineError naming the stage and the worker.

A step's command goes to a worker on its data-plane channel (Lane.CONTROL, ``Job.step``) and the step ends when
its outputs are here: no libp2p message is on a decode step's path. The stage's Done is read later (a task per
stream files the replies in order), at the latest before the next command to that stage, so one command at a time
per stage holds, and a step's failure surfaces during that step or the next.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from tensorlink.p2p.streams import StreamError, close_stream
from tensorlink.pipeline.client import Client
from tensorlink.stage.links import Announced, ChannelLink, Lane, Link, LinkClosed, LocalLink
from tensorlink.stage.runtime import FixedReservation
from tensorlink.stage.session import Session, describe, recv_stage, send_stage, step_frame
from tensorlink.transport import ChannelError
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import StageAssign
from tensorlink.wire.protocols import STAGE_PROTOCOL
from tensorlink.wire.stage import Close, Done, Failed, RunBackward, RunStep, StageMessage, StageOpen

log = logging.getLogger(__name__)
# A step's deadline: STEP_FACTOR x the slowest of the last RECENT_STEPS steps of the same program (per
# input element, so a longer prompt gets longer), never under STEP_FLOOR_S; a program's first step gets
# FIRST_STEP_S plus its cost at SLOW_FLOPS (3x the forward's FLOPs when training: forward and backward).
STEP_FLOOR_S = 30.0
STEP_FACTOR = 10.0
RECENT_STEPS = 16
FIRST_STEP_S = 60.0
SLOW_FLOPS = 1e9
# Every other command's deadline: STEP_FACTOR x the slowest of the last RECENT_STEPS of its kind on its stage, never
# under STEP_FLOOR_S (FIRST_COMMAND_S before any was measured), plus the bytes it moves at SLOW_BYTES_PER_S (a
# 16 Mbit/s link). A program load is never measured (every program is new): LOAD_S covers its validation, whose
# dry run the IR caps (tensorlink.ir.argcheck.MAX_COST: at most about 150 s on a slow machine), plus its bytes.
FIRST_COMMAND_S = 60.0
LOAD_S = 180.0
SLOW_BYTES_PER_S = 2e6
REPLIES = 8  # replies a stage stream's reader holds unread (the owner has at most two commands unanswered)


class PipelineError(RuntimeError):
    """A stage failed a command, sent what was not asked for, missed a deadline, or became unreachable."""


@contextmanager
def first_error() -> Iterator[None]:
    """A PipelineError raised in a nursery's task as itself, not inside trio's ExceptionGroup."""
    try:
        yield
    except Exception as exc:
        found = _pipeline_error(exc)
        if found is None or found is exc:
            raise
        raise found from None


def _pipeline_error(exc: BaseException) -> PipelineError | None:
    if isinstance(exc, PipelineError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _pipeline_error(inner)
        if found is not None:
            return found
    return None


def one_error(exc: BaseException) -> BaseException:
    """A failure on the loop as the one exception the user sees, never a group: the first PipelineError inside
    a group (it names the stage and the worker), else the group's first error as a PipelineError with its type;
    an exception that is not a group is itself (e.g. the validator's JobRefused)."""
    if not getattr(exc, "exceptions", None):
        return exc
    found = _pipeline_error(exc)
    if found is not None:
        return found
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return PipelineError(f"{type(exc).__name__}: {exc}")


def first_step_deadline_s(flops: float) -> float:
    """A program's first step, before any measurement: an allowance plus its cost on a slow worker."""
    return FIRST_STEP_S + flops / SLOW_FLOPS


class StepClock:
    """Deadlines of steps from the steps measured so far, per program (train, eval, generate)."""

    def __init__(self) -> None:
        self._per_element: dict[str, collections.deque[float]] = {}

    def deadline_s(self, key: str, elements: int) -> float | None:
        """For a step of ``elements`` input elements; None before any step of ``key`` was measured."""
        seen = self._per_element.get(key)
        if not seen:
            return None
        return max(STEP_FLOOR_S, STEP_FACTOR * max(seen) * max(elements, 1))

    def record(self, key: str, seconds: float, elements: int) -> None:
        self._per_element.setdefault(key, collections.deque(maxlen=RECENT_STEPS)).append(seconds / max(elements, 1))

    def command_deadline_s(self, key: str, nbytes: int) -> float:
        """For a command other than a step (``key``: its stage and kind) that moves ``nbytes``."""
        if key.endswith(":LoadProgram"):
            return LOAD_S + nbytes / SLOW_BYTES_PER_S
        measured = self.deadline_s(key, 1)
        return (FIRST_COMMAND_S if measured is None else measured) + nbytes / SLOW_BYTES_PER_S


@dataclass
class StageRef:
    index: int
    peer: str | None  # the worker; None: this process (private mode)
    link: Link  # the owner's link to the stage
    stream: Any = None
    local: Session | None = None
    blobs_out: int = 0  # owner -> stage BLOB transfers
    blobs_in: int = 0  # stage -> owner
    steps_out: int = 0  # RunStep frames sent on Lane.CONTROL (Session.steps_in on the worker)
    replies: trio.MemoryReceiveChannel[StageMessage | Exception] | None = None  # the stream's, in order
    # Commands sent whose reply is not read yet, oldest first: (kind, which one, e.g. " of step 3").
    unread: collections.deque[tuple[str, str]] = field(default_factory=collections.deque)

    @property
    def where(self) -> str:
        return f"stage {self.index} ({'this machine' if self.peer is None else 'worker ' + self.peer[:12]})"

    @property
    def at(self) -> str:
        """The stage and its whole worker id, as a missed deadline names them."""
        return f"stage {self.index} on {self.peer}" if self.peer else f"stage {self.index} on this machine"


class Job:
    def __init__(self, client: Client, job: bytes, n_stages: int, workers: dict[int, str], validator: str) -> None:
        """``workers``: stage -> worker peer id; the other stages run here."""
        self.client = client
        self.job = job
        self.n_stages = n_stages
        self.workers = workers
        self.validator = validator
        self.stages: list[StageRef] = []
        self.clock = StepClock()
        self._cut: list[tuple[int, str]] = []  # what the owner was waiting for when a deadline cut it
        self._deadline: trio.CancelScope | None = None  # the step's (Job.deadline)

    # -- set-up ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        nursery = self.client.nursery
        assert nursery is not None
        by_peer: dict[str, ChannelLink] = {}
        for worker in dict.fromkeys(self.workers.values()):
            try:
                channel = await self.client.channels.open(worker, self.job)
            except ChannelError as exc:
                raise PipelineError(f"no data-plane channel to worker {worker}: {exc}") from None
            by_peer[worker] = link = ChannelLink(channel, self.job, strict=True)
            nursery.start_soon(link.run)
        for index in range(self.n_stages):
            peer = self.workers.get(index)
            if peer is not None:
                self.stages.append(StageRef(index, peer, by_peer[peer]))
                continue
            mine, theirs = LocalLink.pair()
            assign = StageAssign(
                job=self.job,
                owner=self.client.peer_id,
                validator=self.validator,
                stage=index,
                n_stages=self.n_stages,
                prev=self.workers.get(index - 1),
                next=self.workers.get(index + 1),
                memory_bytes=0,
            )
            session = Session(assign, "cpu", FixedReservation(8 << 40))  # the owner's own stages: no worker's cap
            session.links["user"] = theirs
            self.stages.append(StageRef(index, None, mine, local=session))
        for left, right in zip(self.stages, self.stages[1:], strict=False):
            if left.local is not None and right.local is not None:
                left.local.links["next"], right.local.links["prev"] = LocalLink.pair()
            elif left.local is not None:
                left.local.links["next"] = right.link
            elif right.local is not None:
                right.local.links["prev"] = left.link
        async with trio.open_nursery() as n:
            for ref in self.stages:
                if ref.peer is not None:
                    n.start_soon(self._open_stage, ref)

    async def _open_stage(self, ref: StageRef) -> None:
        assert ref.peer is not None
        try:
            with self.bounded(ref, "StageOpen", 0):
                ref.stream = await self.client.host.open(ref.peer, STAGE_PROTOCOL)
                await send_stage(ref.stream, StageOpen(job=self.job, stage=ref.index))
                reply = await recv_stage(ref.stream)
        except PipelineError:
            raise
        except (StreamError, WireError, OSError, Exception) as exc:
            raise PipelineError(f"{ref.where}: could not open the stage: {exc}") from None
        if isinstance(reply, Failed):
            raise PipelineError(f"{ref.where} refused the job: {reply.message} ({reply.code})")
        send, ref.replies = trio.open_memory_channel[StageMessage | Exception](REPLIES)
        assert self.client.nursery is not None
        self.client.nursery.start_soon(_read_replies, ref.stream, send)

    async def close(self) -> None:
        async with trio.open_nursery() as n:
            for ref in self.stages:
                if ref.stream is not None:
                    n.start_soon(self._close_stage, ref)

    async def _close_stage(self, ref: StageRef) -> None:
        with trio.move_on_after(10):
            try:
                await self._settle(ref)
                await send_stage(ref.stream, Close())
                if ref.replies is not None:
                    await ref.replies.receive()
            except Exception:
                pass
        await close_stream(ref.stream)
        if ref.replies is not None:
            await ref.replies.aclose()
        if isinstance(ref.link, ChannelLink):
            await ref.link.channel.aclose()

    # -- commands ----------------------------------------------------------------------------------------

    # -- deadlines: the one place a stalled stage is detected (fault tolerance will retry from here) ----------

    @contextmanager
    def deadline(self, step: int, seconds: float) -> Iterator[None]:
        """Everything inside must finish within ``seconds``; else PipelineError naming the stage waited on."""
        self._cut.clear()
        with first_error():
            with trio.move_on_after(seconds) as scope:
                self._deadline = scope
                try:
                    yield
                finally:
                    self._deadline = None
        if scope.cancelled_caught:
            raise self._stalled(step, seconds)

    @contextmanager
    def awaiting(self, ref: StageRef, what: str) -> Iterator[None]:
        """Note what the owner was waiting for from a stage if a deadline cuts the wait short."""
        try:
            yield
        except trio.Cancelled:
            if self._deadline is None or self._deadline.cancel_called:  # not a wait the owner ended itself
                self._cut.append((ref.index, what))
            raise

    def _stalled(self, step: int, seconds: float) -> PipelineError:
        # A worker before this machine; an unanswered command before a missing output (it says more).
        waits = sorted(self._cut, key=lambda w: (self.stages[w[0]].peer is None, not w[1].startswith("did")))
        if not waits:
            return PipelineError(f"step {step} did not finish within {seconds:.1f} s")
        index, what = waits[0]
        ref = self.stages[index]
        where = ref.at if ref.peer else f"{ref.at} (waiting for a worker)"
        return PipelineError(f"{where} {what} for step {step} within {seconds:.1f} s")

    @contextmanager
    def bounded(self, ref: StageRef, kind: str, nbytes: int, what: str = "") -> Iterator[None]:
        """A command other than a step must finish within its deadline (StepClock.command_deadline_s), else
        PipelineError naming the stage, its worker and the command; its time is measured for the next one."""
        key = f"{ref.index}:{kind}"
        seconds = self.clock.command_deadline_s(key, nbytes)
        started = trio.current_time()
        with trio.move_on_after(seconds) as scope:
            yield
        if scope.cancelled_caught:
            raise PipelineError(f"{ref.at} {what or 'did not answer ' + kind} within {seconds:.1f} s")
        self.clock.record(key, trio.current_time() - started, 1)

    async def recv(self, ref: StageRef, lane: Lane, step: int, micro_batch: int, index: int, what: str) -> torch.Tensor:
        """A tensor the stage owes the owner; PipelineError when its link closed (e.g. on a refused frame)."""
        with self.awaiting(ref, what):
            try:
                return await ref.link.recv(lane, step, micro_batch, index)
            except LinkClosed as exc:
                raise PipelineError(f"{ref.where}: {exc}") from None

    async def command(self, ref: StageRef, msg: StageMessage, send: Sequence[torch.Tensor] = ()) -> Done:
        """One command to one stage, after the tensors ``send`` it reads (its BLOB); its Done, or PipelineError.
        A step's commands are bounded by the step's deadline (Job.deadline), every other one by its own."""
        if isinstance(msg, (RunStep, RunBackward)):
            return await self._command(ref, msg)
        with self.bounded(ref, type(msg).__name__, sum(t.nbytes for t in send)):
            if send:
                await self.send_blob(ref, send)
            return await self._command(ref, msg)

    async def _command(self, ref: StageRef, msg: StageMessage) -> Done:
        kind = type(msg).__name__
        try:
            with self.awaiting(ref, f"did not finish {kind}"):
                if ref.local is not None:
                    reply = await ref.local.handle(msg)
                else:
                    await self._settle(ref)
                    await send_stage(ref.stream, msg)
                    ref.unread.append((kind, ""))
                    return await self._reply(ref)
        except (StreamError, WireError, LinkClosed) as exc:
            raise PipelineError(f"{ref.where}: {kind} failed: {exc}") from None
        except Exception as exc:
            if ref.local is None:
                raise
            raise PipelineError(f"{ref.where}: {kind} failed: {describe(exc)}") from exc
        return _checked(ref, kind, reply)

    async def _reply(self, ref: StageRef) -> Done:
        """The stage's reply to the oldest command not answered yet; PipelineError for a Failed one."""
        assert ref.replies is not None
        kind, which = ref.unread[0]
        try:
            reply = await ref.replies.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise PipelineError(f"{ref.where}: the stage stream is closed; {kind}{which} has no answer") from None
        ref.unread.popleft()
        if isinstance(reply, Exception):
            raise PipelineError(f"{ref.where}: {kind}{which} failed: {reply}")
        return _checked(ref, kind + which, reply)

    async def _settle(self, ref: StageRef, most: int = 0) -> None:
        """Read the replies of steps sent ahead until at most ``most`` are unread (PipelineError on a Failed one)."""
        while len(ref.unread) > most:
            with self.awaiting(ref, f"did not finish {ref.unread[0][0]}"):
                await self._reply(ref)

    async def step(self, cmd: RunStep, outputs: Callable[[], Awaitable[None]], *, wait: bool) -> None:
        """Run ``cmd`` on every stage while ``outputs()`` takes what the step sends here. A worker gets it on its
        channel (one earlier step's Done may still be unread); unless ``wait``, the step ends with its outputs and
        the workers' Done replies are read later (a Failed one that comes first ends the step at once)."""
        remote = [ref for ref in self.stages if ref.local is None]
        with first_error():
            async with trio.open_nursery() as n:
                for ref in self.stages:
                    if ref.local is not None:
                        n.start_soon(self.command, ref, cmd)
                async with trio.open_nursery() as posts:
                    for ref in remote:
                        posts.start_soon(self._post, ref, cmd)
                watch = trio.CancelScope()
                n.start_soon(self._watch, watch, remote)
                await outputs()
                if not wait:
                    watch.cancel()

    async def _post(self, ref: StageRef, cmd: RunStep) -> None:
        await self._settle(ref, 1)
        try:
            await ref.link.send(Lane.CONTROL, ref.steps_out, 0, ref.index, step_frame(cmd))
        except LinkClosed as exc:  # where this side closed it (a refused frame), why
            raise PipelineError(f"{ref.where}: {ref.link.mailbox.error or f'RunStep failed: {exc}'}") from None
        ref.steps_out += 1
        ref.unread.append(("RunStep", f" of step {cmd.step}"))

    async def _watch(self, scope: trio.CancelScope, refs: list[StageRef]) -> None:
        with scope:
            async with trio.open_nursery() as n:
                for ref in refs:
                    n.start_soon(self._settle, ref)

    async def broadcast(self, make: Any, stages: list[StageRef] | None = None) -> list[Done]:
        """``make(ref)`` -> the command for that stage (None: skip it); sent to all stages at once."""
        targets = stages if stages is not None else self.stages
        replies: list[Done | None] = [None] * len(targets)

        async def one(i: int, ref: StageRef) -> None:
            msg = make(ref)
            if msg is not None:
                replies[i] = await self.command(ref, msg)

        with first_error():
            async with trio.open_nursery() as n:
                for i, ref in enumerate(targets):
                    n.start_soon(one, i, ref)
        return [r if r is not None else Done() for r in replies]

    async def send_blob(self, ref: StageRef, tensors: Sequence[torch.Tensor]) -> None:
        """Tensors for the stage's next BLOB-reading command, in order (send before the command)."""
        seq = ref.blobs_out
        ref.blobs_out += 1
        for i, tensor in enumerate(tensors):
            await ref.link.send(Lane.BLOB, seq, 1, i, tensor)

    async def fetch_blob(
        self, ref: StageRef, msg: StageMessage, most: int, budget: int
    ) -> tuple[Done, list[torch.Tensor]]:
        """Send a command that makes the stage send tensors back (its Done names them): at most ``most``
        tensors of ``budget`` bytes in all are taken, anything beyond closes the link."""
        seq = ref.blobs_in
        ref.blobs_in += 1
        left = [budget]

        def within_budget(frame: Announced) -> str | None:
            left[0] -= frame.nbytes
            return None if left[0] >= 0 else f"more than the {budget} bytes this stage's state can take"

        for i in range(most):
            ref.link.mailbox.expect((Lane.BLOB, seq, 1, i), within_budget)
        try:
            reply = await self.command(ref, msg)
            if len(reply.names) > most:
                raise PipelineError(f"{ref.where} announced {len(reply.names)} tensors, more than its {most}")
            kind = type(msg).__name__
            with self.bounded(ref, f"{kind}:tensors", budget, f"did not send the tensors it announced for {kind}"):
                got = [await self.recv(ref, Lane.BLOB, seq, 1, i, "sent no tensors") for i in range(len(reply.names))]
        finally:
            ref.link.mailbox.retire(Lane.BLOB, seq)
        return reply, got


def _checked(ref: StageRef, kind: str, reply: StageMessage) -> Done:
    if isinstance(reply, Failed):
        refused = ref.link.mailbox.error if ref.peer is not None else None
        if refused is not None:  # the stage failed because this side closed its link: say why
            raise PipelineError(f"{ref.where}: {refused}")
        raise PipelineError(f"{ref.where}: {kind} failed: {reply.message} ({reply.code})")
    if not isinstance(reply, Done):
        raise PipelineError(f"{ref.where} answered {kind} with {type(reply).__name__}, not Done or Failed")
    return reply


async def _read_replies(stream: Any, send: trio.MemorySendChannel[StageMessage | Exception]) -> None:
    """File a stage stream's replies in order (the owner reads each when it needs it); its end as the last one."""
    async with send:
        while True:
            try:
                reply: StageMessage | Exception = await recv_stage(stream)
            except Exception as exc:  # the stream ended or sent what is no stage message
                known = isinstance(exc, (StreamError, WireError))
                reply = exc if known else StreamError(f"{type(exc).__name__}: {exc}")
            try:
                await send.send(reply)
            except trio.BrokenResourceError:
                return  # the job closed
            if isinstance(reply, Exception):
                return
