"""Merkle-mode rewards: above a handful of workers, a settlement stores one root and each worker claims
its own leaf, so settle costs the same for 32 workers as for 1.

The tree is OpenZeppelin's StandardMerkleTree for leaf encoding `(uint256 jobId, address worker,
uint256 amount, int256 repDelta)`: leaf = keccak256(keccak256(abi.encode(...))) (double hashing keeps a
leaf from ever equalling an inner node), inner node = keccak256 of the two children sorted as bytes
(what `MerkleProof.verify` expects), leaves sorted by hash and laid out as OZ's array tree, so the root
equals the one @openzeppelin/merkle-tree computes for the same values."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from eth_abi import abi
from eth_utils import is_checksum_address, keccak

from tensorlink.chain.eip712 import INT256_MAX, INT256_MIN, UINT256_MAX

LEAF_TYPES = ["uint256", "address", "uint256", "int256"]


class Leaf(msgspec.Struct, frozen=True):
    """One worker's claim: `amount` SNO (minted reward plus its share of the escrow) and a reputation delta."""

    job_id: int
    worker: str
    amount: int
    rep_delta: int

    def __post_init__(self) -> None:
        if not 0 <= self.job_id <= UINT256_MAX or not 0 <= self.amount <= UINT256_MAX:
            raise ValueError(f"job_id and amount must be uint256, got {self.job_id}, {self.amount}")
        if not INT256_MIN <= self.rep_delta <= INT256_MAX:
            raise ValueError(f"rep_delta must be an int256, got {self.rep_delta}")
        if not is_checksum_address(self.worker):
            raise ValueError(f"worker must be a checksummed address, got {self.worker!r}")

    def hash(self) -> bytes:
        encoded = abi.encode(LEAF_TYPES, [self.job_id, self.worker, self.amount, self.rep_delta])
        return keccak(keccak(encoded))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OZ `Hashes.commutativeKeccak256`: order-independent, so proofs need no left/right flags."""
    return keccak(a + b) if a < b else keccak(b + a)


def verify(root: bytes, leaf: Leaf, proof: Sequence[bytes]) -> bool:
    """OZ `MerkleProof.verify`, in Python."""
    node = leaf.hash()
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


class RewardTree:
    """The tree over one job's leaves; `root` goes into `Settle.reward_root`, `proof(worker)` into `claim`."""

    def __init__(self, leaves: Sequence[Leaf]) -> None:
        if not leaves:
            raise ValueError("a reward tree needs at least one leaf")
        by_worker: dict[str, Leaf] = {}
        for leaf in leaves:
            if leaf.worker in by_worker:
                raise ValueError(f"worker {leaf.worker} appears twice")
            by_worker[leaf.worker] = leaf
        if len({leaf.job_id for leaf in leaves}) != 1:
            raise ValueError("all leaves of a tree belong to one job")
        self.leaves = tuple(leaves)
        self._by_worker = by_worker
        hashed = sorted(leaf.hash() for leaf in leaves)
        n = len(hashed)
        tree: list[bytes] = [b""] * (2 * n - 1)
        for i, h in enumerate(hashed):
            tree[len(tree) - 1 - i] = h
        for i in range(len(tree) - 1 - n, -1, -1):
            tree[i] = hash_pair(tree[2 * i + 1], tree[2 * i + 2])
        self._tree = tree
        self._index = {h: len(tree) - 1 - i for i, h in enumerate(hashed)}

    @property
    def root(self) -> bytes:
        return self._tree[0]

    @property
    def total(self) -> int:
        """Sum of all leaf amounts: what the contract must hold for the job (`rewardLeft`)."""
        return sum(leaf.amount for leaf in self.leaves)

    def leaf(self, worker: str) -> Leaf:
        return self._by_worker[worker]

    def proof(self, worker: str) -> list[bytes]:
        """Sibling hashes from `worker`'s leaf up to the root."""
        index = self._index[self._by_worker[worker].hash()]
        proof = []
        while index > 0:
            sibling = index + 1 if index % 2 else index - 1
            proof.append(self._tree[sibling])
            index = (index - 1) // 2
        return proof


def split(total: int, work: Sequence[int]) -> list[int]:
    """Share `total` in proportion to `work`, in integers that sum to exactly `total`.

    Each share is floor(total * w / sum(work)); the few units left over (fewer than the number of
    workers) go one each to the largest fractional remainders, ties to the earlier position. The result
    depends only on the inputs and their order (the largest-remainder, or Hamilton, method)."""
    if total < 0 or any(w < 0 for w in work):
        raise ValueError("total and work must be non-negative")
    whole = sum(work)
    if whole == 0:
        if total:
            raise ValueError("cannot split a non-zero total over zero work")
        return [0] * len(work)
    shares = [total * w // whole for w in work]
    left = total - sum(shares)
    order = sorted(range(len(work)), key=lambda i: (-(total * work[i] % whole), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def reward_leaves(
    job_id: int,
    workers: Sequence[str],
    work: Sequence[int],
    reputation: Sequence[int],
    reward_per_work: int,
    payout: int,
) -> list[Leaf]:
    """Leaves for a Merkle-mode settlement: worker i gets `reward_per_work * work[i]` (the contract mints
    `reward_per_work * sum(work)`) plus its `split` share of `payout`, so the leaves add up to exactly
    what the contract holds for the job."""
    if not len(workers) == len(work) == len(reputation):
        raise ValueError(f"lengths differ: {len(workers)} workers, {len(work)} work, {len(reputation)} reputation")
    if reward_per_work < 0 or payout < 0:
        raise ValueError("reward_per_work and payout must be non-negative")
    escrow_shares = split(payout, work)
    return [
        Leaf(job_id, worker, reward_per_work * w + share, rep)
        for worker, w, share, rep in zip(workers, work, escrow_shares, reputation, strict=True)
    ]
