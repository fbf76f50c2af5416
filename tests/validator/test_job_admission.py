"""Job admission end to end: a LocalSwarm of real node processes (one validator, two workers, one of
them with little memory) and a user-side libp2p host in the test process that asks for workers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from tensorlink.local import LocalSwarm
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import close_stream, open_stream, read_message
from tensorlink.validator import JobRefused, request_job
from tensorlink.wire.messages import ErrorReply, JobPlan, JobRequest, UnitCost
from tensorlink.wire.protocols import JOB_PROTOCOL

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

SMALL_GB = 0.25
UNITS = [UnitCost(1e8, 1000, 100)] * 10  # a few KB per stage: fits every worker


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    with LocalSwarm(workers=2, worker_memory_gb=[2.0, SMALL_GB]) as swarm:
        yield swarm


class User:
    def __init__(self, host: Any, peer_id: str, swarm: LocalSwarm) -> None:
        self.host = host
        self.peer_id = peer_id
        self.validator = swarm.validator_peer_ids[0]

    def request(self, workers: int, **kwargs: Any) -> JobRequest:
        kwargs.setdefault("units", UNITS)
        return JobRequest(job=secrets.token_bytes(16), owner=self.peer_id, workers=workers, **kwargs)

    async def ask(self, request: JobRequest) -> JobPlan:
        return await request_job(PeerHost(self.host), self.validator, request, timeout_s=20)

    async def send_raw(self, data: bytes) -> ErrorReply:
        """Bytes on the job protocol as they are, and the validator's answer."""
        stream = await open_stream(self.host, self.validator, JOB_PROTOCOL)
        await stream.write(data)
        reply = await read_message(stream, ErrorReply)
        await close_stream(stream)
        return reply  # type: ignore[return-value]


@asynccontextmanager
async def connected_user(swarm: LocalSwarm, key_dir: Path) -> AsyncIterator[User]:
    """A user host with the identity kept in ``key_dir``, connected to the swarm's validator."""
    key_pair = load_or_create_identity(key_dir)
    host = make_host(key_pair)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(swarm.validator_addrs[0])))
        yield User(host, peer_id_of(key_pair), swarm)


@pytest.fixture
async def user(swarm: LocalSwarm, tmp_path: Path) -> AsyncIterator[User]:
    async with connected_user(swarm, tmp_path) as user:
        yield user


def small_worker(swarm: LocalSwarm) -> str:
    return next(w.peer_id for w in swarm.workers if w.status()["capability"]["memory_bytes"] <= SMALL_GB * 1e9)


async def test_plan_places_the_stages_on_both_workers_and_they_show_it(swarm: LocalSwarm, user: User) -> None:
    request = user.request(2, optimizer_slots=2)
    plan = await user.ask(request)
    workers = {w.peer_id: w for w in swarm.workers}
    assert {p.peer_id for p in plan.placements} == set(workers)
    assert plan.n_stages == 2 and plan.validator == user.validator and len(plan.unit_stage) == len(UNITS)
    first, second = sorted(plan.placements, key=lambda p: p.stage)
    assert first.units[0] == 0 and first.units[1] + 1 == second.units[0] and second.units[1] == len(UNITS) - 1
    assert all(p.addrs and p.addrs[0].endswith(p.peer_id) for p in plan.placements)
    # each worker holds its assignment (the validator waited for both to accept before answering)
    for placement in plan.placements:
        [stage] = [s for s in workers[placement.peer_id].status()["stages"] if s["job"] == request.job.hex()]
        assert stage["stage"] == placement.stage and stage["owner"] == user.peer_id
        assert stage["memory_bytes"] == placement.memory_bytes and stage["validator"] == user.validator
        assert stage["prev"] == (None if placement is first else first.peer_id)
        assert stage["next"] == (second.peer_id if placement is first else None)
    [job] = [j for j in swarm.validators[0].status()["jobs"] if j["job"] == request.job.hex()]
    assert job["owner"] == user.peer_id and {s["peer_id"] for s in job["stages"]} == set(workers)


async def test_private_plan_has_the_users_stages_at_both_ends(user: User) -> None:
    plan = await user.ask(user.request(2, private=True))
    assert plan.n_stages == 4 and [p.stage for p in sorted(plan.placements, key=lambda p: p.stage)] == [1, 2]
    assert plan.unit_stage.count(0) == 1 and plan.unit_stage.count(3) == 1


async def test_too_few_workers_is_refused_clearly(user: User) -> None:
    with pytest.raises(JobRefused) as info:
        await user.ask(user.request(3))
    assert info.value.code == "too_few_workers"
    assert "asks for 3 workers but this validator knows 2 live worker(s) (2 cpu)" in info.value.message


async def test_a_worker_with_too_little_memory_is_named(swarm: LocalSwarm, user: User) -> None:
    units = [UnitCost(1e8, 100_000_000, 0)] * 4  # 0.4 GB per unit with AdamW's two state copies
    with pytest.raises(JobRefused) as info:
        await user.ask(user.request(2, units=units, optimizer_slots=2))
    assert info.value.code == "not_enough_memory"
    assert f"worker {small_worker(swarm)} offers 0.25 GB free, but the smallest stage" in info.value.message


async def test_malformed_requests_get_an_error_and_the_validator_lives_on(swarm: LocalSwarm, user: User) -> None:
    garbage = await user.send_raw(len(b"\xc1\xc1").to_bytes(4, "big") + b"\xc1\xc1")
    assert garbage.code == "bad_request" and "malformed control message" in garbage.message
    huge = await user.send_raw((1 << 30).to_bytes(4, "big"))
    assert huge.code == "bad_request" and "more than" in huge.message
    someone_else = user.request(1)
    forged = JobRequest(job=someone_else.job, owner=swarm.workers[0].peer_id, workers=1, units=UNITS)
    with pytest.raises(JobRefused, match="owner_mismatch: the request names owner"):
        await user.ask(forged)
    with trio.fail_after(20):
        plan = await user.ask(user.request(1))  # still serving
    assert len(plan.placements) == 1
    assert swarm.validators[0].proc.poll() is None


async def test_memory_is_never_promised_twice(swarm: LocalSwarm, user: User, tmp_path: Path) -> None:
    """Two jobs that each need most of the big worker: the second is refused, either by the worker (its
    reservation is taken) or by the validator (the worker's record already shows less free memory).
    Last in the module: the reservation holds the big worker for the claim timeout."""
    big = next(w for w in swarm.workers if w.peer_id != small_worker(swarm))
    capacity = big.status()["capability"]["free_memory_bytes"]
    units = [UnitCost(1e8, int(capacity * 0.6) // 2, 0)]  # weights + gradients = 60 % of the worker
    plan = await user.ask(user.request(1, units=units))
    assert [p.peer_id for p in plan.placements] == [big.peer_id]
    with pytest.raises(JobRefused) as info:
        await user.ask(user.request(1, units=units))
    assert info.value.code == "too_many_pending"  # one job waiting to start per owner
    async with connected_user(swarm, tmp_path / "other") as other:
        with pytest.raises(JobRefused) as info:
            await other.ask(other.request(1, units=units))
    assert info.value.code == "not_enough_memory"
