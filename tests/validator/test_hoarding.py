"""Reservations cannot be hoarded: a requester that asks for a huge job again and again, and never starts
any, holds one worker for a few seconds at most, and an honest job is placed meanwhile. Real node
processes (a validator, two workers) with a short claim timeout; the requesters are libp2p hosts here."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
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
from tensorlink.validator import JobRefused, request_job
from tensorlink.wire.messages import JobPlan, JobRequest, UnitCost

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CLAIM_TIMEOUT_S = 4.0
ATTEMPTS = 6


@asynccontextmanager
async def requester(swarm: LocalSwarm, key_dir: Path) -> AsyncIterator[Any]:
    """``ask(units)`` sends a new job (fresh job id) of one worker to the swarm's validator."""
    key_pair = load_or_create_identity(key_dir)
    host = make_host(key_pair)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(swarm.validator_addrs[0])))

        async def ask(units: list[UnitCost]) -> JobPlan | JobRefused:
            request = JobRequest(job=secrets.token_bytes(16), owner=peer_id_of(key_pair), workers=1, units=units)
            try:
                return await request_job(PeerHost(host), swarm.validator_peer_ids[0], request, timeout_s=30)
            except JobRefused as exc:
                return exc

        yield ask


@pytest.mark.timeout(180)
def test_a_requester_that_never_starts_its_jobs_does_not_lock_the_workers(tmp_path: Path) -> None:
    timeout = ["--claim-timeout", str(CLAIM_TIMEOUT_S)]
    with LocalSwarm(workers=2, worker_memory_gb=1.0, worker_flags=timeout, validator_flags=timeout) as swarm:
        capacity = min(w.status()["capability"]["free_memory_bytes"] for w in swarm.workers)
        huge = [UnitCost(1e8, int(capacity * 0.8) // 2, 0)]  # weights + gradients: 80 % of a worker

        async def attack_then_honest() -> tuple[list[JobPlan | JobRefused], JobPlan | JobRefused]:
            async with requester(swarm, tmp_path / "attacker") as attacker:
                answers = [await attacker(huge) for _ in range(ATTEMPTS)]
            async with requester(swarm, tmp_path / "honest") as honest:
                return answers, await honest([UnitCost(1e8, int(capacity * 0.5) // 2, 0)])  # cannot share

        answers, honest = trio.run(attack_then_honest)
        admitted = [a for a in answers if isinstance(a, JobPlan)]
        assert len(admitted) == 1, answers
        refusals = {a.code for a in answers if isinstance(a, JobRefused)}
        assert refusals == {"too_many_pending"}, answers
        [held] = [w for w in swarm.workers if w.peer_id == admitted[0].placements[0].peer_id]
        assert isinstance(honest, JobPlan), honest  # placed while the attacker holds its one job
        assert [p.peer_id for p in honest.placements] != [held.peer_id]

        # The attacker's reservation is gone after the claim timeout; then it may ask again, once.
        started = time.monotonic()
        deadline = started + CLAIM_TIMEOUT_S + 10
        while any(s["job"] == admitted[0].job.hex() for s in held.status()["stages"]):
            assert time.monotonic() < deadline, held.status()["stages"]
            time.sleep(0.2)
        assert "did not start it within 4 s" in held.log_path.read_text()
