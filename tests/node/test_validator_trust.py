"""Validators are the network's decision: a peer that runs as a validator, publishes its own presence
record and even lists itself is ignored by workers, by the other validators' status and by owners that
ask it for workers. Real node processes on loopback; the owner is a libp2p host in this test process."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nodes import NodeProcess

from tensorlink.node.config import ConfigError, load_config
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.validator import JobRefused, request_job
from tensorlink.wire.messages import JobPlan, JobRequest, UnitCost

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CONFIG = "heartbeat_s = 1.0\nrecord_ttl_s = 10.0\n"
UNITS = [UnitCost(1e8, 1000, 100)] * 4


def identity(path: Path) -> str:
    """Create a node's identity now, so that its peer id can be configured before it starts."""
    path.mkdir(parents=True, exist_ok=True)
    return peer_id_of(load_or_create_identity(path))


async def ask(validator: NodeProcess, workers: int, key_dir: Path) -> JobPlan | JobRefused:
    """A fresh owner asks ``validator`` for ``workers`` workers: the plan, or the refusal."""
    key_pair = load_or_create_identity(key_dir)
    host = make_host(key_pair)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(validator.addr)))
        request = JobRequest(job=secrets.token_bytes(16), owner=peer_id_of(key_pair), workers=workers, units=UNITS)
        try:
            return await request_job(host, validator.peer_id, request, timeout_s=30)
        except JobRefused as exc:
            return exc


def lists_workers(*workers: NodeProcess) -> Callable[[dict], bool]:
    return lambda s: {w.peer_id for w in workers} <= {w["peer_id"] for w in s["workers"]}


@pytest.mark.timeout(180)
def test_a_self_declared_validator_is_ignored(start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    trusted = identity(tmp_path / "validator")
    impostor_id = identity(tmp_path / "impostor")
    validator = start_node("validator", "--role", "validator", "--validator", trusted, config=CONFIG)
    boot = ("--bootstrap", validator.addr)
    # The impostor lists itself: a validator's own listing of itself must not matter to anyone else.
    impostor = start_node(
        "impostor", "--role", "validator", "--validator", impostor_id, *boot, config=CONFIG, wait=False
    )
    worker = start_node("worker", "--validator", trusted, "--max-memory", "1", *boot, config=CONFIG, wait=False)
    bare = start_node("bare", "--max-memory", "1", *boot, config=CONFIG, wait=False)  # no rule configured
    for node in (impostor, worker, bare):
        node.wait_ready()
    assert "validators:   trusted: config list of 1" in worker.output
    assert "validators:   trusted: none (no trusted validators are configured" in bare.output
    assert worker.status()["trusted_validators"] == "config list of 1"

    # The impostor's record is seen, and marked untrusted, by the trusted validator and by the worker.
    for node in (validator, worker):
        status = node.wait_for(
            lambda s: {v["peer_id"] for v in s["validators"]} >= {trusted, impostor_id}, 20.0, "both validator records"
        )
        assert {v["peer_id"]: v["trusted"] for v in status["validators"]} == {trusted: True, impostor_id: False}
    for node in (validator, impostor):
        node.wait_for(lists_workers(worker, bare), 20.0, "both workers listed")

    # An owner asking the impostor gets no worker: each refuses its assignment, naming the rule.
    refused = trio.run(ask, impostor, 2, tmp_path / "owner1")
    assert isinstance(refused, JobRefused), refused
    assert f"not_a_validator: {impostor_id} is not a trusted validator of this network" in refused.message
    assert "not_a_validator: " + f"{impostor_id} is not a trusted validator: no trusted validators are configured" in (
        refused.message
    )
    assert worker.status()["stages"] == [] and bare.status()["stages"] == []
    assert re.search(rf"refused stage \d of job \w+: {impostor_id} is not a trusted validator", worker.output)

    # The trusted validator places on the worker that trusts it; the worker with no rule refuses it too.
    plan = trio.run(ask, validator, 1, tmp_path / "owner2")
    assert isinstance(plan, JobPlan), plan
    placed = {p.peer_id for p in plan.placements}
    assert placed == {worker.peer_id}, placed
    [stage] = worker.status()["stages"]
    assert stage["validator"] == trusted
    for node in (validator, impostor, worker, bare):
        assert node.stop() < 2.0
        assert "Traceback" not in node.output, node.output[-5000:]


def test_validators_are_peer_ids_in_the_config(tmp_path: Path) -> None:
    peer = identity(tmp_path / "v")
    (tmp_path / "config.toml").write_text(f'validators = ["{peer}"]\n')
    assert load_config(tmp_path, {}).validators == [peer]
    assert load_config(tmp_path, {"validators": [peer, peer]}).validators == [peer, peer]
    (tmp_path / "config.toml").write_text('validators = ["not a peer id"]\n')
    with pytest.raises(ConfigError, match="validators"):
        load_config(tmp_path, {})
