"""Staking: bonds, unbonding delay and its floor, the validator set and its epoch, two-step admin."""

from __future__ import annotations

import pytest
from chain_world import MIN_STAKE, VALIDATOR_STAKE, World, make_world, random_accounts

from tensorlink.chain import SNO, DeployParams, errors

DAY = 86_400


def test_stake_with_approve_and_with_permit(world: World) -> None:
    c, acct = world.chain, world.outsider
    world.fund(acct, 10 * SNO)
    with pytest.raises(errors.ERC20InsufficientAllowance):
        c.stake(acct, 3 * SNO)  # no approve yet
    c.approve(acct, c.staking.address, 3 * SNO)
    rc = c.stake(acct, 3 * SNO)
    assert rc.event("Staked").args == {"account": acct.address, "amount": 3 * SNO, "staked": 3 * SNO}
    rc = c.stake_with_permit(acct, 4 * SNO)  # one transaction, no approve
    assert rc.event("Staked").args["staked"] == 7 * SNO
    assert c.stake_of(acct.address).staked == 7 * SNO
    assert c.balance(acct.address) == 3 * SNO


def test_stake_rejects_zero_and_negative(world: World) -> None:
    with pytest.raises(errors.ZeroAmount):
        world.chain.stake(world.owner, 0)
    with pytest.raises(ValueError, match="amount"):
        world.chain.stake(world.owner, -1)
    with pytest.raises(ValueError, match="amount"):
        world.chain.request_unbond(world.owner, 2**256)


def test_join_needs_min_stake_and_only_once(world: World) -> None:
    c, acct = world.chain, world.outsider
    world.fund(acct, MIN_STAKE)
    c.stake_with_permit(acct, MIN_STAKE - 1)
    with pytest.raises(errors.InsufficientStake) as info:
        c.join_validators(acct)
    assert info.value.args == (MIN_STAKE - 1, MIN_STAKE)
    c.stake_with_permit(acct, 1)
    epoch = c.epoch()
    rc = c.join_validators(acct)
    assert rc.event("ValidatorJoined").args == {"validator": acct.address, "epoch": epoch + 1}
    assert c.is_validator(acct.address) and c.epoch() == epoch + 1
    with pytest.raises(errors.AlreadyValidator):
        c.join_validators(acct)
    assert sorted(c.validators()) == sorted([v.address for v in world.validators] + [acct.address])


def test_leave_bumps_epoch_and_quorum_follows_the_set(world: World) -> None:
    c = world.chain
    assert c.quorum() == 3  # ceil(3 * 6667 / 10000)
    epoch = c.epoch()
    c.leave_validators(world.validators[0])
    assert c.epoch() == epoch + 1 and not c.is_validator(world.validators[0].address)
    assert c.quorum() == 2  # ceil(2 * 6667 / 10000)
    with pytest.raises(errors.NotAValidator):
        c.leave_validators(world.validators[0])
    assert c.stake_of(world.validators[0].address).staked == VALIDATOR_STAKE  # leaving keeps the bond


def test_validator_unbonding_below_min_stake_leaves_and_bumps_epoch(world: World) -> None:
    c, v = world.chain, world.validators[1]
    epoch = c.epoch()
    c.request_unbond(v, VALIDATOR_STAKE - MIN_STAKE)  # exactly min stake left: still a validator
    assert c.is_validator(v.address) and c.epoch() == epoch
    rc = c.request_unbond(v, 1)
    assert rc.event("ValidatorLeft").args == {"validator": v.address, "epoch": epoch + 1}
    assert not c.is_validator(v.address) and c.epoch() == epoch + 1


def test_withdraw_only_after_unbonding_delay(world: World) -> None:
    c, v = world.chain, world.validators[0]
    with pytest.raises(errors.NothingToWithdraw):
        c.withdraw(v)
    with pytest.raises(errors.InsufficientStake):
        c.request_unbond(v, VALIDATOR_STAKE + 1)
    before = c.balance(v.address)
    rc = c.request_unbond(v, 500 * SNO)
    release = rc.event("UnbondRequested").args["releaseAt"]
    assert release == world.backend.now() + world.params.unbonding_delay
    assert c.stake_of(v.address) == type(c.stake_of(v.address))(VALIDATOR_STAKE - 500 * SNO, 500 * SNO, release)
    world.backend.advance_time(world.params.unbonding_delay - 10)
    with pytest.raises(errors.StillUnbonding) as info:
        c.withdraw(v)
    assert info.value.args == (release,)
    world.backend.advance_time(10)
    c.withdraw(v)
    assert c.balance(v.address) == before + 500 * SNO
    assert c.stake_of(v.address).unbonding == 0
    with pytest.raises(errors.NothingToWithdraw):
        c.withdraw(v)


def test_a_later_unbond_restarts_the_clock_for_the_whole_entry(world: World) -> None:
    c, v = world.chain, world.validators[0]
    c.request_unbond(v, 100 * SNO)
    world.backend.advance_time(world.params.unbonding_delay - 100)
    c.request_unbond(v, 1)  # splitting requests cannot shorten the delay of the first part
    world.backend.advance_time(200)
    with pytest.raises(errors.StillUnbonding):
        c.withdraw(v)


def test_unbonding_floor_is_enforced() -> None:
    with pytest.raises(errors.UnbondingBelowFloor) as info:
        make_world(DeployParams(unbonding_delay=DAY - 1))
    assert info.value.args == (DAY - 1, DAY)


def test_admin_cannot_lower_unbonding_below_floor(world: World) -> None:
    c = world.chain
    with pytest.raises(errors.UnbondingBelowFloor):
        c.transact(world.admin, c.staking.functions.setUnbondingDelay(60))
    rc = c.transact(world.admin, c.staking.functions.setUnbondingDelay(DAY))
    assert rc.event("UnbondingDelaySet").args["newValue"] == DAY


def test_quorum_bounds_at_deploy_and_set(world: World) -> None:
    with pytest.raises(errors.BadQuorum):
        make_world(DeployParams(quorum_bps=5_000))
    with pytest.raises(errors.BadQuorum):
        world.chain.transact(world.admin, world.chain.staking.functions.setQuorumBps(10_001))


def test_non_admin_cannot_set_params(world: World) -> None:
    c, stranger = world.chain, world.outsider
    for fn in (
        c.staking.functions.setMinStake(1),
        c.staking.functions.setUnbondingDelay(10 * DAY),
        c.staking.functions.setQuorumBps(9_000),
    ):
        with pytest.raises(errors.AccessControlUnauthorizedAccount) as info:
            c.transact(stranger, fn)
        assert info.value.args[0] == stranger.address


def test_raising_min_stake_drops_validators_below_it(world: World) -> None:
    c = world.chain
    epoch = c.epoch()
    c.transact(world.admin, c.staking.functions.setMinStake(VALIDATOR_STAKE + 1))
    assert c.validators() == [] and c.epoch() == epoch + 3


def test_two_step_admin_transfer_needs_begin_delay_accept(world: World) -> None:
    c, admin, heir = world.chain, world.admin, world.outsider
    staking = c.staking.functions
    with pytest.raises(errors.AccessControlUnauthorizedAccount):  # nobody but the admin can begin
        c.transact(heir, staking.beginDefaultAdminTransfer(heir.address))
    c.transact(admin, staking.beginDefaultAdminTransfer(heir.address))
    with pytest.raises(errors.AccessControlEnforcedDefaultAdminDelay):  # accepting before the delay
        c.transact(heir, staking.acceptDefaultAdminTransfer())
    world.backend.advance_time(world.params.admin_delay + 1)
    with pytest.raises(errors.AccessControlInvalidDefaultAdmin):  # only the pending admin accepts
        c.transact(world.owner, staking.acceptDefaultAdminTransfer())
    c.transact(heir, staking.acceptDefaultAdminTransfer())
    assert staking.defaultAdmin().call() == heir.address
    c.transact(heir, staking.setMinStake(5 * SNO))
    with pytest.raises(errors.AccessControlUnauthorizedAccount):
        c.transact(admin, staking.setMinStake(6 * SNO))


def test_slash_entry_point_only_for_settlement(world: World) -> None:
    c = world.chain
    with pytest.raises(errors.NotSlasher) as info:
        c.transact(world.admin, c.staking.functions.slash(world.validators[0].address, 1, world.admin.address))
    assert info.value.args == (world.admin.address,)
    with pytest.raises(errors.SlasherAlreadyBound):
        c.transact(world.admin, c.staking.functions.bindSlasher(world.admin.address))
    with pytest.raises(errors.NotDeployer):
        c.transact(world.outsider, c.staking.functions.bindSlasher(world.outsider.address))


@pytest.mark.slow
def test_validator_set_is_capped_at_64() -> None:
    world = make_world(validators=0)
    c, backend = world.chain, world.backend
    joined = 0
    for account in random_accounts(64):
        backend.send_value(world.admin, account.address, 10**18)
        world.add_validator(account, MIN_STAKE)
        joined += 1
    assert joined == len(c.validators()) == 64
    late = random_accounts(1)[0]
    backend.send_value(world.admin, late.address, 10**18)
    world.fund(late, MIN_STAKE)
    c.stake_with_permit(late, MIN_STAKE)
    with pytest.raises(errors.ValidatorSetFull):
        c.join_validators(late)
    assert c.quorum() == 43  # ceil(64 * 6667 / 10000)
