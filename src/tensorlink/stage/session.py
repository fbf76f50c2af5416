"""Session: one stage of one job and the stage protocol's framing, shared by the worker and the owner.

A worker's StageHost (worker/stage_host.py) runs a Session per assigned stage and serves ``STAGE_PROTOCOL``; the
owner speaks that protocol to its workers (pipeline/job.py) and, in private mode, runs its own first and last
stage with the same Session. The owner drives a stage with commands (wire/stage.py), one at a time, each
answered by Done or Failed on the stream. A step's command (RunStep) comes as a frame on the owner's data-plane
channel instead (Lane.CONTROL, numbered in order per stage): a decode step then waits on no libp2p message, and
its Done is read by the owner later.
"""

from __future__ import annotations

from typing import Any

import torch
import trio

from tensorlink.p2p.streams import Stream, read_record, write_record
from tensorlink.stage.links import ChannelLink, Lane, Link
from tensorlink.stage.runtime import Reservation, StageError, StageRuntime
from tensorlink.wire.errors import WireError
from tensorlink.wire.stage import (
    MAX_STAGE_MESSAGE,
    CommitGrads,
    Done,
    GradSquares,
    LoadProgram,
    MakeOptimizer,
    OptimizerStep,
    ReorderCache,
    RunBackward,
    RunStep,
    ScaleGrads,
    SendTensors,
    SetGrads,
    StageMessage,
    ZeroGrad,
    decode_stage,
    encode_stage,
)


async def send_stage(stream: Stream, msg: StageMessage) -> None:
    await write_record(stream, encode_stage(msg))


async def recv_stage(stream: Stream) -> StageMessage:
    return decode_stage(await read_record(stream, MAX_STAGE_MESSAGE))


def step_frame(msg: RunStep) -> torch.Tensor:
    """A step's command as the uint8 tensor that carries it on Lane.CONTROL."""
    return torch.frombuffer(bytearray(encode_stage(msg)), dtype=torch.uint8)


def step_of_frame(frame: torch.Tensor) -> RunStep:
    """The RunStep a Lane.CONTROL frame carries; StageError for anything else (wrong dtype or size, bad bytes,
    another command)."""
    if frame.dtype != torch.uint8 or frame.dim() != 1 or frame.numel() > RunStep.max_bytes:
        raise StageError(
            "bad_command", f"a control frame must be at most {RunStep.max_bytes} uint8 bytes; got {frame.dtype} "
            f"{list(frame.shape)}"
        )  # fmt: skip
    try:
        msg = decode_stage(frame.numpy().tobytes())
    except WireError as exc:
        raise StageError("bad_command", f"a control frame that is no stage command: {exc}") from None
    if not isinstance(msg, RunStep):
        raise StageError("bad_command", f"only RunStep comes on the data plane; not {type(msg).__name__}")
    return msg


def describe(exc: BaseException) -> str:
    """What went wrong, without trio's nesting: the innermost errors of an exception group."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "; ".join(describe(e) for e in inner)
    while isinstance(exc.__cause__, Exception) and not str(exc):
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class Session:
    """One job's stage in this process (a worker's, or the owner's own in private mode): its runtime and its links
    (filled in as channels arrive)."""

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
        self.steps_in = 0  # RunStep frames taken from the owner's Lane.CONTROL, counted alike on both sides

    async def next_step(self) -> RunStep:
        """The owner's next step command from its own channel (no neighbour's frame is read as one): StageError
        for a frame that is none; LinkClosed when that channel is gone."""
        frame = await self.links["user"].recv(Lane.CONTROL, self.steps_in, 0, self.assign.stage)
        self.steps_in += 1
        return step_of_frame(frame)

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
        elif isinstance(msg, ReorderCache):
            rt.reorder_cache(msg.key, msg.index)
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
            "micro_batches": rt.micro_batches_run,
            "peak_charged_bytes": rt.peak_charged,
            "optimizer": type(rt.optimizer).__name__ if rt.optimizer is not None else None,
            "links": sorted(self.links),
            **({"from_owner": owner.audit.view()} if (owner := self.by_peer.get(a.owner)) and owner.audit else {}),
        }
