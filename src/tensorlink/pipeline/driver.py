"""Pipeline: one offloaded model's running job, from its first program to steps, gradients and weights.

``Pipeline.open`` profiles a captured program's cost per parameter group, asks a validator for workers (it
partitions by cost and memory and tells each worker its stage and neighbours), splits the program at the
validator's boundaries, opens the job and loads every stage: the object it returns is ready to run. A step
(``StepSpec``) sends each user input straight to the stage that needs it, runs the schedule on every stage
at once and gathers the model outputs from the last stage. More programs (evaluation, generation) are
loaded under their own key and split at the same boundaries; the workers share their weights by name.

Scalar losses computed inside the model (HF models given labels) let the stages run the backward
during the forward call (1F1B, ``Backward.FUSED``): gradients are computed for a loss gradient of 1 and
wait on the workers; the owner's ``loss.backward()`` then scales and commits them (exactly, for the usual
1.0). Any other use of the outputs (a loss computed here) back-propagates after the forward
(``Backward.LATER``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
import trio

from tensorlink.ir import StageProgram
from tensorlink.ir.split import Split, profile, split
from tensorlink.pipeline.client import Client
from tensorlink.pipeline.expect import checker, spec_like, value_spec
from tensorlink.pipeline.job import Job, PipelineError, StageRef, first_error, first_step_deadline_s
from tensorlink.pipeline.programs import Loaded, Program
from tensorlink.stage.links import NONE_MARKER, Lane, from_marker
from tensorlink.stage.runtime import OPTIMIZER_SLOTS
from tensorlink.validator.client import request_job
from tensorlink.validator.partition import declare
from tensorlink.wire.messages import JobPlan, JobRequest
from tensorlink.wire.stage import (
    CommitGrads,
    GradSquares,
    InputSlot,
    LoadProgram,
    MakeOptimizer,
    OptimizerStep,
    OutputSlot,
    ProgramKey,
    ReorderCache,
    RunBackward,
    RunStep,
    ScaleGrads,
    SendTensors,
    SetGrads,
    ZeroGrad,
)

log = logging.getLogger(__name__)


class Backward(Enum):
    """When a step's backward runs: not at all, on the stages during the forward (a scalar loss computed
    in the model), or later from the owner's output gradients."""

    NONE = "none"
    FUSED = "fused"
    LATER = "later"


_ON_WIRE: dict[Backward, Literal["none", "fused", "later"]] = {b: b.value for b in Backward}


@dataclass(frozen=True)
class StepSpec:
    """One step of a loaded program. ``loss_output``: the model output seeded for a fused backward;
    ``to_user``: the model outputs sent back; ``grad_to_user``: the user inputs whose gradients come back;
    ``tail``: only the last ``tail`` positions of dim 1 of the outputs come back (decoding)."""

    key: ProgramKey
    backward: Backward = Backward.NONE
    training: bool = False
    loss_output: int | None = None
    to_user: tuple[int, ...] = (0,)
    grad_to_user: tuple[str, ...] = ()
    micro_batches: int = 1
    tail: int = 0

    def __post_init__(self) -> None:
        if self.backward is Backward.FUSED and self.loss_output is None:
            raise ValueError("a fused backward needs the loss output it starts from (loss_output)")


@dataclass
class StepResult:
    step: int
    spec: StepSpec
    outputs: dict[int, torch.Tensor]  # model output index -> tensor (micro-batches joined)
    input_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # fused: gradients of user inputs


@dataclass(frozen=True)
class Settings:
    """How the owner asked for its job: workers, micro-batches, schedule, private mode, sequence limit and
    the optimizer whose state the workers reserve memory for."""

    workers: int
    micro_batches: int = 1
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    private: bool = False
    max_seq_len: int | None = None
    optimizer: str = "AdamW"

    def kept(self, fused: bool) -> int:
        """Micro-batches a stage may keep for backward at once: with the backward fused into 1F1B at most one per
        stage (schedule.actions: the first stage's warm-up and one more); GPipe, or a backward the owner runs
        later, keeps every micro-batch."""
        stages = self.workers + (2 if self.private else 0)
        return min(self.micro_batches, stages) if fused and self.schedule == "1f1b" else self.micro_batches


class Pipeline:
    """A running job with its loaded programs. Build it with ``open`` (or, for a job assigned by other means,
    the constructor and ``load``); ``trains``: the job reserved gradient and optimizer memory."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        job: Job,
        owner: dict[str, int],
        *,
        trains: bool = True,
        plan: JobPlan | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.job = job
        self.owner = owner  # parameter name (unprefixed) -> stage
        self.trains = trains
        self.plan = plan  # the validator's answer (None for a job assigned by hand)
        self.programs: dict[str, Loaded] = {}
        self.step = 0
        self.tied_total: dict[str, torch.Tensor] = {}

    @property
    def job_id(self) -> bytes:
        return self.job.job

    @classmethod
    async def open(
        cls,
        client: Client,
        validator: str,
        settings: Settings,
        program: Program,
        *,
        key: ProgramKey = "train",
        fused: bool = False,
    ) -> Pipeline:
        """Ask the validator for workers, split at its boundaries, open the job and load ``program`` under
        ``key``. Units are profiled at the declared maximum input shapes, where a worker counts a forward;
        ``fused``: the backward runs with the forward (outputs="loss"). A job whose first program is not
        ``train`` never trains: it reserves no gradient or optimizer memory. On any error the job is closed."""
        trains = key == "train"
        symbols = program.whole.program.signature.symbols
        units = profile(program.whole, {name: high for name, (_, high) in symbols.items()})
        slots = OPTIMIZER_SLOTS[settings.optimizer] if trains else 0
        kept = settings.kept(fused) if trains else 1
        job_id = secrets.token_bytes(16)
        request = JobRequest(
            job=job_id,
            owner=client.peer_id,
            workers=settings.workers,
            units=[declare(u, optimizer_slots=slots, kept=kept, train=trains) for u in units],
            private=settings.private,
            optimizer_slots=slots,
            device=None,
        )
        plan = await request_job(client.host, validator, request)
        owner = {}
        for unit, stage in zip(units, plan.unit_stage, strict=True):
            for name in unit.params:
                owner[name.removeprefix(program.prefix)] = stage
        for placement in plan.placements:
            await client.connect([f"{a}/p2p/{placement.peer_id}" for a in placement.addrs])
        workers = {p.stage: p.peer_id for p in plan.placements}
        job = Job(client, job_id, plan.n_stages, workers, validator)
        pipeline = cls(client, settings, job, owner, trains=trains, plan=plan)
        try:
            await job.open()
            await pipeline.load(key, program)
        except BaseException:
            with trio.CancelScope(shield=True):
                await pipeline.close()
            raise
        return pipeline

    async def load(self, key: ProgramKey, program: Program) -> None:
        """Split ``program`` at this job's boundaries and load it on every stage under ``key`` (replacing a
        program of that key)."""
        if key == "train" and not self.trains:
            raise PipelineError("this job reserved no training memory on its workers; open one with a train program")
        owner = {program.prefix + name: stage for name, stage in self.owner.items()}
        loaded = Loaded(program, split(program.whole, owner, len(self.job.stages)))
        sp = loaded.split
        job = self.job

        async def one(ref: StageRef) -> None:
            data = sp.parts[ref.index].program.to_bytes()
            inputs, outputs = slots(sp, ref.index)
            load = LoadProgram(key=key, size=len(data), inputs=inputs, outputs=outputs, prefix=program.prefix)
            await job.command(ref, load, send=[torch.frombuffer(bytearray(data), dtype=torch.uint8)])

        with first_error():
            async with trio.open_nursery() as n:
                for ref in self.job.stages:
                    n.start_soon(one, ref)
        self.programs[key] = loaded

    # -- steps -------------------------------------------------------------------------------------------

    async def run(self, spec: StepSpec, inputs: Sequence[torch.Tensor]) -> StepResult:
        """Run one step of program ``spec.key`` on ``inputs`` (the user inputs, in the program's order)."""
        loaded = self._loaded(spec.key)
        sp = loaded.split
        self.step += 1
        step = self.step
        n_micro = spec.micro_batches
        chunks = _chunks(inputs, n_micro)
        refs = self.job.stages
        fused = spec.backward is Backward.FUSED
        cmd = RunStep(
            key=spec.key,
            step=step,
            micro_batches=n_micro,
            schedule=self.settings.schedule,
            backward=_ON_WIRE[spec.backward],
            training=spec.training,
            loss_output=-1 if spec.loss_output is None else spec.loss_output,
            loss_scale=1.0 / n_micro,
            to_user=list(spec.to_user),
            grad_to_user=list(spec.grad_to_user),
            tail=spec.tail,
        )
        outputs: dict[int, list[torch.Tensor]] = {i: [] for i in spec.to_user}
        job = self.job
        self._expect_step(loaded, step, chunks, spec)

        async def feed() -> None:
            for m in range(n_micro):
                for i, name in enumerate(sp.user_inputs):
                    if name in sp.input_stage:  # an input no stage reads stays here
                        await refs[sp.input_stage[name]].link.send(Lane.USER_IN, step, m, i, chunks[i][m])

        async def collect() -> None:
            last = refs[-1]
            for m in range(n_micro):
                for i in spec.to_user:
                    outputs[i].append(await job.recv(last, Lane.USER_OUT, step, m, i, "sent no output"))

        started = trio.current_time()
        with self._step_deadline(spec.key, spec.key, step, inputs, 3.0 if fused else 1.0):
            async with trio.open_nursery() as n:
                n.start_soon(feed)
                await job.step(cmd, collect, wait=spec.backward is not Backward.NONE)  # a training step: its Done too
            result = StepResult(step, spec, {i: join(parts) for i, parts in outputs.items()})
            if fused:
                result.input_grads = await self._input_grads(sp, step, n_micro, spec.grad_to_user, inputs)
        job.clock.record(spec.key, trio.current_time() - started, elements(inputs))
        return result

    def _loaded(self, key: str) -> Loaded:
        loaded = self.programs.get(key)
        if loaded is None:
            raise PipelineError(f"no {key} program is loaded on this job's stages (load it first)")
        return loaded

    def _step_deadline(
        self, key: str, clock: str, step: int, inputs: Sequence[torch.Tensor], cost: float
    ) -> AbstractContextManager[None]:
        """Job.deadline for a step of program ``key`` measured as ``clock``; ``cost``: its FLOPs in forwards (3:
        with backward)."""
        whole = self.programs[key].whole
        seconds = self.job.clock.deadline_s(clock, elements(inputs))
        if seconds is None:  # never measured: the program's cost at a slow worker's speed
            flops = cost * sum(u.flops for u in profile(whole, sizes(whole, inputs)))
            seconds = first_step_deadline_s(flops)
        return self.job.deadline(step, seconds)

    def _expect_step(self, loaded: Loaded, step: int, chunks: list[Sequence[torch.Tensor]], spec: StepSpec) -> None:
        """Announce every tensor a step makes the workers send the owner, with the dtype and shape each must
        have: the model outputs and, with a backward, the input gradients (and in private mode what the
        stages here receive from their worker neighbours). Owner links take nothing else."""
        sp, whole, refs = loaded.split, loaded.whole, self.job.stages
        ranges = whole.program.dim_ranges
        for m in range(len(chunks[0]) if chunks else 0):
            mine = [c[m] for c in chunks]
            bound = sizes(whole, mine)
            forward = [(Lane.USER_OUT, refs[-1], i, sp.model_outputs[i], spec.tail) for i in spec.to_user]
            for k in range(1, len(refs)):  # a stage here fed by a worker before it, over that worker's link
                if refs[k].peer is None and refs[k - 1].peer is not None:
                    forward += [(Lane.FWD, refs[k - 1], i, name, 0) for i, name in enumerate(sp.parts[k - 1].outputs)]
            for lane, ref, i, name, cut in forward:
                check = checker(value_spec(whole, name), f"{lane.name} {i} ({name})", bound, ranges, tail=cut)
                ref.link.mailbox.expect((lane, step, m, i), check)
            if spec.backward is Backward.FUSED:
                self._expect_backward(loaded, step, m, mine, bound, spec.grad_to_user)

    def _expect_backward(
        self, loaded: Loaded, step: int, m: int, mine: list[torch.Tensor], bound: dict[str, int], grads: Sequence[str]
    ) -> None:
        """The gradients a backward sends the owner for micro-batch ``m``: of the user inputs asked for,
        and in private mode of the outputs of a stage here that feeds a worker."""
        sp, whole, refs = loaded.split, loaded.whole, self.job.stages
        ranges = whole.program.dim_ranges
        for name in grads:
            i = sp.user_inputs.index(name)
            check = checker(spec_like(mine[i]), f"gradient of input {name}", bound, ranges, marker=True)
            refs[sp.input_stage[name]].link.mailbox.expect((Lane.USER_GRAD, step, m, i), check)
        for k in range(len(refs) - 1):  # a stage here feeding a worker after it, over that worker's link
            if refs[k].peer is None and refs[k + 1].peer is not None:
                for i, name in enumerate(sp.parts[k].outputs):
                    value = value_spec(whole, name)
                    if value.dtype.is_floating_point:  # only those have gradients
                        check = checker(value, f"gradient of {name}", bound, ranges, marker=True)
                        refs[k + 1].link.mailbox.expect((Lane.BWD, step, m, i), check)

    async def backward(
        self, result: StepResult, out_grads: dict[int, torch.Tensor | None], inputs: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Back-propagate a ``Backward.LATER`` step: the owner's output gradients go to the last stage; the
        gradients of the inputs the step's spec named come back."""
        spec = result.spec
        if spec.backward is not Backward.LATER:
            raise PipelineError(f"step {result.step} ran with backward={spec.backward.value}: it has no later backward")
        loaded = self._loaded(spec.key)
        n_micro = spec.micro_batches
        last = self.job.stages[-1]

        async def feed() -> None:
            for i, grad in out_grads.items():
                like = result.outputs[i]
                pieces = torch.tensor_split(grad, n_micro) if grad is not None and grad.dim() > 0 else None
                for m in range(n_micro):
                    if grad is None:
                        piece = NONE_MARKER
                    elif pieces is None:  # a scalar output: the mean of the micro-batches' values
                        piece = grad / n_micro
                    else:
                        piece = pieces[m]
                    await last.link.send(Lane.OUT_GRAD, result.step, m, i, piece if like.numel() else NONE_MARKER)

        cmd = RunBackward(key=spec.key, step=result.step, micro_batches=n_micro, grad_to_user=list(spec.grad_to_user))
        for m, mine in enumerate(zip(*_chunks(inputs, n_micro), strict=True)):
            self._expect_backward(loaded, result.step, m, list(mine), sizes(loaded.whole, mine), spec.grad_to_user)
        clock = f"{spec.key}:backward"
        started = trio.current_time()
        with self._step_deadline(spec.key, clock, result.step, inputs, 2.0):
            async with trio.open_nursery() as n:
                n.start_soon(feed)
                await self.job.broadcast(lambda ref: cmd)
            grads = await self._input_grads(loaded.split, result.step, n_micro, spec.grad_to_user, inputs)
        self.job.clock.record(clock, trio.current_time() - started, elements(inputs))
        return grads

    async def _input_grads(
        self, sp: Split, step: int, micro_batches: int, names: Sequence[str], inputs: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            i = sp.user_inputs.index(name)
            ref = self.job.stages[sp.input_stage[name]]
            pieces = []
            for m, like in enumerate(torch.tensor_split(inputs[i], micro_batches)):
                got = await self.job.recv(ref, Lane.USER_GRAD, step, m, i, "sent no input gradient")
                grad = from_marker(got, like)
                pieces.append(grad if grad is not None else torch.zeros_like(like))
            out[name] = torch.cat(pieces)
        return out

    async def reorder_cache(self, key: ProgramKey, index: list[int]) -> None:
        """Beam search: every stage's KV cache of program ``key`` takes its rows ``index`` (each stage checks them)."""
        self._loaded(key)
        await self.job.broadcast(lambda ref: ReorderCache(key=key, index=index))

    async def commit(self, step: int, scale: float) -> None:
        await self.job.broadcast(lambda ref: CommitGrads(step=step, scale=scale))

    # -- optimizer and gradients ---------------------------------------------------------------------------

    def _training(self) -> Loaded:
        """The training program, which holds the parameters that have gradients and optimizer state."""
        if "train" not in self.programs:
            raise PipelineError("this job has not trained: it has no gradients or optimizer state")
        return self.programs["train"]

    async def make_optimizer(self, name: str, hyper: dict[str, Any]) -> None:
        self._training()
        await self.job.broadcast(lambda ref: MakeOptimizer(name=name, hyper=hyper))

    async def optimizer_step(self, hyper: dict[str, Any]) -> None:
        await self.sync_tied()
        await self.job.broadcast(lambda ref: OptimizerStep(hyper=hyper))

    async def zero_grad(self) -> None:
        self.tied_total.clear()
        await self.job.broadcast(lambda ref: ZeroGrad())

    async def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm over every stage (a tied weight counted once), then one scale for all."""
        await self.sync_tied()
        ties = self._training().split.ties

        def ask(ref: StageRef) -> GradSquares:
            return GradSquares(exclude=[n for n, holders in ties.items() if ref.index != holders[0]])

        replies = await self.job.broadcast(ask)
        total = math.sqrt(sum(r.value for r in replies))
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            await self.job.broadcast(lambda ref: ScaleGrads(factor=coef))
            self.tied_total = {n: t * coef for n, t in self.tied_total.items()}
        return total

    async def sync_tied(self) -> None:
        """Sum the gradients of weights held by several stages (GPT-2's wte and lm_head), so every copy
        takes the same optimizer step. Contributions since the last sum are counted once."""
        ties = self._training().split.ties
        if not ties:
            return
        names_by_stage: dict[int, list[str]] = {}
        for name, holders in ties.items():
            for k in holders:
                names_by_stage.setdefault(k, []).append(name)
        fetched: dict[str, list[torch.Tensor]] = {}
        for k, names in names_by_stage.items():
            for name, grad in zip(names, await self.fetch(self.job.stages[k], "grads", names), strict=True):
                fetched.setdefault(name, []).append(grad)
        totals = {}
        for name, grads in fetched.items():
            before = self.tied_total.get(name)
            total = sum(grads[1:], grads[0].clone()) if before is None else before + sum(g - before for g in grads)
            totals[name] = total
        for k, names in names_by_stage.items():
            ref = self.job.stages[k]
            await self.job.command(ref, SetGrads(names=names), send=[totals[n] for n in names])
        self.tied_total = totals

    async def fetch(
        self, ref: StageRef, what: Literal["grads", "state", "optimizer"], names: list[str]
    ) -> list[torch.Tensor]:
        _, tensors = await self._send_tensors(ref, SendTensors(what=what, names=names))
        return tensors

    async def _send_tensors(self, ref: StageRef, msg: SendTensors) -> tuple[list[str], list[torch.Tensor]]:
        """What a stage sends of its state, bounded by what its program holds: as many tensors as it has
        parameters and buffers (times the optimizer's slots, plus a step count each), and as many bytes."""
        part = self._training().split.parts[ref.index].program
        count = len(part.program.parameters) + len(part.program.buffers)
        slots = OPTIMIZER_SLOTS[self.settings.optimizer] if msg.what == "optimizer" else 1
        most = len(msg.names) or count * (slots + 1)
        reply, tensors = await self.job.fetch_blob(ref, msg, most, slots * len(part.weights) + most * 64 + (1 << 20))
        return reply.names, tensors

    async def state(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers, by the original model's names."""
        merged: dict[str, torch.Tensor] = {}
        for ref in self.job.stages:
            names, tensors = await self._send_tensors(ref, SendTensors(what="state", names=[]))
            for name, tensor in zip(names, tensors, strict=True):
                merged.setdefault(name, tensor)
        return merged

    async def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every stage's optimizer state, by parameter name (a tied weight once)."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for ref in self.job.stages:
            names, tensors = await self._send_tensors(ref, SendTensors(what="optimizer", names=[]))
            for full, tensor in zip(names, tensors, strict=True):
                name, _, key = full.rpartition(":")
                state.setdefault(name, {}).setdefault(key, tensor)
        return state

    async def close(self) -> None:
        await self.job.close()


def slots(sp: Split, k: int) -> tuple[list[InputSlot], list[OutputSlot]]:
    """Where part ``k``'s inputs come from and where its outputs go, as link indices."""
    part = sp.parts[k]
    inputs = []
    for name in part.inputs:
        if name in sp.user_inputs and sp.input_stage[name] == k:
            inputs.append(InputSlot(name=name, source="user", idx=sp.user_inputs.index(name)))
        else:
            inputs.append(InputSlot(name=name, source="prev", idx=sp.parts[k - 1].outputs.index(name)))
    last = k == len(sp.parts) - 1
    outputs = [OutputSlot(name=name, dest="user" if last else "next", idx=i) for i, name in enumerate(part.outputs)]
    return inputs, outputs


def sizes(program: StageProgram, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """The program's symbolic dims at these (full micro-batch) inputs."""
    found: dict[str, int] = {}
    for spec, tensor in zip(program.program.signature.inputs, inputs, strict=True):
        for dim, size in zip(spec.shape, tensor.shape, strict=True):
            if isinstance(dim, str):
                found[dim] = int(size)
    return found


def _chunks(inputs: Sequence[torch.Tensor], micro_batches: int) -> list[Sequence[torch.Tensor]]:
    """Each input split into micro-batches along dim 0 (a scalar goes to every micro-batch)."""
    return [torch.tensor_split(t, micro_batches) if t.dim() > 0 else [t] * micro_batches for t in inputs]


def elements(inputs: Sequence[torch.Tensor]) -> int:
    """A step's size for its deadline: the elements of its inputs (batch x sequence)."""
    return sum(t.numel() for t in inputs)


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batch results as one: scalars (losses) are averaged, everything else concatenated."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].dim() == 0:
        return torch.stack(parts).mean()
    return torch.cat(parts)


__all__ = ["Backward", "Pipeline", "PipelineError", "Settings", "StepResult", "StepSpec"]
