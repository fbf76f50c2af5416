"""Typed access to the deployed SNO token, Staking and Settlement contracts.

Every transaction method takes the signing account first, validates its arguments (a ValueError before
anything is sent), and returns a `Receipt` with the decoded events of all three contracts. Reverts raise
the contract's named error from `tensorlink.chain.errors`. Amounts are integers in SNO's smallest unit
(18 decimals)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import msgspec
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import is_checksum_address, keccak
from hexbytes import HexBytes
from web3.contract import Contract
from web3.types import TxReceipt

from tensorlink.chain import artifacts, eip712, merkle
from tensorlink.chain.backends import Backend
from tensorlink.chain.errors import ChainError

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
SNO = 10**18
PERMIT_TTL_S = 3600
JOB_STATUS = {0: "none", 1: "open", 2: "settled", 3: "reclaimed"}


class Deployment(msgspec.Struct, frozen=True):
    """Where the three contracts live; enough to `Chain.attach` from another process."""

    chain_id: int
    token: str
    staking: str
    settlement: str


class DeployParams(msgspec.Struct, frozen=True, kw_only=True):
    """Constructor arguments. Defaults suit a dev chain; `admin`/`genesis_holder` default to the deployer."""

    genesis_supply: int = 1_000_000_000 * SNO
    genesis_holder: str | None = None
    admin: str | None = None
    admin_delay: int = 86_400  # two-step admin transfer waits this long (uint48 seconds)
    min_stake: int = 1_000 * SNO
    unbonding_delay: int = 7 * 86_400
    quorum_bps: int = 6_667  # more than two thirds: 3 of 3, 3 of 4, 5 of 7 (BFT's 2f + 1 of 3f + 1)
    treasury: str = ZERO_ADDRESS  # zero: slashed stake and swept unclaimed rewards are burnt
    reward_per_work: int = 10**15  # 0.001 SNO minted per unit of work
    job_timeout: int = 86_400
    claim_window: int = 30 * 86_400  # Merkle rewards are claimable this long after settle (7 to 730 days)


class Event(msgspec.Struct, frozen=True):
    """One decoded log."""

    name: str
    address: str
    args: dict[str, Any]


class Receipt(msgspec.Struct, frozen=True):
    """A mined, successful transaction. `result` is the contract function's return value where one
    matters (the new job id for `open_job`, the stake taken for `slash`), read from its event."""

    tx_hash: str
    gas_used: int
    block_number: int
    events: tuple[Event, ...]
    result: int | None = None

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def event(self, name: str) -> Event:
        """The first event called `name` (KeyError if there is none)."""
        for e in self.events:
            if e.name == name:
                return e
        raise KeyError(f"no {name} event in {self.tx_hash} (got {[e.name for e in self.events]})")


class StakeInfo(msgspec.Struct, frozen=True):
    staked: int
    unbonding: int
    release_at: int


class Job(msgspec.Struct, frozen=True):
    owner: str
    escrow: int
    opened_at: int
    status: str  # "none" | "open" | "settled" | "reclaimed"
    proof_root: bytes
    reward_root: bytes
    reward_left: int  # what claims may still take; 0 once swept
    claim_closes_at: int = 0  # Merkle mode: last second a claim is accepted, fixed at settle; 0 otherwise


def _amount(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= eip712.UINT256_MAX:
        raise ValueError(f"{name} must be a non-negative integer below 2**256, got {value!r}")
    return value


def _address(name: str, value: str) -> ChecksumAddress:
    if not isinstance(value, str) or not is_checksum_address(value):
        raise ValueError(f"{name} must be a checksummed address (Web3.to_checksum_address), got {value!r}")
    return cast(ChecksumAddress, value)  # is_checksum_address is a plain bool, not a TypeGuard


def _account(value: LocalAccount) -> LocalAccount:
    if not isinstance(value, LocalAccount):
        raise ValueError(f"the sender must be an eth-account LocalAccount, got {type(value).__name__}")
    return value


def _plain(value: Any) -> Any:
    """Event arguments as plain Python values (HexBytes → bytes, nested lists/tuples kept)."""
    if isinstance(value, HexBytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


class Chain:
    """The three contracts on one backend. `deploy` or `attach` before using the methods."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.w3 = backend.w3
        self._deployment: Deployment | None = None
        self._topics: dict[tuple[str, bytes], Any] = {}
        self._token_name: str | None = None

    # ------------------------------------------------------------------ setup

    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            raise ChainError("no contracts yet: call Chain.deploy(...) or Chain.attach(deployment)")
        return self._deployment

    def _contract(self, name: str, address: ChecksumAddress | None = None) -> Any:
        art = artifacts.load(name)
        if address is None:
            return self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        return self.w3.eth.contract(address=address, abi=art.abi)

    def deploy_contract(self, deployer: LocalAccount, name: str, *args: Any) -> Contract:
        """Deploy any artifact (also `test/...` ones) and return it bound to its address."""
        factory = self._contract(name)
        receipt = self.backend.transact(_account(deployer), factory.constructor(*args))
        return self._contract(name, receipt["contractAddress"])

    def deploy(
        self, deployer: LocalAccount, params: DeployParams | None = None, token: str | None = None
    ) -> Deployment:
        """Deploy SNOToken, Staking and Settlement, bind the settlement as the token's only minter and
        the staking's only slasher, check both bindings, and attach.

        `token` uses an existing token instead of deploying SNOToken (tests pass a hostile token); its
        minter is then not bound."""
        p = params or DeployParams()
        me = _account(deployer).address
        holder = _address("genesis_holder", p.genesis_holder or me)
        admin = _address("admin", p.admin or me)
        _address("treasury", p.treasury)
        for name in ("genesis_supply", "min_stake", "reward_per_work"):
            _amount(name, getattr(p, name))
        if token is None:
            token_contract = self.deploy_contract(deployer, "SNOToken", holder, p.genesis_supply)
            token_address = token_contract.address
        else:
            token_address = _address("token", token)
        staking = self.deploy_contract(
            deployer, "Staking", token_address, admin, p.admin_delay, p.min_stake, p.unbonding_delay, p.quorum_bps
        )
        settlement = self.deploy_contract(
            deployer,
            "Settlement",
            token_address,
            staking.address,
            admin,
            p.admin_delay,
            p.treasury,
            p.reward_per_work,
            p.job_timeout,
            p.claim_window,
        )
        if token is None:
            self.backend.transact(deployer, token_contract.functions.bindMinter(settlement.address))
            if token_contract.functions.minter().call() != settlement.address:
                raise ChainError("token minter binding did not take")
        self.backend.transact(deployer, staking.functions.bindSlasher(settlement.address))
        if staking.functions.slasher().call() != settlement.address:
            raise ChainError("staking slasher binding did not take")
        deployment = Deployment(self.backend.chain_id, token_address, staking.address, settlement.address)
        self.attach(deployment, check_minter=token is None)
        return deployment

    def attach(self, deployment: Deployment, check_minter: bool = True) -> None:
        """Use contracts deployed earlier. A deployment record may come from elsewhere, so check that it is
        for this chain, that code exists at each address, and that the three contracts point at each
        other (settlement's token and staking, staking's slasher, and unless told not to, the minter)."""
        if deployment.chain_id != self.backend.chain_id:
            raise ChainError(f"deployment is for chain {deployment.chain_id}, backend is {self.backend.chain_id}")
        addresses = {name: _address(name, getattr(deployment, name)) for name in ("token", "staking", "settlement")}
        for name, address in addresses.items():
            if not self.w3.eth.get_code(address):
                raise ChainError(f"no contract code at the {name} address {address}")
        token = self._contract("SNOToken", addresses["token"])
        staking = self._contract("Staking", addresses["staking"])
        settlement = self._contract("Settlement", addresses["settlement"])
        links = [
            ("settlement.token", settlement.functions.token(), deployment.token),
            ("settlement.staking", settlement.functions.staking(), deployment.staking),
            ("staking.slasher", staking.functions.slasher(), deployment.settlement),
        ]
        if check_minter:
            links.append(("token.minter", token.functions.minter(), deployment.settlement))
        for link, call, expected in links:
            try:
                found = call.call()
            except Exception as exc:  # not the contract we expect: any view may revert or fail to decode
                raise ChainError(f"reading {link} failed ({exc}): not one TensorLink deployment") from exc
            if found != expected:
                raise ChainError(f"{link} is {found}, expected {expected}: not one TensorLink deployment")
        self._deployment = deployment
        self.token, self.staking, self.settlement = token, staking, settlement
        self._topics = {}
        for contract in (self.token, self.staking, self.settlement):
            for entry in contract.abi:
                if entry.get("type") != "event" or entry.get("anonymous"):
                    continue
                types = ",".join(i["type"] for i in entry["inputs"])
                topic = keccak(text=f"{entry['name']}({types})")
                self._topics[(contract.address, topic)] = getattr(contract.events, entry["name"])()
        self.domain = eip712.domain(self.backend.chain_id, deployment.settlement)

    # ------------------------------------------------------------------ sending

    def transact(self, sender: LocalAccount, fn: Any) -> Receipt:
        """Send any bound contract function (also ones without a typed method here)."""
        return self._receipt(self.backend.transact(_account(sender), fn))

    def _receipt(self, rc: TxReceipt) -> Receipt:
        events = []
        for log in rc["logs"]:
            if not log["topics"]:
                continue
            event = self._topics.get((log["address"], bytes(log["topics"][0])))
            if event is None:
                continue
            decoded = event.process_log(log)
            args = {k: _plain(v) for k, v in decoded["args"].items()}
            events.append(Event(decoded["event"], log["address"], args))
        return Receipt(
            tx_hash="0x" + bytes(rc["transactionHash"]).hex(),
            gas_used=int(rc["gasUsed"]),
            block_number=int(rc["blockNumber"]),
            events=tuple(events),
        )

    # ------------------------------------------------------------------ token

    def approve(self, owner: LocalAccount, spender: str, amount: int) -> Receipt:
        fn = self.token.functions.approve(_address("spender", spender), _amount("amount", amount))
        return self.transact(owner, fn)

    def transfer(self, sender: LocalAccount, to: str, amount: int) -> Receipt:
        fn = self.token.functions.transfer(_address("to", to), _amount("amount", amount))
        return self.transact(sender, fn)

    def permit_signature(
        self, owner: LocalAccount, spender: str, amount: int, deadline: int
    ) -> tuple[int, bytes, bytes]:
        """ERC-2612 permit (v, r, s) letting `spender` pull `amount` of `owner`'s SNO until `deadline`."""
        if self._token_name is None:
            self._token_name = self.token.functions.name().call()
        typed = {
            "types": {
                "EIP712Domain": eip712.DOMAIN_TYPE,
                "Permit": [
                    {"name": "owner", "type": "address"},
                    {"name": "spender", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "deadline", "type": "uint256"},
                ],
            },
            "primaryType": "Permit",
            "domain": {
                "name": self._token_name,
                "version": "1",
                "chainId": self.backend.chain_id,
                "verifyingContract": self.token.address,
            },
            "message": {
                "owner": owner.address,
                "spender": spender,
                "value": amount,
                "nonce": self.token.functions.nonces(owner.address).call(),
                "deadline": deadline,
            },
        }
        signed = Account.sign_typed_data(owner.key, full_message=typed)
        return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")

    # ------------------------------------------------------------------ staking

    def stake(self, sender: LocalAccount, amount: int) -> Receipt:
        """Bond `amount` (needs `approve(sender, staking, amount)` first; see `stake_with_permit`)."""
        return self.transact(sender, self.staking.functions.stake(_amount("amount", amount)))

    def stake_with_permit(self, sender: LocalAccount, amount: int) -> Receipt:
        """Bond `amount` in one transaction: an ERC-2612 permit signed here replaces the approve."""
        _amount("amount", amount)
        deadline = self.backend.now() + PERMIT_TTL_S
        v, r, s = self.permit_signature(_account(sender), self.staking.address, amount, deadline)
        return self.transact(sender, self.staking.functions.stakeWithPermit(amount, deadline, v, r, s))

    def join_validators(self, sender: LocalAccount) -> Receipt:
        return self.transact(sender, self.staking.functions.joinValidators())

    def leave_validators(self, sender: LocalAccount) -> Receipt:
        return self.transact(sender, self.staking.functions.leaveValidators())

    def request_unbond(self, sender: LocalAccount, amount: int) -> Receipt:
        return self.transact(sender, self.staking.functions.requestUnbond(_amount("amount", amount)))

    def withdraw(self, sender: LocalAccount) -> Receipt:
        return self.transact(sender, self.staking.functions.withdraw())

    # ------------------------------------------------------------------ jobs

    def open_job(self, sender: LocalAccount, escrow: int, permit: bool = True) -> Receipt:
        """Open a job holding `escrow` SNO; the job id is `receipt.result`. With `permit=False` the sender
        must have approved the settlement contract first."""
        _amount("escrow", escrow)
        if permit:
            deadline = self.backend.now() + PERMIT_TTL_S
            v, r, s = self.permit_signature(_account(sender), self.settlement.address, escrow, deadline)
            fn = self.settlement.functions.openJobWithPermit(escrow, deadline, v, r, s)
        else:
            fn = self.settlement.functions.openJob(escrow)
        receipt = self.transact(sender, fn)
        return msgspec.structs.replace(receipt, result=int(receipt.event("JobOpened").args["jobId"]))

    def reclaim(self, sender: LocalAccount, job_id: int) -> Receipt:
        """Take an unsettled job's escrow back after the job timeout."""
        return self.transact(sender, self.settlement.functions.reclaim(_amount("job_id", job_id)))

    def sign_settle(self, keys: Sequence[bytes | str], msg: eip712.Settle) -> list[bytes]:
        return eip712.sign(keys, self.domain, msg)

    def sign_slash(self, keys: Sequence[bytes | str], msg: eip712.Slash) -> list[bytes]:
        return eip712.sign(keys, self.domain, msg)

    @staticmethod
    def _signatures(signatures: Sequence[bytes]) -> list[bytes]:
        if not signatures:
            raise ValueError("at least one signature is needed")
        for i, sig in enumerate(signatures):
            if not isinstance(sig, bytes) or len(sig) != 65:
                raise ValueError(f"signature {i} must be 65 bytes (r ‖ s ‖ v)")
        return list(signatures)

    def settle(self, sender: LocalAccount, msg: eip712.Settle, signatures: Sequence[bytes]) -> Receipt:
        """Submit a quorum-signed settlement (anyone may send it)."""
        if not isinstance(msg, eip712.Settle):
            raise ValueError("msg must be an eip712.Settle")
        sigs = self._signatures(signatures)
        return self.transact(sender, self.settlement.functions.settle(msg.as_tuple(), sigs))

    def claim(self, sender: LocalAccount, leaf: merkle.Leaf, proof: Sequence[bytes]) -> Receipt:
        """Pay `leaf.worker` its Merkle-mode reward (anyone may send it; the worker named is paid). Open until
        `job(id).claim_closes_at`; later claims raise `errors.ClaimWindowClosed`."""
        if not isinstance(leaf, merkle.Leaf):
            raise ValueError("leaf must be a merkle.Leaf")
        for i, node in enumerate(proof):
            if not isinstance(node, bytes) or len(node) != 32:
                raise ValueError(f"proof[{i}] must be 32 bytes")
        fn = self.settlement.functions.claim(leaf.job_id, leaf.worker, leaf.amount, leaf.rep_delta, list(proof))
        return self.transact(sender, fn)

    def sweep_unclaimed(self, sender: LocalAccount, job_id: int) -> Receipt:
        """After a Merkle-mode job's claim window closed, send what its claims left to the treasury (burnt
        when the treasury is zero); anyone may send it. `receipt.result` is the amount swept."""
        receipt = self.transact(sender, self.settlement.functions.sweepUnclaimed(_amount("job_id", job_id)))
        return msgspec.structs.replace(receipt, result=int(receipt.event("UnclaimedSwept").args["amount"]))

    def slash(self, sender: LocalAccount, msg: eip712.Slash, signatures: Sequence[bytes]) -> Receipt:
        """Submit a quorum-signed slash; `receipt.result` is the stake actually taken."""
        if not isinstance(msg, eip712.Slash):
            raise ValueError("msg must be an eip712.Slash")
        sigs = self._signatures(signatures)
        receipt = self.transact(sender, self.settlement.functions.slash(msg.as_tuple(), sigs))
        return msgspec.structs.replace(receipt, result=int(receipt.event("SlashExecuted").args["taken"]))

    # ------------------------------------------------------------------ views

    def epoch(self) -> int:
        return int(self.staking.functions.epoch().call())

    def validators(self) -> list[str]:
        return list(self.staking.functions.validators().call())

    def is_validator(self, account: str) -> bool:
        return bool(self.staking.functions.isValidator(_address("account", account)).call())

    def quorum(self) -> int:
        return int(self.staking.functions.quorum().call())

    def stake_of(self, account: str) -> StakeInfo:
        staked, unbonding, release_at = self.staking.functions.stakeOf(_address("account", account)).call()
        return StakeInfo(int(staked), int(unbonding), int(release_at))

    def claim_window(self) -> int:
        """Seconds after a Merkle-mode settlement during which claims are accepted (fixed per job at its
        settlement; a change applies to later settlements only)."""
        return int(self.settlement.functions.claimWindow().call())

    def job(self, job_id: int) -> Job:
        (owner, opened_at, status, escrow, proof_root, reward_root, reward_left, claim_closes_at) = (
            self.settlement.functions.jobs(_amount("job_id", job_id)).call()
        )
        return Job(
            owner, int(escrow), int(opened_at), JOB_STATUS.get(int(status), str(status)),
            bytes(proof_root), bytes(reward_root), int(reward_left), int(claim_closes_at),
        )  # fmt: skip

    def reputation(self, account: str) -> int:
        return int(self.settlement.functions.reputation(_address("account", account)).call())

    def balance(self, account: str) -> int:
        return int(self.token.functions.balanceOf(_address("account", account)).call())

    def settle_digest(self, msg: eip712.Settle) -> bytes:
        """The contract's own digest of `msg` (for cross-checking `eip712.digest`)."""
        return bytes(self.settlement.functions.settleDigest(msg.as_tuple()).call())

    def slash_digest(self, msg: eip712.Slash) -> bytes:
        return bytes(self.settlement.functions.slashDigest(msg.as_tuple()).call())
