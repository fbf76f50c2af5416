"""A small inference forward of a one-micro-batch step runs on the event loop once its input shapes were counted
(runtime.INLINE_BYTES): the same outputs, seeds and charges as in a thread, the process's random stream untouched,
and a forward kept for backward, of several micro-batches or over the size still goes to a thread."""

from __future__ import annotations

from typing import Any

import torch
import trio
from torch import nn

from tensorlink.ir import capture
from tensorlink.stage import runtime as runtime_module
from tensorlink.stage.links import Lane, LocalLink
from tensorlink.stage.runtime import FixedReservation, StageRuntime
from tensorlink.wire.stage import InputSlot, OutputSlot, RunStep

JOB = b"i" * 16


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.drop = nn.Dropout(0.5)  # in training mode: the output shows the seed the stage used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.a(x))


def step(n: int, *, micro_batches: int = 1, backward: Any = "none") -> RunStep:
    return RunStep(
        key="train", step=n, micro_batches=micro_batches, schedule="1f1b", backward=backward, training=True,
        to_user=[0],
    )  # fmt: skip


async def test_a_small_forward_runs_inline_with_the_same_results(monkeypatch: Any) -> None:
    torch.manual_seed(0)
    owner, user = LocalLink.pair()
    rt = StageRuntime(JOB, 0, 1, {"user": user}, reservation=FixedReservation(1 << 30))
    program = capture(Noisy().train(), (torch.randn(3, 8),), train=True)
    rt.load("train", program.to_bytes(), [InputSlot(name="x", source="user", idx=0)], [OutputSlot("out", "user", 0)])
    threads: list[str] = []
    honest = trio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
        threads.append(getattr(fn, "__name__", "?"))
        return await honest(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    x = torch.randn(3, 8)

    async def run(cmd: RunStep) -> torch.Tensor:
        for m in range(cmd.micro_batches):
            await owner.send(Lane.USER_IN, cmd.step, m, 0, x)
        await rt.run_step(cmd)
        outs = [await owner.recv(Lane.USER_OUT, cmd.step, m, 0) for m in range(cmd.micro_batches)]
        return outs[0]

    first = await run(step(5))
    assert threads == ["compute"], "a shape never counted must be counted in a thread"
    state = torch.random.get_rng_state()
    again = await run(step(5))
    assert threads == ["compute"], "the same small forward went to a thread again"
    assert torch.equal(again, first), "inline, the stage's seed for (job, step, micro-batch) gave another output"
    assert torch.equal(torch.random.get_rng_state(), state), "the inline forward moved the process's random stream"
    assert not torch.equal(await run(step(6)), first), "another step got the same dropout"
    assert rt.running == 0 and rt.peak_charged > 0

    await run(step(7, backward="later"))  # kept for backward: always a thread
    assert threads == ["compute"] * 2
    await run(step(8, micro_batches=2))  # several micro-batches: each in a thread
    assert threads == ["compute"] * 4
    monkeypatch.setattr(runtime_module, "INLINE_BYTES", 0)
    rt.load("train", program.to_bytes(), [InputSlot(name="x", source="user", idx=0)], [OutputSlot("out", "user", 0)])
    await run(step(9))
    await run(step(10))
    assert threads == ["compute"] * 6, "a forward over INLINE_BYTES ran inline"
