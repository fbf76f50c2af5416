"""The user's side of job admission: ask a validator for workers, get the plan or the reason why not."""

from __future__ import annotations

import trio

from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import Stream, StreamError, close_stream, read_message, write_message
from tensorlink.validator.matching import JobRefused
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import ErrorReply, JobPlan, JobRequest
from tensorlink.wire.protocols import JOB_PROTOCOL


async def request_job(host: PeerHost, validator_peer_id: str, request: JobRequest, timeout_s: float = 30.0) -> JobPlan:
    """Send ``request`` to a validator the host is connected to (or has addresses for) and return its plan.

    Raises JobRefused with the validator's code and sentence when it turns the job down, and with code
    ``no_answer`` or ``bad_reply`` when it cannot be reached in time or answers something unusable.
    """
    stream: Stream | None = None
    try:
        with trio.fail_after(timeout_s):
            stream = await host.open(validator_peer_id, JOB_PROTOCOL)
            await write_message(stream, request)
            reply = await read_message(stream, JobPlan, ErrorReply, max_bytes=JobPlan.max_bytes)
    except trio.TooSlowError:
        raise JobRefused(
            "no_answer", f"validator {validator_peer_id} did not answer within {timeout_s:.0f} s"
        ) from None
    except (StreamError, WireError) as exc:
        raise JobRefused("bad_reply", f"validator {validator_peer_id}: {exc}") from None
    finally:
        if stream is not None:
            await close_stream(stream)
    if isinstance(reply, ErrorReply):
        raise JobRefused(reply.code, reply.message)
    _check_plan(request, reply, validator_peer_id)
    return reply


def _check_plan(request: JobRequest, plan: JobPlan, validator: str) -> None:
    """A plan that does not answer this request is refused here rather than half-used later."""
    first = 1 if request.private else 0
    remote = list(range(first, first + request.workers))
    peers = [p.peer_id for p in plan.placements]
    checks = (
        (plan.job == request.job, "it is for another job"),
        (plan.validator == validator, f"it names validator {plan.validator}"),
        (len(plan.unit_stage) == len(request.units), "its unit count differs from the request's"),
        (plan.n_stages == request.workers + 2 * first, f"it has {plan.n_stages} stages for {request.workers} workers"),
        (sorted(p.stage for p in plan.placements) == remote, "its placements are not one per remote stage"),
        (len(set(peers)) == len(peers), "it names a worker for two stages"),
        (not {request.owner, validator} & set(peers), "it names the owner or the validator itself as a worker"),
    )
    problems = [why for ok, why in checks if not ok]
    if problems:
        raise JobRefused(
            "bad_reply", f"validator {validator} sent a plan that does not fit the request: {'; '.join(problems)}"
        )
