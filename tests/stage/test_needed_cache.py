"""StageRuntime.needed() keeps what the loaded programs hold between loads (a stage asks on every frame and every
forward): after each kind of change (a program loaded, an eval program sharing the weights, a program replaced, a
refused load, an optimizer, a kept micro-batch and its backward, an optimizer step, frames buffered) it equals a
fresh walk of every parameter and buffer, and the storages it counts are the programs' own."""

from __future__ import annotations

import pytest
import torch
import trio
from torch import nn

from tensorlink.ir import capture
from tensorlink.ir.charge import forward_bytes, optimizer_bytes
from tensorlink.stage.links import Lane, LocalLink
from tensorlink.stage.runtime import FixedReservation, StageError, StageRuntime
from tensorlink.wire.stage import InputSlot, OutputSlot, RunBackward, RunStep

JOB = b"n" * 16
INPUTS = [InputSlot(name="x", source="user", idx=0)]


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(8, width)
        self.b = nn.Linear(width, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) * self.scale


def program(width: int = 16, *, train: bool = True) -> tuple[bytes, list[OutputSlot]]:
    captured = capture(Net(width).train(train), (torch.randn(3, 8),), train=train)
    return captured.to_bytes(), [OutputSlot(name="out", dest="user", idx=0)]


def walked(rt: StageRuntime, **kw: object) -> int:
    """needed() from a fresh walk of every program's parameters and buffers."""
    rt._held.clear()
    return rt.needed(**kw)  # type: ignore[arg-type]


def assert_fresh(rt: StageRuntime) -> None:
    for kw in ({}, {"reserve": False}, {"without": "eval"}, {"without": "train"}, {"copies": 2}):
        cached = rt.needed(**kw)  # type: ignore[arg-type]
        assert rt.needed(**kw) == cached == walked(rt, **kw), kw  # type: ignore[arg-type]


def storages(rt: StageRuntime) -> int:
    seen = {}
    for p in rt.programs.values():
        for t in [*p.module.parameters(), *p.module.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


async def test_the_cached_needed_equals_a_fresh_walk_after_every_change() -> None:
    owner, user = LocalLink.pair()
    rt = StageRuntime(JOB, 0, 1, {"user": user}, reservation=FixedReservation(1 << 30))
    assert rt.needed() == 0
    data, outputs = program()
    rt.load("train", data, INPUTS, outputs)
    assert_fresh(rt)
    params = list(rt.parameters().values())
    param_bytes = sum(p.nbytes for p in params)
    bound = forward_bytes(rt.programs["train"].module.memory_bound, train=True)
    assert rt.needed() == storages(rt) + param_bytes + bound  # weights, their gradients, one forward

    eval_data, eval_outputs = program(train=False)
    rt.load("eval", eval_data, INPUTS, eval_outputs)
    assert_fresh(rt)
    assert storages(rt) == sum(p.nbytes for p in params) + 4 * 4, "the eval program shares the weights"

    rt.make_optimizer("SGD", {"lr": 0.1, "momentum": 0.9})
    assert_fresh(rt)
    assert rt.needed(reserve=False) == storages(rt) + param_bytes + optimizer_bytes(param_bytes, len(params), 1)

    before = rt.needed()
    await owner.send(Lane.USER_IN, 1, 0, 0, torch.randn(3, 8))
    await rt.run_step(RunStep(key="train", step=1, micro_batches=1, schedule="1f1b", backward="later", to_user=[0]))
    assert rt.stash_bytes, "the forward kept nothing for backward"
    assert rt.needed() == before + sum(rt.stash_bytes.values())
    assert_fresh(rt)
    out = await owner.recv(Lane.USER_OUT, 1, 0, 0)
    await owner.send(Lane.OUT_GRAD, 1, 0, 0, torch.ones_like(out))
    with trio.fail_after(30):
        await rt.run_backward(RunBackward(key="train", step=1, micro_batches=1))
    assert not rt.stash_bytes and rt.needed() == before
    rt.optimizer_step({"lr": 0.1})
    assert_fresh(rt)

    buffered = rt.frame_room(0)
    await owner.send(Lane.USER_IN, 2, 0, 0, torch.randn(3, 8))
    assert rt.frame_room(0) == buffered - 3 * 8 * 4, "a buffered frame no longer counts"
    await user.recv(Lane.USER_IN, 2, 0, 0)
    assert rt.frame_room(0) == buffered

    wider, wider_outputs = program(32)
    rt.load("train", wider, INPUTS, wider_outputs)  # a program replaced: the cache must not keep the old one
    assert_fresh(rt)
    kept = rt.needed()
    rt.reservation = FixedReservation(kept + 1024)
    with pytest.raises(StageError, match="over_reservation|would bring|reservation"):
        rt.load("train", program(4096)[0], INPUTS, outputs)
    assert rt.needed() == kept == walked(rt), "a refused load changed what the stage is charged"
