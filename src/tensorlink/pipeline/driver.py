"""Driver: one offloaded model's pipeline, from capture to steps, gradients and weights.

Set-up (first forward): capture the whole model with torch.export into one Stage IR program, profile
its cost per parameter group, ask a validator for workers (it partitions by cost and memory and tells
each worker its stage and neighbours), split the program at the validator's boundaries, open the job
and load every stage. A step sends each user input straight to the stage that needs it, runs the
schedule on every stage at once and gathers the model outputs from the last stage.

Scalar losses computed inside the model (HF models given labels) let the stages run the backward
during the forward call (1F1B): gradients are computed for a loss gradient of 1 and wait on the
workers; the owner's ``loss.backward()`` then scales and commits them (exactly, for the usual 1.0).
Any other use of the outputs (a loss computed here) back-propagates after the forward ("later").
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from torch.export import Dim

from tensorlink.ir import StageProgram, capture
from tensorlink.ir.split import Split, profile, split
from tensorlink.pipeline.client import Client
from tensorlink.pipeline.expect import checker, spec_like, value_spec
from tensorlink.pipeline.job import Job, PipelineError, StageRef, first_error, first_step_deadline_s
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
    RunBackward,
    RunStep,
    ScaleGrads,
    SendTensors,
    SetGrads,
    ZeroGrad,
)

log = logging.getLogger(__name__)
GENERATION_PREFIX = "model."  # where transformers' static-cache wrapper keeps the model


@dataclass
class StepResult:
    step: int
    mode: str  # fused | later | none
    outputs: dict[int, torch.Tensor]  # model output index -> tensor (micro-batches joined)
    input_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # fused: gradients of user inputs


@dataclass
class Program:
    """A captured and split program (train or eval) and how values map to stage slots."""

    whole: StageProgram
    split: Split
    out_spec: Any
    prefix: str = ""  # the parameters' names here are the training program's with this prefix


class Driver:
    def __init__(
        self,
        client: Client,
        validator: str,
        *,
        workers: int,
        micro_batches: int,
        schedule: str,
        private: bool,
        max_seq_len: int | None,
        optimizer: str = "AdamW",
    ) -> None:
        self.client = client
        self.validator = validator
        self.n_workers = workers
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.private = private
        self.max_seq_len = max_seq_len
        self.optimizer_name = optimizer
        self.job_id = secrets.token_bytes(16)
        self.plan: JobPlan | None = None
        self.job: Job | None = None
        self.programs: dict[str, Program] = {}
        self.owner: dict[str, int] = {}
        self.step = 0
        self.tied_total: dict[str, torch.Tensor] = {}

    # -- set-up ------------------------------------------------------------------------------------------

    def capture(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], train: bool) -> Program:
        """Capture ``module`` as one program on an example micro-batch; HF models without their KV cache
        (training and cache-less generation return no cache). Its batch dim is declared up to the example's:
        workers reserve memory for the declared maximum shapes, so the first micro-batch is the largest."""
        config = getattr(module, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if use_cache:
            config.use_cache = False
        try:
            batch = max((t.shape[0] for t in [*args, *kwargs.values()] if t.dim() > 0), default=2)
            whole = capture(
                module,
                args,
                example_kwargs=kwargs,
                max_seq_len=self.max_seq_len,
                max_batch=batch,
                train=train,
            )
        finally:
            if use_cache:
                config.use_cache = use_cache
        return Program(whole, None, getattr(whole, "out_spec", None))  # type: ignore[arg-type]

    def capture_cached(self, module: torch.nn.Module, batch: int, example_ids: torch.Tensor) -> Program:
        """The generation program of an HF causal LM: ``(input_ids, cache_position) -> logits`` with a
        static KV cache as buffers, which the split leaves on the stage of each layer. Its weights are
        the training program's under a ``model.`` prefix; the workers share them by name."""
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        generation = getattr(module, "generation_config", None)
        if generation is None:
            raise ValueError("generate() works on Hugging Face causal LMs (a model with a generation_config)")
        saved = (module.config.use_cache, generation.use_cache, generation.cache_implementation)
        module.config.use_cache, generation.use_cache, generation.cache_implementation = True, True, "static"
        try:
            wrapper = TorchExportableModuleWithStaticCache(module, batch_size=batch, max_cache_len=self.max_seq_len)
            seq = Dim("seq", min=1, max=self.max_seq_len)
            ids = example_ids.contiguous()
            whole = capture(
                wrapper,
                (),
                example_kwargs={"input_ids": ids, "cache_position": torch.arange(ids.shape[1])},
                dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
                train=False,
            )
        finally:
            module.config.use_cache, generation.use_cache, generation.cache_implementation = saved
        program = Program(whole, None, None)  # type: ignore[arg-type]
        program.prefix = GENERATION_PREFIX
        return program

    def sizes(self, program: StageProgram, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        """The program's symbolic dims at these (full micro-batch) inputs."""
        sizes: dict[str, int] = {}
        for spec, tensor in zip(program.program.signature.inputs, inputs, strict=True):
            for dim, size in zip(spec.shape, tensor.shape, strict=True):
                if isinstance(dim, str):
                    sizes[dim] = int(size)
        return sizes

    def kept(self, fused: bool) -> int:
        """Micro-batches a stage may keep for backward at once: with the backward fused into 1F1B at most one per
        stage (schedule.actions: the first stage's warm-up and one more); GPipe, or a backward the owner runs
        later, keeps every micro-batch."""
        stages = self.n_workers + (2 if self.private else 0)
        return min(self.micro_batches, stages) if fused and self.schedule == "1f1b" else self.micro_batches

    async def open(self, program: Program, *, fused: bool) -> None:
        """Ask the validator for workers, split at its boundaries, open the job and load the stages. Units are
        profiled at the declared maximum input shapes, where a worker counts a stage's forward; ``fused``: the
        backward runs with the forward (outputs="loss")."""
        symbols = program.whole.program.signature.symbols
        units = profile(program.whole, {name: high for name, (_, high) in symbols.items()})
        slots = OPTIMIZER_SLOTS.get(self.optimizer_name, 2)
        request = JobRequest(
            job=self.job_id,
            owner=self.client.peer_id,
            workers=self.n_workers,
            units=[declare(u, optimizer_slots=slots, kept=self.kept(fused)) for u in units],
            private=self.private,
            optimizer_slots=slots,
            device=None,
        )
        self.plan = plan = await request_job(self.client.host, self.validator, request)
        for unit, stage in zip(units, plan.unit_stage, strict=True):
            for name in unit.params:
                self.owner[name] = stage
        program.split = split(program.whole, self.owner, plan.n_stages)
        for placement in plan.placements:
            await self.client.connect([f"{a}/p2p/{placement.peer_id}" for a in placement.addrs])
        workers = {p.stage: p.peer_id for p in plan.placements}
        self.job = Job(self.client, self.job_id, plan.n_stages, workers, self.validator)
        await self.job.open()
        await self.load("train", program)

    async def load(self, key: str, program: Program) -> None:
        assert self.job is not None
        if program.split is None:
            owner = {program.prefix + name: stage for name, stage in self.owner.items()}
            program.split = split(program.whole, owner, len(self.job.stages))
        self.programs[key] = program
        sp = program.split

        job = self.job

        async def one(ref: StageRef) -> None:
            part = sp.parts[ref.index]
            data = part.program.to_bytes()
            inputs, outputs = slots(sp, ref.index)
            load = LoadProgram(key=key, size=len(data), inputs=inputs, outputs=outputs, prefix=program.prefix)  # type: ignore[arg-type]
            await job.command(ref, load, send=[torch.frombuffer(bytearray(data), dtype=torch.uint8)])

        with first_error():
            async with trio.open_nursery() as n:
                for ref in self.job.stages:
                    n.start_soon(one, ref)

    # -- steps -------------------------------------------------------------------------------------------

    async def run(
        self,
        key: str,
        inputs: Sequence[torch.Tensor],
        *,
        mode: str,
        training: bool,
        loss_output: int,
        to_user: list[int],
        grad_to_user: list[str],
        micro_batches: int,
        tail: int = 0,
    ) -> StepResult:
        assert self.job is not None
        program = self.programs[key]
        sp = program.split
        self.step += 1
        step = self.step
        chunks = [torch.tensor_split(t, micro_batches) if t.dim() > 0 else [t] * micro_batches for t in inputs]
        refs = self.job.stages
        cmd = RunStep(
            key=key,  # type: ignore[arg-type]
            step=step,
            micro_batches=micro_batches,
            schedule=self.schedule,  # type: ignore[arg-type]
            backward=mode,  # type: ignore[arg-type]
            training=training,
            loss_output=loss_output,
            loss_scale=1.0 / micro_batches,
            to_user=to_user,
            grad_to_user=grad_to_user,
            tail=tail,
        )
        outputs: dict[int, list[torch.Tensor]] = {i: [] for i in to_user}
        job = self.job
        self._expect_step(program, step, chunks, to_user, tail, backward=mode == "fused", grads=grad_to_user)

        async def feed() -> None:
            for m in range(micro_batches):
                for i, name in enumerate(sp.user_inputs):
                    if name in sp.input_stage:  # an input no stage reads stays here
                        await refs[sp.input_stage[name]].link.send(Lane.USER_IN, step, m, i, chunks[i][m])

        async def collect() -> None:
            last = refs[-1]
            for m in range(micro_batches):
                for i in to_user:
                    outputs[i].append(await job.recv(last, Lane.USER_OUT, step, m, i, "sent no output"))

        cost = 3.0 if mode == "fused" else 1.0
        started = trio.current_time()
        with self._step_deadline(key, step, inputs, cost):
            async with trio.open_nursery() as n:
                n.start_soon(feed)
                n.start_soon(collect)
                await job.broadcast(lambda ref: cmd)
            result = StepResult(step, mode, {i: join(parts) for i, parts in outputs.items()})
            if mode == "fused":
                result.input_grads = await self._input_grads(sp, step, micro_batches, grad_to_user, inputs)
        job.clock.record(key, trio.current_time() - started, elements(inputs))
        return result

    def _step_deadline(
        self, key: str, step: int, inputs: Sequence[torch.Tensor], cost: float
    ) -> AbstractContextManager[None]:
        """Job.deadline for a step of program ``key``; ``cost``: its FLOPs in forwards (3: with backward)."""
        assert self.job is not None
        program = self.programs[key.split(":")[0]]
        seconds = self.job.clock.deadline_s(key, elements(inputs))
        if seconds is None:  # never measured: the program's cost at a slow worker's speed
            flops = cost * sum(u.flops for u in profile(program.whole, self.sizes(program.whole, inputs)))
            seconds = first_step_deadline_s(flops)
        return self.job.deadline(step, seconds)

    def _expect_step(
        self,
        program: Program,
        step: int,
        chunks: list[Sequence[torch.Tensor]],
        to_user: list[int],
        tail: int,
        *,
        backward: bool,
        grads: list[str],
    ) -> None:
        """Announce every tensor a step makes the workers send the owner, with the dtype and shape each must
        have: the model outputs and, with a backward, the input gradients (and in private mode what the
        stages here receive from their worker neighbours). Owner links take nothing else."""
        assert self.job is not None
        sp, whole, refs = program.split, program.whole, self.job.stages
        ranges = whole.program.dim_ranges
        for m in range(len(chunks[0]) if chunks else 0):
            mine = [c[m] for c in chunks]
            sizes = self.sizes(whole, mine)
            forward = [(Lane.USER_OUT, refs[-1], i, sp.model_outputs[i], tail) for i in to_user]
            for k in range(1, len(refs)):  # a stage here fed by a worker before it, over that worker's link
                if refs[k].peer is None and refs[k - 1].peer is not None:
                    forward += [(Lane.FWD, refs[k - 1], i, name, 0) for i, name in enumerate(sp.parts[k - 1].outputs)]
            for lane, ref, i, name, cut in forward:
                check = checker(value_spec(whole, name), f"{lane.name} {i} ({name})", sizes, ranges, tail=cut)
                ref.link.mailbox.expect((lane, step, m, i), check)
            if backward:
                self._expect_backward(program, step, m, mine, sizes, grads)

    def _expect_backward(
        self, program: Program, step: int, m: int, mine: list[torch.Tensor], sizes: dict[str, int], grads: list[str]
    ) -> None:
        """The gradients a backward sends the owner for micro-batch ``m``: of the user inputs asked for,
        and in private mode of the outputs of a stage here that feeds a worker."""
        assert self.job is not None
        sp, whole, refs = program.split, program.whole, self.job.stages
        ranges = whole.program.dim_ranges
        for name in grads:
            i = sp.user_inputs.index(name)
            check = checker(spec_like(mine[i]), f"gradient of input {name}", sizes, ranges, marker=True)
            refs[sp.input_stage[name]].link.mailbox.expect((Lane.USER_GRAD, step, m, i), check)
        for k in range(len(refs) - 1):  # a stage here feeding a worker after it, over that worker's link
            if refs[k].peer is None and refs[k + 1].peer is not None:
                for i, name in enumerate(sp.parts[k].outputs):
                    spec = value_spec(whole, name)
                    if spec.dtype.is_floating_point:  # only those have gradients
                        check = checker(spec, f"gradient of {name}", sizes, ranges, marker=True)
                        refs[k + 1].link.mailbox.expect((Lane.BWD, step, m, i), check)

    async def backward(
        self,
        key: str,
        result: StepResult,
        out_grads: dict[int, torch.Tensor | None],
        grad_to_user: list[str],
        inputs: Sequence[torch.Tensor],
        micro_batches: int,
    ) -> dict[str, torch.Tensor]:
        """Back-propagate a "later" step: the owner's output gradients go to the last stage."""
        assert self.job is not None
        sp = self.programs[key].split
        last = self.job.stages[-1]

        async def feed() -> None:
            for i, grad in out_grads.items():
                like = result.outputs[i]
                pieces = torch.tensor_split(grad, micro_batches) if grad is not None and grad.dim() > 0 else None
                for m in range(micro_batches):
                    if grad is None:
                        piece = NONE_MARKER
                    elif pieces is None:  # a scalar output: the mean of the micro-batches' values
                        piece = grad / micro_batches
                    else:
                        piece = pieces[m]
                    await last.link.send(Lane.OUT_GRAD, result.step, m, i, piece if like.numel() else NONE_MARKER)

        cmd = RunBackward(key=key, step=result.step, micro_batches=micro_batches, grad_to_user=grad_to_user)  # type: ignore[arg-type]
        program = self.programs[key]
        chunks = [torch.tensor_split(t, micro_batches) if t.dim() > 0 else [t] * micro_batches for t in inputs]
        for m in range(micro_batches):
            mine = [c[m] for c in chunks]
            self._expect_backward(program, result.step, m, mine, self.sizes(program.whole, mine), grad_to_user)
        started = trio.current_time()
        with self._step_deadline(f"{key}:backward", result.step, inputs, 2.0):
            async with trio.open_nursery() as n:
                n.start_soon(feed)
                await self.job.broadcast(lambda ref: cmd)
            grads = await self._input_grads(sp, result.step, micro_batches, grad_to_user, inputs)
        self.job.clock.record(f"{key}:backward", trio.current_time() - started, elements(inputs))
        return grads

    async def _input_grads(
        self, sp: Split, step: int, micro_batches: int, names: list[str], inputs: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        assert self.job is not None
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

    async def commit(self, step: int, scale: float) -> None:
        assert self.job is not None
        await self.job.broadcast(lambda ref: CommitGrads(step=step, scale=scale))

    # -- optimizer and gradients ---------------------------------------------------------------------------

    async def make_optimizer(self, name: str, hyper: dict[str, Any]) -> None:
        assert self.job is not None
        await self.job.broadcast(lambda ref: MakeOptimizer(name=name, hyper=hyper))

    async def optimizer_step(self, hyper: dict[str, Any]) -> None:
        assert self.job is not None
        await self.sync_tied()
        await self.job.broadcast(lambda ref: OptimizerStep(hyper=hyper))

    async def zero_grad(self) -> None:
        assert self.job is not None
        self.tied_total.clear()
        await self.job.broadcast(lambda ref: ZeroGrad())

    async def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm over every stage (a tied weight counted once), then one scale for all."""
        assert self.job is not None
        await self.sync_tied()
        ties = self.programs["train"].split.ties

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
        assert self.job is not None
        ties = self.programs["train"].split.ties if "train" in self.programs else {}
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

    async def fetch(self, ref: StageRef, what: str, names: list[str]) -> list[torch.Tensor]:
        _, tensors = await self._send_tensors(ref, SendTensors(what=what, names=names))  # type: ignore[arg-type]
        return tensors

    async def _send_tensors(self, ref: StageRef, msg: SendTensors) -> tuple[list[str], list[torch.Tensor]]:
        """What a stage sends of its state, bounded by what its program holds: as many tensors as it has
        parameters and buffers (times the optimizer's slots, plus a step count each), and as many bytes."""
        assert self.job is not None
        part = self.programs["train"].split.parts[ref.index].program
        count = len(part.program.parameters) + len(part.program.buffers)
        slots = OPTIMIZER_SLOTS.get(self.optimizer_name, 2) if msg.what == "optimizer" else 1
        most = len(msg.names) or count * (slots + 1)
        reply, tensors = await self.job.fetch_blob(ref, msg, most, slots * len(part.weights) + most * 64 + (1 << 20))
        return reply.names, tensors

    async def state(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters and buffers, by the original model's names."""
        assert self.job is not None
        merged: dict[str, torch.Tensor] = {}
        for ref in self.job.stages:
            names, tensors = await self._send_tensors(ref, SendTensors(what="state", names=[]))
            for name, tensor in zip(names, tensors, strict=True):
                merged.setdefault(name, tensor)
        return merged

    async def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every stage's optimizer state, by parameter name (a tied weight once)."""
        assert self.job is not None
        state: dict[str, dict[str, torch.Tensor]] = {}
        for ref in self.job.stages:
            names, tensors = await self._send_tensors(ref, SendTensors(what="optimizer", names=[]))
            for full, tensor in zip(names, tensors, strict=True):
                name, _, key = full.rpartition(":")
                state.setdefault(name, {}).setdefault(key, tensor)
        return state

    async def close(self) -> None:
        if self.job is not None:
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


__all__ = ["Driver", "PipelineError", "StepResult"]
