"""A step's command travels on the data plane and its Done is read late, without loosening any rule.

The harness is test_hostile_worker's: a real StageHost on its own libp2p host serving the stage protocol, the real
stage program loaded, an owner's real Client and Pipeline. What is checked:
- a step's RunStep never goes over the stage stream (it is a Lane.CONTROL frame), other commands still do;
- a step ends with its outputs, before its Done (a slow Done does not delay it), and the next command to that stage
  is sent only after that Done: one command at a time per stage;
- a step that fails after its outputs came fails the next step, naming the stage, the worker and the step; one that
  fails first ends its own step at once, not at its deadline;
- the worker takes commands from the owner's channel only, only RunStep, and answers a bad control frame with
  Failed (the session lives).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import trio
from test_hostile_worker import Owner, model, pipeline  # noqa: F401  (the fixture)

from tensorlink.pipeline import job as job_module
from tensorlink.pipeline.job import PipelineError
from tensorlink.stage.links import Lane, LocalLink
from tensorlink.stage.runtime import FixedReservation, StageError, StageRuntime
from tensorlink.stage.session import Session, step_frame, step_of_frame
from tensorlink.wire.messages import StageAssign
from tensorlink.wire.stage import RunStep, StageMessage, ZeroGrad, encode_stage

pytestmark = [pytest.mark.swarm]

HONEST_HANDLE = Session.handle
HONEST_RUN_STEP = StageRuntime.run_step
STEP = RunStep(key="train", step=1, micro_batches=1, schedule="1f1b", backward="none", to_user=[0], tail=1)


def test_a_step_command_goes_on_the_data_plane_and_others_on_the_stream(pipeline: Owner, monkeypatch: Any) -> None:  # noqa: F811
    on_stream: list[str] = []  # what the owner wrote on the stage stream
    on_lane: list[str] = []  # what the worker took from the owner's channel
    handled: list[str] = []
    honest_send, honest_next = job_module.send_stage, Session.next_step

    async def send(stream: Any, msg: StageMessage) -> None:
        on_stream.append(type(msg).__name__)
        await honest_send(stream, msg)

    async def next_step(self: Session) -> RunStep:
        step = await honest_next(self)
        on_lane.append(type(step).__name__)
        return step

    async def handle(self: Session, msg: StageMessage) -> StageMessage:
        handled.append(type(msg).__name__)
        return await HONEST_HANDLE(self, msg)

    monkeypatch.setattr(job_module, "send_stage", send)
    monkeypatch.setattr(Session, "next_step", next_step)
    monkeypatch.setattr(Session, "handle", handle)
    x = torch.randn(4, 8)
    for _ in range(3):
        torch.testing.assert_close(pipeline.step(x), model()(x), rtol=1e-5, atol=1e-6)
    pipeline.owner.call(pipeline.driver.zero_grad)
    assert handled == ["RunStep"] * 3 + ["ZeroGrad"], handled
    assert on_stream == ["ZeroGrad"], f"the stage stream carried {on_stream}"
    assert on_lane == ["RunStep"] * 2, on_lane  # the first one was read before the patch
    ref = pipeline.driver.job.stages[0]
    assert not ref.unread and ref.steps_out == 3


def test_a_step_ends_with_its_outputs_and_the_next_command_waits_for_its_done(
    pipeline: Owner,  # noqa: F811
    monkeypatch: Any,
) -> None:
    x = torch.randn(4, 8)
    pipeline.step(x)  # measured: the step's deadline is the measured one
    late = 1.5
    events: list[str] = []

    async def handle(self: Session, msg: StageMessage) -> StageMessage:
        events.append(f"start {type(msg).__name__}")
        reply = await HONEST_HANDLE(self, msg)
        if isinstance(msg, RunStep):
            await trio.sleep(late)  # its outputs are sent; only its Done is late
        events.append(f"end {type(msg).__name__}")
        return reply

    monkeypatch.setattr(Session, "handle", handle)
    started = time.monotonic()
    torch.testing.assert_close(pipeline.step(x), model()(x), rtol=1e-5, atol=1e-6)
    assert time.monotonic() - started < late, "the step waited for its Done"
    assert len(pipeline.driver.job.stages[0].unread) == 1
    pipeline.owner.call(pipeline.driver.zero_grad)
    assert time.monotonic() - started >= late
    assert events == ["start RunStep", "end RunStep", "start ZeroGrad", "end ZeroGrad"], events
    assert not pipeline.driver.job.stages[0].unread


def test_a_step_that_fails_after_its_outputs_fails_the_next_one(pipeline: Owner, monkeypatch: Any) -> None:  # noqa: F811
    x = torch.randn(4, 8)
    pipeline.step(x)

    async def handle(self: Session, msg: StageMessage) -> StageMessage:
        await HONEST_HANDLE(self, msg)
        await trio.sleep(0.3)  # the outputs are in by then
        raise StageError("broken", "failed after its outputs")

    monkeypatch.setattr(Session, "handle", handle)
    pipeline.step(x)  # step 2: its outputs came
    with pytest.raises(PipelineError) as info:
        pipeline.step(x)
    expected = f"stage 0 (worker {pipeline.worker.peer_id[:12]}): RunStep of step 2 failed: failed after its outputs"
    assert expected in str(info.value)


def test_a_step_that_fails_first_ends_at_once(pipeline: Owner, monkeypatch: Any) -> None:  # noqa: F811
    x = torch.randn(4, 8)
    pipeline.step(x)

    async def refuse(self: StageRuntime, cmd: RunStep) -> None:
        raise StageError("broken", "no such luck")

    monkeypatch.setattr(StageRuntime, "run_step", refuse)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"stage 0 \(worker .*\): RunStep of step 2 failed: no such luck"):
        pipeline.step(x)
    assert time.monotonic() - started < 10, "the owner waited for the step's deadline"  # its floor is 30 s
    monkeypatch.setattr(StageRuntime, "run_step", HONEST_RUN_STEP)
    torch.testing.assert_close(pipeline.step(x), model()(x), rtol=1e-5, atol=1e-6)  # the session lives


def test_a_control_frame_that_is_no_step_fails_as_a_bad_command(pipeline: Owner) -> None:  # noqa: F811
    job = pipeline.driver.job
    ref = job.stages[0]

    async def send(frame: torch.Tensor) -> None:
        await ref.link.send(Lane.CONTROL, ref.steps_out, 0, ref.index, frame)
        ref.steps_out += 1
        ref.unread.append(("RunStep", " (forged)"))
        await job._settle(ref)

    bad = {
        "only RunStep comes on the data plane; not ZeroGrad": torch.frombuffer(
            bytearray(encode_stage(ZeroGrad())), dtype=torch.uint8
        ),
        "a control frame that is no stage command": torch.frombuffer(bytearray(b"\xc1garbage"), dtype=torch.uint8),
        "a control frame must be at most": torch.zeros(3, dtype=torch.float32),
    }
    for message, frame in bad.items():
        with pytest.raises(PipelineError, match=message):
            pipeline.owner.call(send, frame)
    x = torch.randn(4, 8)
    torch.testing.assert_close(pipeline.step(x), model()(x), rtol=1e-5, atol=1e-6)


async def test_a_stage_reads_steps_from_its_owner_only() -> None:
    assign = StageAssign(
        job=b"c" * 16, owner="owner", validator="v", stage=1, n_stages=2, prev="before", memory_bytes=1 << 20
    )
    session = Session(assign, "cpu", FixedReservation(1 << 20))
    owner, user = LocalLink.pair()
    neighbour, prev = LocalLink.pair()
    session.links.update(user=user, prev=prev)
    forged = RunStep(key="train", step=9, micro_batches=1, schedule="1f1b", backward="none")
    await neighbour.send(Lane.CONTROL, 0, 0, 1, step_frame(forged))
    with trio.move_on_after(0.2) as waited:
        await session.next_step()
    assert waited.cancelled_caught, "a neighbour's control frame was taken as a command"
    await owner.send(Lane.CONTROL, 0, 0, 1, step_frame(STEP))
    assert await session.next_step() == STEP
    assert session.steps_in == 1
    assert step_of_frame(step_frame(STEP)) == STEP
