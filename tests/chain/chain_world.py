"""Test worlds for tests/chain: contracts deployed, three staked validators, a job owner, workers.

Accounts (dev keys 1..10): 0 deployer/admin/genesis holder, 1-3 validators, 4 job owner, 5-8 workers,
9 an outsider with ETH but no stake."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from tensorlink.chain import SNO, Chain, DeployParams, EmbeddedBackend, Settle
from tensorlink.chain.eip712 import ZERO32

MIN_STAKE = 1_000 * SNO
VALIDATOR_STAKE = 2_000 * SNO
REWARD_PER_WORK = 10**15


@dataclass
class World:
    backend: EmbeddedBackend
    chain: Chain
    params: DeployParams
    admin: LocalAccount
    validators: list[LocalAccount]
    owner: LocalAccount
    workers: list[LocalAccount]
    outsider: LocalAccount
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def keys(self) -> list[bytes]:
        return [v.key for v in self.validators]

    def fund(self, account: LocalAccount, amount: int) -> None:
        self.chain.transfer(self.admin, account.address, amount)

    def add_validator(self, account: LocalAccount, stake: int = VALIDATOR_STAKE) -> None:
        self.fund(account, stake)
        self.chain.stake_with_permit(account, stake)
        self.chain.join_validators(account)

    def open_job(self, escrow: int = 100 * SNO) -> int:
        job_id = self.chain.open_job(self.owner, escrow).result
        assert job_id is not None
        return job_id

    def settle_msg(
        self,
        job_id: int,
        workers: Sequence[str] | None = None,
        work: Sequence[int] | None = None,
        reputation: Sequence[int] | None = None,
        payout: int = 0,
        reward_root: bytes = ZERO32,
        total_work: int | None = None,
        deadline: int | None = None,
        epoch: int | None = None,
    ) -> Settle:
        workers = list(workers) if workers is not None else [w.address for w in self.workers[:2]]
        work = list(work) if work is not None else [1] * len(workers)
        reputation = list(reputation) if reputation is not None else [1] * len(workers)
        return Settle(
            job_id=job_id,
            epoch=self.chain.epoch() if epoch is None else epoch,
            deadline=self.backend.now() + 3600 if deadline is None else deadline,
            proof_root=b"\x11" * 32,
            payout=payout,
            workers=workers,
            work=work,
            reputation=reputation,
            reward_root=reward_root,
            total_work=sum(work) if total_work is None else total_work,
        )


def make_world(params: DeployParams | None = None, validators: int = 3, token_artifact: str | None = None) -> World:
    """`token_artifact` deploys that contract as the token instead of SNOToken; nobody is staked then."""
    backend = EmbeddedBackend()
    chain = Chain(backend)
    a = backend.accounts
    params = params or DeployParams(
        min_stake=MIN_STAKE, quorum_bps=6_667, reward_per_work=REWARD_PER_WORK, admin_delay=86_400
    )
    token = None if token_artifact is None else chain.deploy_contract(a[0], token_artifact).address
    chain.deploy(a[0], params, token=token)
    world = World(backend, chain, params, a[0], list(a[1 : 1 + validators]), a[4], list(a[5:9]), a[9])
    if token is None:
        for v in world.validators:
            world.add_validator(v)
        world.fund(world.owner, 10_000 * SNO)
    return world


def make_reentrant_world(escrow: int = 100 * SNO) -> tuple[World, Any, int]:
    """A world whose token is test/ReentrantToken (its transfers call back into Settlement.claim when
    armed): three validators staked through approve (the test token has no permit) and one open job
    escrowing `escrow`. Returns (world, token contract, job id)."""
    world = make_world(token_artifact="test/ReentrantToken")
    c = world.chain
    token = c._contract("test/ReentrantToken", c.deployment.token)
    for v in world.validators:
        c.transact(world.admin, token.functions.mint(v.address, VALIDATOR_STAKE))
        c.approve(v, c.staking.address, VALIDATOR_STAKE)
        c.stake(v, VALIDATOR_STAKE)
        c.join_validators(v)
    c.transact(world.admin, token.functions.mint(world.owner.address, escrow))
    c.approve(world.owner, c.settlement.address, escrow)
    job = c.open_job(world.owner, escrow, permit=False).result
    assert job is not None
    return world, token, job


def random_accounts(n: int) -> list[LocalAccount]:
    """Fresh keys (no ETH): workers that never send a transaction themselves."""
    return [Account.from_key(secrets.token_bytes(32)) for _ in range(n)]
