"""Gossip on real libp2p hosts on 127.0.0.1 (one trio process): a 10-node sparse swarm delivers every valid
heartbeat and job announcement to every node; every node drops invalid messages and floods on its own."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tensorlink.p2p import gossip as g
from tensorlink.p2p.gossip import HEARTBEATS, JOBS, Gossip, RawPublisher, Topic
from tensorlink.p2p.host import make_host, parse_multiaddr
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.wire.messages import Heartbeat, JobRecord, Message, encode_message

N = 10
# Ring plus i -> i+3 chords: every node has exactly 4 neighbours, 20 edges, diameter 2 (not all-to-all).
RING_AND_CHORDS = sorted({tuple(sorted((i, (i + d) % N))) for i in range(N) for d in (1, 3)})
LISTEN = parse_multiaddr("/ip4/127.0.0.1/tcp/0", what="listen address")


def heartbeat(peer_id: str, seq: int, *, age_s: float = 0.0) -> Heartbeat:
    return Heartbeat(peer_id=peer_id, role="worker", seq=seq, time_ms=int((time.time() - age_s) * 1000), load=0.25)


def job(validator: str, owner: str, n: int, stages: list[str] | None = None) -> JobRecord:
    stages = [owner, validator] if stages is None else stages
    return JobRecord(job=n.to_bytes(16, "big"), owner=owner, validator=validator, stages=stages, state="admitted")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def connect(a: Any, b: Any) -> None:
    """Dial b from a using only what the hosts themselves expose."""
    a.get_peerstore().add_addrs(b.get_id(), b.get_addrs(), 3600)
    await a.connect(a.get_peerstore().peer_info(b.get_id()))


@dataclass
class Swarm:
    gossips: list[Gossip]
    raws: list[RawPublisher]
    neighbours: list[set[str]]
    # received[node][topic name] = [(signer, message), ...] seen by that node's subscriber
    received: list[dict[str, list[tuple[str, Message]]]] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [gs.peer_id for gs in self.gossips]

    def got(self, node: int, topic: Topic) -> list[tuple[str, Message]]:
        return self.received[node][topic.name]


@asynccontextmanager
async def swarm(
    tmp_path: Path, edges: Sequence[tuple[int, int]], raw_links: Sequence[Sequence[int]] = ()
) -> AsyncIterator[Swarm]:
    """N gossiping nodes connected along ``edges`` (mesh formed, subscribers collecting), plus one
    RawPublisher per entry of ``raw_links``, connected to the nodes listed there."""
    hosts = []
    failure: Exception | None = None
    for i in range(N + len(raw_links)):
        (tmp_path / f"n{i}").mkdir()
        hosts.append(make_host(load_or_create_identity(tmp_path / f"n{i}")))
    async with AsyncExitStack() as stack:
        for host in hosts:
            await stack.enter_async_context(host.run([LISTEN]))
        gossips = [Gossip(h) for h in hosts[:N]]
        raws = [RawPublisher(h) for h in hosts[N:]]
        for gs in gossips:
            await stack.enter_async_context(gs.running())
        for raw in raws:
            await stack.enter_async_context(raw.running())
        s = Swarm(gossips, raws, [set() for _ in range(N)])
        nursery = await stack.enter_async_context(trio.open_nursery())
        for i, gs in enumerate(gossips):
            s.received.append({})
            for topic in (HEARTBEATS, JOBS):
                sink = s.received[i][topic.name] = []
                nursery.start_soon(collect, gs.subscribe(topic), sink)
        links = [(a, b) for a, b in edges] + [(N + r, i) for r, peers in enumerate(raw_links) for i in peers]
        with trio.fail_after(10):
            async with trio.open_nursery() as dialling:
                for a, b in links:
                    dialling.start_soon(connect, hosts[a], hosts[b])
        for a, b in edges:
            s.neighbours[a].add(s.ids[b])
            s.neighbours[b].add(s.ids[a])
        await wait_until(
            lambda: all(
                gs.mesh_peers(t) == s.neighbours[i] for i, gs in enumerate(gossips) for t in (HEARTBEATS, JOBS)
            ),
            10,
            "every node's mesh to hold all its neighbours",
        )
        await wait_until(
            lambda: all(
                raw.subscribers(t) >= {s.ids[i] for i in peers}
                for raw, peers in zip(raws, raw_links, strict=True)
                for t in (HEARTBEATS, JOBS)
            ),
            10,
            "raw publishers to see their peers' subscriptions",
        )
        try:
            yield s
        except Exception as exc:  # re-raised below: 12 hosts' nurseries would bury it in nested groups
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def collect(sub: g.Subscription, sink: list[tuple[str, Message]]) -> None:
    async for item in sub:
        sink.append(item)


async def test_every_node_receives_every_valid_message_in_a_sparse_swarm(tmp_path: Path) -> None:
    async with swarm(tmp_path, RING_AND_CHORDS) as s:
        expected_beats: list[tuple[str, Message]] = []
        expected_jobs: list[tuple[str, Message]] = []
        for node in (0, 3, 7):  # not neighbours of one another everywhere: messages cross 2 hops
            for seq in (1, 2):
                beat = heartbeat(s.ids[node], seq)
                await s.gossips[node].publish(HEARTBEATS, beat)
                expected_beats.append((s.ids[node], beat))
        for node, n in ((5, 1), (5, 2), (8, 3)):
            record = job(s.ids[node], s.ids[(node + 1) % N], n)
            await s.gossips[node].publish(JOBS, record)
            expected_jobs.append((s.ids[node], record))
        await wait_until(
            lambda: all(
                len(s.got(i, HEARTBEATS)) >= len(expected_beats) and len(s.got(i, JOBS)) >= len(expected_jobs)
                for i in range(N)
            ),
            10,
            "all heartbeats and job announcements at every node",
        )
        await trio.sleep(0.3)  # let any duplicate arrive before asserting there is none
        for i, gs in enumerate(s.gossips):
            assert sorted(map(repr, s.got(i, HEARTBEATS))) == sorted(map(repr, expected_beats)), f"node {i}"
            assert sorted(map(repr, s.got(i, JOBS))) == sorted(map(repr, expected_jobs)), f"node {i}"
            assert gs.stats.accepted == {HEARTBEATS.name: len(expected_beats), JOBS.name: len(expected_jobs)}
            assert gs.stats.dropped_total() == 0, gs.stats.dropped
        assert sum(gs.stats.published[HEARTBEATS.name] for gs in s.gossips) == len(expected_beats)
        for i, gs in enumerate(s.gossips):  # still sparse: nothing dialled extra peers behind our back
            assert {p.to_base58() for p in gs.host.get_connected_peers()} == s.neighbours[i], f"node {i}"
            # py-libp2p builds these queues with a fixed 32 entries; ours must have been resized.
            queues = gs._pubsub.peer_queues.values()  # type: ignore[union-attr]
            assert len(queues) == 4 and all(q._queue.max_size == g.OUTBOUND_QUEUE_SIZE for q in queues)


async def test_publish_refuses_what_peers_would_drop(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    host = make_host(load_or_create_identity(tmp_path / "n"))
    gs = Gossip(host)
    with pytest.raises(g.GossipError, match="not running"):
        await gs.publish(HEARTBEATS, heartbeat(gs.peer_id, 1))
    async with host.run([LISTEN]), gs.running():
        with pytest.raises(g.GossipError, match="carries Heartbeat, not JobRecord"):
            await gs.publish(HEARTBEATS, job(gs.peer_id, gs.peer_id, 1))
        other = "12D3KooWSyXyhsN4X6kPPGpyfg9RBnRjZEY6Qahssf7fMYvdf82g"
        with pytest.raises(g.GossipError, match=f"Heartbeat.peer_id {other} is not the signer"):
            await gs.publish(HEARTBEATS, heartbeat(other, 1))
        with pytest.raises(g.GossipError, match=f"JobRecord.validator {other} is not the signer"):
            await gs.publish(JOBS, job(other, gs.peer_id, 1))
        with pytest.raises(g.GossipError, match="time_ms is 3600 s from our clock"):
            await gs.publish(HEARTBEATS, heartbeat(gs.peer_id, 1, age_s=3600))
        with pytest.raises(g.GossipError, match="over its cap"):
            await gs.publish(JOBS, job(gs.peer_id, gs.peer_id, 1, stages=["1" * 128] * 200))
        with pytest.raises(g.GossipError, match="over the rate limit"):
            for seq in range(HEARTBEATS.burst + 1):
                await gs.publish(HEARTBEATS, heartbeat(gs.peer_id, seq))
        assert gs.stats.published[HEARTBEATS.name] == HEARTBEATS.burst


# Every reason the invalid-message test provokes at every node.
INVALID_REASONS = (
    g.UNSIGNED,
    g.BAD_SIGNATURE,
    g.MULTI_TOPIC,
    g.OVERSIZED,
    g.MALFORMED,
    g.WRONG_KIND,
    g.NOT_SIGNER,
    g.STALE,
)


async def test_invalid_messages_are_dropped_by_every_node(tmp_path: Path) -> None:
    # The raw publisher runs no validator and signs only when told to. It is linked to every node, so every
    # node gets each bad message straight from it and must drop it itself.
    async with swarm(tmp_path, RING_AND_CHORDS, raw_links=[range(N)]) as s:
        raw = s.raws[0]
        me = raw.host.get_id().to_base58()
        victim = s.ids[3]
        fresh = encode_message(heartbeat(me, 1))
        bad = [
            (HEARTBEATS, b"\x93not a control message", {}),  # malformed
            (HEARTBEATS, b"\x81\xa4kind\xa9heartbeat", {}),  # malformed: a heartbeat missing every field
            (HEARTBEATS, encode_message(job(me, me, 1)), {}),  # wrong kind for the topic
            (JOBS, fresh, {}),  # wrong kind for the topic
            (HEARTBEATS, encode_message(heartbeat(victim, 1)), {}),  # claims another peer's id
            (HEARTBEATS, encode_message(heartbeat(me, 2, age_s=3600)), {}),  # an hour old
            (HEARTBEATS, fresh + b"\x00" * HEARTBEATS.max_bytes, {}),  # oversized
            ([HEARTBEATS.name, JOBS.name], fresh, {}),  # on two topics at once
            (HEARTBEATS, fresh, {"sign": False}),  # a valid heartbeat, unsigned
            (JOBS, encode_message(job(me, me, 2)), {"sign": False}),  # a valid job, unsigned
            (HEARTBEATS, encode_message(heartbeat(victim, 2)), {"origin": victim}),  # forged signer
            # A `from` that is no identity multihash with a garbage key field: raises inside py-libp2p's own
            # signature check, which stops a stock Pubsub service.
            (HEARTBEATS, fresh, {"origin": b"\x12\x20" + os.urandom(32), "key": b"garbage"}),
        ]
        for topic, data, options in bad:
            await raw.publish(topic, data, **options)
        # A forgery carrying the victim's *next* sequence number must not block the real message later.
        next_seqno = s.gossips[3]._pubsub.counter + 1  # type: ignore[union-attr]
        await raw.publish(HEARTBEATS, encode_message(heartbeat(victim, 3)), origin=victim, seqno=next_seqno)

        await wait_until(
            lambda: all(gs.stats.dropped_total(reason=r) >= 1 for gs in s.gossips for r in INVALID_REASONS),
            10,
            "every node to drop every kind of invalid message",
        )
        # Garbage that is not even a pubsub RPC, on a pubsub stream: stock py-libp2p lets the decode error stop
        # the host's Swarm. The node resets that stream and carries on.
        stream = await raw.host.new_stream(s.gossips[4].host.get_id(), ["/meshsub/1.2.0"])
        # 0x0f: field 1 with wire type 7, which does not exist, so this can never parse as an RPC (random
        # bytes sometimes do: protobuf skips unknown fields).
        await stream.write(bytes([20]) + b"\x0f" * 20)
        await wait_until(lambda: s.gossips[4].stats.bad_streams == 1, 15, "node 4 to reset the garbage stream")

        # Valid traffic after the garbage, from the victim (with the forged sequence number) and others.
        expected = []
        for node in (3, 4, 8):
            beat = heartbeat(s.ids[node], 3)
            await s.gossips[node].publish(HEARTBEATS, beat)
            expected.append((s.ids[node], beat))
        record = job(s.ids[6], s.ids[1], 7)
        await s.gossips[6].publish(JOBS, record)
        await wait_until(
            lambda: all(len(s.got(i, HEARTBEATS)) >= 3 and len(s.got(i, JOBS)) >= 1 for i in range(N)),
            10,
            "valid messages after the garbage at every node",
        )
        await trio.sleep(0.3)
        for i, gs in enumerate(s.gossips):
            assert sorted(map(repr, s.got(i, HEARTBEATS))) == sorted(map(repr, expected)), f"node {i}"
            assert s.got(i, JOBS) == [(s.ids[6], record)], f"node {i}"
            assert gs.stats.accepted == {HEARTBEATS.name: 3, JOBS.name: 1}, f"node {i}: {gs.stats.accepted}"
            # Each bad message was dropped here: it reached this node directly. No honest node forwarded
            # one, since GossipSub forwards only what its validator accepted and the accepted counts above
            # are exact. A node may drop the same bad message more than once: py-libp2p keeps no record of
            # rejected ids, so a copy that comes again (the raw publisher's gossip, a late fanout) is
            # validated and dropped again; on a loaded machine that happened (unsigned: 4 instead of 2).
            drops = {r: gs.stats.dropped_total(reason=r) for r in INVALID_REASONS}
            assert drops[g.MALFORMED] >= 2 and drops[g.WRONG_KIND] >= 2, (i, drops)
            assert drops[g.UNSIGNED] >= 2 and drops[g.NOT_SIGNER] >= 1 and drops[g.STALE] >= 1, (i, drops)
            assert gs.stats.dropped_total(reason=g.RATE_LIMITED) == 0
            assert gs.stats.dropped_total(reason=g.INTERNAL_ERROR) == 0


@pytest.mark.slow
async def test_flood_above_the_rate_limit_is_dropped_and_others_get_through(tmp_path: Path) -> None:
    # The flooder is linked to nodes 0 and 5 only; everyone else hears it only through honest nodes.
    async with swarm(tmp_path, RING_AND_CHORDS, raw_links=[(0, 5)]) as s:
        flooder = s.raws[0]
        me = flooder.host.get_id().to_base58()
        flood = 80
        start = time.monotonic()
        expected = []
        async with trio.open_nursery() as nursery:

            async def flood_them() -> None:
                for seq in range(flood):
                    await flooder.publish(HEARTBEATS, encode_message(heartbeat(me, seq)))
                    if seq % 8 == 7:
                        await trio.sleep(0)

            nursery.start_soon(flood_them)
            for node in (2, 6, 9):
                beat = heartbeat(s.ids[node], 1)
                await s.gossips[node].publish(HEARTBEATS, beat)
                expected.append((s.ids[node], beat))
        await wait_until(
            lambda: all(sum(sender != me for sender, _ in s.got(i, HEARTBEATS)) == len(expected) for i in range(N)),
            10,
            "the honest heartbeats at every node during the flood",
        )

        def flood_seen(i: int) -> int:
            stats = s.gossips[i].stats
            return stats.dropped_total(reason=g.RATE_LIMITED) + sum(sender == me for sender, _ in s.got(i, HEARTBEATS))

        await wait_until(
            lambda: all(flood_seen(i) >= flood for i in (0, 5)),
            30,
            "the flooder's direct peers to see all of its flood",
        )
        await trio.sleep(0.3)
        allowed = HEARTBEATS.burst + HEARTBEATS.rate_per_s * (time.monotonic() - start) + 1
        for i in range(N):
            honest = sorted(repr(item) for item in s.got(i, HEARTBEATS) if item[0] != me)
            assert honest == sorted(map(repr, expected)), f"node {i}"
            flooded = sum(sender == me for sender, _ in s.got(i, HEARTBEATS))
            assert 1 <= flooded <= allowed, (i, flooded, allowed)
        for i in (0, 5):
            # Everything the flooder sent reached these two directly; what they did not accept they dropped.
            stats = s.gossips[i].stats
            flooded = sum(sender == me for sender, _ in s.got(i, HEARTBEATS))
            assert stats.dropped_total(reason=g.RATE_LIMITED) >= flood - flooded - 2, (i, stats.dropped)
