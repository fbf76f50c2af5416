"""The worker's registry of assigned stages: only trusted validators assign, memory is never promised
twice, every stage reserves at least the floor, one owner holds few unclaimed stages, unclaimed stages
expire, and claimed ones stay until released."""

from __future__ import annotations

import logging

import pytest

from tensorlink.validator.trust import ValidatorTrust
from tensorlink.wire.messages import ErrorReply, StageAssign, StageAssigned
from tensorlink.worker.assignments import MIN_STAGE_BYTES, Assignments

VALIDATOR = "12D3KooWValidator"
OTHER = "12D3KooWOther"
USER = "12D3KooWUser"
JOB = bytes(16)
JOB2 = bytes([1] * 16)
FLOOR = 50  # min_stage_bytes of these registries: below every declared figure but the floor's own test


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assign(
    job: bytes = JOB, *, memory: int = 100, validator: str = VALIDATOR, stage: int = 1, owner: str = USER
) -> StageAssign:
    return StageAssign(
        job=job, owner=owner, validator=validator, stage=stage, n_stages=3, memory_bytes=memory, prev=None, next=OTHER
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Assignments:
    return Assignments(
        1000, validators=ValidatorTrust([VALIDATOR]), claim_timeout_s=60, min_stage_bytes=FLOOR, clock=clock
    )


def refusal(reply: StageAssigned | ErrorReply) -> str:
    assert isinstance(reply, ErrorReply), reply
    return reply.code


def test_accept_get_claim_release(registry: Assignments) -> None:
    reply = registry.accept(assign(), VALIDATOR)
    assert reply == StageAssigned(job=JOB, stage=1)
    assert registry.get(JOB) == assign()
    assert registry.reserved_bytes() == 100
    [view] = registry.status()
    assert view["job"] == JOB.hex() and view["owner"] == USER and view["next"] == OTHER and view["claimed"] is False
    assert registry.claim(JOB) == assign() and registry.status()[0]["claimed"] is True
    registry.release(JOB)
    assert registry.get(JOB) is None and registry.reserved_bytes() == 0
    registry.release(JOB)  # twice is harmless


def test_only_trusted_validators_assign(registry: Assignments, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tensorlink.worker.assignments"):
        reply = registry.accept(assign(validator=OTHER), OTHER)
    assert refusal(reply) == "not_a_validator"
    assert f"{OTHER} is not a trusted validator of this network (trusted validators: config list of 1" in (
        reply.message  # type: ignore[union-attr]
    )
    assert f"refused stage 1 of job {JOB.hex()}: {OTHER} is not a trusted validator" in caplog.text
    assert refusal(registry.accept(assign(), OTHER)) == "not_the_validator"  # claims to be the validator
    assert registry.get(JOB) is None


def test_with_no_rule_configured_nobody_assigns_and_the_reason_says_how_to_configure(clock: Clock) -> None:
    registry = Assignments(1000, validators=ValidatorTrust(), clock=clock)
    reply = registry.accept(assign(), VALIDATOR)
    assert refusal(reply) == "not_a_validator"
    assert "no trusted validators are configured: start the node with --validator PEER_ID" in reply.message  # type: ignore[union-attr]


def test_trust_any_validator(clock: Clock) -> None:
    registry = Assignments(1000, trust_any_validator=True, min_stage_bytes=FLOOR, clock=clock)
    assert isinstance(registry.accept(assign(validator=OTHER), OTHER), StageAssigned)
    with pytest.raises(ValueError, match="say who may assign"):
        Assignments(1000)


@pytest.mark.parametrize("declared", [0, 1, FLOOR - 1])
def test_a_stage_reserves_at_least_the_floor(registry: Assignments, declared: int) -> None:
    assert isinstance(registry.accept(assign(memory=declared), VALIDATOR), StageAssigned)
    assert registry.reserved_bytes() == FLOOR and registry.get(JOB).memory_bytes == FLOOR  # type: ignore[union-attr]
    for i in range(1000 // FLOOR - 1):
        other = assign(bytes([i + 2] * 16), memory=0, owner=f"12D3KooWOwner{i}")
        assert isinstance(registry.accept(other, VALIDATOR), StageAssigned)
    assert refusal(registry.accept(assign(JOB2, memory=0, owner="12D3KooWLast"), VALIDATOR)) == "not_enough_memory"


def test_the_default_floor_is_tens_of_megabytes() -> None:
    registry = Assignments(1 << 30, trust_any_validator=True)
    registry.accept(assign(memory=0), VALIDATOR)
    assert registry.reserved_bytes() == MIN_STAGE_BYTES >= 16 << 20


def test_one_owner_holds_few_unclaimed_stages(registry: Assignments) -> None:
    jobs = [bytes([i] * 16) for i in range(2, 6)]
    assert all(isinstance(registry.accept(assign(j, memory=60), VALIDATOR), StageAssigned) for j in jobs[:2])
    reply = registry.accept(assign(jobs[2], memory=60), VALIDATOR)
    assert refusal(reply) == "too_many_pending" and f"owner {USER} already holds 2 stage(s)" in reply.message  # type: ignore[union-attr]
    assert isinstance(registry.accept(assign(jobs[2], memory=60, owner=OTHER), VALIDATOR), StageAssigned)
    registry.claim(jobs[0])  # a started job no longer counts
    assert isinstance(registry.accept(assign(jobs[3], memory=60), VALIDATOR), StageAssigned)


def test_memory_is_not_promised_twice(registry: Assignments) -> None:
    assert isinstance(registry.accept(assign(memory=700), VALIDATOR), StageAssigned)
    reply = registry.accept(assign(JOB2, memory=400), VALIDATOR)
    assert refusal(reply) == "not_enough_memory"
    assert "needs 4e-07 GB" in reply.message and "7e-07 GB are reserved" in reply.message  # type: ignore[union-attr]
    assert isinstance(registry.accept(assign(JOB2, memory=300), VALIDATOR), StageAssigned)


def test_the_same_validator_may_reassign_a_job(registry: Assignments) -> None:
    registry.accept(assign(memory=900), VALIDATOR)
    assert isinstance(registry.accept(assign(memory=950, stage=2), VALIDATOR), StageAssigned)  # replaces, not adds
    assert registry.get(JOB).stage == 2 and registry.reserved_bytes() == 950  # type: ignore[union-attr]


def test_another_validator_cannot_take_over_a_job(clock: Clock) -> None:
    registry = Assignments(1000, trust_any_validator=True, min_stage_bytes=FLOOR, clock=clock)
    registry.accept(assign(), VALIDATOR)
    assert refusal(registry.accept(assign(validator=OTHER), OTHER)) == "job_exists"


def test_unclaimed_assignments_expire_and_claimed_ones_stay(registry: Assignments, clock: Clock) -> None:
    registry.accept(assign(JOB, memory=500), VALIDATOR)
    registry.accept(assign(JOB2, memory=500), VALIDATOR)
    registry.claim(JOB2)
    clock.now += 59
    assert registry.get(JOB) is not None and registry.status()[0]["expires_in_s"] == 1.0
    clock.now += 2
    assert registry.get(JOB) is None and registry.get(JOB2) is not None
    assert registry.reserved_bytes() == 500
    assert registry.claim(JOB) is None
