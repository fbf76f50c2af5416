"""Pipeline partitioning: which contiguous range of a model's units each stage holds.

Stages are balanced by time, not by unit count: a GPT-2 split by block count leaves ~62 % of the work on
the stage with the LM head, and a pipeline runs at the pace of its slowest stage. The partitioner
minimises the bottleneck max_k flops_k / gflops_k over contiguous splits, subject to every stage fitting
its worker's free memory, by bisection on the bottleneck with an exact feasibility check (a reachability
DP over prefix sums, O(units x workers) per check in numpy). Workers keep the order they are given:
stage k runs on workers[k]; the caller decides the order (the validator lists the fastest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tensorlink.ir.charge import forward_bytes, optimizer_bytes, training_bytes
from tensorlink.wire.messages import UnitCost

if TYPE_CHECKING:
    from tensorlink.ir.split import Unit

BISECTION_TOLERANCE = 1e-4  # relative gap between the bounds at which the bottleneck search stops


class PartitionError(ValueError):
    """No split of the units onto the workers is possible; the message says what to change. ``code`` is
    ``not_enough_memory`` when memory is what is missing, else ``partition_failed``."""

    def __init__(self, message: str, code: str = "partition_failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WorkerSpec:
    """What the partitioner needs to know about a worker: its measured throughput (from its capability
    record) and the memory it can give a stage."""

    peer_id: str
    gflops: float
    free_memory_bytes: int


@dataclass(frozen=True)
class StageTotals:
    first: int  # first unit, inclusive
    last: int  # last unit, inclusive
    flops: float
    memory_bytes: int


def unit_memory(unit: UnitCost, optimizer_slots: int) -> int:
    """Bytes one unit needs on the worker that holds it, as the worker charges them (tensorlink.ir.charge): its
    parameters, their gradients and ``optimizer_slots`` optimizer copies, and ``activation_bytes``, everything
    else the owner declared it holds (the micro-batches it keeps, buffers, optimizer step counters: declare)."""
    return training_bytes(unit.param_bytes, 0, optimizer_slots) + unit.activation_bytes


def declare(unit: Unit, *, optimizer_slots: int, kept: int, train: bool = True) -> UnitCost:
    """A unit as its owner declares it to a validator. ``unit`` was profiled at the program's declared maximum
    input shapes, where the worker counts a forward; its ``activation_bytes`` on the wire are ``kept`` training
    forwards of it (the micro-batches a stage may hold for backward) and ``kept`` micro-batches of the frames a
    stage starting or ending at it buffers, the buffers, the optimizer's step counters and the training copies
    of an earlier unit's parameters it uses (held again where it is another stage): with unit_memory, all that
    the worker charges. A job that never trains (``train=False``) holds its parameters without gradients and
    runs one forward at a time: it declares them as held bytes (``param_bytes`` 0, which unit_memory doubles)."""
    if not train:
        held = forward_bytes(unit.activation_bytes, train=False) + unit.boundary_bytes + unit.buffer_bytes
        return UnitCost(unit.flops, 0, unit.param_bytes + unit.tied_bytes + held)
    held = forward_bytes(unit.activation_bytes, train=True, kept=kept) + kept * unit.boundary_bytes
    held += unit.buffer_bytes + optimizer_bytes(0, len(unit.params), optimizer_slots)
    held += training_bytes(unit.tied_bytes, len(unit.tied), optimizer_slots)
    return UnitCost(unit.flops, unit.param_bytes, held)


def stage_totals(units: Sequence[UnitCost], unit_stage: Sequence[int], *, optimizer_slots: int) -> list[StageTotals]:
    """Unit range, forward FLOPs and memory of every stage of a split (stages in order, as partition returns)."""
    totals: list[StageTotals] = []
    for index, (unit, stage) in enumerate(zip(units, unit_stage, strict=True)):
        memory = unit_memory(unit, optimizer_slots)
        if stage == len(totals):
            totals.append(StageTotals(index, index, unit.flops, memory))
        else:
            t = totals[stage]
            totals[stage] = StageTotals(t.first, index, t.flops + unit.flops, t.memory_bytes + memory)
    return totals


def partition(
    units: Sequence[UnitCost], workers: Sequence[WorkerSpec], *, private: bool, optimizer_slots: int
) -> list[int]:
    """The stage of every unit. One stage per worker, in the workers' order; with ``private`` the first and
    the last unit are stages of their own on the user's machine (stage 0 and the last stage) and the
    workers take the units between them as stages 1..len(workers)."""
    if not workers:
        raise PartitionError("no workers to place stages on: ask for at least one worker")
    for w in workers:
        if not (w.gflops > 0 and np.isfinite(w.gflops)):
            raise PartitionError(f"worker {w.peer_id} reports {w.gflops} GFLOP/s; leave it out of the job")
    if private:
        if len(units) < len(workers) + 2:
            raise PartitionError(
                f"a private job keeps its first and last unit on your machine, which leaves {len(units) - 2} of "
                f"its {len(units)} units for {len(workers)} workers: ask for at most {max(len(units) - 2, 0)} "
                "workers, or split the model into more units"
            )
        middle = _split(units[1:-1], workers, optimizer_slots)
        return [0, *(stage + 1 for stage in middle), len(workers) + 1]
    if len(units) < len(workers):
        raise PartitionError(
            f"{len(units)} units cannot fill {len(workers)} stages (one per worker): ask for at most "
            f"{len(units)} workers, or split the model into more units"
        )
    return _split(units, workers, optimizer_slots)


def _split(units: Sequence[UnitCost], workers: Sequence[WorkerSpec], optimizer_slots: int) -> list[int]:
    n, w = len(units), len(workers)
    memory = np.array([unit_memory(u, optimizer_slots) for u in units], dtype=np.float64)
    flops_prefix = np.concatenate([[0.0], np.cumsum([u.flops for u in units], dtype=np.float64)])
    memory_prefix = np.concatenate([[0.0], np.cumsum(memory)])
    speed = np.array([wk.gflops * 1e9 for wk in workers])
    free = np.array([float(wk.free_memory_bytes) for wk in workers])
    for k, wk in enumerate(workers):
        # stage k holds at least one unit, and only units k .. n-w+k leave the other stages one each
        smallest = memory[k : n - w + k + 1].min()
        if smallest > free[k]:
            raise PartitionError(
                f"worker {wk.peer_id} offers {_gb(free[k])} free, but the smallest stage it could hold needs "
                f"{_gb(smallest)} (weights, gradients, {optimizer_slots} optimizer state copies, activations): "
                "use workers with more memory, or split the model into smaller units",
                "not_enough_memory",
            )

    def reachable(bottleneck: float) -> list[np.ndarray] | None:
        """reach[k][e]: the first e units split into k stages on workers[:k], each within ``bottleneck``
        seconds and its worker's memory; None when all n units cannot be split onto all w workers."""
        reach = [np.zeros(n + 1, dtype=bool)]
        reach[0][0] = True
        for k in range(w):
            starts = np.flatnonzero(reach[k][:n])
            ends = _stage_ends(starts, k, bottleneck)
            ok = ends > starts
            cover = np.bincount(starts[ok] + 1, minlength=n + 2) - np.bincount(ends[ok] + 1, minlength=n + 2)
            reach.append(np.cumsum(cover[: n + 1]) > 0)
        return reach if reach[w][n] else None

    def _stage_ends(starts: np.ndarray, k: int, bottleneck: float) -> np.ndarray:
        """The last unit (exclusive end) stage k may reach from each start."""
        by_time = np.searchsorted(flops_prefix, flops_prefix[starts] + bottleneck * speed[k], side="right") - 1
        by_memory = np.searchsorted(memory_prefix, memory_prefix[starts] + free[k], side="right") - 1
        return np.minimum(by_time, by_memory)

    total = float(flops_prefix[-1])
    # The ideal, and a bound no stage's time can pass. The slack keeps time from binding at `high`:
    # (total / speed) * speed rounds below total for about one speed in nine, which made a single worker
    # "unable" to hold a job that fits it (a CI run refused 24 KB on a 2 GB worker as not_enough_memory).
    low, high = total / speed.sum(), total / speed.min() * (1 + 1e-9)
    best = reachable(high)
    if best is None:
        raise PartitionError(
            f"the {n} units need {_gb(memory.sum())} in all (weights, gradients, {optimizer_slots} optimizer "
            f"state copies, activations) and no split fits the {w} workers' free memory ({_gb(free.sum())} in "
            "all, in their order): ask for more workers or workers with more memory, or use an optimizer with "
            "less state",
            "not_enough_memory",
        )
    while high - low > BISECTION_TOLERANCE * high:
        middle = (low + high) / 2
        reach = reachable(middle)
        if reach is None:
            low = middle
        else:
            high, best = middle, reach
    # Walk back from the end: each stage starts at the earliest reachable start that can still reach its end.
    stage_of = [0] * n
    end = n
    for k in range(w - 1, -1, -1):
        starts = np.flatnonzero(best[k][:end])
        start = int(starts[_stage_ends(starts, k, high) >= end][0])
        stage_of[start:end] = [k] * (end - start)
        end = start
    return stage_of


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"
