"""Roster: the live workers and validators a node knows, each by its own signed DHT record.

Candidates come from heartbeats (a new peer is seen within a heartbeat) and, every PUBLISHER_LISTING_S,
from the DHT's publisher lists (peers that do not gossip to us). A record is fetched when it is missing
or past half its lifetime, so a peer costs a fetch per half lifetime, not one per refresh; what is known
stays until its own signed expiry, so a peer vanishes only when it stops refreshing its record, never
because one lookup missed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from tensorlink.p2p.dht import Directory
from tensorlink.p2p.gossip import HEARTBEATS, Gossip
from tensorlink.p2p.records import VALIDATORS, WORKERS, Namespace, VerifiedRecord
from tensorlink.wire.messages import Heartbeat, WorkerCapability

log = logging.getLogger(__name__)
PUBLISHER_LISTING_S = 30.0  # full listings are expensive (a walk per shard); heartbeats find peers sooner
MISSING_RECORD_RETRY_S = 2.0
MAX_FETCHES_PER_REFRESH = 32


class Roster:
    """Live workers and validators (peer id -> verified record), kept by ``listen`` and ``refresh_forever``.
    ``role`` is this node's own: it lists itself among its kind, so it sees its own record too."""

    def __init__(self, directory: Directory, peer_id: str, role: str) -> None:
        self.directory = directory
        self.peer_id = peer_id
        self.workers: dict[str, VerifiedRecord] = {}
        self.validators: dict[str, VerifiedRecord] = {}
        self.last_heartbeat: dict[str, float] = {}
        self.candidates: dict[str, set[str]] = {WORKERS.name: set(), VALIDATORS.name: set()}
        self._last_try: dict[tuple[str, str], float] = {}
        self.candidates[(WORKERS if role == "worker" else VALIDATORS).name].add(peer_id)

    def live_claims(self) -> list[WorkerCapability]:
        """Live workers' records as they published them."""
        now_ms = time.time() * 1000
        return [r.message for r in self.workers.values() if r.expires_ms > now_ms]  # type: ignore[misc]

    def views(self, namespace: Namespace, now: float) -> list[dict[str, Any]]:
        """Records as the status endpoint shows them; one that expired since the last refresh is left out."""
        records = self.workers if namespace is WORKERS else self.validators
        return [
            {**msgspec.structs.asdict(r.message), "expires_in_s": round(r.expires_ms / 1000 - now, 1)}
            for r in records.values()
            if r.expires_ms / 1000 > now
        ]

    async def listen(self, gossip: Gossip) -> None:
        """Take heartbeat senders as candidates (users excepted: they publish no record)."""
        with gossip.subscribe(HEARTBEATS) as beats:
            async for sender, beat in beats:
                if not isinstance(beat, Heartbeat):  # the topic decodes only Heartbeats: cannot happen
                    continue
                self.last_heartbeat[sender] = time.time()
                namespace = WORKERS if beat.role == "worker" else VALIDATORS
                if beat.role != "user" and sender != self.peer_id:
                    self.candidates[namespace.name].add(sender)

    async def refresh_forever(self, period: float, each_validator: Callable[[str], Awaitable[None]]) -> None:
        """Every ``period``: fetch the records that are due, drop the expired ones. ``each_validator`` runs
        alongside the fetches for every known validator (the node learns their stake)."""
        next_listing = 0.0
        while True:
            if time.monotonic() >= next_listing:
                next_listing = time.monotonic() + PUBLISHER_LISTING_S
                for namespace in (WORKERS, VALIDATORS):
                    self.candidates[namespace.name].update(await self.directory.publishers(namespace))
            async with trio.open_nursery() as nursery:
                for namespace, known in ((WORKERS, self.workers), (VALIDATORS, self.validators)):
                    for peer in self._due(namespace, known):
                        nursery.start_soon(self._fetch_one, namespace, known, peer)
                for peer in list(self.validators):
                    nursery.start_soon(each_validator, peer)
            now_ms = time.time() * 1000
            for namespace, known in ((WORKERS, self.workers), (VALIDATORS, self.validators)):
                for peer in [p for p, r in known.items() if r.expires_ms <= now_ms]:
                    log.info("%s gone (record expired): %s", namespace.name, peer)
                    del known[peer]
            await trio.sleep(period)

    def _due(self, namespace: Namespace, known: dict[str, VerifiedRecord]) -> list[str]:
        now = time.time()
        due = []
        for peer in self.candidates[namespace.name]:
            record = known.get(peer)
            if record is None:
                if now - self._last_try.get((namespace.name, peer), 0.0) >= MISSING_RECORD_RETRY_S:
                    due.append(peer)
            elif record.expires_ms / 1000 - now < (record.expires_ms - record.seq) / 2000:
                due.append(peer)  # past half its lifetime: the publisher has refreshed it by now
        return due[:MAX_FETCHES_PER_REFRESH]

    async def _fetch_one(self, namespace: Namespace, known: dict[str, VerifiedRecord], peer: str) -> None:
        self._last_try[(namespace.name, peer)] = time.time()
        record = await self.directory.fetch(namespace, peer)
        if record is None:
            return
        old = known.get(peer)
        if old is None:
            log.info("%s appeared: %s", namespace.name, peer)
        if old is None or record.seq > old.seq:
            known[peer] = record
