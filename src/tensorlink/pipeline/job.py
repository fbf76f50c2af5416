"""Job: the owner's view of a running pipeline, on the client's loop.

It opens the data plane (a channel to every worker; workers open theirs to the next worker), the
control stream of every remote stage, and, in private mode, runs the first and the last stage in this
process with the same Session code the workers run. Every command goes to the stages concurrently;
a Failed reply or a broken link raises PipelineError naming the stage and the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import trio

from tensorlink.p2p.streams import StreamError, close_stream, open_stream
from tensorlink.pipeline.client import Client
from tensorlink.pipeline.links import ChannelLink, Lane, Link, LinkClosed, LocalLink
from tensorlink.transport import ChannelError
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import StageAssign
from tensorlink.wire.stage import Close, Done, Failed, StageMessage, StageOpen
from tensorlink.worker.stage_host import PROTOCOL, Session, describe, recv_stage, send_stage

log = logging.getLogger(__name__)
COMMAND_TIMEOUT_S = 600.0


class PipelineError(RuntimeError):
    """A stage failed a command or its worker became unreachable."""


@dataclass
class StageRef:
    index: int
    peer: str | None  # the worker; None: this process (private mode)
    link: Link  # the owner's link to the stage
    stream: Any = None
    local: Session | None = None
    blobs_out: int = 0  # owner -> stage BLOB transfers
    blobs_in: int = 0  # stage -> owner

    @property
    def where(self) -> str:
        return f"stage {self.index} ({'this machine' if self.peer is None else 'worker ' + self.peer[:12]})"


class Job:
    def __init__(self, client: Client, job: bytes, n_stages: int, workers: dict[int, str], validator: str) -> None:
        """``workers``: stage -> worker peer id; the other stages run here."""
        self.client = client
        self.job = job
        self.n_stages = n_stages
        self.workers = workers
        self.validator = validator
        self.stages: list[StageRef] = []

    # -- set-up ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        nursery = self.client.nursery
        assert nursery is not None
        by_peer: dict[str, ChannelLink] = {}
        for peer in dict.fromkeys(self.workers.values()):
            try:
                channel = await self.client.channels.open(peer, self.job)
            except ChannelError as exc:
                raise PipelineError(f"no data-plane channel to worker {peer}: {exc}") from None
            by_peer[peer] = link = ChannelLink(channel, self.job)
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
            session = Session(assign, "cpu", 8 << 40)
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
            ref.stream = await open_stream(self.client.host, ref.peer, PROTOCOL)
            await send_stage(ref.stream, StageOpen(job=self.job, stage=ref.index))
            reply = await recv_stage(ref.stream)
        except (StreamError, WireError, OSError, Exception) as exc:
            raise PipelineError(f"{ref.where}: could not open the stage: {exc}") from None
        if isinstance(reply, Failed):
            raise PipelineError(f"{ref.where} refused the job: {reply.message} ({reply.code})")

    async def close(self) -> None:
        async with trio.open_nursery() as n:
            for ref in self.stages:
                if ref.stream is not None:
                    n.start_soon(self._close_stage, ref)

    async def _close_stage(self, ref: StageRef) -> None:
        with trio.move_on_after(10):
            try:
                await send_stage(ref.stream, Close())
                await recv_stage(ref.stream)
            except Exception:
                pass
        await close_stream(ref.stream)
        if isinstance(ref.link, ChannelLink):
            await ref.link.channel.aclose()

    # -- commands ----------------------------------------------------------------------------------------

    async def command(self, ref: StageRef, msg: StageMessage) -> Done:
        """One command to one stage; its Done, or PipelineError."""
        try:
            with trio.fail_after(COMMAND_TIMEOUT_S):
                if ref.local is not None:
                    reply = await ref.local.handle(msg)
                else:
                    await send_stage(ref.stream, msg)
                    reply = await recv_stage(ref.stream)
        except (StreamError, WireError, LinkClosed, trio.TooSlowError) as exc:
            raise PipelineError(f"{ref.where}: {type(msg).__name__} failed: {exc}") from None
        except Exception as exc:
            if ref.local is None:
                raise
            raise PipelineError(f"{ref.where}: {type(msg).__name__} failed: {describe(exc)}") from exc
        if isinstance(reply, Failed):
            raise PipelineError(f"{ref.where}: {type(msg).__name__} failed: {reply.message} ({reply.code})")
        assert isinstance(reply, Done)
        return reply

    async def broadcast(self, make: Any, stages: list[StageRef] | None = None) -> list[Done]:
        """``make(ref)`` -> the command for that stage (None: skip it); sent to all stages at once."""
        targets = stages if stages is not None else self.stages
        replies: list[Done | None] = [None] * len(targets)

        async def one(i: int, ref: StageRef) -> None:
            msg = make(ref)
            if msg is not None:
                replies[i] = await self.command(ref, msg)

        async with trio.open_nursery() as n:
            for i, ref in enumerate(targets):
                n.start_soon(one, i, ref)
        return [r if r is not None else Done() for r in replies]

    async def send_blob(self, ref: StageRef, tensors: list[torch.Tensor]) -> None:
        """Tensors for the stage's next BLOB-reading command, in order (send before the command)."""
        seq = ref.blobs_out
        ref.blobs_out += 1
        for i, tensor in enumerate(tensors):
            await ref.link.send(Lane.BLOB, seq, 1, i, tensor)

    async def recv_blob(self, ref: StageRef, count: int) -> list[torch.Tensor]:
        seq = ref.blobs_in
        ref.blobs_in += 1
        return [await ref.link.recv(Lane.BLOB, seq, 1, i) for i in range(count)]
