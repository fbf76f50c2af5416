"""Matching a job to workers: which live workers run which stages, and what each is told. No I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tensorlink.validator.partition import PartitionError, WorkerSpec, partition, stage_totals
from tensorlink.wire.messages import JobPlan, JobRequest, StageAssign, StagePlacement, WorkerCapability
from tensorlink.worker.assignments import MIN_STAGE_BYTES


class JobRefused(Exception):
    """A validator (or this side, before asking one) turned a job down: ``code`` for programs, ``message``
    for people (it says what to change)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def plan_job(
    request: JobRequest, candidates: Sequence[WorkerCapability], validator: str
) -> tuple[JobPlan, list[StageAssign]]:
    """The plan for the user and the assignment for each chosen worker.

    Workers of the device asked for come first, then the fastest; the first ``request.workers`` of them
    are tried, and if their memory cannot hold the model, those with the most free memory. Stage order
    follows speed (fastest first); the partitioner balances the work to each worker's speed.
    """
    candidates = [c for c in candidates if c.peer_id != request.owner and c.gflops > 0]
    wanted = request.workers
    if len(candidates) < wanted:
        devices = ", ".join(f"{n} {d}" for d, n in sorted(Counter(c.device for c in candidates).items()))
        raise JobRefused(
            "too_few_workers",
            f"the job asks for {wanted} workers but this validator knows {len(candidates)} live worker(s)"
            f"{f' ({devices})' if devices else ''}: ask for at most {len(candidates)}, or wait for more to join",
        )

    def preferred(c: WorkerCapability) -> bool:
        return request.device is None or c.device == request.device

    fastest = sorted(candidates, key=lambda c: (not preferred(c), -c.gflops))[:wanted]
    roomiest = sorted(candidates, key=lambda c: (not preferred(c), -c.free_memory_bytes))[:wanted]
    error: PartitionError | None = None
    for group in (fastest, roomiest):
        chosen = sorted(group, key=lambda c: -c.gflops)
        specs = [WorkerSpec(c.peer_id, c.gflops, c.free_memory_bytes) for c in chosen]
        try:
            unit_stage = partition(
                request.units, specs, private=request.private, optimizer_slots=request.optimizer_slots
            )
        except PartitionError as exc:
            error = error or exc  # the fastest choice's reason is the one worth reading
            continue
        return _plan(request, chosen, unit_stage, validator)
    assert error is not None
    raise JobRefused(error.code, str(error))


def _plan(
    request: JobRequest, chosen: list[WorkerCapability], unit_stage: list[int], validator: str
) -> tuple[JobPlan, list[StageAssign]]:
    totals = stage_totals(request.units, unit_stage, optimizer_slots=request.optimizer_slots)
    first_remote = 1 if request.private else 0
    peer_of: dict[int, WorkerCapability] = {first_remote + k: c for k, c in enumerate(chosen)}
    placements = [
        StagePlacement(
            peer_id=c.peer_id,
            addrs=c.addrs,
            stage=stage,
            units=(totals[stage].first, totals[stage].last),
            memory_bytes=max(totals[stage].memory_bytes, MIN_STAGE_BYTES),  # what the worker will reserve
        )
        for stage, c in peer_of.items()
    ]
    assigns = [
        StageAssign(
            job=request.job,
            owner=request.owner,
            validator=validator,
            stage=p.stage,
            n_stages=len(totals),
            memory_bytes=p.memory_bytes,
            prev=peer_of[p.stage - 1].peer_id if p.stage - 1 in peer_of else None,
            next=peer_of[p.stage + 1].peer_id if p.stage + 1 in peer_of else None,
        )
        for p in placements
    ]
    plan = JobPlan(
        job=request.job, validator=validator, n_stages=len(totals), unit_stage=unit_stage, placements=placements
    )
    return plan, assigns
