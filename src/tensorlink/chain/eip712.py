"""EIP-712 typed structs that validators sign: `Settle` (pay a job's workers) and `Slash` (punish a
staked account). Field order and type strings mirror Settlement.sol exactly; the digest is checked
against the contract's `settleDigest`/`slashDigest` views in the tests. Inputs are validated here so
that a malformed message fails with a ValueError before anything is signed or sent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import is_checksum_address, keccak

DOMAIN_NAME = "TensorLink"
DOMAIN_VERSION = "1"
UINT64_MAX = (1 << 64) - 1
UINT256_MAX = (1 << 256) - 1
INT256_MIN, INT256_MAX = -(1 << 255), (1 << 255) - 1

SETTLE_TYPE = [
    {"name": "jobId", "type": "uint256"},
    {"name": "epoch", "type": "uint64"},
    {"name": "deadline", "type": "uint256"},
    {"name": "proofRoot", "type": "bytes32"},
    {"name": "payout", "type": "uint256"},
    {"name": "workers", "type": "address[]"},
    {"name": "work", "type": "uint256[]"},
    {"name": "reputation", "type": "int256[]"},
    {"name": "rewardRoot", "type": "bytes32"},
    {"name": "totalWork", "type": "uint256"},
]
SLASH_TYPE = [
    {"name": "offender", "type": "address"},
    {"name": "amount", "type": "uint256"},
    {"name": "evidence", "type": "bytes32"},
    {"name": "nonce", "type": "uint256"},
    {"name": "epoch", "type": "uint64"},
    {"name": "deadline", "type": "uint256"},
    {"name": "reputation", "type": "int256"},
]
DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
ZERO32 = b"\x00" * 32


def _uint(name: str, value: int, top: int = UINT256_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{name} must be an integer in [0, {top}], got {value!r}")


def _int256(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not INT256_MIN <= value <= INT256_MAX:
        raise ValueError(f"{name} must be an int256, got {value!r}")


def _bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {value!r}")


def _address(name: str, value: str) -> None:
    if not isinstance(value, str) or not is_checksum_address(value):
        raise ValueError(f"{name} must be a checksummed address (Web3.to_checksum_address), got {value!r}")


class Settle(msgspec.Struct, frozen=True):
    """A job's settlement. Direct mode: `reward_root` is zero and workers/work/reputation list every
    worker (1..8). Merkle mode: `reward_root` is the root of `merkle.RewardTree` and the lists are empty;
    workers claim their leaf later."""

    job_id: int
    epoch: int
    deadline: int
    proof_root: bytes
    payout: int
    workers: tuple[str, ...]
    work: tuple[int, ...]
    reputation: tuple[int, ...]
    reward_root: bytes
    total_work: int

    def __post_init__(self) -> None:
        for name in ("workers", "work", "reputation"):  # accept lists; keep the struct immutable
            msgspec.structs.force_setattr(self, name, tuple(getattr(self, name)))
        _uint("job_id", self.job_id)
        _uint("epoch", self.epoch, UINT64_MAX)
        _uint("deadline", self.deadline)
        _bytes32("proof_root", self.proof_root)
        _uint("payout", self.payout)
        _bytes32("reward_root", self.reward_root)
        _uint("total_work", self.total_work)
        if not len(self.workers) == len(self.work) == len(self.reputation):
            raise ValueError(
                f"workers, work and reputation must have equal lengths, got "
                f"{len(self.workers)}, {len(self.work)}, {len(self.reputation)}"
            )
        for i, worker in enumerate(self.workers):
            _address(f"workers[{i}]", worker)
        for i, w in enumerate(self.work):
            _uint(f"work[{i}]", w)
        for i, r in enumerate(self.reputation):
            _int256(f"reputation[{i}]", r)
        if self.reward_root != ZERO32 and self.workers:
            raise ValueError("Merkle mode (reward_root set) takes no per-worker lists: workers claim instead")

    def message(self) -> dict[str, Any]:
        """The EIP-712 message (Solidity field names)."""
        return {
            "jobId": self.job_id,
            "epoch": self.epoch,
            "deadline": self.deadline,
            "proofRoot": self.proof_root,
            "payout": self.payout,
            "workers": list(self.workers),
            "work": list(self.work),
            "reputation": list(self.reputation),
            "rewardRoot": self.reward_root,
            "totalWork": self.total_work,
        }

    def as_tuple(self) -> tuple[Any, ...]:
        """The calldata tuple for `settle(Settle, bytes[])` and `settleDigest(Settle)`."""
        return tuple(self.message().values())


class Slash(msgspec.Struct, frozen=True):
    """A quorum's verdict against `offender`: take up to `amount` of its bond; `reputation` is added to its
    score (negative). `nonce` is unique per slash (replay guard); `evidence` names the proof (non-zero)."""

    offender: str
    amount: int
    evidence: bytes
    nonce: int
    epoch: int
    deadline: int
    reputation: int

    def __post_init__(self) -> None:
        _address("offender", self.offender)
        _uint("amount", self.amount)
        _bytes32("evidence", self.evidence)
        _uint("nonce", self.nonce)
        _uint("epoch", self.epoch, UINT64_MAX)
        _uint("deadline", self.deadline)
        _int256("reputation", self.reputation)

    def message(self) -> dict[str, Any]:
        return {
            "offender": self.offender,
            "amount": self.amount,
            "evidence": self.evidence,
            "nonce": self.nonce,
            "epoch": self.epoch,
            "deadline": self.deadline,
            "reputation": self.reputation,
        }

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self.message().values())


def domain(chain_id: int, address: str) -> dict[str, Any]:
    """The Settlement contract's EIP-712 domain."""
    _address("verifying contract", address)
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id, "verifyingContract": address}


def typed_data(dom: dict[str, Any], msg: Settle | Slash) -> dict[str, Any]:
    """The full EIP-712 document (what a wallet's eth_signTypedData_v4 would take)."""
    primary, fields = ("Settle", SETTLE_TYPE) if isinstance(msg, Settle) else ("Slash", SLASH_TYPE)
    return {
        "types": {"EIP712Domain": DOMAIN_TYPE, primary: fields},
        "primaryType": primary,
        "domain": dom,
        "message": msg.message(),
    }


def digest(dom: dict[str, Any], msg: Settle | Slash) -> bytes:
    """keccak256("\\x19\\x01" ‖ domainSeparator ‖ structHash): what each validator signs."""
    signable = encode_typed_data(full_message=typed_data(dom, msg))
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def sign(keys: Iterable[bytes | str], dom: dict[str, Any], msg: Settle | Slash) -> list[bytes]:
    """65-byte signatures (r ‖ s ‖ v), ordered by ascending signer address as the contract requires."""
    signable = encode_typed_data(full_message=typed_data(dom, msg))
    signed = []
    for key in keys:
        account = Account.from_key(key)
        signed.append((int(account.address, 16), bytes(account.sign_message(signable).signature)))
    signed.sort(key=lambda pair: pair[0])
    return [sig for _, sig in signed]


def recover(dom: dict[str, Any], msg: Settle | Slash, signature: bytes) -> str:
    """The address that made `signature` over `msg` (checksummed)."""
    return Account.recover_message(encode_typed_data(full_message=typed_data(dom, msg)), signature=signature)
