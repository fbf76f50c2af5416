"""Job admission on a validator: ``JOB_PROTOCOL`` takes one JobRequest and answers a JobPlan or an ErrorReply.

Admission: the request must come from its owner; live workers are matched and the model partitioned
(validator/matching.py, in a thread: a big model takes the partitioner seconds); each chosen worker is
sent its StageAssign over the worker's ``ASSIGN_PROTOCOL``. A worker that refuses or does not answer is
left out and the job re-planned without it, a few times, before the user is told why it failed.

Hoarding: a job reserves its workers until its owner starts it, which an honest owner does within a
second of the plan. An owner may have ``max_pending_per_owner`` admitted jobs younger than the workers'
claim timeout (``pending_window_s``); more are refused, so one requester cannot lock the network with
jobs it never starts.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.streams import Stream, StreamError, close_stream, read_message, remote_peer, write_message
from tensorlink.validator.matching import JobRefused, plan_job
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import (
    ErrorReply,
    JobPlan,
    JobRequest,
    StageAssign,
    StageAssigned,
    WorkerCapability,
)
from tensorlink.wire.protocols import ASSIGN_PROTOCOL
from tensorlink.worker.assignments import CLAIM_TIMEOUT_S

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0
ASSIGN_TIMEOUT_S = 10.0
ADDRS_TTL_S = 600
MAX_ATTEMPTS = 3  # plans tried per request; each leaves out the workers that refused the one before
MAX_JOBS_KEPT = 256  # admitted jobs shown in the status, newest last
MAX_PENDING_PER_OWNER = 1  # offload() opens one job per model, each under an identity of its own


@dataclass(frozen=True)
class AdmittedJob:
    request: JobRequest
    plan: JobPlan
    admitted: float  # time.time()


class JobService:
    """Serves ``JOB_PROTOCOL`` (register ``handle`` with serve_protocol). ``workers()`` returns the live
    worker records this validator knows."""

    def __init__(
        self,
        host: PeerHost,
        peer_id: str,
        workers: Callable[[], list[WorkerCapability]],
        *,
        pending_window_s: float = CLAIM_TIMEOUT_S,
        max_pending_per_owner: int = MAX_PENDING_PER_OWNER,
    ) -> None:
        self.host = host
        self.peer_id = peer_id
        self._workers = workers
        self.pending_window_s = pending_window_s
        self.max_pending_per_owner = max_pending_per_owner
        self.jobs: OrderedDict[bytes, AdmittedJob] = OrderedDict()

    async def handle(self, stream: Stream) -> None:
        peer = remote_peer(stream)
        reply: JobPlan | ErrorReply
        try:
            try:
                with trio.fail_after(READ_TIMEOUT_S):
                    request = await read_message(stream, JobRequest, max_bytes=JobRequest.max_bytes)
            except (StreamError, WireError) as exc:
                raise JobRefused("bad_request", str(exc)) from None
            except trio.TooSlowError:
                raise JobRefused("bad_request", f"no JobRequest within {READ_TIMEOUT_S:.0f} s") from None
            reply = await self.admit(request, peer)
        except JobRefused as exc:
            log.info("refused a job from %s: %s", peer, exc)
            reply = ErrorReply(code=exc.code, message=exc.message[:1024])
        try:
            await write_message(stream, reply)
        finally:
            await close_stream(stream)

    async def admit(self, request: JobRequest, peer: str) -> JobPlan:
        """Match, partition and assign; the plan once every chosen worker accepted, else JobRefused."""
        if request.owner != peer:
            raise JobRefused("owner_mismatch", f"the request names owner {request.owner} but came from {peer}")
        known = self.jobs.get(request.job)
        if known is not None and known.request.owner != request.owner:
            raise JobRefused("job_exists", f"job {request.job.hex()} belongs to another owner; pick a new job id")
        self._check_pending(request)
        refused: dict[str, str] = {}
        for _ in range(MAX_ATTEMPTS):
            candidates = [c for c in self._workers() if c.peer_id not in refused]
            try:
                plan, assigns = await trio.to_thread.run_sync(plan_job, request, candidates, self.peer_id)
            except JobRefused as exc:
                if refused:
                    raise JobRefused(exc.code, f"{exc.message} ({_refusals(refused)})") from None
                raise
            addrs = {p.peer_id: p.addrs for p in plan.placements}
            failed: dict[str, str] = {}
            async with trio.open_nursery() as nursery:
                for assign, placement in zip(assigns, plan.placements, strict=True):
                    nursery.start_soon(self._assign, placement.peer_id, addrs[placement.peer_id], assign, failed)
            if not failed:
                self.jobs[request.job] = AdmittedJob(request, plan, time.time())
                self.jobs.move_to_end(request.job)
                while len(self.jobs) > MAX_JOBS_KEPT:
                    self.jobs.popitem(last=False)
                log.info("admitted job %s of %s: %d stages", request.job.hex(), request.owner, plan.n_stages)
                return plan
            refused.update(failed)
        raise JobRefused("workers_refused", f"no plan was accepted by all its workers ({_refusals(refused)})")

    def _check_pending(self, request: JobRequest) -> None:
        """Refuse an owner that already holds its quota of jobs it may not have started yet."""
        since = time.time() - self.pending_window_s
        pending = [
            job
            for job, a in self.jobs.items()
            if a.request.owner == request.owner and a.admitted > since and job != request.job
        ]
        if len(pending) >= self.max_pending_per_owner:
            raise JobRefused(
                "too_many_pending",
                f"owner {request.owner} has {len(pending)} job(s) admitted in the last {self.pending_window_s:.0f} s "
                f"(at most {self.max_pending_per_owner}): start them, or wait until their workers let them go",
            )

    async def _assign(self, peer: str, addrs: list[str], assign: StageAssign, failed: dict[str, str]) -> None:
        """Send one StageAssign; a refusal or silence is recorded in ``failed`` with the reason."""
        self.host.remember_addrs(peer, addrs, ADDRS_TTL_S)  # from its record: dialable
        stream: Stream | None = None
        try:
            with trio.fail_after(ASSIGN_TIMEOUT_S):
                stream = await self.host.open(peer, ASSIGN_PROTOCOL)
                await write_message(stream, assign)
                reply = await read_message(stream, StageAssigned, ErrorReply, max_bytes=ErrorReply.max_bytes)
        except trio.TooSlowError:
            failed[peer] = f"no answer within {ASSIGN_TIMEOUT_S:.0f} s"
            return
        except Exception as exc:  # unreachable, stream reset, garbage: this worker is out of this job
            failed[peer] = f"{type(exc).__name__}: {exc}"[:200]
            return
        finally:
            if stream is not None:
                await close_stream(stream)
        if isinstance(reply, ErrorReply):
            failed[peer] = f"{reply.code}: {reply.message}"[:300]
        elif reply.job != assign.job or reply.stage != assign.stage:
            failed[peer] = "answered for another job or stage"

    def status(self) -> list[dict[str, Any]]:
        """Admitted jobs as /status shows them."""
        now = time.time()
        return [
            {
                "job": job.hex(),
                "owner": a.request.owner,
                "n_stages": a.plan.n_stages,
                "private": a.request.private,
                "units": len(a.plan.unit_stage),
                "admitted_s_ago": round(now - a.admitted, 1),
                "stages": [
                    {"stage": p.stage, "peer_id": p.peer_id, "units": list(p.units), "memory_bytes": p.memory_bytes}
                    for p in a.plan.placements
                ],
            }
            for job, a in self.jobs.items()
        ]


def _refusals(refused: dict[str, str]) -> str:
    return "refused by " + "; ".join(f"{peer}: {why}" for peer, why in refused.items())
