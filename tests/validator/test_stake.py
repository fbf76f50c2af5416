"""The chain rule of validator trust: a peer is obeyed as a validator while the account it proves is in
the Staking contract's validator set. An in-process EVM with the real contracts, real libp2p hosts on
loopback: a staked validator, an unstaked one, one that replays the staked one's proof, one with none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from tensorlink.chain import SNO, Chain, DeployParams, EmbeddedBackend
from tensorlink.p2p.host import make_host, serve_protocol
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import close_stream, open_stream, read_record, write_message, write_record
from tensorlink.validator import stake
from tensorlink.validator.trust import ValidatorTrust
from tensorlink.wire.messages import ErrorReply, StageAssign, StageAssigned, decode_message
from tensorlink.wire.protocols import PROOF_PROTOCOL
from tensorlink.worker.assignments import Assignments

pytestmark = [pytest.mark.slow]
STAKE = 1_000 * SNO


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def chain() -> Chain:
    backend = EmbeddedBackend()
    chain = Chain(backend)
    admin, validator = backend.accounts[0], backend.accounts[1]
    chain.deploy(admin, DeployParams(min_stake=STAKE))
    chain.transfer(admin, validator.address, STAKE)
    chain.stake_with_permit(validator, STAKE)
    chain.join_validators(validator)
    return chain


@asynccontextmanager
async def peers(tmp_path: Path, names: list[str]) -> AsyncIterator[dict[str, tuple[Any, str]]]:
    """Running hosts by name, each (host, peer id), all connected to the first."""
    async with AsyncExitStack() as stack:
        out: dict[str, tuple[Any, str]] = {}
        for name in names:
            key_pair = load_or_create_identity(tmp_path / name)
            host = make_host(key_pair)
            await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            out[name] = (host, peer_id_of(key_pair))
        first = out[names[0]][0]
        for host, _ in list(out.values())[1:]:
            await first.connect(info_from_p2p_addr(host.get_addrs()[0]))
        yield out


def assign(validator: str) -> StageAssign:
    return StageAssign(
        job=bytes(16), owner="12D3KooWOwner", validator=validator, stage=0, n_stages=1, memory_bytes=1 << 20
    )


async def test_only_a_peer_that_proves_a_staked_account_is_obeyed(chain: Chain, tmp_path: Path) -> None:
    accounts = chain.backend.accounts
    clock = Clock()
    with trio.fail_after(60):
        async with peers(tmp_path, ["worker", "staked", "unstaked", "copycat", "silent"]) as p:
            worker_rule = stake.StakedValidators(chain, PeerHost(p["worker"][0]), clock=clock)
            staked = stake.StakedValidators(chain, PeerHost(p["staked"][0]), accounts[1].key)
            unstaked = stake.StakedValidators(chain, PeerHost(p["unstaked"][0]), accounts[2].key)
            serve_protocol(p["staked"][0], PROOF_PROTOCOL, staked.serve_proof)
            serve_protocol(p["unstaked"][0], PROOF_PROTOCOL, unstaked.serve_proof)
            statement = staked.statement(p["staked"][1])
            signed = accounts[1].sign_message(stake.encode_defunct(text=statement))

            async def replay(stream: Any) -> None:  # the staked validator's own proof, from another peer
                await read_record(stream, 64)
                proof = stake.ValidatorProof(account=accounts[1].address, signature=bytes(signed.signature))
                await write_message(stream, proof)
                await close_stream(stream)

            serve_protocol(p["copycat"][0], PROOF_PROTOCOL, replay)
            trust = ValidatorTrust(staked=worker_rule)
            registry = Assignments(1 << 30, validators=trust)
            verdicts = {}
            for name in ("staked", "unstaked", "copycat", "silent"):
                peer = p[name][1]
                await trust.learn(peer)
                verdicts[name] = registry.accept(assign(peer), peer)
            assert isinstance(verdicts["staked"], StageAssigned), verdicts["staked"]
            why = {name: v.message for name, v in verdicts.items() if isinstance(v, ErrorReply)}
            assert set(why) == {"unstaked", "copycat", "silent"}
            assert all(v.code == "not_a_validator" for v in verdicts.values() if isinstance(v, ErrorReply))
            assert f"its account {accounts[2].address} is not in the validator set on chain" in why["unstaked"]
            assert "is not signed by the account it names" in why["copycat"]
            assert "no proof of stake" in why["silent"]
            assert f"trusted validators: staked on chain {chain.deployment.chain_id}" in why["silent"]

            # Leaving the validator set ends the role once the verdict is a minute old.
            chain.leave_validators(accounts[1])
            await trust.learn(p["staked"][1])
            assert trust.trusts(p["staked"][1])  # still the cached verdict
            clock.now += stake.TTL_S + 1
            await trust.learn(p["staked"][1])
            assert not trust.trusts(p["staked"][1])
            assert "not in the validator set" in trust.refusal(p["staked"][1])


@pytest.mark.parametrize("record", [b"\xc1\xc1", b"\x81\xa4kind\xafvalidator_proof", bytes(100)])
async def test_a_bad_proof_request_gets_a_named_error(chain: Chain, tmp_path: Path, record: bytes) -> None:
    with trio.fail_after(30):
        async with peers(tmp_path, ["asker", "validator"]) as p:
            rule = stake.StakedValidators(chain, PeerHost(p["validator"][0]), chain.backend.accounts[1].key)
            serve_protocol(p["validator"][0], PROOF_PROTOCOL, rule.serve_proof)
            stream = await open_stream(p["asker"][0], p["validator"][1], PROOF_PROTOCOL)
            await write_record(stream, record)
            reply = decode_message(await read_record(stream, 4096))
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request", reply
