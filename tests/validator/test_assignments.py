"""The worker's registry of assigned stages: only validators assign, memory is never promised twice,
unclaimed stages expire, and claimed ones stay until released."""

from __future__ import annotations

import pytest

from tensorlink.wire.messages import ErrorReply, StageAssign, StageAssigned
from tensorlink.worker.assignments import Assignments

VALIDATOR = "12D3KooWValidator"
OTHER = "12D3KooWOther"
USER = "12D3KooWUser"
JOB = bytes(16)
JOB2 = bytes([1] * 16)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assign(job: bytes = JOB, *, memory: int = 100, validator: str = VALIDATOR, stage: int = 1) -> StageAssign:
    return StageAssign(
        job=job, owner=USER, validator=validator, stage=stage, n_stages=3, memory_bytes=memory, prev=None, next=OTHER
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Assignments:
    return Assignments(1000, is_validator=lambda peer: peer == VALIDATOR, claim_timeout_s=60, clock=clock)


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


def test_only_validators_assign(registry: Assignments) -> None:
    assert refusal(registry.accept(assign(validator=OTHER), OTHER)) == "not_a_validator"
    assert refusal(registry.accept(assign(), OTHER)) == "not_the_validator"  # claims to be the validator
    assert registry.get(JOB) is None


def test_trust_any_validator(clock: Clock) -> None:
    registry = Assignments(1000, trust_any_validator=True, clock=clock)
    assert isinstance(registry.accept(assign(validator=OTHER), OTHER), StageAssigned)
    with pytest.raises(ValueError, match="say who may assign"):
        Assignments(1000)


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
    registry = Assignments(1000, trust_any_validator=True, clock=clock)
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
