"""Rule (a) of validator trust: a peer is a validator while its account is in the Staking contract's
validator set on the chain this node is configured with.

A libp2p identity is not an Ethereum account, so a validator proves which account is its own: over
``PROOF_PROTOCOL`` it answers an EIP-191 signature, by that account, of a statement naming its peer id,
the chain and the staking contract. The statement names the peer, so a proof copied by another peer is
worthless (the stream is authenticated as the peer that answers). The verdict is kept ``TTL_S`` and
asked again after that, so a validator that unstakes or is slashed out loses its role within a minute.
"""

from __future__ import annotations

# isort: split
from tensorlink.chain import recursion_guard  # noqa: F401  (before eth_account: it raises the recursion limit)

# isort: split
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol, Union

import msgspec
import trio
from eth_account import Account
from eth_account.messages import encode_defunct

from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import Stream, close_stream, read_record, remote_peer, write_message
from tensorlink.wire.messages import ErrorReply, Message, decode_checked
from tensorlink.wire.protocols import PROOF_PROTOCOL

log = logging.getLogger(__name__)

TTL_S = 60.0
PROOF_TIMEOUT_S = 10.0
Address = Annotated[str, msgspec.Meta(pattern=r"^0x[0-9a-fA-F]{40}\Z")]


class ProofRequest(Message, tag="validator_proof_request", frozen=True):
    """Asking a peer which staked account is its own."""

    max_bytes: ClassVar[int] = 64


class ValidatorProof(Message, tag="validator_proof", frozen=True):
    """The account and its signature of ``statement(peer id, chain)``."""

    account: Address
    signature: Annotated[bytes, msgspec.Meta(min_length=65, max_length=65)]
    max_bytes: ClassVar[int] = 256


_decoder = msgspec.msgpack.Decoder(Union[ProofRequest, ValidatorProof, ErrorReply])  # noqa: UP007


class StakingView(Protocol):
    """What this rule reads from the chain (tensorlink.chain.Chain has it)."""

    @property
    def deployment(self) -> Any: ...  # chain_id and staking address

    def is_validator(self, account: str) -> bool: ...


@dataclass(frozen=True)
class _Verdict:
    staked: bool
    until: float
    why: str


class StakedValidators:
    """The chain rule on one node: ``learn(peer)`` asks and checks, ``trusts(peer)`` answers from that.

    ``key`` is this node's own staked account key, when it is a validator that must prove itself."""

    protocol: ClassVar[str] = PROOF_PROTOCOL

    def __init__(
        self,
        chain: StakingView,
        host: PeerHost,
        key: bytes | str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chain = chain
        self.host = host
        self.account = None if key is None else Account.from_key(key)
        self._clock = clock
        self._verdicts: dict[str, _Verdict] = {}

    @property
    def rule(self) -> str:
        d = self.chain.deployment
        return f"staked on chain {d.chain_id} (staking contract {d.staking})"

    def statement(self, peer: str) -> str:
        d = self.chain.deployment
        return f"TensorLink validator {peer} on chain {d.chain_id}, staking contract {d.staking}"

    def trusts(self, peer: str) -> bool:
        v = self._verdicts.get(peer)
        return v is not None and v.staked and v.until > self._clock()

    def why_not(self, peer: str) -> str:
        v = self._verdicts.get(peer)
        return "its stake was not checked yet" if v is None else v.why

    async def learn(self, peer: str) -> None:
        """Ask ``peer`` for its proof and check its stake, unless a verdict is still fresh."""
        v = self._verdicts.get(peer)
        if v is not None and v.until > self._clock():
            return
        staked, why = await self._check(peer)
        self._verdicts[peer] = _Verdict(staked, self._clock() + TTL_S, why)
        log.info("validator %s: %s", peer, why)

    async def _check(self, peer: str) -> tuple[bool, str]:
        stream: Stream | None = None
        try:
            with trio.fail_after(PROOF_TIMEOUT_S):
                stream = await self.host.open(peer, PROOF_PROTOCOL)
                await write_message(stream, ProofRequest())
                reply = decode_checked(_decoder, await read_record(stream, ValidatorProof.max_bytes), "proof")
        except trio.TooSlowError:
            return False, f"no proof of stake within {PROOF_TIMEOUT_S:.0f} s"
        except Exception as exc:  # unreachable, reset, garbage
            return False, f"no proof of stake ({type(exc).__name__}: {exc})"[:300]
        finally:
            if stream is not None:
                await close_stream(stream)
        if not isinstance(reply, ValidatorProof):
            return False, f"no proof of stake (answered {getattr(reply, 'code', type(reply).__name__)})"
        try:
            signer = Account.recover_message(encode_defunct(text=self.statement(peer)), signature=reply.signature)
        except Exception:
            return False, "its proof of stake has an invalid signature"
        if signer.lower() != reply.account.lower():
            return False, f"its proof of stake is not signed by the account it names ({reply.account})"
        try:
            staked = await trio.to_thread.run_sync(self.chain.is_validator, signer)
        except Exception as exc:  # the chain is unreachable: not a validator until it answers
            return False, f"the chain could not be asked about {signer} ({type(exc).__name__})"
        if not staked:
            return False, f"its account {signer} is not in the validator set on chain {self.chain.deployment.chain_id}"
        return True, f"staked as {signer}"

    async def serve_proof(self, stream: Stream) -> None:
        """``PROOF_PROTOCOL`` handler: this node's proof, or an error when it has no account."""
        reply: ValidatorProof | ErrorReply
        try:
            with trio.fail_after(PROOF_TIMEOUT_S):
                request = decode_checked(_decoder, await read_record(stream, ProofRequest.max_bytes), "proof request")
        except Exception as exc:
            reply = ErrorReply(code="bad_request", message=str(exc)[:1024] or "timeout")
        else:
            if not isinstance(request, ProofRequest):
                reply = ErrorReply(code="bad_request", message=f"expected a ProofRequest from {remote_peer(stream)}")
            elif self.account is None:
                reply = ErrorReply(code="no_account", message="this node has no staked account configured")
            else:
                own = self.host.peer_id
                signed = self.account.sign_message(encode_defunct(text=self.statement(own)))
                reply = ValidatorProof(account=self.account.address, signature=bytes(signed.signature))
        try:
            await write_message(stream, reply)
        finally:
            await close_stream(stream)


def connect(rpc_url: str, deployment_file: str, host: PeerHost, key_file: str | None = None) -> StakedValidators:
    """The chain rule from a node's settings: the JSON-RPC URL, a deployment file (``{"chain_id", "token",
    "staking", "settlement"}``, as ``Chain.deploy`` returns it) and, on a validator, the file holding the
    hex key of its staked account. ValueError naming what is wrong."""
    from tensorlink.chain import Chain, ChainError, Deployment, RpcBackend

    try:
        deployment = msgspec.json.decode(open(deployment_file, "rb").read(), type=Deployment)
    except (OSError, msgspec.DecodeError) as exc:
        raise ValueError(f"chain_deployment {deployment_file}: {exc}") from None
    try:
        chain = Chain(RpcBackend(rpc_url, chain_id=deployment.chain_id, keys=[]))
        chain.attach(deployment)
    except (ChainError, OSError, ValueError) as exc:
        raise ValueError(f"chain at {rpc_url} cannot be used: {exc}") from None
    except Exception as exc:  # web3 raises its own connection errors
        raise ValueError(f"chain at {rpc_url} cannot be reached: {type(exc).__name__}: {exc}") from None
    key = None
    if key_file is not None:
        try:
            key = open(key_file).read().strip()
            Account.from_key(key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"chain_key_file {key_file}: not a readable hex private key ({exc})") from None
    return StakedValidators(chain, host, key)
