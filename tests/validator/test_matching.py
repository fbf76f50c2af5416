"""Matching a JobRequest to worker records: who is chosen, what the plan and each assignment say."""

from __future__ import annotations

import msgspec
import pytest

from tensorlink.validator import JobRefused, plan_job
from tensorlink.validator.client import _check_plan as check_plan
from tensorlink.wire.messages import JobRequest, UnitCost, WorkerCapability

VALIDATOR = "12D3KooWValidator"
USER = "12D3KooWUser"
GB = 10**9
UNITS = [UnitCost(1e9, 1000, 100)] * 8


def worker(name: str, gflops: float, *, device: str = "cpu", free: int = 10 * GB) -> WorkerCapability:
    return WorkerCapability(
        peer_id=name, device=device, device_name="x", memory_bytes=free, free_memory_bytes=free, gflops=gflops,
        software="tensorlink/test", addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{name}"],
    )  # fmt: skip


def request(workers: int, **kwargs: object) -> JobRequest:
    return JobRequest(job=bytes(16), owner=USER, workers=workers, units=kwargs.pop("units", UNITS), **kwargs)  # type: ignore[arg-type]


def test_fastest_workers_are_chosen_and_placed_fastest_first() -> None:
    pool = [worker("slow", 1), worker("fast", 30), worker("mid", 10)]
    plan, assigns = plan_job(request(2), pool, VALIDATOR)
    assert [p.peer_id for p in plan.placements] == ["fast", "mid"]
    assert plan.n_stages == 2 and plan.validator == VALIDATOR and len(plan.unit_stage) == len(UNITS)
    assert plan.placements[0].units == (0, plan.unit_stage.count(0) - 1)
    assert plan.placements[1].units == (plan.unit_stage.count(0), len(UNITS) - 1)
    first, second = assigns
    assert (first.prev, first.next, second.prev, second.next) == (None, "mid", "fast", None)
    assert (
        first.owner == USER and first.validator == VALIDATOR and first.memory_bytes == plan.placements[0].memory_bytes
    )


def test_private_jobs_leave_the_ends_to_the_user() -> None:
    plan, assigns = plan_job(request(2, private=True), [worker("a", 10), worker("b", 10)], VALIDATOR)
    assert plan.n_stages == 4 and [p.stage for p in plan.placements] == [1, 2]
    assert plan.unit_stage[0] == 0 and plan.unit_stage[-1] == 3
    assert (assigns[0].prev, assigns[0].next, assigns[1].prev, assigns[1].next) == (None, "b", "a", None)


def test_the_device_asked_for_is_preferred() -> None:
    pool = [worker("cpu-fast", 100), worker("gpu", 50, device="cuda"), worker("cpu-slow", 1)]
    plan, _ = plan_job(request(2, device="cuda"), pool, VALIDATOR)
    assert {p.peer_id for p in plan.placements} == {"gpu", "cpu-fast"}
    plan, _ = plan_job(request(1, device="cuda"), pool, VALIDATOR)
    assert [p.peer_id for p in plan.placements] == ["gpu"]


def test_when_the_fastest_cannot_hold_the_model_the_roomiest_are_tried() -> None:
    units = [UnitCost(1e9, GB, 0)] * 4  # 2 GB per unit without optimizer state
    pool = [worker("fast-small", 100, free=GB), worker("slow-big", 1, free=100 * GB)]
    plan, _ = plan_job(request(1, units=units), pool, VALIDATOR)
    assert [p.peer_id for p in plan.placements] == ["slow-big"]


def test_too_few_workers() -> None:
    with pytest.raises(
        JobRefused, match=r"asks for 3 workers but this validator knows 2 live worker\(s\) \(1 cpu, 1 cuda\)"
    ) as info:
        plan_job(request(3), [worker("a", 1), worker("b", 1, device="cuda")], VALIDATOR)
    assert info.value.code == "too_few_workers"


def test_the_owner_is_never_its_own_worker() -> None:
    with pytest.raises(JobRefused, match="knows 1 live worker"):
        plan_job(request(2), [worker("a", 1), worker(USER, 1)], VALIDATOR)


def test_not_enough_memory_names_the_worker() -> None:
    units = [UnitCost(1e9, GB, 0)] * 4
    with pytest.raises(JobRefused, match=r"worker small offers 1 GB free, but the smallest stage") as info:
        plan_job(request(1, units=units), [worker("small", 1, free=GB)], VALIDATOR)
    assert info.value.code == "not_enough_memory"


@pytest.mark.parametrize(
    ("peers", "why"),
    [
        (["a", "a"], "it names a worker for two stages"),
        (["a", USER], "it names the owner or the validator itself as a worker"),
        ([VALIDATOR, "b"], "it names the owner or the validator itself as a worker"),
    ],
)
def test_the_owner_refuses_a_plan_that_names_the_wrong_workers(peers: list[str], why: str) -> None:
    plan, _ = plan_job(request(2), [worker("a", 10), worker("b", 10)], VALIDATOR)
    check_plan(request(2), plan, VALIDATOR)  # the validator's own plan fits
    placements = [msgspec.structs.replace(p, peer_id=peer) for p, peer in zip(plan.placements, peers, strict=True)]
    with pytest.raises(JobRefused, match=why):
        check_plan(request(2), msgspec.structs.replace(plan, placements=placements), VALIDATOR)
