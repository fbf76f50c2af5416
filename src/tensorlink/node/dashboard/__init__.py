"""The node's dashboard: the page's files, the timeline of failures and recoveries, and the Prometheus
families that carry every number the page shows.

The page (index.html, app.js, style.css, favicon.svg: package data next to this module) is served by
tensorlink.node.status from memory and draws the /status snapshot it receives every second over
server-sent events. Everything it shows comes from that snapshot, and ``SnapshotCollector`` turns the
same snapshot into metrics, so the page and /metrics cannot disagree about what a number means.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Snapshot = dict[str, Any]

CONTENT_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
TIMELINE_KEPT = 200  # events kept in memory; the snapshot carries the newest TIMELINE_SHOWN
TIMELINE_SHOWN = 50
TIMELINE_PERIOD_S = 1.0
NORMAL_CLOSE = "closed by this side"


def assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type) of the page's files, read once from the package."""
    files = resources.files(__name__)
    served = {f"/{name}": (files.joinpath(name).read_bytes(), ctype) for name, ctype in CONTENT_TYPES.items()}
    served["/"] = served["/index.html"]
    return served


def memory_in_use(device: str | None) -> tuple[int | None, str]:
    """Bytes this node's process holds now and what that number is: CUDA's allocated memory on a GPU
    worker, else the process's resident set (Linux /proc; None elsewhere)."""
    torch = sys.modules.get("torch")  # only where the node already imported it: never import torch for this
    if device is not None and device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device)), "cuda_allocated"
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "process_rss"
    except (OSError, ValueError, IndexError):
        return None, "unavailable"


def memory_view(capability: Any, assignments: Any) -> dict[str, Any]:
    """Memory as the page shows it: offered to stages (a worker's measured free memory, capped by
    --max-memory), reserved for accepted stages, and in use by this process now."""
    in_use, source = memory_in_use(None if capability is None else capability.device)
    return {
        "offered_bytes": None if capability is None else capability.free_memory_bytes,
        "reserved_bytes": None if assignments is None else assignments.reserved_bytes(),
        "in_use_bytes": in_use,
        "in_use_source": source,
    }


@dataclass(frozen=True)
class Event:
    at: float  # unix time
    kind: str  # failure | recovery | change
    what: str

    def view(self) -> dict[str, Any]:
        return {"at": round(self.at, 1), "kind": self.kind, "what": self.what}


class Timeline:
    """Failures and recoveries, found by comparing consecutive snapshots: peers whose records appear or
    expire, channels that close and why, capacity checks that fail or pass again, reachability, jobs.
    Deriving them from the snapshot keeps the services free of dashboard code."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.events: deque[Event] = deque(maxlen=TIMELINE_KEPT)
        self.counts: Counter[str] = Counter()
        self._last: Snapshot | None = None
        self._gone: set[str] = set()  # peers whose record expired: their return is a recovery

    def view(self) -> dict[str, Any]:
        """The newest events and how many of each kind were seen since the node started."""
        return {"events": [e.view() for e in list(self.events)[-TIMELINE_SHOWN:]], "counts": dict(self.counts)}

    async def follow(self, snapshot: Callable[[], Snapshot], period_s: float = TIMELINE_PERIOD_S) -> None:
        while True:
            self.observe(snapshot())
            await trio.sleep(period_s)

    def observe(self, now: Snapshot) -> None:
        before, self._last = self._last, now
        if before is None:
            return
        self._peers(before, now, "workers", "worker")
        self._peers(before, now, "validators", "validator")
        if before.get("reachability") != now.get("reachability"):
            self._add("change", f"reachability: {before.get('reachability')} -> {now.get('reachability')}")
        self._channels(before, now)
        self._checks(before, now)
        self._jobs(before, now)

    def _add(self, kind: str, what: str) -> None:
        self.events.append(Event(self._clock(), kind, what))
        self.counts[kind] += 1

    def _peers(self, before: Snapshot, now: Snapshot, key: str, label: str) -> None:
        old = {p["peer_id"] for p in before.get(key, [])}
        new = {p["peer_id"] for p in now.get(key, [])}
        for peer in sorted(new - old):
            if peer in self._gone:
                self._gone.discard(peer)
                self._add("recovery", f"{label} {peer} is back")
            else:
                self._add("change", f"{label} {peer} appeared")
        for peer in sorted(old - new):
            self._gone.add(peer)
            self._add("failure", f"{label} {peer} gone (its record expired)")

    def _channels(self, before: Snapshot, now: Snapshot) -> None:
        def closed(s: Snapshot) -> dict[tuple[str, str, float], str]:
            channels = s.get("data_plane", {}).get("channels", [])
            return {(c["peer"], c["job"], c["opened_at"]): c["closed"] for c in channels if c["closed"] is not None}

        was = closed(before)
        for (peer, job, _), reason in closed(now).items():
            if (peer, job, _) not in was:
                kind = "change" if reason == NORMAL_CLOSE else "failure"
                self._add(kind, f"channel to {peer} (job {job[:8]}) closed: {reason}")

    def _checks(self, before: Snapshot, now: Snapshot) -> None:
        def outcomes(s: Snapshot) -> dict[str, str]:
            return {
                w["peer_id"]: w["capacity_check"]["outcome"] for w in s.get("workers", []) if w.get("capacity_check")
            }

        was = outcomes(before)
        for peer, outcome in outcomes(now).items():
            old = was.get(peer)
            if outcome == old:
                continue
            if outcome != "verified":
                self._add("failure", f"capacity check of {peer}: {outcome}")
            elif old is not None:
                self._add("recovery", f"capacity check of {peer}: verified again (was {old})")

    def _jobs(self, before: Snapshot, now: Snapshot) -> None:
        for key, label in (("jobs", "admitted job"), ("running", "stage of job")):
            old = {(j["job"], j.get("stage")) for j in before.get(key, [])}
            new = {(j["job"], j.get("stage")) for j in now.get(key, [])}
            for job, stage in sorted(new - old, key=str):
                self._add("change", f"{label} {job[:8]}{'' if stage is None else f' (stage {stage})'} started")
            for job, stage in sorted(old - new, key=str):
                self._add("change", f"{label} {job[:8]}{'' if stage is None else f' (stage {stage})'} ended")


class SnapshotCollector(Collector):
    """The numbers of the /status snapshot as Prometheus families, read at each scrape. A family with no
    samples still reports its HELP and TYPE, so an operator's dashboard finds every name on every node."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the families depend on the snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from self._node(s)
        yield from self._swarm(s)
        yield from self._jobs(s)
        yield from self._data_plane(s)
        yield from self._verification(s)
        events = CounterMetricFamily(
            "tensorlink_timeline_events", "failures, recoveries and changes seen", labels=["kind"]
        )
        for kind in ("failure", "recovery", "change"):
            events.add_metric([kind], s.get("timeline", {}).get("counts", {}).get(kind, 0))
        yield events

    def _node(self, s: Snapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tensorlink_node_info", "this node: role, peer id, reachability, device, data port (value 1)",
            labels=["peer_id", "role", "reachability", "device", "device_name", "data_port"],
        )  # fmt: skip
        cap = s.get("capability") or {}
        port = s.get("data_plane", {}).get("port")
        labels = [s["peer_id"], s["role"], s["reachability"], cap.get("device", ""), cap.get("device_name", "")]
        info.add_metric([*labels, "" if port is None else str(port)], 1)
        yield info
        speed = GaugeMetricFamily("tensorlink_measured_gflops", "this worker's measured speed, in GFLOP/s")
        if cap:
            speed.add_metric([], cap["gflops"])
        yield speed
        mem = s.get("memory", {})
        for key, help_text in (
            ("offered_bytes", "memory this worker offers to stages, in bytes"),
            ("reserved_bytes", "memory reserved for accepted stages, in bytes"),
            ("in_use_bytes", "memory this node's process holds (CUDA allocated on GPU workers, else RSS), in bytes"),
        ):
            family = GaugeMetricFamily(f"tensorlink_memory_{key}", help_text)
            if mem.get(key) is not None:
                family.add_metric([], mem[key])
            yield family

    def _swarm(self, s: Snapshot) -> Iterator[Metric]:
        gflops = GaugeMetricFamily(
            "tensorlink_swarm_worker_gflops", "a worker's claimed speed, in GFLOP/s", labels=["peer"]
        )
        free = GaugeMetricFamily(
            "tensorlink_swarm_worker_free_memory_bytes", "memory a worker's record offers, in bytes", labels=["peer"]
        )
        record = GaugeMetricFamily(
            "tensorlink_swarm_record_expires_seconds", "seconds until a peer's record expires", labels=["peer", "role"]
        )
        trusted = GaugeMetricFamily(
            "tensorlink_swarm_validator_trusted", "1 when this node trusts the validator, else 0", labels=["peer"]
        )
        for w in s.get("workers", []):
            gflops.add_metric([w["peer_id"]], w["gflops"])
            free.add_metric([w["peer_id"]], w["free_memory_bytes"])
            record.add_metric([w["peer_id"], "worker"], w["expires_in_s"])
        for v in s.get("validators", []):
            trusted.add_metric([v["peer_id"]], 1 if v["trusted"] else 0)
            record.add_metric([v["peer_id"], "validator"], v["expires_in_s"])
        beat = GaugeMetricFamily(
            "tensorlink_heartbeat_age_seconds",
            "seconds since a peer's last heartbeat reached this node",
            labels=["peer"],
        )
        for peer, age in sorted(s.get("heartbeats", {}).items()):
            beat.add_metric([peer], age)
        yield from (gflops, free, record, trusted, beat)

    def _jobs(self, s: Snapshot) -> Iterator[Metric]:
        stages = GaugeMetricFamily("tensorlink_job_stages", "stages of a job this validator admitted", labels=["job"])
        placed = ["job", "stage", "peer"]
        units = GaugeMetricFamily(
            "tensorlink_job_stage_units", "units (layers) a worker holds for a job", labels=placed
        )
        reserved = GaugeMetricFamily(
            "tensorlink_job_stage_memory_bytes",
            "memory reserved on a worker for a job's stage, in bytes",
            labels=placed,
        )
        for job in s.get("jobs", []):
            stages.add_metric([job["job"]], job["n_stages"])
            for p in job["stages"]:
                first, last = p["units"]  # inclusive
                units.add_metric([job["job"], str(p["stage"]), p["peer_id"]], last - first + 1)
                reserved.add_metric([job["job"], str(p["stage"]), p["peer_id"]], p["memory_bytes"])
        yield from (stages, units, reserved)
        labels = ["job", "stage"]
        steps = CounterMetricFamily("tensorlink_stage_steps", "training steps a stage here has run", labels=labels)
        mbs = CounterMetricFamily("tensorlink_stage_micro_batches", "micro-batches a stage here has run", labels=labels)
        params = GaugeMetricFamily("tensorlink_stage_parameters", "parameters a stage here holds", labels=labels)
        peak = GaugeMetricFamily(
            "tensorlink_stage_peak_charged_bytes", "the most memory a stage here was charged, in bytes", labels=labels
        )
        for r in s.get("running", []):
            key = [r["job"], str(r["stage"])]
            steps.add_metric(key, r["steps"])
            mbs.add_metric(key, r.get("micro_batches", 0))
            params.add_metric(key, r["parameters"])
            peak.add_metric(key, r["peak_charged_bytes"])
        yield from (steps, mbs, params, peak)

    def _data_plane(self, s: Snapshot) -> Iterator[Metric]:
        open_ = GaugeMetricFamily("tensorlink_channels_open", "open data-plane channels", labels=["kind"])
        sent = CounterMetricFamily(
            "tensorlink_peer_sent_bytes", "bytes sent to a peer over the channels listed in /status", labels=["peer"]
        )
        received = CounterMetricFamily(
            "tensorlink_peer_received_bytes", "bytes received from a peer over the channels listed in /status",
            labels=["peer"],
        )  # fmt: skip
        channels = s.get("data_plane", {}).get("channels", [])
        kinds = Counter(c["kind"] for c in channels if c["closed"] is None)
        for kind in ("direct", "libp2p"):
            open_.add_metric([kind], kinds.get(kind, 0))
        per_peer = GaugeMetricFamily("tensorlink_peer_channels_open", "open channels to a peer", labels=["peer"])
        totals: dict[str, list[int]] = {}
        for c in channels:
            t = totals.setdefault(c["peer"], [0, 0, 0])
            t[0] += c.get("bytes_sent", 0)
            t[1] += c.get("bytes_received", 0)
            t[2] += c["closed"] is None
        for peer, (out, into, n_open) in sorted(totals.items()):
            sent.add_metric([peer], out)
            received.add_metric([peer], into)
            per_peer.add_metric([peer], n_open)
        yield from (open_, per_peer, sent, received)

    def _verification(self, s: Snapshot) -> Iterator[Metric]:
        checks = GaugeMetricFamily(
            "tensorlink_capacity_checks", "workers by the outcome of this validator's last capacity check of them",
            labels=["outcome"],
        )  # fmt: skip
        outcomes = Counter(w["capacity_check"]["outcome"] for w in s.get("workers", []) if w.get("capacity_check"))
        for outcome in sorted({"verified", "wrong_answer", "unreachable", *outcomes}):
            checks.add_metric([outcome], outcomes.get(outcome, 0))
        yield checks
