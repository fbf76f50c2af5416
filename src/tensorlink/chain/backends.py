"""Where the EVM runs: in-process (py-evm through eth-tester, the default for tests and demos) or any
JSON-RPC node (anvil locally, a real network later). Both sign transactions locally with eth-account
keys and send them raw, with one gas estimate: web3's automatic gas would execute each transaction twice,
and the estimate is where both eth-tester and anvil report a revert's data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_account.types import TransactionDictType
from eth_typing import HexStr
from web3 import Web3
from web3.types import RPCEndpoint, TxReceipt

from tensorlink.chain import errors

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 6, 5  # +20 % over the estimate: storage refunds and warm slots vary
PRIORITY_FEE = 1_000_000_000  # 1 gwei
RECEIPT_TIMEOUT_S = 120.0


class Backend:
    """A web3 connection plus funded signing accounts and dev-chain time control."""

    w3: Web3
    accounts: tuple[LocalAccount, ...]

    def __init__(self, w3: Web3, accounts: Sequence[LocalAccount]) -> None:
        self.w3 = w3
        self.accounts = tuple(accounts)
        self.chain_id = int(w3.eth.chain_id)

    def now(self) -> int:
        """Timestamp of the latest block (what `block.timestamp` was last)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def advance_time(self, seconds: int) -> None:
        """Move the chain clock forward and mine a block (dev chains only)."""
        raise NotImplementedError

    def transact(self, account: LocalAccount, fn: Any, value: int = 0) -> TxReceipt:
        """Estimate, sign and send `fn` (a bound contract function or constructor) from `account`.

        A revert at estimate time or in the mined transaction raises the contract's named error
        (`errors.X`); other failures propagate unchanged."""
        params: dict[str, Any] = {"from": account.address, "value": value}
        try:
            estimate = int(fn.estimate_gas(params))
        except Exception as exc:
            named = errors.from_exception(exc)
            if named is None:
                raise
            raise named from exc
        block = self.w3.eth.get_block("latest")
        gas = min(estimate * GAS_MARGIN_NUM // GAS_MARGIN_DEN + 10_000, int(block["gasLimit"]))
        base_fee = int(block.get("baseFeePerGas", 0) or 0)
        params.update(
            nonce=self.w3.eth.get_transaction_count(account.address, "pending"),
            gas=gas,
            maxPriorityFeePerGas=PRIORITY_FEE,
            maxFeePerGas=2 * base_fee + PRIORITY_FEE,
            chainId=self.chain_id,
        )
        tx = fn.build_transaction(params)
        signed = account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        if receipt["status"] != 1:
            self._raise_mined_revert(fn, params, receipt)
        return receipt

    def send_value(self, account: LocalAccount, to: str, wei: int) -> TxReceipt:
        """Plain ETH transfer (funding a fresh account's gas), signed locally like every transaction."""
        if wei < 0:
            raise ValueError("wei must be non-negative")
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        tx: TransactionDictType = {
            "to": HexStr(to),
            "value": wei,
            "gas": 21_000,
            "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
            "maxPriorityFeePerGas": PRIORITY_FEE,
            "maxFeePerGas": 2 * base_fee + PRIORITY_FEE,
            "chainId": self.chain_id,
        }
        tx_hash = self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        if receipt["status"] != 1:
            raise errors.TransactionReverted(f"value transfer to {to} failed")
        return receipt

    def _raise_mined_revert(self, fn: Any, params: dict[str, Any], receipt: TxReceipt) -> None:
        """The state changed between estimate and mining: replay as a call to recover the reason."""
        call = {k: params[k] for k in ("from", "value")}
        try:
            if hasattr(fn, "call"):
                fn.call(call, block_identifier=receipt["blockNumber"] - 1)
        except Exception as exc:
            named = errors.from_exception(exc)
            if named is not None:
                raise named from exc
        raise errors.TransactionReverted(f"transaction 0x{bytes(receipt['transactionHash']).hex()} reverted")

    def close(self) -> None:
        """Release the connection (nothing to do for most backends)."""


def _estimate_once(state: Any, transaction: Any) -> int:
    """Gas a transaction uses (before refunds) when given the whole block; raises its revert."""
    from eth.vm.spoof import SpoofTransaction

    trial = SpoofTransaction(transaction, gas=state.gas_limit, gas_price=0)
    snapshot = state.snapshot()
    try:
        computation = state.apply_transaction(trial)
        if computation.is_error:
            raise computation.error
        return int(state.gas_limit - computation.get_gas_remaining())
    finally:
        state.revert(snapshot)


class EmbeddedBackend(Backend):
    """py-evm in this process: a fresh chain in ~10 ms, ten accounts with private keys 1..10 holding
    1 000 000 ETH each."""

    def __init__(self) -> None:
        from eth_tester import EthereumTester  # eth-tester is imported only when used
        from web3 import EthereumTesterProvider

        self.tester = EthereumTester()  # what the provider makes by default, kept with its type
        keys = [i.to_bytes(32, "big") for i in range(1, 11)]
        super().__init__(Web3(EthereumTesterProvider(self.tester)), [Account.from_key(k) for k in keys])

    def transact(self, account: LocalAccount, fn: Any, value: int = 0) -> TxReceipt:
        # py-evm's default estimator bisects from 21 000 gas to the block limit, executing the transaction
        # about 13 times; one run at the block limit gives the same answer (our margin covers the 63/64
        # call-gas rule and refunds) and the same revert data.
        chain = self.tester.backend.chain
        if chain.gas_estimator is not _estimate_once:
            chain.gas_estimator = _estimate_once
        return super().transact(account, fn, value)

    def advance_time(self, seconds: int) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self.tester.time_travel(self.now() + int(seconds))
        self.tester.mine_blocks(1)

    def snapshot(self) -> int:
        """Remember the chain as it is now (for tests: deploy once, start each test from here)."""
        return int(self.tester.take_snapshot())

    def revert(self, snapshot: int) -> None:
        """Return to a `snapshot`: every later block, balance and nonce is forgotten."""
        self.tester.revert_to_snapshot(snapshot)


class RpcBackend(Backend):
    """A JSON-RPC node. Accounts default to the ten of the anvil/hardhat dev mnemonic; give `keys` for
    anything else. `chain_id`, when given, must match the node's (a guard against the wrong network)."""

    def __init__(
        self,
        url: str,
        chain_id: int | None = None,
        keys: Sequence[bytes | str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}))
        if keys is None:
            Account.enable_unaudited_hdwallet_features()
            accounts = [Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}") for i in range(10)]
        else:
            accounts = [Account.from_key(k) for k in keys]
        super().__init__(w3, accounts)
        if chain_id is not None and chain_id != self.chain_id:
            raise ValueError(f"{url} serves chain id {self.chain_id}, expected {chain_id}")

    def advance_time(self, seconds: int) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self.w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [int(seconds)])
        self.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
