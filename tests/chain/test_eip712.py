"""Python's EIP-712 digests equal the contract's `settleDigest`/`slashDigest`, and an independent
hand-rolled encoding (eth_abi + keccak) agrees with the eth-account path."""

from __future__ import annotations

import pytest
from chain_world import World, make_world, random_accounts
from eth_abi import abi
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorlink.chain import Settle, Slash, eip712
from tensorlink.chain.eip712 import ZERO32

SETTLE_TYPE = (
    "Settle(uint256 jobId,uint64 epoch,uint256 deadline,bytes32 proofRoot,uint256 payout,address[] workers,"
    "uint256[] work,int256[] reputation,bytes32 rewardRoot,uint256 totalWork)"
)
SLASH_TYPE = (
    "Slash(address offender,uint256 amount,bytes32 evidence,uint256 nonce,uint64 epoch,uint256 deadline,"
    "int256 reputation)"
)
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"


def oracle_digest(chain_id: int, contract: str, msg: Settle | Slash) -> bytes:
    """EIP-712 written out from the standard, without eth-account."""
    separator = keccak(
        abi.encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(text=DOMAIN_TYPE), keccak(text="TensorLink"), keccak(text="1"), chain_id, contract],
        )
    )
    if isinstance(msg, Settle):

        def packed(kind: str, values: tuple) -> bytes:
            return keccak(b"".join(abi.encode([kind], [v]) for v in values))

        struct = keccak(
            abi.encode(
                ["bytes32", "uint256", "uint64", "uint256", "bytes32", "uint256"]
                + ["bytes32", "bytes32", "bytes32", "bytes32", "uint256"],
                [
                    keccak(text=SETTLE_TYPE),
                    msg.job_id,
                    msg.epoch,
                    msg.deadline,
                    msg.proof_root,
                    msg.payout,
                    packed("address", msg.workers),
                    packed("uint256", msg.work),
                    packed("int256", msg.reputation),
                    msg.reward_root,
                    msg.total_work,
                ],
            )
        )
    else:
        struct = keccak(
            abi.encode(
                ["bytes32", "address", "uint256", "bytes32", "uint256", "uint64", "uint256", "int256"],
                [keccak(text=SLASH_TYPE), *msg.as_tuple()],
            )
        )
    return keccak(b"\x19\x01" + separator + struct)


@pytest.fixture(scope="module")
def digests() -> World:
    return make_world(validators=0)  # views only: the chain's state never changes here


def _settle(n: int, negative: bool = True, merkle: bool = False) -> Settle:
    workers = [a.address for a in random_accounts(n)]
    work = [i * 1_000 + 1 for i in range(n)]
    rep = [(-1) ** i * (i + 1) * (10**20) if negative else i for i in range(n)]
    return Settle(
        job_id=42,
        epoch=7,
        deadline=2**40,
        proof_root=keccak(b"proof"),
        payout=123 * 10**18,
        workers=[] if merkle else workers,
        work=[] if merkle else work,
        reputation=[] if merkle else rep,
        reward_root=keccak(b"rewards") if merkle else ZERO32,
        total_work=sum(work),
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 33])
def test_settle_digest_matches_contract_for_array_sizes(digests: World, n: int) -> None:
    c = digests.chain
    msg = _settle(n)
    ours = eip712.digest(c.domain, msg)
    assert ours == c.settle_digest(msg)
    assert ours == oracle_digest(digests.backend.chain_id, c.settlement.address, msg)


def test_merkle_mode_and_extreme_values_match(digests: World) -> None:
    c = digests.chain
    assert eip712.digest(c.domain, _settle(4, merkle=True)) == c.settle_digest(_settle(4, merkle=True))
    extreme = Settle(
        job_id=2**256 - 1,
        epoch=2**64 - 1,
        deadline=2**256 - 1,
        proof_root=b"\xff" * 32,
        payout=2**256 - 1,
        workers=[to_checksum_address("0x" + "ff" * 20), to_checksum_address("0x" + "00" * 19 + "01")],
        work=[2**256 - 1, 0],
        reputation=[-(2**255), 2**255 - 1],
        reward_root=ZERO32,
        total_work=0,
    )
    assert eip712.digest(c.domain, extreme) == c.settle_digest(extreme)


def test_domain_separator_matches(digests: World) -> None:
    c = digests.chain
    ours = oracle_digest(digests.backend.chain_id, c.settlement.address, _settle(0))
    assert ours == c.settle_digest(_settle(0))
    separator = bytes(c.settlement.functions.domainSeparator().call())
    expected = keccak(
        abi.encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(text=DOMAIN_TYPE),
                keccak(text="TensorLink"),
                keccak(text="1"),
                c.backend.chain_id,
                c.settlement.address,
            ],
        )
    )
    assert separator == expected


def test_typehashes_match_the_contract(digests: World) -> None:
    fns = digests.chain.settlement.functions
    assert bytes(fns.SETTLE_TYPEHASH().call()) == keccak(text=SETTLE_TYPE)
    assert bytes(fns.SLASH_TYPEHASH().call()) == keccak(text=SLASH_TYPE)


addresses = st.binary(min_size=20, max_size=20).map(lambda b: to_checksum_address(b))
uint256 = st.integers(0, 2**256 - 1)
int256 = st.integers(-(2**255), 2**255 - 1)


@st.composite
def settles(draw: st.DrawFn) -> Settle:
    n = draw(st.integers(0, 9))
    return Settle(
        job_id=draw(uint256),
        epoch=draw(st.integers(0, 2**64 - 1)),
        deadline=draw(uint256),
        proof_root=draw(st.binary(min_size=32, max_size=32)),
        payout=draw(uint256),
        workers=draw(st.lists(addresses, min_size=n, max_size=n)),
        work=draw(st.lists(uint256, min_size=n, max_size=n)),
        reputation=draw(st.lists(int256, min_size=n, max_size=n)),
        reward_root=ZERO32,
        total_work=draw(uint256),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=settles())
def test_random_settles_match_contract(digests: World, msg: Settle) -> None:
    assert eip712.digest(digests.chain.domain, msg) == digests.chain.settle_digest(msg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offender=addresses,
    amount=uint256,
    evidence=st.binary(min_size=32, max_size=32),
    nonce=uint256,
    epoch=st.integers(0, 2**64 - 1),
    deadline=uint256,
    reputation=int256,
)
def test_random_slashes_match_contract(
    digests: World, offender: str, amount: int, evidence: bytes, nonce: int, epoch: int, deadline: int, reputation: int
) -> None:
    msg = Slash(offender, amount, evidence, nonce, epoch, deadline, reputation)
    c = digests.chain
    assert eip712.digest(c.domain, msg) == c.slash_digest(msg)
    assert eip712.digest(c.domain, msg) == oracle_digest(digests.backend.chain_id, c.settlement.address, msg)


def test_sign_orders_by_signer_and_recovers() -> None:
    keys = [a.key for a in random_accounts(6)]
    dom = eip712.domain(1, to_checksum_address("0x" + "12" * 20))
    msg = _settle(2)
    sigs = eip712.sign(keys, dom, msg)
    signers = [eip712.recover(dom, msg, s) for s in sigs]
    assert signers == sorted((Account.from_key(k).address for k in keys), key=lambda a: int(a, 16))
    assert all(len(s) == 65 for s in sigs)
    digest = eip712.digest(dom, msg)
    assert Account._recover_hash(digest, signature=sigs[0]) == signers[0]


def test_struct_validation() -> None:
    good = _settle(2)
    fields = {f: getattr(good, f) for f in good.__struct_fields__}
    for name, bad in [
        ("epoch", 2**64),
        ("job_id", -1),
        ("deadline", 2**256),
        ("payout", True),
        ("reward_root", b"\x00" * 31),
        ("workers", [good.workers[0].lower(), good.workers[1]]),
        ("reputation", [0, -(2**255) - 1]),
    ]:
        with pytest.raises(ValueError):
            Settle(**{**fields, name: bad})
    assert isinstance(Settle(**{**fields, "workers": list(good.workers)}).workers, tuple)
    with pytest.raises(ValueError):
        eip712.domain(1, "0x" + "ab" * 20)
