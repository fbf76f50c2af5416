"""Gas per contract operation: bonding, jobs, settlement by signer and worker count, claims, sweeping
unclaimed rewards, slashing.

    python benchmarks/gas.py                 # table, in-process py-evm chain
    python benchmarks/gas.py --json          # one JSON object: {"backend", "rows": [{"op", "gas", ...}]}
    python benchmarks/gas.py --rpc URL       # the same against a dev node (anvil), dev-mnemonic accounts

Gas is deterministic for a given contract build and EVM fork, so one run per operation suffices (the
numbers differ by a few dozen gas between py-evm and anvil). Every worker paid is a fresh address, the
expensive case: its balance slot goes from zero to non-zero. Settle rows show the whole transaction
divided by signers and by workers, and a marginal cost per extra signer from the 3/5/7 rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
from typing import Any

from eth_account import Account
from rich.console import Console
from rich.table import Table

from tensorlink.chain import (
    SNO,
    Backend,
    Chain,
    DeployParams,
    EmbeddedBackend,
    RewardTree,
    RpcBackend,
    Settle,
    Slash,
    reward_leaves,
)
from tensorlink.chain.eip712 import ZERO32

DIRECT_WORKERS = 4
MERKLE_WORKERS = 32
SIGNER_COUNTS = (3, 5, 7)


def _fresh_addresses(n: int) -> list[str]:
    return [Account.from_key(secrets.token_bytes(32)).address for _ in range(n)]


def _world(backend: Backend, validators: int) -> tuple[Chain, list[Any]]:
    """Deploy with every validator needed for quorum (quorum_bps 10000: all `validators` must sign)."""
    chain = Chain(backend)
    a = backend.accounts
    chain.deploy(a[0], DeployParams(quorum_bps=10_000))
    for v in a[1 : 1 + validators]:
        chain.transfer(a[0], v.address, 2_000 * SNO)
        chain.stake_with_permit(v, 2_000 * SNO)
        chain.join_validators(v)
    chain.transfer(a[0], a[8].address, 1_000_000 * SNO)  # the job owner
    return chain, [v.key for v in a[1 : 1 + validators]]


def _direct_settle(backend: Backend, chain: Chain, keys: list[bytes], workers: int) -> int:
    owner = backend.accounts[8]
    job = int(chain.open_job(owner, 100 * SNO).result or 0)
    addrs = _fresh_addresses(workers)
    msg = Settle(
        job, chain.epoch(), backend.now() + 3600, b"\x01" * 32, 90 * SNO,
        addrs, list(range(1, workers + 1)), [1] * workers, ZERO32, workers * (workers + 1) // 2,
    )  # fmt: skip
    return chain.settle(owner, msg, chain.sign_settle(keys, msg)).gas_used


def _merkle_settle(backend: Backend, chain: Chain, keys: list[bytes], workers: int) -> tuple[int, RewardTree, int]:
    """Open and settle a Merkle-mode job for `workers` fresh addresses: (job id, reward tree, settle gas)."""
    owner = backend.accounts[8]
    job = int(chain.open_job(owner, 100 * SNO).result or 0)
    addrs = _fresh_addresses(workers)
    work = [i % 7 + 1 for i in range(workers)]
    per_work = int(chain.settlement.functions.rewardPerWork().call())
    tree = RewardTree(reward_leaves(job, addrs, work, [1] * workers, per_work, 90 * SNO))
    msg = Settle(job, chain.epoch(), backend.now() + 3600, b"\x01" * 32, 90 * SNO, (), (), (), tree.root, sum(work))
    return job, tree, chain.settle(owner, msg, chain.sign_settle(keys, msg)).gas_used


def measure(make_backend: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(op: str, gas: int, signers: int = 0, workers: int = 0, note: str = "") -> None:
        rows.append({"op": op, "gas": gas, "signers": signers, "workers": workers, "note": note})

    # Bonding and jobs, on a 3-validator world.
    backend = make_backend()
    chain, keys = _world(backend, 3)
    a = backend.accounts
    staker, permit_staker, owner = a[9], a[5], a[8]
    chain.transfer(a[0], staker.address, 10_000 * SNO)
    chain.transfer(a[0], permit_staker.address, 10_000 * SNO)
    row("approve (SNO)", chain.approve(staker, chain.staking.address, 2_000 * SNO).gas_used)
    row("stake (after approve)", chain.stake(staker, 2_000 * SNO).gas_used, note="first bond")
    row("stake_with_permit", chain.stake_with_permit(permit_staker, 2_000 * SNO).gas_used, note="first bond")
    row("join_validators", chain.join_validators(staker).gas_used)
    row("leave_validators", chain.leave_validators(staker).gas_used)
    chain.approve(owner, chain.settlement.address, 100 * SNO)
    row("open_job (after approve)", chain.open_job(owner, 100 * SNO, permit=False).gas_used)
    row("open_job with permit", chain.open_job(owner, 100 * SNO).gas_used)

    # Settlement by signer count (direct mode, fresh workers).
    for signers in SIGNER_COUNTS:
        if signers != 3:
            backend = make_backend()
            chain, keys = _world(backend, signers)
        gas = _direct_settle(backend, chain, keys, DIRECT_WORKERS)
        row(f"settle direct, {signers} signers × {DIRECT_WORKERS} workers", gas, signers, DIRECT_WORKERS)
    backend = make_backend()
    chain, keys = _world(backend, 3)
    gas = _direct_settle(backend, chain, keys, 8)
    row("settle direct, 3 signers × 8 workers", gas, 3, 8, note="MAX_DIRECT_WORKERS")

    # Merkle mode: one root for 32 workers, then each claims.
    owner = backend.accounts[8]
    _, tree, gas = _merkle_settle(backend, chain, keys, MERKLE_WORKERS)
    row(f"settle Merkle, 3 signers × {MERKLE_WORKERS} workers", gas, 3, MERKLE_WORKERS, note="claims extra")
    claims = [chain.claim(owner, leaf, tree.proof(leaf.worker)).gas_used for leaf in tree.leaves]
    row("claim (mean of 32)", sum(claims) // len(claims), note=f"min {min(claims):,}, max {max(claims):,}")
    row(f"settle Merkle + all {MERKLE_WORKERS} claims", gas + sum(claims), 0, MERKLE_WORKERS, note="total")

    # Sweep: two Merkle jobs nobody claims from; once their window closed, one remainder is burnt (zero
    # treasury), the other goes to a treasury address that held no SNO before.
    burnt, _, _ = _merkle_settle(backend, chain, keys, MERKLE_WORKERS)
    kept, _, _ = _merkle_settle(backend, chain, keys, MERKLE_WORKERS)
    backend.advance_time(int(chain.settlement.functions.claimWindow().call()) + 1)
    row("sweep_unclaimed (to burn)", chain.sweep_unclaimed(owner, burnt).gas_used, note="treasury zero")
    chain.transact(backend.accounts[0], chain.settlement.functions.setTreasury(_fresh_addresses(1)[0]))
    row("sweep_unclaimed (to treasury)", chain.sweep_unclaimed(owner, kept).gas_used, note="fresh treasury")

    # Slash: four validators, three sign against the fourth.
    backend = make_backend()
    chain, _ = _world(backend, 4)
    a = backend.accounts
    chain.transact(a[0], chain.staking.functions.setQuorumBps(7_500))  # 3 of 4
    offender = a[4].address
    keys = [v.key for v in a[1:4]]
    slash = Slash(offender, 500 * SNO, b"\xee" * 32, 1, chain.epoch(), backend.now() + 3600, -5)
    row("slash (3 signers, to burn)", chain.slash(a[8], slash, chain.sign_slash(keys, slash)).gas_used, 3)
    return rows


def report(rows: list[dict[str, Any]], backend_name: str) -> dict[str, Any]:
    settle = {r["signers"]: r["gas"] for r in rows if r["op"].startswith("settle direct") and r["workers"] == 4}
    marginal = (settle[7] - settle[3]) // 4 if 3 in settle and 7 in settle else None
    return {
        "backend": backend_name,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "rows": rows,
        "marginal_gas_per_signer": marginal,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Gas per operation ({result['backend']})")
    table.add_column("operation")
    table.add_column("gas", justify="right")
    table.add_column("gas/signer", justify="right")
    table.add_column("gas/worker", justify="right")
    table.add_column("note")
    for r in result["rows"]:
        per_signer = f"{r['gas'] // r['signers']:,}" if r["signers"] and r["op"].startswith("settle") else ""
        per_worker = f"{r['gas'] // r['workers']:,}" if r["workers"] else ""
        table.add_row(r["op"], f"{r['gas']:,}", per_signer, per_worker, r["note"])
    console.print(table)
    if result["marginal_gas_per_signer"] is not None:
        console.print(f"marginal gas per extra signer (3 → 7 signers): {result['marginal_gas_per_signer']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--rpc", metavar="URL", help="a dev node (anvil) instead of the in-process chain")
    args = parser.parse_args()
    if args.rpc:
        # One node for every world: each deploys fresh contracts, so earlier worlds do not interfere.
        node = RpcBackend(args.rpc)
        result = report(measure(lambda: node), f"JSON-RPC {args.rpc} (chain {node.chain_id})")
    else:
        result = report(measure(EmbeddedBackend), "py-evm (eth-tester), in process")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, Console())


if __name__ == "__main__":
    main()
