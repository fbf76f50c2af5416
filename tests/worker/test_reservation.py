"""A stage's real memory stays within its reservation: its program's weights, their gradients, the optimizer's
state and one forward at the declared maximum shapes all count against it, and the stage refuses (code
``over_reservation``, naming the bytes needed and reserved) a load or an optimizer that would not fit. The
reservation grows into the worker's unreserved memory when a program needs more than was declared, never past it.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tensorlink.ir import capture
from tensorlink.stage.links import FrameRefused, Lane, LocalLink
from tensorlink.stage.runtime import FixedReservation, StageError, StageRuntime
from tensorlink.wire.messages import StageAssign
from tensorlink.wire.stage import InputSlot, OutputSlot, RunStep
from tensorlink.worker.assignments import Assignments
from tensorlink.worker.stage_host import AssignedReservation

MIB = 1 << 20
JOB = b"j" * 16
WIDTH = 1024  # a Linear(1024, 1024): 4 MiB of weights, 4 MiB of gradients, 8 MiB of Adam state


@pytest.fixture(scope="module")
def program() -> bytes:
    torch.manual_seed(0)
    return capture(nn.Linear(WIDTH, WIDTH), (torch.randn(2, WIDTH),)).to_bytes()


def runtime(reservation: object) -> StageRuntime:
    return StageRuntime(JOB, 0, 1, {}, reservation=reservation)  # type: ignore[arg-type]


def test_a_program_larger_than_the_reservation_is_refused_before_it_is_parsed(program: bytes) -> None:
    rt = runtime(FixedReservation(1 * MIB))
    with pytest.raises(
        StageError, match=rf"program's {len(program)} bytes .* over the {MIB} bytes its reservation"
    ) as e:
        rt.load("train", program, [], [])
    assert e.value.code == "over_reservation"
    assert not rt.programs


def test_weights_gradients_and_activations_count_against_the_reservation(program: bytes) -> None:
    """Weights alone (4 MiB) fit 6 MiB; with their gradients and a forward at the maximum batch they do not."""
    rt = runtime(FixedReservation(6 * MIB))
    with pytest.raises(StageError, match=r"the train program .*over its reservation of 6291456 bytes") as e:
        rt.load("train", program, [], [])
    assert e.value.code == "over_reservation"
    assert not rt.programs


def test_optimizer_state_counts_against_the_reservation(program: bytes) -> None:
    rt = runtime(FixedReservation(14 * MIB))
    rt.load("train", program, [], [])
    loaded = rt.needed()
    params = sum(p.numel() * p.element_size() for p in rt.parameters().values())
    module = rt.programs["train"].module
    assert loaded == 2 * params + 2 * module.memory_bound  # weights and gradients, room for one training forward
    with pytest.raises(StageError, match="Adam optimizer") as e:
        rt.make_optimizer("Adam", {"lr": 1e-3})  # two copies of the parameters: 8 MiB more
    assert e.value.code == "over_reservation" and rt.optimizer is None
    rt.make_optimizer("SGD", {"lr": 0.1, "momentum": 0.9})  # one copy: fits
    assert rt.needed() == loaded + params + 64 * len(rt.parameters())


def _registry(capacity: int, declared: int) -> Assignments:
    registry = Assignments(capacity, trust_any_validator=True, min_stage_bytes=1)
    assign = StageAssign(job=JOB, owner="owner", validator="v", stage=0, n_stages=1, memory_bytes=declared)
    registry.accept(assign, "v")
    registry.claim(JOB)
    return registry


def test_the_reservation_grows_into_unreserved_memory(program: bytes) -> None:
    registry = _registry(64 * MIB, 1 * MIB)
    rt = runtime(AssignedReservation(registry, JOB, 64 * MIB))
    rt.load("train", program, [], [])
    assert registry.get(JOB).memory_bytes == rt.needed() > 8 * MIB  # type: ignore[union-attr]
    assert registry.unreserved_bytes() == 64 * MIB - rt.needed()


def test_the_reservation_never_grows_past_the_worker(program: bytes) -> None:
    registry = _registry(6 * MIB, 1 * MIB)
    rt = runtime(AssignedReservation(registry, JOB, 64 * MIB))
    with pytest.raises(StageError) as e:
        rt.load("train", program, [], [])
    assert e.value.code == "over_reservation"
    assert registry.get(JOB).memory_bytes == 1 * MIB  # type: ignore[union-attr]


async def _step(rt: StageRuntime, owner: LocalLink, step: int, micro_batches: int, batch: int) -> None:
    for mb in range(micro_batches):
        await owner.send(Lane.USER_IN, step, mb, 0, torch.randn(batch, WIDTH))
    await rt.run_step(RunStep(key="train", step=step, micro_batches=micro_batches, schedule="gpipe", backward="later"))


async def test_micro_batches_kept_for_backward_count_against_the_reservation(program: bytes) -> None:
    """Loaded with room for one training forward at the maximum batch (64), and for the three inputs that wait on
    its link while the first micro-batch runs, the stage runs one micro-batch of 64 kept for backward but refuses
    one of four: each kept one holds its values and, later, their gradients."""
    probe = runtime(FixedReservation(1 << 40))
    probe.load("train", program, [], [])
    owner, mine = LocalLink.pair()
    waiting = 3 * 64 * WIDTH * 4
    rt = StageRuntime(JOB, 0, 1, {"user": mine}, reservation=FixedReservation(probe.needed() + waiting + 1024))
    rt.load("train", program, [InputSlot(name="x", source="user", idx=0)], [OutputSlot(name="y", dest="user", idx=0)])
    await _step(rt, owner, 0, 1, 64)
    assert len(rt.stash) == 1
    with pytest.raises(Exception) as raised:  # noqa: PT011 - trio wraps it in an exception group
        await _step(rt, owner, 1, 4, 64)
    error = raised.value
    while getattr(error, "exceptions", None):
        (error,) = error.exceptions  # type: ignore[attr-defined]
    assert isinstance(error, StageError) and error.code == "over_reservation", error
    assert re.search(r"micro-batch [1-3] of step 1 would bring this stage to \d+ bytes, over", str(error))


async def test_frames_buffered_on_a_link_count_against_the_reservation(program: bytes) -> None:
    """A peer pushing frames nobody reads fills what the stage's reservation leaves free, and no more."""
    rt = runtime(FixedReservation(16 * MIB))
    rt.load("train", program, [], [])
    owner, mine = LocalLink.pair()
    rt.links["user"] = mine
    mine.mailbox.room = rt.frame_room
    free = 16 * MIB - rt.needed(reserve=False)
    with pytest.raises(FrameRefused, match=r"of 262144 bytes, over the \d+ bytes left to buffer"):
        for step in range(16 * MIB // (256 << 10)):
            await owner.send(Lane.FWD, step, 0, 0, torch.zeros(64 << 10))
    assert free - (256 << 10) < mine.mailbox.buffered_bytes <= free
