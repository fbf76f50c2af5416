"""Merkle rewards: OpenZeppelin StandardMerkleTree compatibility and exact integer splits."""

from __future__ import annotations

import pytest
from chain_world import random_accounts
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorlink.chain import Leaf, RewardTree, reward_leaves, split
from tensorlink.chain.merkle import hash_pair, verify

SNO = 10**18


def _oz_vector_leaves() -> list[Leaf]:
    """The values given to @openzeppelin/merkle-tree 1.0.8 `StandardMerkleTree.of(values,
    ["uint256","address","uint256","int256"])` to produce the root below."""
    return [Leaf(7, to_checksum_address("0x" + f"{i + 1:040x}"), i * SNO + 3, -i if i % 2 else i) for i in range(5)]


OZ_ROOT = bytes.fromhex("c09a99edf6677612731514c227ea14593b0cd5b2c4c04c5d07d86a532bb84e5c")
OZ_PROOF_0 = [
    bytes.fromhex("e461bd8b51f455fb0e81d8383b85f974d274b413d5c82668d15b0fb99d4ea08a"),
    bytes.fromhex("d99224fc2285285ee46753c7571e209b1b8d53344de38a701646d13b33659a4e"),
]


def test_root_and_proof_equal_openzeppelin_merkle_tree() -> None:
    leaves = _oz_vector_leaves()
    tree = RewardTree(leaves)
    assert tree.root == OZ_ROOT
    assert tree.proof(leaves[0].worker) == OZ_PROOF_0


def test_three_leaves_by_hand() -> None:
    leaves = _oz_vector_leaves()[:3]
    h0, h1, h2 = sorted(leaf.hash() for leaf in leaves)
    # OZ array layout: sorted leaves at the end in reverse order, node i = hash_pair(2i+1, 2i+2)
    assert RewardTree(leaves).root == hash_pair(hash_pair(h1, h0), h2)


def test_single_leaf_root_is_the_leaf() -> None:
    leaf = _oz_vector_leaves()[0]
    tree = RewardTree([leaf])
    assert tree.root == leaf.hash() and tree.proof(leaf.worker) == []
    assert verify(tree.root, leaf, [])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_proof_verifies_and_a_changed_leaf_does_not(n: int) -> None:
    workers = [a.address for a in random_accounts(n)]
    tree = RewardTree(reward_leaves(3, workers, list(range(1, n + 1)), [0] * n, 10, 1_000))
    for leaf in tree.leaves:
        proof = tree.proof(leaf.worker)
        assert verify(tree.root, leaf, proof)
        assert not verify(tree.root, Leaf(leaf.job_id, leaf.worker, leaf.amount + 1, leaf.rep_delta), proof)
        assert not verify(tree.root, Leaf(leaf.job_id + 1, leaf.worker, leaf.amount, leaf.rep_delta), proof)


def test_tree_rejects_duplicates_mixed_jobs_and_bad_leaves() -> None:
    a, b = (x.address for x in random_accounts(2))
    with pytest.raises(ValueError, match="twice"):
        RewardTree([Leaf(1, a, 1, 0), Leaf(1, a, 2, 0)])
    with pytest.raises(ValueError, match="one job"):
        RewardTree([Leaf(1, a, 1, 0), Leaf(2, b, 1, 0)])
    with pytest.raises(ValueError):
        RewardTree([])
    with pytest.raises(ValueError, match="checksummed"):
        Leaf(1, a.lower(), 1, 0)
    with pytest.raises(ValueError):
        Leaf(1, a, -1, 0)
    with pytest.raises(ValueError):
        Leaf(1, a, 1, 2**255)


def test_split_examples() -> None:
    assert split(10, [1, 1, 1]) == [4, 3, 3]  # remainders tie: earlier position first
    assert split(10, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert split(7, [3, 1, 1]) == [4, 2, 1]  # 4.2, 1.4, 1.4: the one unit left goes to the first 0.4
    assert split(0, [1, 2]) == [0, 0]
    assert split(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError):
        split(1, [0, 0])
    with pytest.raises(ValueError):
        split(-1, [1])


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 2**200), work=st.lists(st.integers(0, 2**64), min_size=1, max_size=40))
def test_split_is_exact_and_close_to_proportional(total: int, work: list[int]) -> None:
    if sum(work) == 0:
        return
    shares = split(total, work)
    assert sum(shares) == total
    whole = sum(work)
    for s, w in zip(shares, work, strict=True):
        assert total * w // whole <= s <= total * w // whole + 1
    assert split(total, work) == shares  # deterministic


def test_reward_leaves_add_up_to_what_the_contract_holds() -> None:
    workers = [a.address for a in random_accounts(32)]
    work = [(i * 31) % 13 + 1 for i in range(32)]
    leaves = reward_leaves(9, workers, work, [1] * 32, 10**15, 777 * SNO + 5)
    assert sum(leaf.amount for leaf in leaves) == 10**15 * sum(work) + 777 * SNO + 5
    assert RewardTree(leaves).total == sum(leaf.amount for leaf in leaves)
    with pytest.raises(ValueError, match="lengths"):
        reward_leaves(9, workers, work[:-1], [1] * 32, 1, 1)
