"""Validators are the network's decision: a peer that runs as a validator, publishes its own presence
record and even lists itself is ignored by workers, by the other validators' status and by owners that
ask it for workers. Real node processes on loopback; the owner is a libp2p host in this test process."""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nodes import NodeProcess

from tensorlink.node.config import ConfigError, load_config
from tensorlink.p2p.dht import Directory
from tensorlink.p2p.gossip import HEARTBEATS, Gossip, GossipError
from tensorlink.p2p.host import make_host, serve_protocol
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.records import WORKERS
from tensorlink.p2p.streams import close_stream, read_record, write_message
from tensorlink.validator import JobRefused, request_job
from tensorlink.wire.messages import ErrorReply, Heartbeat, JobPlan, JobRequest, UnitCost, WorkerCapability
from tensorlink.wire.protocols import ASSIGN_PROTOCOL, CHALLENGE_PROTOCOL
from tensorlink.worker.challenge import ROW_DIGEST_BYTES, CapacityAnswer, N

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
            return await request_job(PeerHost(host), validator.peer_id, request, timeout_s=30)
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
    assert "this worker will refuse every stage: no trusted validators are configured" in bare.output
    assert "will refuse every stage" not in worker.output
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
    (tmp_path / "config.toml").write_text(f'validator = ["{peer}"]\n')
    assert load_config(tmp_path, {}).validators == [peer]
    assert load_config(tmp_path, {"validator": [peer, peer]}).validators == [peer, peer]
    (tmp_path / "config.toml").write_text('validator = ["not a peer id"]\n')
    with pytest.raises(ConfigError, match="validator"):
        load_config(tmp_path, {})
    (tmp_path / "config.toml").write_text('chain_rpc = "http://127.0.0.1:8545"\n')
    with pytest.raises(ConfigError, match="chain_rpc and chain_deployment go together"):
        load_config(tmp_path, {})
    (tmp_path / "config.toml").write_text('chain_key_file = "key"\n')
    with pytest.raises(ConfigError, match="chain_key_file needs a chain"):
        load_config(tmp_path, {})
    deployment = tmp_path / "deployment.json"
    deployment.write_text('{"chain_id": 31337, "token": "0x1", "staking": "0x2", "settlement": "0x3"}')
    for file, why in ((tmp_path / "missing.json", "chain_deployment"), (deployment, "chain at http://127.0.0.1:9")):
        result = subprocess.run(
            [sys.executable, "-m", "tensorlink.node", "--data-dir", str(tmp_path / "n"), "--status-port", "0",
             "--chain-rpc", "http://127.0.0.1:9", "--chain-deployment", str(file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and why in result.stderr and "Traceback" not in result.stderr, result.stderr


@asynccontextmanager
async def fake_worker(key_dir: Path, bootstrap: str, assigned: list[str], *, garbage: bool) -> AsyncIterator[str]:
    """A peer that publishes a worker record claiming 10**6 GFLOP/s and 1000 GiB and gossips heartbeats.
    It cannot back the claim: ``garbage`` answers challenges with random digests, else it does not speak
    the challenge protocol at all. An assignment it receives is recorded in ``assigned`` (and refused)."""
    key_pair = load_or_create_identity(key_dir)
    peer = peer_id_of(key_pair)
    host = make_host(key_pair)
    directory, gossip = Directory(host, key_pair, server=False), Gossip(host)

    async def take_assign(stream: Any) -> None:
        assigned.append(peer)
        await write_message(stream, ErrorReply(code="busy", message="a liar"))
        await close_stream(stream)

    async def answer_garbage(stream: Any) -> None:
        await read_record(stream, 1024)
        await write_message(stream, CapacityAnswer(rows=secrets.token_bytes(N * ROW_DIGEST_BYTES)))
        await close_stream(stream)

    async def beat() -> None:
        for seq in range(10_000):
            with contextlib.suppress(GossipError):
                await gossip.publish(
                    HEARTBEATS,
                    Heartbeat(peer_id=peer, role="worker", seq=seq, time_ms=int(time.time() * 1000), load=0.0),
                )
            await trio.sleep(1.0)

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), directory.running(), gossip.running():
        assert await directory.connect_bootstrap([bootstrap])
        serve_protocol(host, ASSIGN_PROTOCOL, take_assign)
        if garbage:
            serve_protocol(host, CHALLENGE_PROTOCOL, answer_garbage)
        claim = WorkerCapability(
            peer_id=peer, device="cpu", device_name="liar", memory_bytes=1000 << 30, free_memory_bytes=1000 << 30,
            gflops=1e6, software="tensorlink/0.1.0", addrs=[f"{a}/p2p/{peer}" for a in host.get_addrs()],
        )  # fmt: skip
        await directory.publish(WORKERS, claim, 60.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat)
            yield peer
            nursery.cancel_scope.cancel()


@pytest.mark.timeout(180)
def test_a_worker_that_lies_about_its_capacity_is_not_preferred(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    trusted = identity(tmp_path / "validator")
    validator = start_node("validator", "--role", "validator", "--validator", trusted, config=CONFIG)
    honest = start_node(
        "honest", "--validator", trusted, "--max-memory", "1", "--bootstrap", validator.addr, config=CONFIG
    )
    assigned: list[str] = []

    def checked(s: dict[str, Any]) -> dict[str, str]:
        return {w["peer_id"]: (w["capacity_check"] or {}).get("outcome", "") for w in s["workers"]}

    async def scenario() -> JobPlan | JobRefused:
        async with (
            fake_worker(tmp_path / "silent", validator.addr, assigned, garbage=False) as silent,
            fake_worker(tmp_path / "garbage", validator.addr, assigned, garbage=True) as garbage,
        ):
            want = {honest.peer_id: "verified", silent: "unreachable", garbage: "wrong_answer"}
            # 75 s: the checks run one at a time, and a claim whose first check failed (the honest worker
            # still starting) is tried again RETRY_S = 30 s later; a 40 s wait failed 2 runs in 18 that way.
            status = await trio.to_thread.run_sync(
                lambda: validator.wait_for(lambda s: checked(s) == want, 75.0, "the three claims checked")
            )
            views = {w["peer_id"]: w for w in status["workers"]}
            assert views[silent]["gflops"] == 1e6 and views[silent]["memory_bytes"] == 1000 << 30  # what it claims
            measured = views[honest.peer_id]["capacity_check"]["measured_gflops"]
            assert 0 < measured, views[honest.peer_id]
            return await ask(validator, 1, tmp_path / "owner")

    plan = trio.run(scenario)
    assert isinstance(plan, JobPlan), plan
    assert [p.peer_id for p in plan.placements] == [honest.peer_id]
    assert assigned == []  # neither liar was even tried
    assert "capacity of" in validator.output and "wrong_answer" in validator.output
    for node in (validator, honest):
        assert node.stop() < 2.0
        assert "Traceback" not in node.output, node.output[-5000:]
