"""LocalSwarm starts real node processes that find each other, and leaves nothing behind.

(Named test_local_swarm.py, not test_swarm.py: tests/node/test_swarm.py exists, and without __init__.py
files pytest refuses two test modules of the same name in one run.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorlink.local import LocalSwarm, SwarmError

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def test_two_workers_start_join_and_stop(tmp_path: Path) -> None:
    with LocalSwarm(workers=2, threads_per_worker=1, worker_memory_gb=1.0, log_dir=tmp_path) as swarm:
        procs = [node.proc for node in swarm.nodes]
        roots = [node.data_dir for node in swarm.nodes]
        assert len(swarm.validator_addrs) == 1
        assert swarm.validator_addrs[0].startswith("/ip4/127.0.0.1/tcp/")
        assert swarm.validator_addrs[0].endswith(f"/p2p/{swarm.validator_peer_ids[0]}")
        status = swarm.validators[0].status()
        assert {w["peer_id"] for w in status["workers"]} == {w.peer_id for w in swarm.workers}
        assert all(0 < w["memory_bytes"] <= 1e9 for w in status["workers"])
        for worker in swarm.workers:
            assert worker.status_port > 0 and worker.log_path.parent == tmp_path
            assert worker.status()["validators"][0]["peer_id"] == swarm.validator_peer_ids[0]
    assert all(p.poll() is not None for p in procs)  # every process it started has exited
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]  # stopped by SIGTERM, cleanly
    assert not any(root.exists() for root in roots)  # data dirs removed
    assert (tmp_path / "worker0.log").read_text().count("TensorLink node running") == 1  # logs kept in log_dir
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()


def test_a_node_that_fails_to_start_is_reported_with_its_log() -> None:
    with pytest.raises(SwarmError, match=r"(?s)worker0 \(worker\) exited with code 2 .*--max-memory") as info:
        with LocalSwarm(workers=1, worker_memory_gb=-1.0):
            pass
    assert "last lines of" in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lists 1 values for 2 workers"):
        LocalSwarm(workers=2, worker_memory_gb=[1.0])
    with pytest.raises(ValueError, match="at least one validator"):
        LocalSwarm(validators=0)
