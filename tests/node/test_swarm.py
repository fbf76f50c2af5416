"""A swarm of real node processes on loopback: discovery through the DHT, expiry, late joiners."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nodes import NodeProcess

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

TTL_S = 10.0  # short record lifetime so that a dead worker drops out quickly
CONFIG = f"record_ttl_s = {TTL_S}\nheartbeat_s = 1.0\n"


def worker_ids(status: dict[str, Any]) -> set[str]:
    return {w["peer_id"] for w in status["workers"]}


@pytest.mark.timeout(180)
def test_validator_sees_workers_then_loses_a_dead_one_and_a_late_joiner_finds_all(
    start_node: Callable[..., NodeProcess],
) -> None:
    validator = start_node("validator", "--role", "validator", config=CONFIG)
    workers = [
        start_node(f"worker{i}", "--bootstrap", validator.addr, "--max-memory", "2", config=CONFIG, wait=False)
        for i in range(4)
    ]
    for worker in workers:
        worker.wait_ready()
    ids = {w.peer_id for w in workers}

    # 1. Within 10 s of the workers being up, the validator lists all four with their capability records.
    status = validator.wait_for(lambda s: worker_ids(s) == ids, 10.0, "all 4 workers in the validator's status")
    for record in status["workers"]:
        assert record["device"] == "cpu" and record["gflops"] > 0 and record["software"].startswith("tensorlink/")
        assert 0 < record["free_memory_bytes"] <= record["memory_bytes"] <= 2e9
        assert 0 < record["expires_in_s"] <= TTL_S
        assert any(addr.endswith(record["peer_id"]) for addr in record["addrs"])
    assert set(status["peers"]) >= ids

    # 2. A killed worker (no goodbye) disappears once its record expires, and not before it could have.
    dead = workers.pop()
    killed_at = time.monotonic()
    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(timeout=5)
    status = validator.wait_for(lambda s: dead.peer_id not in worker_ids(s), TTL_S + 6, "the dead worker gone")
    assert time.monotonic() - killed_at >= 1.0  # it was not dropped merely for disconnecting
    assert worker_ids(status) == ids - {dead.peer_id}

    # 3. A late joiner that bootstraps from one worker (not the validator) finds every other node.
    late = start_node("late", "--bootstrap", workers[0].addr, config=CONFIG)
    others = {w.peer_id for w in workers}
    late.wait_for(
        lambda s: worker_ids(s) >= others | {late.peer_id}  # its own record is in the DHT too
        and {v["peer_id"] for v in s["validators"]} == {validator.peer_id},
        20.0,
        "every worker, itself and the validator in the late joiner's status",
    )
    validator.wait_for(lambda s: late.peer_id in worker_ids(s), 10.0, "the late joiner in the validator's status")
    # 4. Gossip works across the swarm: the validator hears heartbeats from every live worker.
    beats = validator.wait_for(lambda s: set(s["heartbeats"]) >= others | {late.peer_id}, 10.0, "heartbeats")
    assert all(beats["heartbeats"][peer] < 10 for peer in others | {late.peer_id})
    for node in (validator, *workers, late):
        assert node.stop() < 2.0
        assert "Traceback" not in node.output, node.output


@pytest.mark.timeout(120)
def test_restarted_worker_keeps_its_peer_id_and_rejoins(start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    validator = start_node("validator", "--role", "validator", config=CONFIG)
    worker = start_node("worker", "--bootstrap", validator.addr, config=CONFIG)
    validator.wait_for(lambda s: worker.peer_id in worker_ids(s), 15.0, "the worker listed")
    assert worker.stop() < 2.0
    again = start_node("worker-again", "--bootstrap", validator.addr, data_dir=tmp_path / "worker")
    assert again.peer_id == worker.peer_id and again.addr != worker.addr  # same identity, new port
    status = validator.wait_for(
        lambda s: any(w["peer_id"] == again.peer_id and again.addr in w["addrs"] for w in s["workers"]),
        15.0,
        "the restarted worker listed with its new address",
    )
    assert again.peer_id in status["peers"]
