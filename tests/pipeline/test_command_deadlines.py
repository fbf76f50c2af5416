"""A worker that stalls on a command other than a step (optimizer, gradients, state fetches, program loads):
the owner gets a PipelineError naming the stage, the worker and the command within that command's deadline
(tensorlink.pipeline.job: measured durations of the same command with a margin and a floor, plus the bytes it
moves at a slow rate), not after the old flat 600 s.

The harness is test_hostile_worker's: a real StageHost on its own libp2p host serving the stage protocol, with
the real stage program loaded; here its Session answers one kind of command never (or announces tensors it
does not send).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
import trio
from test_hostile_worker import Owner, pipeline  # noqa: F401  (the fixture)

from tensorlink.pipeline import job as job_module
from tensorlink.pipeline.driver import Pipeline
from tensorlink.pipeline.job import PipelineError
from tensorlink.stage.session import Session
from tensorlink.wire.stage import Done, SendTensors, StageMessage

pytestmark = [pytest.mark.swarm]

HONEST_HANDLE = Session.handle
ADAM = {"lr": 1e-3}

# Each command the owner sends outside a step, as the user's code makes it.
COMMANDS: dict[str, Callable[[Pipeline], Awaitable[Any]]] = {
    "MakeOptimizer": lambda d: d.make_optimizer("AdamW", ADAM),
    "OptimizerStep": lambda d: d.optimizer_step(ADAM),
    "ZeroGrad": lambda d: d.zero_grad(),
    "GradSquares": lambda d: d.clip_grad_norm(1.0),
    "SendTensors": lambda d: d.state(),
    "LoadProgram": lambda d: d.load("train", d.programs["train"].program),
}


def train_once(pipeline: Owner) -> None:  # noqa: F811
    """A forward and backward, then every command once: each kind's duration is measured."""
    pipeline.step_and_backward(torch.randn(4, 8))
    for name in COMMANDS:
        pipeline.owner.call(COMMANDS[name], pipeline.driver)


def stall_on(monkeypatch: Any, kind: str) -> None:
    """The worker reads commands of ``kind`` and never answers them."""

    async def handle(self: Session, msg: StageMessage) -> StageMessage:
        if type(msg).__name__ == kind:
            await trio.sleep_forever()
        return await HONEST_HANDLE(self, msg)

    monkeypatch.setattr(Session, "handle", handle)


def deadline_in(message: str) -> float:
    return float(message.rsplit("within ", 1)[1].split(" s")[0])


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_a_worker_that_never_answers_a_command(pipeline: Owner, monkeypatch: Any, kind: str) -> None:  # noqa: F811
    """After one honest round, a command the worker never answers fails within its deadline, which the
    message states: the measured round times the margin (floored, here at 1 s) or, for a load, LOAD_S."""
    train_once(pipeline)
    monkeypatch.setattr(job_module, "STEP_FLOOR_S", 1.0)  # 30 s in real use; the measured part is tested here
    monkeypatch.setattr(job_module, "LOAD_S", 1.0)  # 180 s in real use: a load's validation is bounded by the IR
    stall_on(monkeypatch, kind)
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        pipeline.owner.call(COMMANDS[kind], pipeline.driver)
    took = time.monotonic() - started
    message = str(info.value)
    assert message.startswith(f"stage 0 on {pipeline.worker.peer_id} did not answer {kind} within "), message
    deadline = deadline_in(message)
    assert 1.0 <= deadline < 10.0 and deadline - 0.5 < took < deadline + 5.0, (deadline, took)


def test_a_first_command_never_measured_has_a_deadline(pipeline: Owner, monkeypatch: Any) -> None:  # noqa: F811
    """Before any command of a kind was measured, FIRST_COMMAND_S bounds it (60 s in real use)."""
    monkeypatch.setattr(job_module, "FIRST_COMMAND_S", 1.5)
    stall_on(monkeypatch, "MakeOptimizer")
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"did not answer MakeOptimizer within 1\.5 s"):
        pipeline.owner.call(COMMANDS["MakeOptimizer"], pipeline.driver)
    assert time.monotonic() - started < 6.0


def test_a_worker_that_announces_tensors_but_sends_none(pipeline: Owner, monkeypatch: Any) -> None:  # noqa: F811
    """A state fetch answered with names but no tensors: bounded by the bytes the stage could send."""
    train_once(pipeline)
    monkeypatch.setattr(job_module, "STEP_FLOOR_S", 1.0)

    async def announce_only(self: Session, msg: StageMessage) -> StageMessage:
        if isinstance(msg, SendTensors):
            self.blobs_out += 1
            return Done(names=[name for name, _ in self.runtime.state_tensors([])])
        return await HONEST_HANDLE(self, msg)

    monkeypatch.setattr(Session, "handle", announce_only)
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        pipeline.owner.call(pipeline.driver.state)
    took = time.monotonic() - started
    message = str(info.value)
    expected = f"stage 0 on {pipeline.worker.peer_id} did not send the tensors it announced for SendTensors within "
    assert message.startswith(expected), message
    deadline = deadline_in(message)
    assert deadline < 10.0 and deadline - 0.5 < took < deadline + 5.0, (deadline, took)
