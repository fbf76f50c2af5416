"""Capacity claims are checked before they are relied on: the challenge's arithmetic is exact on both
sides, a worker that skips work or answers garbage is caught, only trusted validators may challenge,
and matching credits a claim only as far as a challenge measured it. Two real libp2p hosts on loopback."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from tensorlink.p2p.host import make_host, serve_protocol
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import close_stream, open_stream, read_record, write_message, write_record
from tensorlink.validator.trust import UNVERIFIED_GFLOPS, CapacityCheck, ValidatorTrust
from tensorlink.wire.messages import ErrorReply, WorkerCapability
from tensorlink.wire.protocols import CHALLENGE_PROTOCOL
from tensorlink.worker import challenge as ch

GIB = 1 << 30


def claim(peer: str, gflops: float = 20.0, memory: int = 4 * GIB, device: str = "cpu") -> WorkerCapability:
    return WorkerCapability(
        peer_id=peer, device=device, device_name="x", memory_bytes=memory, free_memory_bytes=memory, gflops=gflops,
        software="tensorlink/0.1.0",
    )  # fmt: skip


def test_the_answer_is_exact_and_rows_can_be_checked_alone() -> None:
    seed = secrets.token_bytes(16)
    answer = ch.solve(ch.CapacityChallenge(seed=seed, rounds=3), "cpu")
    rows = [0, 1, 200, ch.N - 1]
    got = [answer.rows[i * ch.ROW_DIGEST_BYTES : (i + 1) * ch.ROW_DIGEST_BYTES] for i in rows]
    assert got == ch.expected_rows(seed, 3, rows)
    assert ch.expected_rows(seed, 2, rows) != got  # a round fewer is another answer
    assert ch.expected_rows(secrets.token_bytes(16), 3, rows) != got


@asynccontextmanager
async def two_hosts(tmp_path: Path, worker_handler: Callable[[Any], Any] | None) -> AsyncIterator[tuple[Any, str, str]]:
    """(validator host, its peer id, worker peer id), connected; the worker serves ``worker_handler``."""
    keys = [load_or_create_identity(tmp_path / name) for name in ("validator", "worker")]
    validator, worker = (make_host(k) for k in keys)
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with validator.run(listen), worker.run(listen):
        if worker_handler is not None:
            serve_protocol(worker, CHALLENGE_PROTOCOL, worker_handler)
        await validator.connect(info_from_p2p_addr(worker.get_addrs()[0]))
        yield validator, peer_id_of(keys[0]), peer_id_of(keys[1])


def validator_id(tmp_path: Path) -> str:
    """The peer id ``two_hosts`` will give its validator, known before it starts."""
    return peer_id_of(load_or_create_identity(tmp_path / "validator"))


def honest_handler(trusted: list[str]) -> Callable[[Any], Any]:
    return ch.challenge_handler("cpu", ValidatorTrust(trusted))


async def test_an_honest_worker_is_measured_and_credited_at_most_its_claim(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_hosts(tmp_path, honest_handler([validator_id(tmp_path)])) as (host, _, worker):
            check = CapacityCheck(PeerHost(host))
            modest = claim(worker, gflops=0.5)  # below any real speed: the claim is the cap
            assert check.due(modest) and check.credited(modest).gflops == 0.5  # type: ignore[union-attr]
            verdict = await check.check(modest)
            assert verdict.outcome == "verified" and verdict.measured_gflops > 0.5, verdict
            assert check.credited(modest).gflops == 0.5 and not check.due(modest)  # type: ignore[union-attr]
            bold = claim(worker, gflops=1e6)  # a new claim is checked again
            assert check.due(bold) and check.credited(bold).gflops == UNVERIFIED_GFLOPS  # type: ignore[union-attr]
            verdict = await check.check(bold)
            assert verdict.outcome == "verified" and verdict.measured_gflops < 1e4, verdict  # no CPU does 10 TFLOP/s
            assert check.credited(bold).gflops == verdict.measured_gflops  # type: ignore[union-attr]
            assert "64 rounds" in verdict.detail  # the work is capped, whatever the claim


@pytest.mark.parametrize("skip", ["garbage", "half_the_rows", "one_round_less"])
async def test_a_worker_that_skips_work_is_caught_and_left_out(tmp_path: Path, skip: str) -> None:
    async def cheat(stream: Any) -> None:
        msg = ch.decode(await read_record(stream, 1024))
        assert isinstance(msg, ch.CapacityChallenge)
        if skip == "garbage":
            rows = secrets.token_bytes(ch.N * ch.ROW_DIGEST_BYTES)
        else:
            # one round less of the long challenge (the one-round probe is answered honestly)
            rounds = max(1, msg.rounds - 1) if skip == "one_round_less" else msg.rounds
            honest = ch.solve(msgspec.structs.replace(msg, rounds=rounds), "cpu").rows
            half = ch.N // 2 * ch.ROW_DIGEST_BYTES
            rows = honest if skip == "one_round_less" else honest[:half] + bytes(len(honest) - half)
        await write_message(stream, ch.CapacityAnswer(rows=rows))
        await close_stream(stream)

    with trio.fail_after(60):
        async with two_hosts(tmp_path, cheat) as (host, _, worker):
            check = CapacityCheck(PeerHost(host))
            verdict = await check.check(claim(worker, gflops=1e6, memory=1000 * GIB))
            assert verdict.outcome == "wrong_answer", verdict
            assert f"of {ch.MAX_ROUNDS} round(s)" in verdict.detail or skip != "one_round_less", verdict
            assert check.credited(claim(worker, gflops=1e6, memory=1000 * GIB)) is None


async def test_only_trusted_validators_may_challenge_and_unchecked_claims_count_little(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with two_hosts(tmp_path, honest_handler(["12D3KooWSomeoneElse"])) as (host, me, worker):
            check = CapacityCheck(PeerHost(host))
            verdict = await check.check(claim(worker, gflops=50.0))
            assert (
                verdict.outcome == "refused" and f"not_a_validator: {me} is not a trusted validator" in verdict.detail
            )
            credited = check.credited(claim(worker, gflops=50.0, memory=1000 * GIB))
            assert credited is not None and credited.gflops == UNVERIFIED_GFLOPS
            assert credited.memory_bytes == credited.free_memory_bytes == 256 * GIB  # the plausibility bound
            assert check.credited(claim(worker, memory=1000 * GIB, device="cuda")).memory_bytes == 192 * GIB  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (b"\xc1\xc1", "malformed challenge message"),
        (msgspec.msgpack.encode(ch.CapacityAnswer(rows=bytes(ch.N * ch.ROW_DIGEST_BYTES))), "more than 128"),
        (msgspec.msgpack.encode(ErrorReply(code="x", message="")), "expected a CapacityChallenge"),
        (b"\x81\xa4kind\xb2capacity_challenge", "malformed challenge message"),  # no seed, no rounds
    ],
)
async def test_bad_challenges_get_a_named_error(tmp_path: Path, record: bytes, why: str) -> None:
    with trio.fail_after(30):
        async with two_hosts(tmp_path, honest_handler([validator_id(tmp_path)])) as (host, _, worker):
            stream = await open_stream(host, worker, CHALLENGE_PROTOCOL)
            await write_record(stream, record)
            reply = ch.decode(await read_record(stream, 4096))
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request" and why in reply.message, reply
