"""The capacity challenge: a worker shows the matmul speed it claims, on the validator's numbers.

A validator sends a seed and a round count over ``CHALLENGE_PROTOCOL``. Both sides draw the same two
N x N matrices A, B of small integers from the seed; the worker runs ``rounds`` chained products on its
stage device (``A <- fold(A @ B)``, fold mapping each value back into [-4, 4]) and answers a digest of
every row of the result. Every value is an integer below 2**24, so float32 computes it exactly in any
order, on any BLAS or GPU. Row i of the result depends only on row i of A, so the validator recomputes
a few rows it picks after the answer, at N**2 per row and round instead of N**3: it cannot be fooled by
a worker that computed part of the matrix, and checking costs it almost nothing. Only trusted validators
may challenge, one challenge at a time, and the work is capped (``MAX_ROUNDS``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ClassVar, Union

import msgspec
import numpy as np
import trio

from tensorlink.p2p.streams import Stream, StreamError, close_stream, read_record, remote_peer, write_message
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import ErrorReply, Message, decode_checked
from tensorlink.worker.assignments import ValidatorRule

log = logging.getLogger(__name__)

N = 512  # the self-benchmark's matmul size (node/selfbench.py): the same kernel, so the same speed
MAX_ROUNDS = 64  # 17 GFLOP: a fraction of a second for a worker that really has the speed it would need
LOW, HIGH = -4, 4  # entries: |sum| <= N * 16 = 8192 < 2**24, exact in float32
ROW_DIGEST_BYTES = 8
READ_TIMEOUT_S = 10.0


def flops_per_round() -> int:
    return 2 * N**3


class CapacityChallenge(Message, tag="capacity_challenge", frozen=True):
    """A validator asking for ``rounds`` chained N x N products of the matrices drawn from ``seed``."""

    seed: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    rounds: Annotated[int, msgspec.Meta(ge=1, le=MAX_ROUNDS)]
    max_bytes: ClassVar[int] = 128


class CapacityAnswer(Message, tag="capacity_answer", frozen=True):
    """A digest of every row of the result, in row order."""

    rows: Annotated[bytes, msgspec.Meta(min_length=N * ROW_DIGEST_BYTES, max_length=N * ROW_DIGEST_BYTES)]
    max_bytes: ClassVar[int] = N * ROW_DIGEST_BYTES + 128


_decoder = msgspec.msgpack.Decoder(Union[CapacityChallenge, CapacityAnswer, ErrorReply])  # noqa: UP007


def decode(data: bytes) -> CapacityChallenge | CapacityAnswer | ErrorReply:
    return decode_checked(_decoder, data, "challenge message")


def matrices(seed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A and B (int8), the same on every machine for the same seed."""
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return rng.integers(LOW, HIGH + 1, (N, N), dtype=np.int8), rng.integers(LOW, HIGH + 1, (N, N), dtype=np.int8)


def fold(values: Any) -> Any:
    """Back into [LOW, HIGH], so that the next product stays exact (numpy and torch alike)."""
    return (values % (HIGH - LOW + 1)) + LOW


def row_digest(row: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(row, dtype="<i4").tobytes()).digest()[:ROW_DIGEST_BYTES]


def expected_rows(seed: bytes, rounds: int, rows: list[int]) -> list[bytes]:
    """The digests of the answer's ``rows``, computed with N**2 work per row and round (the validator's
    check; float64 holds every value exactly)."""
    a, b = matrices(seed)
    part, bm = a[rows].astype(np.float64), b.astype(np.float64)
    for k in range(rounds):
        part = part @ bm
        if k < rounds - 1:
            part = fold(part)
    return [row_digest(r) for r in part.astype(np.int32)]


def solve(challenge: CapacityChallenge, device: str) -> CapacityAnswer:
    """The worker's side: all rounds on the stage device, in float32."""
    import torch  # workers only

    a, b = (torch.from_numpy(m).to(device=device, dtype=torch.float32) for m in matrices(challenge.seed))
    for k in range(challenge.rounds):
        a = a @ b
        if k < challenge.rounds - 1:
            a = fold(a)
    result = a.to(torch.int32).cpu().numpy()
    return CapacityAnswer(rows=b"".join(row_digest(r) for r in result))


def challenge_handler(device: str, validators: ValidatorRule) -> Callable[[Any], Awaitable[None]]:
    """The worker's ``CHALLENGE_PROTOCOL`` handler: one challenge in, one answer out. Only trusted
    ``validators`` get an answer, and one at a time: the worker's CPU is for stages."""
    busy = trio.Lock()

    async def answer(peer: str, msg: Any) -> CapacityAnswer | ErrorReply:
        if not isinstance(msg, CapacityChallenge):
            return ErrorReply(code="bad_request", message=f"expected a CapacityChallenge, got {type(msg).__name__}")
        await validators.learn(peer)
        if not validators.trusts(peer):
            return ErrorReply(code="not_a_validator", message=validators.refusal(peer)[:1024])
        if busy.locked():
            return ErrorReply(code="busy", message="this worker is answering another challenge; ask again later")
        async with busy:
            return await trio.to_thread.run_sync(solve, msg, device)

    async def handle(stream: Stream) -> None:
        reply: CapacityAnswer | ErrorReply
        try:
            with trio.fail_after(READ_TIMEOUT_S):
                msg = decode(await read_record(stream, CapacityChallenge.max_bytes))
        except (StreamError, WireError, trio.TooSlowError) as exc:
            reply = ErrorReply(code="bad_request", message=str(exc)[:1024] or "timeout")
        else:
            reply = await answer(remote_peer(stream), msg)
        try:
            await write_message(stream, reply)
        finally:
            await close_stream(stream)

    return handle
