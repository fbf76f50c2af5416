"""A malicious worker against its owner: it stalls, floods or sends wrong outputs, and the owner gets a
PipelineError naming the stage, the worker and what happened, in bounded time and memory.

The worker is real in every part but its behaviour: a StageHost on its own libp2p host and data plane in
this process, serving the stage protocol with real wire messages and loading the real stage program, whose
StageRuntime is patched here to misbehave. The owner is a real Client and Pipeline, as offload() builds them;
the validator's part (assigning the stage) is the one line of bookkeeping the fake Assignments does.
"""

from __future__ import annotations

import re
import resource
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from torch import nn

from tensorlink.pipeline import job as job_module
from tensorlink.pipeline.client import Client
from tensorlink.pipeline.driver import Backward, Pipeline, Settings, StepSpec
from tensorlink.pipeline.job import Job, PipelineError
from tensorlink.pipeline.programs import capture_program
from tensorlink.stage.links import Lane, LinkClosed
from tensorlink.stage.runtime import StageRuntime
from tensorlink.wire.messages import StageAssign
from tensorlink.wire.stage import RunStep
from tensorlink.worker.stage_host import StageHost

pytestmark = [pytest.mark.swarm]

MICRO_BATCHES = 2


class OneAssignment:
    """The worker's assignments: the one stage a validator would have assigned it."""

    def __init__(self, assign: StageAssign) -> None:
        self.assign: StageAssign | None = assign

    def get(self, job: bytes) -> StageAssign | None:
        return self.assign if self.assign is not None and self.assign.job == job else None

    def claim(self, job: bytes) -> StageAssign | None:
        return self.get(job)

    def release(self, job: bytes) -> None:
        self.assign = None

    def unreserved_bytes(self) -> int:
        return 0  # the stage holds what was assigned, no more

    def grow(self, job: bytes, memory_bytes: int) -> int:
        assign = self.get(job)
        return 0 if assign is None else assign.memory_bytes


@dataclass
class Owner:
    owner: Client
    worker: Client
    driver: Pipeline

    def step(self, x: torch.Tensor) -> torch.Tensor:
        async def run() -> torch.Tensor:
            spec = StepSpec(key="train", loss_output=0, micro_batches=MICRO_BATCHES)
            result = await self.driver.run(spec, [x])
            return result.outputs[0]

        return self.owner.call(run)

    def step_and_backward(self, x: torch.Tensor) -> torch.Tensor:
        """A forward, then a backward from the owner's output gradient: the gradient of ``x`` comes back."""
        name = self.driver.programs["train"].split.user_inputs[0]

        async def run() -> torch.Tensor:
            spec = StepSpec(
                key="train", backward=Backward.LATER, training=True, loss_output=0, grad_to_user=(name,),
                micro_batches=MICRO_BATCHES,
            )  # fmt: skip
            result = await self.driver.run(spec, [x])
            out_grad: dict[int, torch.Tensor | None] = {0: torch.ones_like(result.outputs[0])}
            grads = await self.driver.backward(result, out_grad, [x])
            return grads[name]

        return self.owner.call(run)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.fixture
def pipeline() -> Iterator[Owner]:
    """An owner driving one stage on the in-process worker; the program is loaded, no step run yet."""
    owner, worker = Client().start(), Client().start()
    try:
        job_id = secrets.token_bytes(16)
        assign = StageAssign(
            job=job_id, owner=owner.peer_id, validator=worker.peer_id, stage=0, n_stages=1, memory_bytes=1 << 30
        )
        stage_host = StageHost(worker.host, worker.channels, OneAssignment(assign), max_memory_bytes=1 << 30)

        async def serve() -> None:
            assert worker.nursery is not None
            await worker.nursery.start(stage_host.serve)

        worker.call(serve)
        addrs = [f"{a}/p2p/{worker.peer_id}" for a in worker.host.addrs()]
        assert owner.call(owner.connect, addrs)
        program = capture_program(model(), (torch.randn(4, 8),), {}, train=True, max_seq_len=None)

        async def open_job() -> Pipeline:
            job = Job(owner, job_id, 1, {0: worker.peer_id}, worker.peer_id)
            await job.open()
            settings = Settings(workers=1, micro_batches=MICRO_BATCHES)
            driver = Pipeline(owner, settings, job, {name: 0 for name in program.whole.program.parameters})
            await driver.load("train", program)
            return driver

        yield Owner(owner, worker, owner.call(open_job))
    finally:
        owner.close()
        worker.close()


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


HONEST_RUN_STEP = StageRuntime.run_step
HONEST_SEND = StageRuntime._send


def test_a_worker_that_acknowledges_a_step_but_sends_no_output(pipeline: Owner, monkeypatch: Any) -> None:
    """The step's deadline comes from the measured honest step; missing it names stage, worker and step."""
    x = torch.randn(4, 8)
    assert torch.allclose(pipeline.step(x), model()(x), atol=1e-6)
    monkeypatch.setattr(job_module, "STEP_FLOOR_S", 1.0)  # minutes in real use; the measured part is tested here

    async def acknowledge_only(self: StageRuntime, cmd: RunStep) -> None:
        self.steps_run += 1

    monkeypatch.setattr(StageRuntime, "run_step", acknowledge_only)
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        pipeline.step(x)
    took = time.monotonic() - started
    message = str(info.value)
    assert f"stage 0 on {pipeline.worker.peer_id} sent no output for step 2 within " in message, message
    deadline = float(message.rsplit("within ", 1)[1].split(" s")[0])
    assert deadline >= 1.0 and deadline - 0.5 < took < deadline + 5.0, (deadline, took)


def test_a_worker_that_never_finishes_a_step(pipeline: Owner, monkeypatch: Any) -> None:
    x = torch.randn(4, 8)
    pipeline.step(x)
    monkeypatch.setattr(job_module, "STEP_FLOOR_S", 1.0)

    async def hang(self: StageRuntime, cmd: RunStep) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(StageRuntime, "run_step", hang)
    with pytest.raises(PipelineError, match=f"stage 0 on {pipeline.worker.peer_id} did not finish RunStep for step 2"):
        pipeline.step(x)


FLOOD_FRAMES, FLOOD_MIB = 48, 4


@pytest.mark.parametrize("unsolicited", ["later_steps", "duplicates", "other_lanes"])
def test_a_worker_that_floods_its_owner(pipeline: Owner, monkeypatch: Any, unsolicited: str) -> None:
    """Frames the owner did not ask for close the link at the first one, naming the worker; the owner
    keeps none of them (without the check it kept all, FLOOD_FRAMES x FLOOD_MIB MiB)."""
    x = torch.randn(4, 8)
    pipeline.step(x)
    big = torch.ones(FLOOD_MIB << 18)
    sent = []

    async def flood(self: StageRuntime, cmd: RunStep) -> None:
        await HONEST_RUN_STEP(self, cmd)
        link = self.links["user"]
        for i in range(FLOOD_FRAMES):
            key = {
                "later_steps": (Lane.USER_OUT, cmd.step + 1 + i, 0, 0),
                "duplicates": (Lane.USER_OUT, cmd.step, 0, 0),
                "other_lanes": (Lane.BLOB, 1000 + i, 1, 0),
            }[unsolicited]
            try:
                await link.send(*key, big)
            except Exception:  # the owner closed the link
                break
            sent.append(key)

    monkeypatch.setattr(StageRuntime, "run_step", flood)
    before = rss_peak_mib()
    # A frame for a later step is unsolicited, or, once that step's outputs are announced (the owner sends a
    # step ahead of the last one's replies), of the wrong shape: either way the link closes at the first one.
    refused = f"{pipeline.worker.peer_id} sent (an unsolicited|a wrong)"
    with pytest.raises(PipelineError, match=refused) as info:
        for _ in range(3):  # the flood races the step's own outputs: the owner notices within a step or two
            pipeline.step(x)
    growth = rss_peak_mib() - before
    print(f"flood ({unsolicited}): {len(sent)} frames of {FLOOD_MIB} MiB sent, owner peak RSS +{growth:.0f} MiB")
    assert "link closed" in str(info.value)
    assert growth < FLOOD_FRAMES * FLOOD_MIB / 3, growth


def reset_peak_rss() -> None:
    """Start a fresh peak (VmHWM), so the next peak measures this test alone, whatever ran before it."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


# 768 MiB fits the owner's 1 GiB data-plane buffer pool, so read before its check the frame was held whole;
# 2 GiB never fits it.
HUGE = {"2GiB": 2 << 30, "768MiB": 768 << 20}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux's /proc")
@pytest.mark.parametrize("announced", sorted(HUGE))
def test_a_worker_that_announces_a_huge_output(pipeline: Owner, monkeypatch: Any, announced: str) -> None:
    """An output frame announcing gigabytes (a real tensor's shape, never filled) is refused by its header:
    the owner names the frame, what it announced and what it expected, and allocates nothing for it."""
    nbytes = HUGE[announced]
    x = torch.randn(4, 8)
    pipeline.step(x)
    outcome: list[str] = []

    async def announce(self: StageRuntime, cmd: RunStep) -> None:
        huge = torch.empty(nbytes // 32, 8)  # never written: the send reads the zero page, so no RSS here
        with trio.move_on_after(30):
            try:
                await self.links["user"].send(Lane.USER_OUT, cmd.step, 0, 0, huge)
                outcome.append("sent whole")
            except LinkClosed:
                outcome.append("link closed by the owner")

    monkeypatch.setattr(StageRuntime, "run_step", announce)
    reset_peak_rss()
    before = peak_rss_since_reset_mib()
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        pipeline.step(x)
    took, growth = time.monotonic() - started, peak_rss_since_reset_mib() - before
    print(f"{announced} output announced: worker {outcome}, owner peak RSS +{growth:.0f} MiB, {took:.2f} s")
    expected = (
        rf"{pipeline.worker.peer_id} sent a wrong USER_OUT frame of step \d+, micro-batch 0, index 0: .* is float32 "
        rf"\[{nbytes // 32}, 8\], expected float32 \['s\d+', 8\]: dim 0 is {nbytes // 32}, expected 2 .*; link closed"
    )
    assert re.search(expected, str(info.value)), str(info.value)
    assert growth < 64, growth


WRONG = {
    "dtype": (lambda t: t.double(), r"is float64 \[2, 8\], expected float32"),
    "flattened": (lambda t: t.reshape(-1), r"is float32 \[16\], expected float32"),
    "transposed": (lambda t: t.t().contiguous(), r"is float32 \[8, 2\], expected float32 .*dim 0 is 8, expected 2"),
    "larger": (lambda t: torch.cat([t, t]), r"is float32 \[4, 8\], expected float32 .*dim 0 is 4, expected 2"),
    "integer": (lambda t: t.long(), r"is int64 \[2, 8\], expected float32"),
}


@pytest.mark.parametrize("wrong", sorted(WRONG))
def test_a_worker_that_sends_wrong_outputs(pipeline: Owner, monkeypatch: Any, wrong: str) -> None:
    """Each output is checked against the capture's signature (dtype exact, every dim against the
    input it depends on) before use: a named error, never a silent reshape or a crash."""
    mutate, expected = WRONG[wrong]

    def send(self: StageRuntime, role: str, lane: Lane, step: int, mb: int, idx: int, tensor: torch.Tensor) -> None:
        HONEST_SEND(self, role, lane, step, mb, idx, mutate(tensor) if lane == Lane.USER_OUT else tensor)

    monkeypatch.setattr(StageRuntime, "_send", send)
    with pytest.raises(PipelineError, match=f"{pipeline.worker.peer_id} sent a wrong USER_OUT frame of step 1") as info:
        pipeline.step(torch.randn(4, 8))
    assert re.search(expected, str(info.value)), str(info.value)


def test_a_worker_that_sends_a_wrong_input_gradient(pipeline: Owner, monkeypatch: Any) -> None:
    """Gradients sent back to the owner are checked too: the shape of the input they belong to."""
    x = torch.randn(4, 8)
    reference = x.clone().requires_grad_(True)
    model()(reference).sum().backward()
    assert torch.allclose(pipeline.step_and_backward(x), reference.grad, atol=1e-6)

    def send(self: StageRuntime, role: str, lane: Lane, step: int, mb: int, idx: int, tensor: torch.Tensor) -> None:
        HONEST_SEND(self, role, lane, step, mb, idx, tensor[:, :4] if lane == Lane.USER_GRAD else tensor)

    monkeypatch.setattr(StageRuntime, "_send", send)
    with pytest.raises(PipelineError, match=r"sent a wrong USER_GRAD frame of step 2.* is float32 \[2, 4\], expected"):
        pipeline.step_and_backward(x)
