"""Settlement: quorum signatures, replay guards, direct and Merkle payouts, reclaim, reentrancy."""

from __future__ import annotations

import pytest
from chain_world import REWARD_PER_WORK, World, make_reentrant_world, make_world, random_accounts

from tensorlink.chain import SNO, ZERO_ADDRESS, DeployParams, Leaf, RewardTree, errors, reward_leaves
from tensorlink.chain.eip712 import ZERO32, Settle

# ---------------------------------------------------------------- signature rules


def test_direct_settlement_pays_in_proportion_and_refunds_exactly(world: World) -> None:
    c, owner = world.chain, world.owner
    escrow, payout = 100 * SNO, 70 * SNO + 1  # not divisible by total work: dust goes back to the owner
    before_owner = c.balance(owner.address)
    job = world.open_job(escrow)
    assert c.balance(owner.address) == before_owner - escrow
    workers = [w.address for w in world.workers[:3]]
    work, rep = [1, 2, 4], [5, -3, 0]
    msg = world.settle_msg(job, workers, work, rep, payout=payout)
    rc = c.settle(world.outsider, msg, c.sign_settle(world.keys, msg))  # anyone may submit

    shares = [payout * w // 7 for w in work]
    for addr, w, share in zip(workers, work, shares, strict=True):
        assert c.balance(addr) == REWARD_PER_WORK * w + share
    assert c.balance(owner.address) == before_owner - sum(shares)  # escrow - paid, dust included
    assert c.balance(c.settlement.address) == 0
    assert [c.reputation(a) for a in workers] == rep
    assert c.job(job).status == "settled" and c.job(job).proof_root == msg.proof_root
    settled = rc.event("JobSettled").args
    assert settled["minted"] == REWARD_PER_WORK * 7 and settled["payout"] == payout
    paid = rc.named("WorkerPaid")
    assert [(e.args["worker"], e.args["amount"], e.args["repDelta"]) for e in paid] == [
        (a, REWARD_PER_WORK * w + s, r) for a, w, s, r in zip(workers, work, shares, rep, strict=True)
    ]
    assert [e.args["account"] for e in rc.named("ReputationChanged")] == workers[:2]  # zero delta: no event


def test_too_few_signatures(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    with pytest.raises(errors.NotEnoughSignatures) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys[:2], msg))
    assert info.value.args == (2, 3)


def test_duplicate_signer(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle(world.keys, msg)
    with pytest.raises(errors.SignersNotAscending) as info:
        world.chain.settle(world.owner, msg, [sigs[0], sigs[1], sigs[1]])
    assert info.value.args == (2,)


def test_unsorted_signers(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle(world.keys, msg)
    with pytest.raises(errors.SignersNotAscending) as info:
        world.chain.settle(world.owner, msg, [sigs[1], sigs[0], sigs[2]])
    assert info.value.args == (1,)


def test_signer_not_a_validator(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle([*world.keys[:2], world.outsider.key], msg)
    with pytest.raises(errors.NotValidatorSigner) as info:
        world.chain.settle(world.owner, msg, sigs)
    assert info.value.args == (world.outsider.address,)


def test_staked_but_not_joined_signer_is_refused(world: World) -> None:
    c = world.chain
    world.fund(world.outsider, 5_000 * SNO)
    c.stake_with_permit(world.outsider, 5_000 * SNO)  # bonded, never joined
    job = world.open_job()
    msg = world.settle_msg(job)
    with pytest.raises(errors.NotValidatorSigner):
        c.settle(world.owner, msg, c.sign_settle([*world.keys[:2], world.outsider.key], msg))


def test_replayed_settlement(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle(world.keys, msg)
    world.chain.settle(world.owner, msg, sigs)
    balance = world.chain.balance(world.workers[0].address)
    with pytest.raises(errors.JobNotOpen) as info:
        world.chain.settle(world.outsider, msg, sigs)
    assert info.value.args == (job, 2)
    assert world.chain.balance(world.workers[0].address) == balance


def test_expired_deadline(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job, deadline=world.backend.now() + 60)
    sigs = world.chain.sign_settle(world.keys, msg)
    world.backend.advance_time(120)
    with pytest.raises(errors.Expired) as info:
        world.chain.settle(world.owner, msg, sigs)
    assert info.value.args == (msg.deadline,)


def test_stale_epoch_after_a_validator_joins(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle(world.keys, msg)
    world.add_validator(world.outsider)  # the set changed after signing
    with pytest.raises(errors.StaleEpoch) as info:
        world.chain.settle(world.owner, msg, sigs)
    assert info.value.args == (msg.epoch, msg.epoch + 1)


def test_concurrent_jobs_do_not_invalidate_each_other(world: World) -> None:
    c = world.chain
    first, second = world.open_job(), world.open_job()
    m1, m2 = world.settle_msg(first), world.settle_msg(second)
    s1, s2 = c.sign_settle(world.keys, m1), c.sign_settle(world.keys, m2)
    c.settle(world.owner, m2, s2)
    c.settle(world.owner, m1, s1)  # no global nonce: the first job's signatures still hold
    assert c.job(first).status == c.job(second).status == "settled"


def test_payout_above_escrow(world: World) -> None:
    job = world.open_job(10 * SNO)
    msg = world.settle_msg(job, payout=10 * SNO + 1)
    with pytest.raises(errors.PayoutExceedsEscrow) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))
    assert info.value.args == (10 * SNO + 1, 10 * SNO)


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def test_malleated_high_s_signature_is_refused(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job)
    sigs = world.chain.sign_settle(world.keys, msg)
    r, s, v = sigs[0][:32], int.from_bytes(sigs[0][32:64], "big"), sigs[0][64]
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # same signer, other s (27 <-> 28)
    with pytest.raises(errors.ECDSAInvalidSignatureS):
        world.chain.settle(world.owner, msg, [twin, *sigs[1:]])


def test_signature_for_another_message_is_refused(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job, payout=SNO)
    greedy = world.settle_msg(job, payout=50 * SNO)
    with pytest.raises(errors.NotValidatorSigner):  # recovers some unrelated address
        world.chain.settle(world.owner, greedy, world.chain.sign_settle(world.keys, msg))


# ---------------------------------------------------------------- direct-mode input rules


def test_zero_worker_address(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job, [world.workers[0].address, ZERO_ADDRESS])
    with pytest.raises(errors.ZeroAddress):
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))


def test_work_overflow_reverts_instead_of_wrapping(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job, [world.workers[0].address], [2**256 - 1], [0])
    with pytest.raises(errors.Panic) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))
    assert info.value.args == (0x11,)  # arithmetic overflow
    assert world.chain.balance(world.workers[0].address) == 0


def test_work_sum_overflow_reverts(world: World) -> None:
    job = world.open_job()
    big = 2**255
    msg = world.settle_msg(job, [w.address for w in world.workers[:2]], [big, big], [0, 0], total_work=1)
    with pytest.raises(errors.Panic):
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))


def test_total_work_must_match(world: World) -> None:
    job = world.open_job()
    msg = world.settle_msg(job, work=[1, 2], total_work=4)
    with pytest.raises(errors.TotalWorkMismatch) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))
    assert info.value.args == (4, 3)


def test_too_many_direct_workers(world: World) -> None:
    job = world.open_job()
    workers = [a.address for a in random_accounts(9)]
    msg = world.settle_msg(job, workers)
    with pytest.raises(errors.BadWorkerCount) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))
    assert info.value.args == (9, 8)


def test_length_mismatch_reaches_the_contract_only_by_bypassing_python(world: World) -> None:
    c = world.chain
    job = world.open_job()
    msg = world.settle_msg(job)
    with pytest.raises(ValueError, match="equal lengths"):
        Settle(**{**{f: getattr(msg, f) for f in msg.__struct_fields__}, "work": (1,)})
    # The contract's own check, reached with a raw call (its digest covers the short array too).
    raw = list(msg.as_tuple())
    raw[6] = [2]
    raw[9] = 2
    digest = bytes(c.settlement.functions.settleDigest(tuple(raw)).call())
    from eth_account import Account

    sigs = sorted(
        ((v.address, bytes(Account.unsafe_sign_hash(digest, v.key).signature)) for v in world.validators),
        key=lambda p: int(p[0], 16),
    )
    with pytest.raises(errors.LengthMismatch):
        c.transact(world.owner, c.settlement.functions.settle(tuple(raw), [s for _, s in sigs]))


def test_bad_input_fails_in_python_before_any_transaction(world: World) -> None:
    c, owner = world.chain, world.owner
    nonce = world.backend.w3.eth.get_transaction_count(owner.address)
    job = world.open_job()
    nonce += 1
    with pytest.raises(ValueError, match="checksummed"):
        world.settle_msg(job, [world.workers[0].address.lower()])
    with pytest.raises(ValueError, match="payout"):
        world.settle_msg(job, payout=-1)
    with pytest.raises(ValueError, match="work"):
        world.settle_msg(job, work=[-1, 2])
    with pytest.raises(ValueError, match="reputation"):
        world.settle_msg(job, reputation=[2**255, 0])
    with pytest.raises(ValueError, match="32 bytes"):
        Settle(job, 0, 0, b"short", 0, (), (), (), ZERO32, 0)
    with pytest.raises(ValueError, match="Merkle mode"):
        world.settle_msg(job, reward_root=b"\x01" * 32)
    with pytest.raises(ValueError, match="escrow"):
        c.open_job(owner, -5)
    with pytest.raises(ValueError, match="65 bytes"):
        c.settle(owner, world.settle_msg(job), [b"\x00" * 64])
    with pytest.raises(ValueError, match="checksummed"):
        c.transfer(owner, world.outsider.address.lower(), 1)
    assert world.backend.w3.eth.get_transaction_count(owner.address) == nonce


# ---------------------------------------------------------------- jobs: permit, approve, reclaim


def test_open_job_with_permit_and_with_approve(world: World) -> None:
    c, owner = world.chain, world.owner
    rc = c.open_job(owner, 5 * SNO)  # permit: one transaction, no approve
    first = rc.result
    assert rc.event("JobOpened").args == {"jobId": first, "owner": owner.address, "escrow": 5 * SNO}
    c.approve(owner, c.settlement.address, 7 * SNO)
    second = c.open_job(owner, 7 * SNO, permit=False).result
    assert first is not None and second == first + 1
    job = c.job(second)
    assert (job.owner, job.escrow, job.status) == (owner.address, 7 * SNO, "open")
    assert c.balance(c.settlement.address) == 12 * SNO
    with pytest.raises(errors.ERC20InsufficientAllowance):
        c.open_job(owner, SNO, permit=False)  # the approve was used up


def test_reclaim_after_timeout_then_settle_is_refused(world: World) -> None:
    c, owner = world.chain, world.owner
    before = c.balance(owner.address)
    job = world.open_job(30 * SNO)
    msg = world.settle_msg(job, deadline=world.backend.now() + 10 * 86_400)
    sigs = c.sign_settle(world.keys, msg)
    with pytest.raises(errors.JobNotExpired):
        c.reclaim(owner, job)
    world.backend.advance_time(world.params.job_timeout)
    with pytest.raises(errors.NotJobOwner):
        c.reclaim(world.outsider, job)
    rc = c.reclaim(owner, job)
    assert rc.event("JobReclaimed").args["escrow"] == 30 * SNO
    assert c.balance(owner.address) == before
    assert c.job(job).status == "reclaimed"
    with pytest.raises(errors.JobNotOpen) as info:
        c.settle(owner, msg, sigs)
    assert info.value.args == (job, 3)
    with pytest.raises(errors.JobNotOpen):
        c.reclaim(owner, job)


# ---------------------------------------------------------------- Merkle mode and claims


def _merkle_job(world: World, n_workers: int, escrow: int, payout: int) -> tuple[int, RewardTree, list[int]]:
    c = world.chain
    job = world.open_job(escrow)
    workers = [a.address for a in random_accounts(n_workers)]
    work = [(i * 7919) % 97 + 1 for i in range(n_workers)]
    rep = [(i % 5) - 2 for i in range(n_workers)]
    tree = RewardTree(reward_leaves(job, workers, work, rep, REWARD_PER_WORK, payout))
    msg = world.settle_msg(job, [], [], [], payout=payout, reward_root=tree.root, total_work=sum(work))
    c.settle(world.outsider, msg, c.sign_settle(world.keys, msg))
    return job, tree, work


def test_merkle_mode_32_workers_all_claim_and_totals_add_up(world: World) -> None:
    c, owner = world.chain, world.owner
    escrow, payout = 500 * SNO, 333 * SNO + 17
    before_owner = c.balance(owner.address)
    job, tree, work = _merkle_job(world, 32, escrow, payout)
    assert c.balance(owner.address) == before_owner - payout  # escrow - payout refunded at settle
    left = c.job(job).reward_left
    assert left == REWARD_PER_WORK * sum(work) + payout == tree.total
    for leaf in tree.leaves:
        rc = c.claim(world.outsider, leaf, tree.proof(leaf.worker))
        assert rc.event("WorkerPaid").args["amount"] == leaf.amount
    assert sum(c.balance(leaf.worker) for leaf in tree.leaves) == tree.total
    assert all(c.balance(leaf.worker) == leaf.amount for leaf in tree.leaves)
    assert all(c.reputation(leaf.worker) == leaf.rep_delta for leaf in tree.leaves)
    assert c.job(job).reward_left == 0
    assert c.balance(c.settlement.address) == 0


def test_claim_twice(world: World) -> None:
    job, tree, _ = _merkle_job(world, 4, 10 * SNO, 5 * SNO)
    leaf = tree.leaves[0]
    world.chain.claim(world.outsider, leaf, tree.proof(leaf.worker))
    with pytest.raises(errors.AlreadyClaimed) as info:
        world.chain.claim(world.outsider, leaf, tree.proof(leaf.worker))
    assert info.value.args == (job, leaf.worker)
    assert world.chain.balance(leaf.worker) == leaf.amount


def test_proof_pays_only_the_named_worker(world: World) -> None:
    c = world.chain
    job, tree, _ = _merkle_job(world, 5, 10 * SNO, 5 * SNO)
    leaf = tree.leaves[2]
    thief = world.outsider
    thief_before = c.balance(thief.address)
    c.claim(thief, leaf, tree.proof(leaf.worker))  # submitting someone else's proof pays them, not us
    assert c.balance(leaf.worker) == leaf.amount
    assert c.balance(thief.address) == thief_before
    other = tree.leaves[3]
    with pytest.raises(errors.InvalidProof):  # a valid proof, relabelled for another worker
        c.claim(thief, Leaf(job, thief.address, leaf.amount, leaf.rep_delta), tree.proof(leaf.worker))
    with pytest.raises(errors.InvalidProof):  # a changed amount
        c.claim(thief, Leaf(job, other.worker, other.amount + 1, other.rep_delta), tree.proof(other.worker))
    with pytest.raises(errors.InvalidProof):  # a changed reputation
        c.claim(thief, Leaf(job, other.worker, other.amount, 100), tree.proof(other.worker))
    assert c.balance(other.worker) == 0


def test_claim_on_a_direct_job_is_refused(world: World) -> None:
    c = world.chain
    job = world.open_job()
    msg = world.settle_msg(job)
    c.settle(world.owner, msg, c.sign_settle(world.keys, msg))
    with pytest.raises(errors.InvalidProof):
        c.claim(world.outsider, Leaf(job, world.workers[0].address, 1, 0), [])


def test_merkle_mode_rejects_worker_lists(world: World) -> None:
    c = world.chain
    job = world.open_job()
    raw = list(world.settle_msg(job, [], [], []).as_tuple())
    raw[5], raw[6], raw[7], raw[8], raw[9] = [world.workers[0].address], [1], [0], b"\x01" * 32, 1
    digest = bytes(c.settlement.functions.settleDigest(tuple(raw)).call())
    from eth_account import Account

    sigs = sorted(
        ((v.address, bytes(Account.unsafe_sign_hash(digest, v.key).signature)) for v in world.validators),
        key=lambda p: int(p[0], 16),
    )
    with pytest.raises(errors.LengthMismatch):
        c.transact(world.owner, c.settlement.functions.settle(tuple(raw), [s for _, s in sigs]))


def test_reentrant_claim_fails_and_pays_nothing_twice() -> None:
    world, token, job = make_reentrant_world()
    c = world.chain
    workers = [w.address for w in world.workers[:2]]
    tree = RewardTree(reward_leaves(job, workers, [1, 1], [0, 0], REWARD_PER_WORK, 50 * SNO))
    msg = world.settle_msg(job, [], [], [], payout=50 * SNO, reward_root=tree.root, total_work=2)
    c.settle(world.owner, msg, c.sign_settle(world.keys, msg))

    first, second = tree.leaves
    # Armed: the token's transfer (inside claim) re-enters claim for the same leaf.
    c.transact(
        world.admin,
        token.functions.arm(c.settlement.address, job, first.worker, first.amount, 0, tree.proof(first.worker)),
    )
    with pytest.raises(errors.ReentrancyGuardReentrantCall):
        c.claim(world.outsider, first, tree.proof(first.worker))
    assert c.balance(first.worker) == 0
    assert token.functions.reentries().call() == 0
    assert c.job(job).reward_left == tree.total
    # The failed attempt left nothing behind: a plain claim pays once, a second one is refused.
    c.transact(
        world.admin,
        token.functions.arm(c.settlement.address, job, second.worker, second.amount, 0, tree.proof(second.worker)),
    )
    with pytest.raises(errors.ReentrancyGuardReentrantCall):  # re-entering for a different leaf fails too
        c.claim(world.outsider, first, tree.proof(first.worker))
    assert c.balance(second.worker) == 0


def test_only_admin_sets_parameters(world: World) -> None:
    c = world.chain
    with pytest.raises(errors.AccessControlUnauthorizedAccount):
        c.transact(world.outsider, c.settlement.functions.setRewardPerWork(1))
    with pytest.raises(errors.AccessControlUnauthorizedAccount):
        c.transact(world.outsider, c.settlement.functions.setTreasury(world.outsider.address))
    with pytest.raises(errors.BadJobTimeout):
        c.transact(world.admin, c.settlement.functions.setJobTimeout(60))
    rc = c.transact(world.admin, c.settlement.functions.setRewardPerWork(7))
    assert rc.event("RewardPerWorkSet").args == {"oldValue": REWARD_PER_WORK, "newValue": 7}


def test_deploy_checks_job_timeout() -> None:
    with pytest.raises(errors.BadJobTimeout):
        make_world(DeployParams(job_timeout=10))
