"""StageHost: the worker's side of the stage protocol, and the channels of the jobs it runs.

A validator assigns a stage of a job to this worker (worker/assignments.py). Only then may the job's
owner open the stage stream (``PROTOCOL``) and a channel, and only the assigned neighbours may open
channels for that job. The owner drives the stage with commands (wire/stage.py), one at a time, each
answered by Done or Failed; a bad command fails that command, a broken stream ends the session.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from tensorlink.p2p.host import serve_protocol
from tensorlink.p2p.streams import StreamError, close_stream, read_record, remote_peer, write_record
from tensorlink.pipeline.links import Audit, ChannelLink, Lane, Link, LinkClosed
from tensorlink.transport import Channel, ChannelError, ChannelService
from tensorlink.wire.errors import WireError
from tensorlink.wire.stage import (
    MAX_STAGE_MESSAGE,
    Close,
    CommitGrads,
    Done,
    Failed,
    GradSquares,
    LoadProgram,
    MakeOptimizer,
    OptimizerStep,
    RunBackward,
    RunStep,
    ScaleGrads,
    SendTensors,
    SetGrads,
    StageMessage,
    StageOpen,
    ZeroGrad,
    decode_stage,
    encode_stage,
)
from tensorlink.worker.runtime import Reservation, StageError, StageRuntime

log = logging.getLogger(__name__)
PROTOCOL = "/tensorlink/stage/1.0.0"
CHANNEL_WAIT_S = 60.0
STAGES_PER_PEER = 8  # stage streams one owner may hold here at once (one per stage of its jobs)


async def send_stage(stream: Any, msg: StageMessage) -> None:
    await write_record(stream, encode_stage(msg))


async def recv_stage(stream: Any) -> StageMessage:
    return decode_stage(await read_record(stream, MAX_STAGE_MESSAGE))


def _refusal(code: str, reason: str) -> bytes:
    """serve_protocol's refusal of a stage stream, as the owner's Job reads it."""
    return encode_stage(Failed(code=code, message=reason))


def describe(exc: BaseException) -> str:
    """What went wrong, without trio's nesting: the innermost errors of an exception group."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "; ".join(describe(e) for e in inner)
    while isinstance(exc.__cause__, Exception) and not str(exc):
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class AssignedReservation:
    """A stage's reservation as the worker's assignments hold it; it grows only into unreserved memory, and
    never past ``limit`` (the memory the worker offers stages)."""

    def __init__(self, assignments: Any, job: bytes, limit: int) -> None:
        self.assignments = assignments
        self.job = job
        self.limit = limit

    def held(self) -> int:
        assign = self.assignments.get(self.job)
        return 0 if assign is None else assign.memory_bytes

    def grow(self, needed: int) -> int:
        return self.assignments.grow(self.job, needed) if needed <= self.limit else self.held()

    def ceiling(self) -> int:
        return min(self.limit, self.held() + self.assignments.unreserved_bytes())


class Session:
    """One job's stage here: its runtime and its links (filled in as channels arrive)."""

    def __init__(self, assign: Any, device: str, reservation: Reservation) -> None:
        self.assign = assign
        self.links: dict[str, Link] = {}
        self.by_peer: dict[str, ChannelLink] = {}
        self.changed = trio.Event()
        self.runtime = StageRuntime(
            assign.job, assign.stage, assign.n_stages, self.links, device=device, reservation=reservation
        )
        self.blobs_in = 0  # owner -> worker transfers on the BLOB lane, counted alike on both sides
        self.blobs_out = 0

    def attach(self, peer: str, link: ChannelLink) -> None:
        a = self.assign
        self.by_peer[peer] = link
        if peer == a.owner:
            self.links["user"] = link
            # The owner is also the neighbour where no worker is (private mode keeps ends at home).
            if a.prev is None and a.stage > 0:
                self.links["prev"] = link
            if a.next is None and a.stage < a.n_stages - 1:
                self.links["next"] = link
        if peer == a.prev:
            self.links["prev"] = link
        if peer == a.next:
            self.links["next"] = link
        self.changed.set()
        self.changed = trio.Event()

    async def handle(self, msg: StageMessage) -> StageMessage:
        """Carry out one command of the owner; StageError/LinkClosed for the caller to report."""
        rt = self.runtime
        user = self.links["user"]
        if isinstance(msg, LoadProgram):
            data = await user.recv(Lane.BLOB, self.blobs_in, 1, 0)
            self.blobs_in += 1
            if data.numel() != msg.size:
                raise StageError("bad_program", f"program of {data.numel()} bytes, announced {msg.size}")
            raw = data.numpy().tobytes()
            await trio.to_thread.run_sync(rt.load, msg.key, raw, msg.inputs, msg.outputs, msg.prefix)
        elif isinstance(msg, RunStep):
            await rt.run_step(msg)
        elif isinstance(msg, RunBackward):
            await rt.run_backward(msg)
        elif isinstance(msg, CommitGrads):
            rt.commit(msg.step, msg.scale)
        elif isinstance(msg, MakeOptimizer):
            rt.make_optimizer(msg.name, msg.hyper)
        elif isinstance(msg, OptimizerStep):
            await trio.to_thread.run_sync(rt.optimizer_step, msg.hyper)
        elif isinstance(msg, ZeroGrad):
            rt.zero_grad()
        elif isinstance(msg, GradSquares):
            return Done(value=rt.grad_squares(msg.exclude))
        elif isinstance(msg, ScaleGrads):
            rt.scale_grads(msg.factor)
        elif isinstance(msg, SendTensors):
            if msg.what == "grads":
                named = rt.grad_tensors(msg.names)
            elif msg.what == "state":
                named = rt.state_tensors(msg.names)
            else:
                named = rt.optimizer_tensors()
            seq = self.blobs_out
            self.blobs_out += 1
            for i, (_, tensor) in enumerate(named):
                await user.send(Lane.BLOB, seq, 1, i, tensor.detach().cpu())
            return Done(names=[name for name, _ in named])
        elif isinstance(msg, SetGrads):
            seq = self.blobs_in
            self.blobs_in += 1
            grads = [await user.recv(Lane.BLOB, seq, 1, i) for i in range(len(msg.names))]
            rt.set_grads(list(zip(msg.names, grads, strict=True)))
        else:
            raise StageError("bad_command", f"{type(msg).__name__} is not a stage command")
        return Done()

    def missing(self) -> list[str]:
        a = self.assign
        need = ["user"] + (["prev"] if a.stage > 0 else []) + (["next"] if a.stage < a.n_stages - 1 else [])
        return [role for role in need if role not in self.links]

    def status(self) -> dict[str, Any]:
        rt, a = self.runtime, self.assign
        return {
            "job": self.assign.job.hex(),
            "stage": self.assign.stage,
            "n_stages": self.assign.n_stages,
            "programs": sorted(rt.programs),
            "parameters": sum(p.numel() for p in rt.parameters().values()) if "train" in rt.programs else 0,
            "steps": rt.steps_run,
            "peak_charged_bytes": rt.peak_charged,
            "optimizer": type(rt.optimizer).__name__ if rt.optimizer is not None else None,
            "links": sorted(self.links),
            **({"from_owner": owner.audit.view()} if (owner := self.by_peer.get(a.owner)) and owner.audit else {}),
        }


class StageHost:
    """Serves the stage protocol on a worker; ``assignments`` says which jobs and peers are expected."""

    def __init__(
        self,
        host: Any,
        channels: ChannelService,
        assignments: Any,
        *,
        device: str = "cpu",
        max_memory_bytes: int,
        audit: bool = False,
    ) -> None:
        self.host = host
        self.channels = channels
        self.assignments = assignments
        self.device = device
        self.max_memory_bytes = max_memory_bytes
        self.audit = audit  # keep digests of what owners send (--audit-inputs)
        self.sessions: dict[bytes, Session] = {}
        self._nursery: trio.Nursery | None = None
        channels.admit = self._admit

    def _admit(self, peer: str, job: bytes) -> bool:
        assign = self.assignments.get(job)
        return assign is not None and peer in {assign.owner, assign.prev, assign.next}

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.sessions.values()]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            serve_protocol(self.host, PROTOCOL, self._on_stream, limit=64, per_peer=STAGES_PER_PEER, refuse=_refusal)
            nursery.start_soon(self._accept_channels)
            task_status.started()
            await trio.sleep_forever()

    def _session(self, job: bytes) -> Session | None:
        session = self.sessions.get(job)
        if session is None:
            assign = self.assignments.claim(job)  # the owner showed up: the assignment no longer expires
            if assign is None:
                return None
            reservation = AssignedReservation(self.assignments, job, self.max_memory_bytes)
            session = self.sessions[job] = Session(assign, self.device, reservation)
        return session

    async def _accept_channels(self) -> None:
        while True:
            channel = await self.channels.accept()
            session = self._session(channel.job)
            if session is None:  # the assignment ended between admission and now
                await channel.aclose()
                continue
            self._attach(session, channel.peer, channel)

    def _attach(self, session: Session, peer: str, channel: Channel) -> None:
        assert self._nursery is not None
        audit = Audit() if self.audit and peer == session.assign.owner else None
        link = ChannelLink(channel, session.assign.job, audit)
        link.mailbox.room = session.runtime.frame_room  # frames count against the stage's reservation
        self._nursery.start_soon(link.run)
        session.attach(peer, link)

    async def _open_next(self, session: Session) -> None:
        """The lower stage opens the channel to the next worker (the owner opens its own)."""
        nxt = session.assign.next
        if nxt is None or nxt in session.by_peer:
            return
        channel = await self.channels.open(nxt, session.assign.job)
        self._attach(session, nxt, channel)

    async def _on_stream(self, stream: Any) -> None:
        peer = remote_peer(stream)
        opening = await recv_stage(stream)
        if not isinstance(opening, StageOpen):
            raise StreamError(f"expected stage_open, got {type(opening).__name__}")
        assign = self.assignments.get(opening.job)
        if assign is None or assign.owner != peer or assign.stage != opening.stage:
            await send_stage(stream, Failed(code="not_assigned", message="this worker holds no such stage for you"))
            await close_stream(stream)
            return
        session = self._session(opening.job)
        assert session is not None
        try:
            await self._open_next(session)
            with trio.fail_after(CHANNEL_WAIT_S):
                while session.missing():
                    await session.changed.wait()
        except (ChannelError, trio.TooSlowError) as exc:
            what = ", ".join(session.missing()) or "next"
            await send_stage(stream, Failed(code="no_channel", message=f"no data-plane channel to the {what}: {exc}"))
            await close_stream(stream)
            return
        log.info("job %s: stage %d of %d ready for %s", opening.job.hex()[:8], assign.stage, assign.n_stages, peer)
        await send_stage(stream, Done())
        try:
            await self._serve_session(stream, session)
        finally:
            self._end(session)

    async def _serve_session(self, stream: Any, session: Session) -> None:
        while True:
            try:
                msg = await recv_stage(stream)
            except (StreamError, WireError) as exc:
                log.info("job %s: stage stream ended: %s", session.assign.job.hex()[:8], exc)
                return
            if isinstance(msg, Close):
                await send_stage(stream, Done())
                return
            try:
                reply = await session.handle(msg)
            except StageError as exc:
                reply = Failed(code=exc.code, message=str(exc))
            except LinkClosed as exc:
                await send_stage(stream, Failed(code="link_closed", message=str(exc)))
                return
            except Exception as exc:  # a bad program or tensor: this command fails, the session lives
                log.info("job %s: command %s failed: %r", session.assign.job.hex()[:8], type(msg).__name__, exc)
                reply = Failed(code="command_failed", message=f"{type(msg).__name__}: {describe(exc)}"[:4000])
            await send_stage(stream, reply)

    def _end(self, session: Session) -> None:
        """The owner is gone or done: free the stage and its memory."""
        job = session.assign.job
        self.sessions.pop(job, None)
        self.assignments.release(job)
        if self._nursery is not None:
            for link in session.by_peer.values():
                self._nursery.start_soon(link.channel.aclose)
        log.info("job %s: stage %d released", job.hex()[:8], session.assign.stage)
