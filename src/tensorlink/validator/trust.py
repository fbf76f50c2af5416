"""Trust: which peers are validators, and how much of a worker's claimed capacity is believed.

Roles are the network's decision, never the claimant's. A validator presence record signed by a peer
proves who it is, not that it may assign stages. A peer is a trusted validator when it is staked on
the chain the node is configured with (validator/stake.py), or when the network's configuration lists
it (``validator = [...]`` in config.toml, ``--validator PEER_ID``): the rule for networks without a
chain. A node with no rule trusts nobody: a worker then refuses every assignment, and says how to
configure one.

A worker's capability record is a claim. Validators match on what they have checked: each worker is
challenged (worker/challenge.py) when it appears and every ``RECHECK_S``; its speed counts as the lesser
of its claim and what the challenge measured, a claim not (yet) checked counts as ``UNVERIFIED_GFLOPS``,
a worker that answered wrongly is left out, and memory claims are capped by a per-device bound.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
import trio

from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import Stream, close_stream, read_record, write_message
from tensorlink.wire.messages import ErrorReply, WorkerCapability
from tensorlink.wire.protocols import CHALLENGE_PROTOCOL
from tensorlink.worker.challenge import (
    MAX_ROUNDS,
    ROW_DIGEST_BYTES,
    CapacityAnswer,
    CapacityChallenge,
    N,
    decode,
    expected_rows,
    flops_per_round,
)

log = logging.getLogger(__name__)

NO_RULE_HINT = (
    "no trusted validators are configured: start the node with --validator PEER_ID (repeatable) or list "
    'them in config.toml as validator = ["PEER_ID", ...], or configure a chain (--chain-rpc, '
    "--chain-deployment)"
)


class StakeRule(Protocol):
    """The chain rule (validator/stake.py's StakedValidators), imported only where a chain is configured."""

    @property
    def rule(self) -> str: ...

    def trusts(self, peer: str) -> bool: ...

    def why_not(self, peer: str) -> str: ...

    async def learn(self, peer: str) -> None: ...


class ValidatorTrust:
    """The rule in force on one node: ``trusts(peer)`` answers, ``rule`` describes it for people, and
    ``learn(peer)`` (before ``trusts``) checks a peer's stake when a chain is configured."""

    def __init__(self, listed: Iterable[str] = (), staked: StakeRule | None = None) -> None:
        self.listed = frozenset(listed)
        self.staked = staked

    def trusts(self, peer: str) -> bool:
        return peer in self.listed or (self.staked is not None and self.staked.trusts(peer))

    async def learn(self, peer: str) -> None:
        if self.staked is not None and peer not in self.listed:
            await self.staked.learn(peer)

    @property
    def rule(self) -> str:
        """One line for the banner and /status."""
        rules = [f"config list of {len(self.listed)}"] if self.listed else []
        if self.staked is not None:
            rules.append(self.staked.rule)
        return " or ".join(rules) if rules else "none (" + NO_RULE_HINT + ")"

    def refusal(self, peer: str) -> str:
        """Why ``peer`` is not obeyed, naming the rule, for the refused peer and the operator's log."""
        if not self.listed and self.staked is None:
            return f"{peer} is not a trusted validator: {NO_RULE_HINT}"
        why = "" if self.staked is None else f"; {self.staked.why_not(peer)}"
        return (
            f"{peer} is not a trusted validator of this network (trusted validators: {self.rule}; a "
            f"validator's own record does not make it one{why})"
        )


TARGET_S = 0.1  # the challenge's compute time at the claimed speed: cheap for a worker that tells the truth
CHALLENGE_TIMEOUT_S = 10.0
RECHECK_S = 600.0  # a verified worker is measured again this often (load and hardware change)
RETRY_S = 30.0  # a worker that could not be checked is tried again this soon
CHECKED_ROWS = 8  # a worker that computed a fraction f of the rows passes with probability f**8
UNVERIFIED_GFLOPS = 1.0  # an unchecked claim is worth the slowest worker anyone would run
MAX_MEMORY_BYTES = {"cpu": 256 << 30, "cuda": 192 << 30}  # no volunteer machine offers more to one node

Outcome = Literal["verified", "wrong_answer", "timeout", "unreachable", "refused"]


@dataclass(frozen=True)
class Verdict:
    """What one challenge showed about one claim."""

    claimed_gflops: float
    outcome: Outcome
    measured_gflops: float  # 0 unless verified
    at: float  # time.monotonic()
    detail: str = ""


class CapacityCheck:
    """The validator's record of checked claims; ``credited`` is what matching may rely on."""

    def __init__(self, host: PeerHost, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self._clock = clock
        self.verdicts: dict[str, Verdict] = {}

    def due(self, claim: WorkerCapability) -> bool:
        """Whether this worker's claim needs a (new) challenge."""
        v = self.verdicts.get(claim.peer_id)
        if v is None or v.claimed_gflops != claim.gflops:
            return True
        return self._clock() - v.at >= (RECHECK_S if v.outcome == "verified" else RETRY_S)

    def credited(self, claim: WorkerCapability) -> WorkerCapability | None:
        """The claim as matching may use it; None for a worker caught answering wrongly."""
        v = self.verdicts.get(claim.peer_id)
        gflops = min(claim.gflops, UNVERIFIED_GFLOPS)
        if v is not None and v.claimed_gflops == claim.gflops:
            if v.outcome == "wrong_answer":
                return None
            if v.outcome == "verified":
                gflops = min(claim.gflops, v.measured_gflops)
        bound = MAX_MEMORY_BYTES[claim.device]
        return msgspec.structs.replace(
            claim,
            gflops=gflops,
            memory_bytes=min(claim.memory_bytes, bound),
            free_memory_bytes=min(claim.free_memory_bytes, bound),
        )

    def view(self, peer: str) -> dict[str, Any] | None:
        """The last verdict on ``peer`` as /status shows it."""
        v = self.verdicts.get(peer)
        if v is None:
            return None
        return {
            "outcome": v.outcome,
            "claimed_gflops": v.claimed_gflops,
            "measured_gflops": round(v.measured_gflops, 2),
            "checked_s_ago": round(self._clock() - v.at, 1),
            "detail": v.detail,
        }

    async def check(self, claim: WorkerCapability) -> Verdict:
        """Challenge the worker twice, one round then enough rounds for ``TARGET_S`` at its claimed speed;
        the speed is the difference of work over the difference of time, so the round trip, the stream
        set-up and the matrices' generation cancel out."""
        rounds = max(2, min(MAX_ROUNDS, math.ceil(claim.gflops * 1e9 * TARGET_S / flops_per_round())))
        try:
            small = await self._exchange(claim.peer_id, 1)
            large = await self._exchange(claim.peer_id, rounds)
        except _Failed as exc:
            verdict = Verdict(claim.gflops, exc.outcome, 0.0, self._clock(), exc.detail)
        else:
            extra = large - small
            seconds = extra if extra > 0 else large
            measured = (rounds - 1 if extra > 0 else rounds) * flops_per_round() / seconds / 1e9
            detail = f"{rounds} rounds in {large:.3f} s, 1 round in {small:.3f} s"
            verdict = Verdict(claim.gflops, "verified", measured, self._clock(), detail)
        self.verdicts[claim.peer_id] = verdict
        log.info(
            "capacity of %s: %s (claims %.1f GFLOP/s, measured %.1f) %s",
            claim.peer_id, verdict.outcome, claim.gflops, verdict.measured_gflops, verdict.detail,
        )  # fmt: skip
        return verdict

    async def _exchange(self, peer: str, rounds: int) -> float:
        """One challenge: the seconds its correct answer took; _Failed otherwise."""
        seed = secrets.token_bytes(16)
        stream: Stream | None = None
        try:
            with trio.fail_after(CHALLENGE_TIMEOUT_S):
                start = time.perf_counter()
                stream = await self.host.open(peer, CHALLENGE_PROTOCOL)
                await write_message(stream, CapacityChallenge(seed=seed, rounds=rounds))
                reply = decode(await read_record(stream, CapacityAnswer.max_bytes))
                elapsed = time.perf_counter() - start
        except trio.TooSlowError:
            raise _Failed("timeout", f"no answer to {rounds} round(s) within {CHALLENGE_TIMEOUT_S:.0f} s") from None
        except Exception as exc:  # unreachable, reset, garbage
            raise _Failed("unreachable", f"{type(exc).__name__}: {exc}"[:200]) from None
        finally:
            if stream is not None:
                await close_stream(stream)
        if isinstance(reply, ErrorReply):
            raise _Failed("refused", f"{reply.code}: {reply.message}"[:300])
        if not isinstance(reply, CapacityAnswer):
            raise _Failed("wrong_answer", f"answered a {type(reply).__name__}")
        rows = sorted(secrets.SystemRandom().sample(range(N), CHECKED_ROWS))
        want = await trio.to_thread.run_sync(expected_rows, seed, rounds, rows)
        got = [reply.rows[i * ROW_DIGEST_BYTES : (i + 1) * ROW_DIGEST_BYTES] for i in rows]
        if got != want:
            bad = sum(g != w for g, w in zip(got, want, strict=True))
            raise _Failed("wrong_answer", f"{bad} of {CHECKED_ROWS} checked rows of {rounds} round(s) are wrong")
        return elapsed


class _Failed(Exception):
    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
