"""Quorum-signed slashing (treasury, burn, unbonding does not escape, replay) and the token's bindings."""

from __future__ import annotations

import msgspec
import pytest
from chain_world import MIN_STAKE, VALIDATOR_STAKE, World, make_world

from tensorlink.chain import SNO, ZERO_ADDRESS, ChainError, DeployParams, Slash, errors
from tensorlink.chain.chain import Chain

EVIDENCE = b"\xee" * 32


def slash_msg(world: World, offender: str, amount: int, nonce: int = 1, **kw: object) -> Slash:
    fields: dict[str, object] = {
        "offender": offender,
        "amount": amount,
        "evidence": EVIDENCE,
        "nonce": nonce,
        "epoch": world.chain.epoch(),
        "deadline": world.backend.now() + 3600,
        "reputation": -10,
    }
    fields.update(kw)
    return Slash(**fields)  # type: ignore[arg-type]


def add_fourth_validator(world: World) -> None:
    """Four validators (quorum 3), so three can slash the fourth without its signature."""
    world.add_validator(world.outsider)


def test_slash_burns_when_treasury_is_zero(world: World) -> None:
    c = world.chain
    add_fourth_validator(world)
    offender = world.outsider
    supply = c.token.functions.totalSupply().call()
    msg = slash_msg(world, offender.address, 300 * SNO)
    rc = c.slash(world.owner, msg, c.sign_slash(world.keys, msg))
    assert rc.event("SlashExecuted").args == {
        "offender": offender.address,
        "taken": 300 * SNO,
        "evidence": EVIDENCE,
        "nonce": 1,
    }
    assert rc.event("Slashed").args["recipient"] == ZERO_ADDRESS
    assert c.token.functions.totalSupply().call() == supply - 300 * SNO
    assert c.stake_of(offender.address).staked == VALIDATOR_STAKE - 300 * SNO
    assert c.reputation(offender.address) == -10


def test_slash_goes_to_treasury(world: World) -> None:
    c = world.chain
    treasury = world.workers[3].address
    c.transact(world.admin, c.settlement.functions.setTreasury(treasury))
    add_fourth_validator(world)
    msg = slash_msg(world, world.outsider.address, 250 * SNO)
    c.slash(world.owner, msg, c.sign_slash(world.keys, msg))
    assert c.balance(treasury) == 250 * SNO


def test_unbonding_does_not_escape_a_slash(world: World) -> None:
    c = world.chain
    add_fourth_validator(world)
    offender = world.outsider
    c.request_unbond(offender, VALIDATOR_STAKE - 100 * SNO)  # tries to run with most of the bond
    assert not c.is_validator(offender.address)  # below min stake: left the set, epoch bumped
    msg = slash_msg(world, offender.address, 1_000 * SNO)  # signed under the new epoch
    keys = world.keys
    rc = c.slash(world.owner, msg, c.sign_slash(keys, msg))
    assert rc.result == 1_000 * SNO
    info = c.stake_of(offender.address)
    assert info.staked == 0  # 100 from staked, then 900 from the unbonding entry
    assert info.unbonding == VALIDATOR_STAKE - 1_000 * SNO
    world.backend.advance_time(world.params.unbonding_delay)
    before = c.balance(offender.address)
    c.withdraw(offender)
    assert c.balance(offender.address) == before + VALIDATOR_STAKE - 1_000 * SNO


def test_slash_takes_at_most_what_is_there(world: World) -> None:
    c = world.chain
    add_fourth_validator(world)
    msg = slash_msg(world, world.outsider.address, 10**30)
    rc = c.slash(world.owner, msg, c.sign_slash(world.keys, msg))
    assert rc.result == VALIDATOR_STAKE
    assert c.stake_of(world.outsider.address) == type(c.stake_of(world.outsider.address))(0, 0, 0)


def test_slashed_validator_below_min_stake_leaves_and_bumps_epoch(world: World) -> None:
    c = world.chain
    add_fourth_validator(world)
    epoch = c.epoch()
    msg = slash_msg(world, world.outsider.address, VALIDATOR_STAKE - MIN_STAKE + 1)
    rc = c.slash(world.owner, msg, c.sign_slash(world.keys, msg))
    assert rc.event("ValidatorLeft").args == {"validator": world.outsider.address, "epoch": epoch + 1}
    assert not c.is_validator(world.outsider.address)


def test_offender_cannot_sign_its_own_slash(world: World) -> None:
    c = world.chain
    offender = world.validators[0]
    msg = slash_msg(world, offender.address, SNO)
    with pytest.raises(errors.OffenderCannotSign):
        c.slash(world.owner, msg, c.sign_slash(world.keys, msg))
    assert c.stake_of(offender.address).staked == VALIDATOR_STAKE


def test_slash_replay_evidence_and_sign_rules(world: World) -> None:
    c = world.chain
    add_fourth_validator(world)
    offender = world.outsider.address
    msg = slash_msg(world, offender, SNO, nonce=7)
    sigs = c.sign_slash(world.keys, msg)
    c.slash(world.owner, msg, sigs)
    with pytest.raises(errors.SlashReplayed) as info:
        c.slash(world.owner, msg, sigs)
    assert info.value.args == (7,)
    no_evidence = slash_msg(world, offender, SNO, nonce=8, evidence=b"\x00" * 32)
    with pytest.raises(errors.MissingEvidence):
        c.slash(world.owner, no_evidence, c.sign_slash(world.keys, no_evidence))
    positive = slash_msg(world, offender, SNO, nonce=9, reputation=5)
    with pytest.raises(errors.PositiveSlashReputation):
        c.slash(world.owner, positive, c.sign_slash(world.keys, positive))
    few = slash_msg(world, offender, SNO, nonce=10)
    with pytest.raises(errors.NotEnoughSignatures):
        c.slash(world.owner, few, c.sign_slash(world.keys[:2], few))
    stale = slash_msg(world, offender, SNO, nonce=11, epoch=c.epoch() - 1)
    with pytest.raises(errors.StaleEpoch):
        c.slash(world.owner, stale, c.sign_slash(world.keys, stale))
    late = slash_msg(world, offender, SNO, nonce=12, deadline=world.backend.now() - 1)
    with pytest.raises(errors.Expired):
        c.slash(world.owner, late, c.sign_slash(world.keys, late))
    with pytest.raises(ValueError, match="checksummed"):
        slash_msg(world, offender.lower(), SNO)
    with pytest.raises(ValueError, match="amount"):
        slash_msg(world, offender, -1)


# ---------------------------------------------------------------- token


def test_only_settlement_can_mint(world: World) -> None:
    c = world.chain
    assert c.token.functions.minter().call() == c.settlement.address
    for who in (world.admin, world.outsider):
        with pytest.raises(errors.NotMinter) as info:
            c.transact(who, c.token.functions.mint(who.address, SNO))
        assert info.value.args == (who.address,)


def test_minter_bound_once_by_the_deployer(world: World) -> None:
    c = world.chain
    with pytest.raises(errors.MinterAlreadyBound):
        c.transact(world.admin, c.token.functions.bindMinter(world.admin.address))
    with pytest.raises(errors.NotDeployer):
        c.transact(world.outsider, c.token.functions.bindMinter(world.outsider.address))


def test_unbound_token_mints_for_nobody_and_binding_rejects_zero() -> None:
    world = make_world(validators=0)
    c = Chain(world.backend)
    token = c.deploy_contract(world.admin, "SNOToken", world.admin.address, 10 * SNO)
    with pytest.raises(errors.NotMinter):  # minter is zero before binding: nobody is it
        c.backend.transact(world.admin, token.functions.mint(world.admin.address, 1))
    with pytest.raises(errors.ZeroAddress):
        c.backend.transact(world.admin, token.functions.bindMinter(ZERO_ADDRESS))
    with pytest.raises(errors.ZeroAddress):
        c.deploy_contract(world.admin, "SNOToken", ZERO_ADDRESS, 10 * SNO)


def test_deploy_defaults_and_attach_from_another_handle(world: World) -> None:
    other = Chain(world.backend)
    other.attach(world.chain.deployment)
    assert other.epoch() == world.chain.epoch()
    assert other.token.functions.symbol().call() == "SNO"
    assert other.token.functions.name().call() == "TensorLink SNO"
    assert DeployParams().quorum_bps == 6_667


def test_attach_refuses_a_mismatched_deployment(world: World) -> None:
    d = world.chain.deployment
    other = Chain(world.backend)
    with pytest.raises(ChainError, match="no contract code"):
        other.attach(msgspec.structs.replace(d, token=world.outsider.address))
    with pytest.raises(ChainError, match="settlement.token"):
        other.attach(msgspec.structs.replace(d, token=d.staking))
    with pytest.raises(ChainError, match="chain"):
        other.attach(msgspec.structs.replace(d, chain_id=1))
    with pytest.raises(ChainError, match="settlement.staking|staking.slasher"):
        other.attach(msgspec.structs.replace(d, staking=d.settlement))
    other.attach(d)  # the real record still attaches
