"""The partitioner: contiguous stages balanced by time (flops / worker speed) within each worker's memory,
and errors that say what to change."""

from __future__ import annotations

import random

import pytest

from tensorlink.validator.partition import (
    PartitionError,
    WorkerSpec,
    partition,
    stage_totals,
    unit_memory,
)
from tensorlink.wire.messages import UnitCost

GB = 10**9


def workers(*gflops: float, memory: int = 100 * GB) -> list[WorkerSpec]:
    return [WorkerSpec(f"w{i}", g, memory) for i, g in enumerate(gflops)]


def bottleneck(units: list[UnitCost], stages: list[int], specs: list[WorkerSpec], *, first: int = 0) -> float:
    """Seconds of the slowest remote stage (stages first .. first+len(specs)-1 run on specs in order)."""
    totals = stage_totals(units, stages, optimizer_slots=0)
    return max(totals[first + k].flops / (w.gflops * 1e9) for k, w in enumerate(specs))


def ideal(units: list[UnitCost], specs: list[WorkerSpec]) -> float:
    return sum(u.flops for u in units) / sum(w.gflops * 1e9 for w in specs)


def check_contiguous(stages: list[int], n_stages: int) -> None:
    assert stages[0] == 0 and stages[-1] == n_stages - 1
    assert all(b - a in (0, 1) for a, b in zip(stages[:-1], stages[1:], strict=True))


def gpt2_like() -> list[UnitCost]:
    """GPT-2 small per token: embeddings, 12 blocks (~14.2 MFLOP each), final norm, LM head (~77 MFLOP)."""
    return [
        UnitCost(0.1e6, 39_000_000 * 4, 3072),
        *[UnitCost(14.2e6, 7_100_000 * 4, 3072 * 8) for _ in range(12)],
        UnitCost(0.01e6, 1536 * 4, 3072),
        UnitCost(77.2e6, 0, 50257 * 4),  # tied to the embeddings: no parameters of its own
    ]


def test_equal_units_on_equal_workers_split_evenly() -> None:
    units = [UnitCost(1e9, 10, 10)] * 12
    specs = workers(10, 10, 10)
    stages = partition(units, specs, private=False, optimizer_slots=0)
    assert stages == [0] * 4 + [1] * 4 + [2] * 4


def test_gpt2_head_heavy_case_is_balanced_by_cost_not_block_count() -> None:
    """Split by block count, the stage with the LM head holds ~62 % of the work; by cost, the bottleneck
    is within 10 % of the ideal (total work / total speed)."""
    units = gpt2_like()
    specs = workers(50, 50)
    by_blocks = [0] * 7 + [1] * 8  # embeddings + 6 blocks | 6 blocks + norm + head
    total = sum(u.flops for u in units)
    assert stage_totals(units, by_blocks, optimizer_slots=0)[1].flops / total > 0.6
    stages = partition(units, specs, private=False, optimizer_slots=2)
    check_contiguous(stages, 2)
    assert bottleneck(units, stages, specs) <= 1.10 * ideal(units, specs)
    assert bottleneck(units, stages, specs) < 0.85 * bottleneck(units, by_blocks, specs)


def test_gpt2_on_four_workers() -> None:
    units = gpt2_like()
    specs = workers(50, 50, 50, 50)
    stages = partition(units, specs, private=False, optimizer_slots=2)
    check_contiguous(stages, 4)
    # the LM head alone is 31 % of the work, so it bounds the bottleneck: the best is the head's stage
    head = units[-1].flops / 50e9
    assert bottleneck(units, stages, specs) == pytest.approx(max(head, ideal(units, specs)), rel=1e-3)


def test_heterogeneous_workers_get_work_in_proportion_to_speed() -> None:
    units = [UnitCost(1e9, 10, 10)] * 40
    specs = workers(30, 10)  # the first worker is three times as fast
    stages = partition(units, specs, private=False, optimizer_slots=0)
    assert stages.count(0) == 30 and stages.count(1) == 10
    slow_first = workers(10, 30)
    stages = partition(units, slow_first, private=False, optimizer_slots=0)
    assert stages.count(0) == 10 and stages.count(1) == 30


@pytest.mark.parametrize("seed", range(5))
def test_random_profiles_stay_near_the_ideal(seed: int) -> None:
    """Against the exact optimum from brute force on small cases: equal within the search tolerance."""
    rng = random.Random(seed)
    units = [UnitCost(rng.uniform(0, 1e9), 10, 10) for _ in range(9)]
    specs = workers(*(rng.uniform(1, 50) for _ in range(3)))
    stages = partition(units, specs, private=False, optimizer_slots=0)
    check_contiguous(stages, 3)
    best = min(
        bottleneck(units, [0] * a + [1] * (b - a) + [2] * (9 - b), specs) for a in range(1, 8) for b in range(a + 1, 9)
    )
    assert bottleneck(units, stages, specs) <= best * (1 + 1e-3)


def test_memory_limits_move_units_to_the_worker_that_can_hold_them() -> None:
    """Balanced by time, the first stage would take 5 units; its worker holds only 2."""
    units = [UnitCost(1e9, 1 * GB, 0)] * 10
    per_unit = unit_memory(units[0], optimizer_slots=2)  # weights + grads + 2 optimizer copies = 4 GB
    specs = [WorkerSpec("small", 10, 2 * per_unit), WorkerSpec("big", 10, 100 * per_unit)]
    stages = partition(units, specs, private=False, optimizer_slots=2)
    assert stages.count(0) == 2
    for total, spec in zip(stage_totals(units, stages, optimizer_slots=2), specs, strict=True):
        assert total.memory_bytes <= spec.free_memory_bytes


def test_memory_counts_weights_grads_optimizer_state_and_what_the_owner_declared() -> None:
    """activation_bytes is everything else the owner declared a unit holds (partition.declare: kept forwards,
    frames, buffers, step counters), as the worker charges it."""
    unit = UnitCost(1.0, 100, 10)
    assert unit_memory(unit, optimizer_slots=2) == 100 * 4 + 10
    assert unit_memory(unit, optimizer_slots=0) == 100 * 2 + 10


def test_private_jobs_keep_the_first_and_last_unit_on_the_users_machine() -> None:
    units = gpt2_like()
    specs = workers(50, 50)
    stages = partition(units, specs, private=True, optimizer_slots=2)
    assert stages[0] == 0 and stages[1] == 1 and stages[-1] == 3 and stages[-2] == 2
    assert stages.count(0) == 1 and stages.count(3) == 1
    check_contiguous(stages, 4)
    middle = units[1:-1]
    assert bottleneck(units, stages, specs, first=1) <= 1.10 * ideal(middle, specs)


def test_zero_flop_units_still_split() -> None:
    stages = partition([UnitCost(0.0, 1, 1)] * 4, workers(1, 1), private=False, optimizer_slots=0)
    check_contiguous(stages, 2)


def test_large_profiles_partition_quickly() -> None:
    rng = random.Random(7)
    units = [UnitCost(rng.uniform(1e6, 1e9), 1000, 100) for _ in range(5000)]
    specs = workers(*(rng.uniform(5, 50) for _ in range(16)))
    stages = partition(units, specs, private=False, optimizer_slots=2)
    check_contiguous(stages, 16)
    assert bottleneck(units, stages, specs) <= 1.01 * ideal(units, specs)


@pytest.mark.parametrize(
    ("units", "specs", "private", "match"),
    [
        (
            [UnitCost(1.0, 1, 1)] * 2,
            workers(1, 1, 1),
            False,
            r"2 units cannot fill 3 stages .* ask for at most 2 workers",
        ),
        ([UnitCost(1.0, 1, 1)] * 3, workers(1, 1), True, r"leaves 1 of its 3 units for 2 workers: ask for at most 1"),
        ([UnitCost(1.0, 1, 1)] * 3, [], False, r"no workers"),
        ([UnitCost(1.0, 1, 1)] * 3, workers(0), False, r"worker w0 reports 0 GFLOP/s"),
    ],
)
def test_shape_errors(units: list[UnitCost], specs: list[WorkerSpec], private: bool, match: str) -> None:
    with pytest.raises(PartitionError, match=match) as info:
        partition(units, specs, private=private, optimizer_slots=0)
    assert info.value.code == "partition_failed"


def test_a_worker_too_small_for_any_stage_is_named() -> None:
    units = [UnitCost(1.0, GB, 0)] * 4  # 2 GB per unit with no optimizer state
    specs = [WorkerSpec("roomy", 1, 100 * GB), WorkerSpec("tiny", 1, GB)]
    with pytest.raises(
        PartitionError, match=r"worker tiny offers 1 GB free, but the smallest stage it could hold needs 2 GB"
    ) as info:
        partition(units, specs, private=False, optimizer_slots=0)
    assert info.value.code == "not_enough_memory"


def test_no_split_fits_in_memory() -> None:
    """Each worker holds one unit, but three units do not fit two workers."""
    units = [UnitCost(1.0, GB, 0)] * 3
    specs = workers(1, 1, memory=3 * GB)
    with pytest.raises(
        PartitionError, match=r"the 3 units need 6 GB in all .* no split fits the 2 workers' free memory \(6 GB"
    ) as info:
        partition(units, specs, private=False, optimizer_slots=0)
    assert info.value.code == "not_enough_memory"


@pytest.mark.parametrize("gflops", [44.43154120955269, 56.821915709813084, 87.32880951334637, 1.0, 13.7])
@pytest.mark.parametrize("n_workers", [1, 3])
def test_time_bound_rounding_never_refuses_a_fitting_job(gflops: float, n_workers: int) -> None:
    """With these speeds (total / speed) * speed rounds below total; the job fits in memory many times
    over, so it must be placed (a CI run refused it as not_enough_memory)."""
    units = [UnitCost(1e8, 1000, 100)] * 10
    specs = workers(*[gflops] * n_workers, memory=2 * GB)
    stages = partition(units, specs, private=False, optimizer_slots=0)
    check_contiguous(stages, n_workers)
