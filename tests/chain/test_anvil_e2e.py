"""The same contracts and Python API over JSON-RPC: anvil (from `make contracts`) on a free loopback port,
deploy → stake → open → settle in Merkle mode → claim → slash, then anvil is stopped by its PID."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from eth_account import Account

from tensorlink.chain import SNO, Chain, DeployParams, RewardTree, RpcBackend, Slash, eip712, errors, reward_leaves
from tensorlink.chain.eip712 import Settle

ANVIL = Path(__file__).resolve().parents[2] / "contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_anvil_end_to_end(tmp_path: Path) -> None:
    assert ANVIL.is_file(), f"anvil binary missing at {ANVIL}: run `make contracts` (npm ci in contracts/)"
    port = _free_port()
    log = (tmp_path / "anvil.log").open("wb")
    proc = subprocess.Popen(
        [str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--silent", "--chain-id", "31337"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        backend = None
        deadline = time.monotonic() + 30
        while backend is None:
            assert proc.poll() is None, f"anvil exited with {proc.returncode}: {(tmp_path / 'anvil.log').read_text()}"
            try:
                backend = RpcBackend(f"http://127.0.0.1:{port}", chain_id=31337, timeout_s=10)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with pytest.raises(ValueError, match="expected 1"):
            RpcBackend(f"http://127.0.0.1:{port}", chain_id=1)  # the wrong-network guard
        _scenario(backend)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _scenario(backend: RpcBackend) -> None:
    a = backend.accounts
    assert a[0].address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"  # the dev mnemonic's first account
    chain = Chain(backend)
    params = DeployParams(min_stake=1_000 * SNO, quorum_bps=6_667)
    chain.deploy(a[0], params)
    validators, owner, outsider = a[1:4], a[4], a[9]
    for v in validators:
        chain.transfer(a[0], v.address, 5_000 * SNO)
        chain.stake_with_permit(v, 2_000 * SNO)
        chain.join_validators(v)
    chain.transfer(a[0], outsider.address, 5_000 * SNO)
    chain.stake_with_permit(outsider, 2_000 * SNO)
    chain.join_validators(outsider)  # four validators: three can slash the fourth
    assert chain.quorum() == 3
    keys = [v.key for v in validators]

    chain.transfer(a[0], owner.address, 1_000 * SNO)
    job = chain.open_job(owner, 100 * SNO).result
    assert job is not None
    workers = [Account.create().address for _ in range(12)]
    work = list(range(1, 13))
    tree = RewardTree(reward_leaves(job, workers, work, [1] * 12, params.reward_per_work, 60 * SNO))
    msg = Settle(job, chain.epoch(), backend.now() + 3600, b"\x01" * 32, 60 * SNO, (), (), (), tree.root, sum(work))
    assert chain.settle_digest(msg) == eip712.digest(chain.domain, msg)
    with pytest.raises(errors.NotEnoughSignatures):  # anvil reports a custom error its own way
        chain.settle(owner, msg, chain.sign_settle(keys[:2], msg))
    chain.settle(owner, msg, chain.sign_settle(keys, msg))
    for leaf in tree.leaves:
        chain.claim(owner, leaf, tree.proof(leaf.worker))
    assert sum(chain.balance(w) for w in workers) == tree.total
    with pytest.raises(errors.AlreadyClaimed):
        chain.claim(owner, tree.leaves[0], tree.proof(tree.leaves[0].worker))

    slash = Slash(outsider.address, 500 * SNO, b"\xee" * 32, 1, chain.epoch(), backend.now() + 3600, -5)
    rc = chain.slash(owner, slash, chain.sign_slash(keys, slash))
    assert rc.result == 500 * SNO
    assert chain.stake_of(outsider.address).staked == 1_500 * SNO
    assert chain.reputation(outsider.address) == -5

    chain.request_unbond(validators[0], 100 * SNO)
    with pytest.raises(errors.StillUnbonding):
        chain.withdraw(validators[0])
    backend.advance_time(params.unbonding_delay)
    chain.withdraw(validators[0])
    assert chain.stake_of(validators[0].address).unbonding == 0
