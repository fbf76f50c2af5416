"""The stages a worker has accepted from validators, before and while their owners run them.

A validator assigns a stage over ``ASSIGN_PROTOCOL`` (one StageAssign, answered by StageAssigned or an
ErrorReply). The registry reserves the stage's memory so that two validators cannot promise the same
bytes twice, and drops an assignment whose owner never claims it within ``claim_timeout_s``, so a user
who asks for workers and walks away does not hold them. The stage runtime checks uploads against
``get(job)`` (the owner, the neighbours), calls ``claim(job)`` when the owner starts the stage and
``release(job)`` when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from tensorlink.p2p.streams import StreamError, close_stream, read_message, remote_peer, write_message
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import ErrorReply, StageAssign, StageAssigned

log = logging.getLogger(__name__)

ASSIGN_PROTOCOL = "/tensorlink/assign/1.0.0"
CLAIM_TIMEOUT_S = 300.0
READ_TIMEOUT_S = 10.0
MAX_ASSIGNMENTS = 256  # stages one worker holds at once, claimed or not: bounds what validators can pile up


@dataclass
class _Entry:
    assign: StageAssign
    accepted: float  # time.monotonic()
    claimed: bool = False


class Assignments:
    """The worker's registry of accepted stages, keyed by job (one stage per job per worker).

    Only validators may assign: ``is_validator(peer)`` says whether a peer is one (the node passes "has a
    live validator record"); ``trust_any_validator=True`` accepts any peer, for tests and private swarms.
    ``capacity_bytes`` is the memory this worker offers to stages in all.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        is_validator: Callable[[str], bool] | None = None,
        trust_any_validator: bool = False,
        claim_timeout_s: float = CLAIM_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if is_validator is None and not trust_any_validator:
            raise ValueError("say who may assign stages: pass is_validator, or trust_any_validator=True")
        self.capacity_bytes = capacity_bytes
        self._is_validator = is_validator or (lambda peer: True)
        self._trust_any = trust_any_validator
        self.claim_timeout_s = claim_timeout_s
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
        if not self._trust_any and not self._is_validator(from_peer):
            return ErrorReply(
                code="not_a_validator",
                message=f"{from_peer} has no live validator record here; only validators assign stages",
            )
        old = self._entries.get(assign.job)
        if old is not None and old.assign.validator != from_peer:
            return ErrorReply(
                code="job_exists", message=f"job {assign.job.hex()} is assigned here by another validator"
            )
        if old is None and len(self._entries) >= MAX_ASSIGNMENTS:
            return ErrorReply(code="too_many_stages", message=f"this worker holds {MAX_ASSIGNMENTS} stages already")
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

    def claim(self, job: bytes) -> StageAssign | None:
        """Mark the job's stage as started by its owner: it no longer expires; None if nothing is assigned."""
        self._expire()
        entry = self._entries.get(job)
        if entry is None:
            return None
        entry.claimed = True
        return entry.assign

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
    out. ``learn_validator(peer)`` runs first, so a validator whose record this worker has not fetched yet
    is looked up instead of refused."""

    async def handle(stream: Any) -> None:
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
