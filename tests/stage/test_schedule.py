"""The micro-batch schedules (stage/schedule.py), checked the way torch's pipelining tests check theirs: every stage
runs each micro-batch's forward once and its backward once, after the forward; all stages together form a pipeline
that runs to the end (simulated below: a stage waits for its neighbour's frame, sends never block); a stage keeps no
more activations than its schedule promises (1F1B: at most ``n_stages - stage`` micro-batches; GPipe: all of them);
and both take the same number of unit-time ticks, 2(m+p-1), as the module docstring says (the same bubble)."""

from __future__ import annotations

import itertools

import pytest

from tensorlink.stage.schedule import SCHEDULES, Action, Schedule, actions

STAGES = range(1, 6)
MICRO_BATCHES = range(1, 10)
GRID = list(itertools.product(SCHEDULES, STAGES, MICRO_BATCHES))


def orders(schedule: Schedule, n_stages: int, micro_batches: int) -> list[list[Action]]:
    return [actions(schedule, k, n_stages, micro_batches, backward=True) for k in range(n_stages)]


def simulate(orders: list[list[Action]]) -> int:
    """Run every stage's order in lock step, one action per stage per tick: stage k's forward of m needs stage
    k-1's forward of m (an earlier tick), its backward of m needs stage k+1's backward of m. Returns the ticks taken;
    fails on a tick where no stage can move (a deadlock)."""
    n = len(orders)
    done: set[tuple[str, int, int]] = set()  # (kind, stage, micro-batch)
    position = [0] * n
    ticks = 0
    while any(position[k] < len(orders[k]) for k in range(n)):
        ready = []
        for k in range(n):
            if position[k] == len(orders[k]):
                continue
            kind, mb = orders[k][position[k]]
            needs = ("F", k - 1, mb) if kind == "F" else ("B", k + 1, mb)
            if not 0 <= needs[1] < n or needs in done:
                ready.append((kind, k, mb))
        assert ready, f"deadlock at tick {ticks}: every stage waits ({[orders[k][position[k] :] for k in range(n)]})"
        for kind, k, mb in ready:
            done.add((kind, k, mb))
            position[k] += 1
        ticks += 1
    return ticks


def peak_kept(order: list[Action]) -> int:
    """The most micro-batches this stage keeps activations of at once (from a forward until its backward)."""
    kept, peak = 0, 0
    for kind, _ in order:
        kept += 1 if kind == "F" else -1
        peak = max(peak, kept)
    return peak


@pytest.mark.parametrize(("schedule", "n_stages", "micro_batches"), GRID)
def test_each_micro_batch_runs_forward_then_backward_once_per_stage(
    schedule: Schedule, n_stages: int, micro_batches: int
) -> None:
    for k, order in enumerate(orders(schedule, n_stages, micro_batches)):
        assert sorted(order) == sorted((kind, m) for kind in "FB" for m in range(micro_batches)), f"stage {k}"
        for m in range(micro_batches):
            assert order.index(("F", m)) < order.index(("B", m)), f"stage {k}: backward of {m} before its forward"


@pytest.mark.parametrize(("schedule", "n_stages", "micro_batches"), GRID)
def test_the_stages_together_run_to_the_end_with_the_same_bubble_as_gpipe(
    schedule: Schedule, n_stages: int, micro_batches: int
) -> None:
    assert simulate(orders(schedule, n_stages, micro_batches)) == 2 * (micro_batches + n_stages - 1)


@pytest.mark.parametrize(("schedule", "n_stages", "micro_batches"), GRID)
def test_a_stage_keeps_no_more_activations_than_its_schedule_promises(
    schedule: Schedule, n_stages: int, micro_batches: int
) -> None:
    for k, order in enumerate(orders(schedule, n_stages, micro_batches)):
        if schedule == "gpipe":
            assert peak_kept(order) == micro_batches
        else:
            assert peak_kept(order) <= min(n_stages - k, micro_batches), f"stage {k} keeps {peak_kept(order)}"


def test_forwards_only_without_backward() -> None:
    for schedule in SCHEDULES:
        assert actions(schedule, 1, 3, 4, backward=False) == [("F", 0), ("F", 1), ("F", 2), ("F", 3)]


def test_an_unknown_schedule_or_stage_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'zb'; use one of gpipe, 1f1b"):
        actions("zb", 0, 2, 4, backward=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"stage 2 is outside 0\.\.1"):
        actions("1f1b", 2, 2, 4, backward=True)
