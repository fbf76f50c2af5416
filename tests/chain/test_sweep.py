"""Merkle-mode claim window and sweepUnclaimed: claims close at the claimClosesAt fixed at settle, after which what
the claims left goes to the treasury (or is burnt) exactly once."""

from __future__ import annotations

import pytest
from chain_world import REWARD_PER_WORK, World, make_reentrant_world, make_world, random_accounts

from tensorlink.chain import SNO, ZERO_ADDRESS, DeployParams, RewardTree, errors, reward_leaves

DAY = 86_400
WINDOW = 30 * DAY  # DeployParams' default


def _merkle_job(
    world: World, n_workers: int = 4, escrow: int = 20 * SNO, payout: int = 10 * SNO
) -> tuple[int, RewardTree, int]:
    """A settled Merkle-mode job; returns (job id, tree, settle block timestamp)."""
    c = world.chain
    job = world.open_job(escrow)
    workers = [a.address for a in random_accounts(n_workers)]
    work = [i + 1 for i in range(n_workers)]
    tree = RewardTree(reward_leaves(job, workers, work, [1] * n_workers, REWARD_PER_WORK, payout))
    msg = world.settle_msg(job, [], [], [], payout=payout, reward_root=tree.root, total_work=sum(work))
    rc = c.settle(world.outsider, msg, c.sign_settle(world.keys, msg))
    return job, tree, int(world.backend.w3.eth.get_block(rc.block_number)["timestamp"])


def _next_block_at(world: World, timestamp: int) -> None:
    """Mine so that the next transaction's block has `timestamp` (each block after a time jump is +1 s)."""
    world.backend.advance_time(timestamp - 1 - world.backend.now())
    assert world.backend.now() == timestamp - 1


def _set_treasury(world: World, treasury: str) -> None:
    world.chain.transact(world.admin, world.chain.settlement.functions.setTreasury(treasury))


def test_job_view_records_settlement_and_window(world: World) -> None:
    c = world.chain
    assert c.claim_window() == WINDOW == world.params.claim_window
    job, tree, settled_at = _merkle_job(world)
    view = c.job(job)
    assert (view.claim_closes_at, view.reward_left) == (settled_at + WINDOW, tree.total)
    direct = world.open_job()
    msg = world.settle_msg(direct)
    c.settle(world.owner, msg, c.sign_settle(world.keys, msg))
    assert c.job(direct).claim_closes_at == 0  # only Merkle mode records it


def test_claims_close_exactly_at_the_window_end_and_sweep_opens_one_second_later(world: World) -> None:
    c = world.chain
    job, tree, settled_at = _merkle_job(world)
    closes = settled_at + WINDOW
    first, second, third, _ = tree.leaves
    c.claim(world.outsider, first, tree.proof(first.worker))  # early in the window

    _next_block_at(world, closes)  # the last second of the window
    with pytest.raises(errors.ClaimWindowOpen) as info:
        c.sweep_unclaimed(world.outsider, job)
    assert info.value.args == (job, closes)
    rc = c.claim(world.outsider, second, tree.proof(second.worker))
    assert world.backend.w3.eth.get_block(rc.block_number)["timestamp"] == closes
    assert c.balance(second.worker) == second.amount

    # closes + 1: claims refused, the sweep works.
    with pytest.raises(errors.ClaimWindowClosed) as closed:
        c.claim(world.outsider, third, tree.proof(third.worker))
    assert closed.value.args == (job, closes)
    assert c.balance(third.worker) == 0
    rc = c.sweep_unclaimed(world.outsider, job)
    assert world.backend.w3.eth.get_block(rc.block_number)["timestamp"] == closes + 1
    assert rc.result == tree.total - first.amount - second.amount


def test_sweep_sends_exactly_the_unclaimed_remainder_to_the_treasury(world: World) -> None:
    c = world.chain
    treasury = random_accounts(1)[0].address
    _set_treasury(world, treasury)
    job, tree, settled_at = _merkle_job(world, n_workers=5)
    other, other_tree, _ = _merkle_job(world, n_workers=3)  # a second job's funds must stay put
    claimed = tree.leaves[:2]
    for leaf in claimed:
        c.claim(world.outsider, leaf, tree.proof(leaf.worker))
    remainder = tree.total - sum(leaf.amount for leaf in claimed)
    assert c.job(job).reward_left == remainder
    held = c.balance(c.settlement.address)
    supply = c.token.functions.totalSupply().call()

    _next_block_at(world, settled_at + WINDOW + 1)
    rc = c.sweep_unclaimed(world.outsider, job)  # anyone may sweep
    assert rc.result == remainder
    assert rc.event("UnclaimedSwept").args == {"jobId": job, "amount": remainder, "recipient": treasury}
    assert c.balance(treasury) == remainder
    assert c.balance(c.settlement.address) == held - remainder == other_tree.total
    assert c.token.functions.totalSupply().call() == supply  # moved, not burnt
    view = c.job(job)
    assert view.reward_left == 0 and view.claim_closes_at == settled_at + WINDOW  # the window stays closed
    assert c.job(other).reward_left == other_tree.total

    with pytest.raises(errors.NothingToSweep) as info:
        c.sweep_unclaimed(world.outsider, job)
    assert info.value.args == (job,)
    late = tree.leaves[2]
    with pytest.raises(errors.ClaimWindowClosed):
        c.claim(world.outsider, late, tree.proof(late.worker))


def test_sweep_burns_when_the_treasury_is_zero(world: World) -> None:
    c = world.chain
    assert c.settlement.functions.treasury().call() == ZERO_ADDRESS
    job, tree, settled_at = _merkle_job(world)
    c.claim(world.outsider, tree.leaves[0], tree.proof(tree.leaves[0].worker))
    remainder = tree.total - tree.leaves[0].amount
    supply = c.token.functions.totalSupply().call()
    held = c.balance(c.settlement.address)

    _next_block_at(world, settled_at + WINDOW + 1)
    rc = c.sweep_unclaimed(world.owner, job)
    assert rc.event("UnclaimedSwept").args == {"jobId": job, "amount": remainder, "recipient": ZERO_ADDRESS}
    assert c.token.functions.totalSupply().call() == supply - remainder
    assert c.balance(c.settlement.address) == held - remainder == 0
    with pytest.raises(errors.NothingToSweep):
        c.sweep_unclaimed(world.owner, job)


def test_fully_claimed_job_has_nothing_to_sweep(world: World) -> None:
    c = world.chain
    job, tree, settled_at = _merkle_job(world, n_workers=2)
    for leaf in tree.leaves:
        c.claim(world.outsider, leaf, tree.proof(leaf.worker))
    _next_block_at(world, settled_at + WINDOW + 1)
    with pytest.raises(errors.NothingToSweep):
        c.sweep_unclaimed(world.outsider, job)


def test_sweep_needs_a_merkle_settled_job(world: World) -> None:
    c = world.chain
    direct = world.open_job()
    msg = world.settle_msg(direct)
    c.settle(world.owner, msg, c.sign_settle(world.keys, msg))
    still_open = world.open_job()
    world.backend.advance_time(WINDOW + DAY)
    for job in (direct, still_open, 999):
        with pytest.raises(errors.NotMerkleSettled) as info:
            c.sweep_unclaimed(world.outsider, job)
        assert info.value.args == (job,)


def test_window_change_applies_to_later_settlements_only(world: World) -> None:
    """Each job's window is fixed when it settles: the admin can neither shorten a settled job's window
    (and sweep its rewards early) nor reopen one; the new window applies from the next settlement."""
    c = world.chain
    job, tree, settled_at = _merkle_job(world)
    rc = c.transact(world.admin, c.settlement.functions.setClaimWindow(8 * DAY))  # much shorter
    assert rc.event("ClaimWindowSet").args == {"oldValue": WINDOW, "newValue": 8 * DAY}
    assert c.job(job).claim_closes_at == settled_at + WINDOW  # unchanged
    later, _, later_settled_at = _merkle_job(world)
    assert c.job(later).claim_closes_at == later_settled_at + 8 * DAY
    _next_block_at(world, settled_at + 9 * DAY)  # past the new window, inside the old one
    with pytest.raises(errors.ClaimWindowOpen):
        c.sweep_unclaimed(world.outsider, job)
    leaf = tree.leaves[0]
    c.claim(world.outsider, leaf, tree.proof(leaf.worker))
    assert c.balance(leaf.worker) == leaf.amount
    c.sweep_unclaimed(world.outsider, later)  # the later job's shorter window has closed


def test_claim_window_bounds_and_admin_only(world: World) -> None:
    c = world.chain
    set_window = c.settlement.functions.setClaimWindow
    with pytest.raises(errors.AccessControlUnauthorizedAccount):
        c.transact(world.outsider, set_window(10 * DAY))
    for bad in (0, 7 * DAY - 1, 730 * DAY + 1, 2**64 - 1):
        with pytest.raises(errors.BadClaimWindow) as info:
            c.transact(world.admin, set_window(bad))
        assert info.value.args == (bad,)
    for good in (7 * DAY, 730 * DAY):
        c.transact(world.admin, set_window(good))
        assert c.claim_window() == good
    assert c.settlement.functions.MIN_CLAIM_WINDOW().call() == 7 * DAY
    assert c.settlement.functions.MAX_CLAIM_WINDOW().call() == 730 * DAY


def test_deploy_checks_claim_window() -> None:
    with pytest.raises(errors.BadClaimWindow) as info:
        make_world(DeployParams(claim_window=DAY))
    assert info.value.args == (DAY,)


def test_reward_left_above_uint192_reverts_instead_of_truncating() -> None:
    """Only an absurd supply can push rewardLeft past 2**192; settle then refuses (see Settlement.Job)."""
    huge = 2**193
    world = make_world(
        DeployParams(genesis_supply=4 * huge, min_stake=1_000 * SNO, quorum_bps=6_667, reward_per_work=REWARD_PER_WORK)
    )
    world.fund(world.owner, huge)
    job = world.open_job(huge)
    tree = RewardTree(reward_leaves(job, [random_accounts(1)[0].address], [1], [0], REWARD_PER_WORK, huge))
    msg = world.settle_msg(job, [], [], [], payout=huge, reward_root=tree.root, total_work=1)
    with pytest.raises(errors.SafeCastOverflowedUintDowncast) as info:
        world.chain.settle(world.owner, msg, world.chain.sign_settle(world.keys, msg))
    assert info.value.args == (192, huge + REWARD_PER_WORK)
    assert world.chain.job(job).status == "open"


def test_sweep_cannot_be_reentered() -> None:
    """The sweep's transfer to the treasury re-enters claim (test token): the guard refuses it and the
    failed sweep leaves rewardLeft untouched."""
    world, token, job = make_reentrant_world()
    c = world.chain
    workers = [a.address for a in random_accounts(2)]
    tree = RewardTree(reward_leaves(job, workers, [1, 1], [0, 0], REWARD_PER_WORK, 50 * SNO))
    msg = world.settle_msg(job, [], [], [], payout=50 * SNO, reward_root=tree.root, total_work=2)
    c.settle(world.owner, msg, c.sign_settle(world.keys, msg))
    treasury = random_accounts(1)[0].address
    _set_treasury(world, treasury)
    world.backend.advance_time(WINDOW + 1)

    leaf = tree.leaves[0]
    c.transact(
        world.admin,
        token.functions.arm(c.settlement.address, job, leaf.worker, leaf.amount, 0, tree.proof(leaf.worker)),
    )
    with pytest.raises(errors.ReentrancyGuardReentrantCall):
        c.sweep_unclaimed(world.outsider, job)
    assert c.job(job).reward_left == tree.total and c.balance(treasury) == 0
