"""The stages a worker has accepted from validators, before and while their owners run them.

A validator assigns a stage over ``ASSIGN_PROTOCOL`` (one StageAssign, answered by StageAssigned or an
ErrorReply). Only trusted validators may assign (validator/trust.py: the network's rule, never the
peer's own record). The registry reserves the stage's memory, at least ``MIN_STAGE_BYTES`` whatever the
validator declared, so that two validators cannot promise the same bytes twice. It drops an assignment
whose owner does not claim it within ``claim_timeout_s`` (an honest owner claims within a second of its
plan) and caps the unclaimed stages of one owner, so a user who asks for workers and walks away, or
asks again and again, does not hold them. The stage runtime checks uploads against ``get(job)`` (the
owner, the neighbours, the reservation), calls ``claim(job)`` when the owner starts the stage and
``release(job)`` when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio

from tensorlink.p2p.streams import Stream, StreamError, close_stream, read_message, remote_peer, write_message
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import ErrorReply, StageAssign, StageAssigned

log = logging.getLogger(__name__)

# Plan to claim took an honest owner 0.16-0.23 s (offload() of gpt2/llama/mlp on a LocalSwarm, a loaded
# 2-core machine); a big model's split adds seconds. 30 s leaves a wide margin and frees a hoarded worker.
CLAIM_TIMEOUT_S = 30.0
MIN_STAGE_BYTES = 32 << 20  # the least a stage reserves: its program, buffers and frames are never free
MAX_UNCLAIMED_PER_OWNER = 2  # unclaimed stages of one owner here, from any validators
READ_TIMEOUT_S = 10.0
MAX_ASSIGNMENTS = 256  # stages one worker holds at once, claimed or not: bounds what validators can pile up


class ValidatorRule(Protocol):
    """Who may assign stages (validator/trust.py's ValidatorTrust): ``learn(peer)`` first (it may ask the
    chain), then ``trusts(peer)``."""

    def trusts(self, peer: str) -> bool: ...

    def refusal(self, peer: str) -> str: ...

    async def learn(self, peer: str) -> None: ...


@dataclass
class _Entry:
    assign: StageAssign
    accepted: float  # time.monotonic()
    claimed: bool = False


class Assignments:
    """The worker's registry of accepted stages, keyed by job (one stage per job per worker).

    Only validators may assign: ``validators`` is the network's rule (validator/trust.py);
    ``trust_any_validator=True`` accepts any peer, for unit tests. ``capacity_bytes`` is the memory this
    worker offers to stages in all; each stage reserves at least ``min_stage_bytes`` of it, and the
    StageAssign kept (``get``) carries the reservation as its ``memory_bytes``.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        validators: ValidatorRule | None = None,
        trust_any_validator: bool = False,
        claim_timeout_s: float = CLAIM_TIMEOUT_S,
        min_stage_bytes: int = MIN_STAGE_BYTES,
        max_unclaimed_per_owner: int = MAX_UNCLAIMED_PER_OWNER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if validators is None and not trust_any_validator:
            raise ValueError("say who may assign stages: pass validators, or trust_any_validator=True")
        if min_stage_bytes < 1:
            raise ValueError("min_stage_bytes must be at least 1: a stage never runs in 0 bytes")
        self.capacity_bytes = capacity_bytes
        self._validators = validators
        self.claim_timeout_s = claim_timeout_s
        self.min_stage_bytes = min_stage_bytes
        self.max_unclaimed_per_owner = max_unclaimed_per_owner
        self._clock = clock
        self._entries: dict[bytes, _Entry] = {}

    def reserved_bytes(self) -> int:
        self._expire()
        return sum(e.assign.memory_bytes for e in self._entries.values())

    def accept(self, assign: StageAssign, from_peer: str) -> StageAssigned | ErrorReply:
        """Reserve the stage, or say why not. The same validator may assign a job again (it re-planned
        after another worker refused); the new assignment replaces the old one."""
        self._expire()
        if assign.validator != from_peer:
            return ErrorReply(
                code="not_the_validator",
                message=f"the assignment names validator {assign.validator} but came from {from_peer}",
            )
        if self._validators is not None and not self._validators.trusts(from_peer):
            why = self._validators.refusal(from_peer)
            log.warning("refused stage %d of job %s: %s", assign.stage, assign.job.hex(), why)
            return ErrorReply(code="not_a_validator", message=why[:1024])
        # The program's runtime is never free: a declared 0 (or any tiny figure) reserves the floor.
        assign = msgspec.structs.replace(assign, memory_bytes=max(assign.memory_bytes, self.min_stage_bytes))
        old = self._entries.get(assign.job)
        if old is not None and old.assign.validator != from_peer:
            return ErrorReply(
                code="job_exists", message=f"job {assign.job.hex()} is assigned here by another validator"
            )
        if old is None and len(self._entries) >= MAX_ASSIGNMENTS:
            return ErrorReply(code="too_many_stages", message=f"this worker holds {MAX_ASSIGNMENTS} stages already")
        waiting = sum(1 for e in self._entries.values() if e.assign.owner == assign.owner and not e.claimed)
        if old is None and waiting >= self.max_unclaimed_per_owner:
            return ErrorReply(
                code="too_many_pending",
                message=f"owner {assign.owner} already holds {waiting} stage(s) here that it has not started; "
                f"start or abandon them first (unclaimed stages expire after {self.claim_timeout_s:.0f} s)",
            )
        reserved = self.reserved_bytes() - (old.assign.memory_bytes if old else 0)
        if reserved + assign.memory_bytes > self.capacity_bytes:
            return ErrorReply(
                code="not_enough_memory",
                message=f"stage {assign.stage} needs {assign.memory_bytes / 1e9:.3g} GB; this worker offers "
                f"{self.capacity_bytes / 1e9:.3g} GB of which {reserved / 1e9:.3g} GB are reserved",
            )
        self._entries[assign.job] = _Entry(assign, self._clock())
        log.info(
            "accepted stage %d/%d of job %s from validator %s for %s",
            assign.stage, assign.n_stages, assign.job.hex(), from_peer, assign.owner,
        )  # fmt: skip
        return StageAssigned(job=assign.job, stage=assign.stage)

    def get(self, job: bytes) -> StageAssign | None:
        self._expire()
        entry = self._entries.get(job)
        return None if entry is None else entry.assign

    def admits(self, peer: str, job: bytes) -> bool:
        """Whether ``peer`` may open a channel for ``job`` here: its owner and the stage's two neighbours."""
        assign = self.get(job)
        return assign is not None and peer in {assign.owner, assign.prev, assign.next}

    def claim(self, job: bytes) -> StageAssign | None:
        """Mark the job's stage as started by its owner: it no longer expires; None if nothing is assigned."""
        self._expire()
        entry = self._entries.get(job)
        if entry is None:
            return None
        if not entry.claimed:
            entry.claimed = True
            log.info("job %s claimed %.2f s after its assignment", job.hex(), self._clock() - entry.accepted)
        return entry.assign

    def unreserved_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.reserved_bytes())

    def grow(self, job: bytes, memory_bytes: int) -> int:
        """Raise the job's reservation to ``memory_bytes`` where the worker has that much unreserved (its
        program needs more than was declared); the reservation after, 0 if the job is not here."""
        entry = self._entries.get(job)
        if entry is None:
            return 0
        if 0 < memory_bytes - entry.assign.memory_bytes <= self.unreserved_bytes():
            log.info("job %s: reservation grown from %d to %d bytes", job.hex(), entry.assign.memory_bytes,
                     memory_bytes)  # fmt: skip
            entry.assign = msgspec.structs.replace(entry.assign, memory_bytes=memory_bytes)
        return entry.assign.memory_bytes

    def release(self, job: bytes) -> None:
        """Forget the job's stage and free its memory; nothing happens if it is not here."""
        if self._entries.pop(job, None) is not None:
            log.info("released the stage of job %s", job.hex())

    def status(self) -> list[dict[str, Any]]:
        """The assignments as /status shows them."""
        self._expire()
        now = self._clock()
        return [
            {
                "job": e.assign.job.hex(),
                "stage": e.assign.stage,
                "n_stages": e.assign.n_stages,
                "owner": e.assign.owner,
                "validator": e.assign.validator,
                "prev": e.assign.prev,
                "next": e.assign.next,
                "memory_bytes": e.assign.memory_bytes,
                "claimed": e.claimed,
                "expires_in_s": None if e.claimed else round(e.accepted + self.claim_timeout_s - now, 1),
            }
            for e in self._entries.values()
        ]

    def _expire(self) -> None:
        now = self._clock()
        for job in [j for j, e in self._entries.items() if not e.claimed and now - e.accepted > self.claim_timeout_s]:
            log.info("dropped the stage of job %s: its owner did not start it within %.0f s", job.hex(),
                     self.claim_timeout_s)  # fmt: skip
            del self._entries[job]


def assign_handler(
    assignments: Assignments, learn_validator: Callable[[str], Awaitable[None]]
) -> Callable[[Any], Awaitable[None]]:
    """The ``ASSIGN_PROTOCOL`` stream handler (for ``serve_protocol``): one StageAssign in, one answer
    out. ``learn_validator(peer)`` runs first, so that a staked validator is checked before it is judged."""

    async def handle(stream: Stream) -> None:
        peer = remote_peer(stream)
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                assign = await read_message(stream, StageAssign, max_bytes=StageAssign.max_bytes)
        except (StreamError, WireError, trio.TooSlowError) as exc:
            reply: StageAssigned | ErrorReply = ErrorReply(code="bad_request", message=str(exc)[:1024] or "timeout")
        else:
            await learn_validator(peer)
            reply = assignments.accept(assign, peer)
        try:
            await write_message(stream, reply)
        finally:
            await close_stream(stream)

    return handle
