"""StageHost: the worker's side of the stage protocol, and the channels of the jobs it runs.

A validator assigns a stage of a job to this worker (worker/assignments.py). Only then may the job's
owner open the stage stream (``STAGE_PROTOCOL``) and a channel, and only the assigned
neighbours may open channels for that job. The owner drives the stage with commands (wire/stage.py), one
at a time, each answered by Done or Failed; a bad command fails that command, a broken stream ends the
session.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import Stream, StreamError, close_stream, remote_peer
from tensorlink.stage.links import Audit, ChannelLink, LinkClosed
from tensorlink.stage.runtime import StageError
from tensorlink.stage.session import Session, describe, recv_stage, send_stage
from tensorlink.transport import Channel, ChannelError
from tensorlink.transport.service import ChannelService
from tensorlink.wire.errors import WireError
from tensorlink.wire.protocols import STAGE_PROTOCOL
from tensorlink.wire.stage import Close, Done, Failed, RunStep, StageMessage, StageOpen, encode_stage

log = logging.getLogger(__name__)
CHANNEL_WAIT_S = 60.0
STAGES_PER_PEER = 8  # stage streams one owner may hold here at once (one per stage of its jobs)


def _refusal(code: str, reason: str) -> bytes:
    """serve_protocol's refusal of a stage stream, as the owner's Job reads it."""
    return encode_stage(Failed(code=code, message=reason))


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


class StageHost:
    """Serves the stage protocol on a worker; ``assignments`` says which jobs and peers are expected."""

    def __init__(
        self,
        host: PeerHost,
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

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.sessions.values()]

    # trio 0.35 has TaskStatus; libp2p's trio-typing 0.10 stubs (which mypy reads first) predate it
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[name-defined]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.serve(STAGE_PROTOCOL, self._on_stream, limit=64, per_peer=STAGES_PER_PEER, refuse=_refusal)
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

    async def _on_stream(self, stream: Stream) -> None:
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

    async def _serve_session(self, stream: Stream, session: Session) -> None:
        """Carry out the owner's commands one at a time, in the order they come, each answered on the stream:
        those of the stream and the steps of its data-plane channel (Session.next_step)."""
        send, commands = trio.open_memory_channel[StageMessage | StageError | None](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stream, stream, session, send.clone())
            nursery.start_soon(self._read_steps, session, send)
            async with commands:
                async for msg in commands:
                    if msg is None or not await self._answer(stream, session, msg):
                        break
            nursery.cancel_scope.cancel()

    async def _read_stream(self, stream: Stream, session: Session, send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            while True:
                try:
                    msg: StageMessage | None = await recv_stage(stream)
                except (StreamError, WireError) as exc:
                    log.info("job %s: stage stream ended: %s", session.assign.job.hex()[:8], exc)
                    msg = None
                await send.send(msg)
                if msg is None:
                    return

    async def _read_steps(self, session: Session, send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            while True:
                try:
                    step: RunStep | StageError = await session.next_step()
                except StageError as exc:  # a bad frame: that command fails, as a bad one on the stream does
                    step = exc
                except LinkClosed:
                    return  # the owner's channel is gone: its stream commands still get their answers
                await send.send(step)

    async def _answer(self, stream: Stream, session: Session, msg: StageMessage | StageError) -> bool:
        """Carry out one command and answer it; False: the session ends."""
        if isinstance(msg, Close):
            await send_stage(stream, Done())
            return False
        try:
            if isinstance(msg, StageError):
                raise msg
            reply = await session.handle(msg)
        except StageError as exc:
            reply = Failed(code=exc.code, message=str(exc))
        except LinkClosed as exc:
            await send_stage(stream, Failed(code="link_closed", message=str(exc)))
            return False
        except Exception as exc:  # a bad program or tensor: this command fails, the session lives
            log.info("job %s: command %s failed: %r", session.assign.job.hex()[:8], type(msg).__name__, exc)
            reply = Failed(code="command_failed", message=f"{type(msg).__name__}: {describe(exc)}"[:4000])
        await send_stage(stream, reply)
        return True

    def _end(self, session: Session) -> None:
        """The owner is gone or done: free the stage and its memory."""
        job = session.assign.job
        self.sessions.pop(job, None)
        self.assignments.release(job)
        if self._nursery is not None:
            for link in session.by_peer.values():
                self._nursery.start_soon(link.channel.aclose)
        log.info("job %s: stage %d released", job.hex()[:8], session.assign.stage)
