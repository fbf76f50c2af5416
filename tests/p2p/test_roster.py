"""Roster on a real DHT swarm on loopback: a published worker and validator appear (found through the DHT's
publisher lists, with no heartbeat), the validator hook runs for the validator, and a record that is not
refreshed is dropped at its signed expiry."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from tensorlink.p2p import roster as roster_module
from tensorlink.p2p.records import VALIDATORS, WORKERS
from tensorlink.p2p.roster import Roster
from tensorlink.wire.messages import ValidatorPresence, WorkerCapability


def capability(peer_id: str) -> WorkerCapability:
    return WorkerCapability(
        peer_id=peer_id,
        device="cpu",
        device_name="test cpu",
        memory_bytes=16 << 30,
        free_memory_bytes=8 << 30,
        gflops=12.5,
        software="tensorlink-test",
    )


async def wait_until(check: Callable[[], bool], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not check():
            await trio.sleep(0.05)


async def test_roster_finds_published_peers_and_drops_expired_ones(dht_swarm, monkeypatch) -> None:
    monkeypatch.setattr(roster_module, "PUBLISHER_LISTING_S", 0.5)  # list on every refresh, not every 30 s
    with trio.fail_after(90):
        async with dht_swarm(4) as s:
            me, worker, validator = s.nodes[0], s.nodes[1], s.nodes[2]
            await validator.publish(VALIDATORS, ValidatorPresence(peer_id=validator.peer_id, software="t"), ttl_s=60)
            roster = Roster(me, me.peer_id, "validator")
            learned: list[str] = []

            async def learn(peer: str) -> None:
                learned.append(peer)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(roster.refresh_forever, 0.2, learn)
                await wait_until(lambda: validator.peer_id in roster.validators, 40)  # seconds under load
                await wait_until(lambda: validator.peer_id in learned, 5)
                assert roster.workers == {} and roster.live_claims() == []

                # A worker appears with a short-lived record that it never refreshes: listed, then dropped.
                await worker.publish(WORKERS, capability(worker.peer_id), ttl_s=8)
                await wait_until(lambda: worker.peer_id in roster.workers, 8)
                assert [c.peer_id for c in roster.live_claims()] == [worker.peer_id]
                [view] = roster.views(WORKERS, time.time())
                assert view["peer_id"] == worker.peer_id and 0 < view["expires_in_s"] <= 8
                expiry_s = roster.workers[worker.peer_id].expires_ms / 1000 - time.time()
                await wait_until(lambda: worker.peer_id not in roster.workers, expiry_s + 5)
                assert roster.live_claims() == [] and roster.views(WORKERS, time.time()) == []
                assert validator.peer_id in roster.validators
                nursery.cancel_scope.cancel()
