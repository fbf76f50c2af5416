"""Backend mechanics: one estimate then a raw signed transaction, a revert found only after mining, time."""

from __future__ import annotations

from typing import Any

import pytest
from chain_world import World

from tensorlink.chain import SNO, EmbeddedBackend, errors


class _LowGas:
    """A bound contract function whose estimate is far too low, so the mined transaction fails."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def estimate_gas(self, params: dict[str, Any]) -> int:
        return 25_000

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def test_a_transaction_failing_after_the_estimate_raises(world: World) -> None:
    c = world.chain
    fn = c.token.functions.transfer(world.outsider.address, SNO)
    with pytest.raises(errors.TransactionReverted, match="reverted"):  # out of gas: no revert data
        world.backend.transact(world.admin, _LowGas(fn))
    assert c.balance(world.outsider.address) == 0


def test_estimate_revert_sends_nothing(world: World) -> None:
    w3 = world.backend.w3
    nonce = w3.eth.get_transaction_count(world.outsider.address)
    with pytest.raises(errors.ERC20InsufficientBalance) as info:
        world.chain.transfer(world.outsider, world.owner.address, SNO)
    assert info.value.fields["sender"] == world.outsider.address
    assert w3.eth.get_transaction_count(world.outsider.address) == nonce


def test_receipt_fields(world: World) -> None:
    rc = world.chain.transfer(world.admin, world.outsider.address, 5)
    assert rc.tx_hash.startswith("0x") and len(rc.tx_hash) == 66
    assert 21_000 < rc.gas_used < 100_000
    assert rc.named("Transfer")[0].args == {"from": world.admin.address, "to": world.outsider.address, "value": 5}
    with pytest.raises(KeyError):
        rc.event("Nope")


def test_time_only_moves_forward() -> None:
    backend = EmbeddedBackend()
    start = backend.now()
    backend.advance_time(1_000)
    assert backend.now() == start + 1_000
    with pytest.raises(ValueError):
        backend.advance_time(-1)
    assert backend.accounts[0].address == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"  # private key 1


def test_the_sender_must_be_a_local_account(world: World) -> None:
    with pytest.raises(ValueError, match="LocalAccount"):
        world.chain.transfer(world.admin.address, world.outsider.address, 1)  # type: ignore[arg-type]
