"""GossipSub topics for heartbeats and job announcements, with a validator on every node.

py-libp2p 0.8.1's defaults do not fit TensorLink (measured): the
heartbeat is 120 s, the router silently stops forwarding past 10 msg/s per forwarding peer per topic, the
outbound and subscription queues hold 32 entries and drop the rest. Here every node starts Pubsub and
GossipSub with a 1 s heartbeat, mesh degrees for swarms of 5–100 nodes, larger queues, and one
validator per topic. A message is delivered and forwarded only after the validator has checked:

- its signature (strict signing, checked before anything else so that a forged message can never poison
  py-libp2p's validation cache for the real publisher's sequence number),
- that it is one control message of the topic's kind within the kind's size cap,
- that the message names its signer where it names a peer (a Heartbeat's ``peer_id``, a JobRecord's
  ``validator``), and that a heartbeat is fresh,
- that its publisher is within the topic's rate limit.

Anything else is dropped, logged once at debug level with the reason, and counted in ``Gossip.stats``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyType
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.tools.anyio_service import background_trio_service

from tensorlink.p2p._libp2p import SizedRpcQueues, pubsub_forget_peer, pubsub_has_seen
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import Heartbeat, JobRecord, Message, decode_message, encode_message
from tensorlink.wire.protocols import HEARTBEAT_TOPIC, JOBS_TOPIC

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topic:
    """A gossip topic: the one message kind it carries and how often one publisher may send on it."""

    name: str
    message: type[Message]
    rate_per_s: float  # sustained messages per second per publisher (token bucket refill)
    burst: int  # messages a publisher may send at once (token bucket size)
    signer_field: str | None = None  # a peer id field that must equal the message's signer
    max_age_s: float | None = None  # for messages with ``time_ms``: how far from our clock it may be

    @property
    def max_bytes(self) -> int:
        """Largest accepted message: the message kind's own cap."""
        return self.message.max_bytes


# Heartbeats: every node sends one every 1-5 s. 2/s sustained is twice the fastest legitimate pace, so two
# beats landing close together (timer jitter, a slow event loop catching up) never trip it. A burst of 10
# absorbs a neighbour replaying its message cache to us when we connect (gossip_history = 5 heartbeats of
# 1 s, i.e. up to 5 beats of one publisher at once) plus gossip repair after a short partition.
HEARTBEATS = Topic(HEARTBEAT_TOPIC, Heartbeat, rate_per_s=2.0, burst=10, signer_field="peer_id", max_age_s=60.0)
# Job announcements are rare: a validator announces each job it admits and each state change (admitted,
# running, done/failed), a handful per job, and jobs last minutes. 0.5/s sustained (one every 2 s) is far
# above a busy validator and bounds what one peer costs us at 8 KiB/s of 16 KiB records; a burst of 20
# lets a restarted validator re-announce its open jobs at once. Only the admitting validator may announce.
JOBS = Topic(JOBS_TOPIC, JobRecord, rate_per_s=0.5, burst=20, signer_field="validator")
TOPICS: tuple[Topic, ...] = (HEARTBEATS, JOBS)

# GossipSub settings. Mesh degree D=6 (4..12) as in go-libp2p: ≥4 paths to every node keeps
# delivery through churn in a 5-node swarm, and a 100-node swarm stays at ~2-3 hops.
DEGREE, DEGREE_LOW, DEGREE_HIGH = 6, 4, 12
HEARTBEAT_INTERVAL_S = 1
# The router's own limit counts, per forwarding peer and topic, the messages that peer was first to bring us,
# and past it stops *forwarding* (local delivery still happens) without telling anyone. One mesh neighbour
# may legitimately be first for nearly all of a topic's traffic: 100 nodes x 1 heartbeat/s, more after a
# partition heals. The per-publisher limits above are the real control; this only caps floods from many
# fresh identities, so it sits well above honest traffic instead of at the default 10.
ROUTER_MAX_MESSAGES_PER_TOPIC_PER_S = 1000.0
# Outbound RPCs queued per peer (py-libp2p default 32, rejected beyond that without a trace). A new peer gets
# our message cache replayed at once (5 s of every topic: ~500 heartbeats in a 100-node swarm); ~0.5 KiB each.
OUTBOUND_QUEUE_SIZE = 1024
# Delivered messages buffered per local subscriber before a slow subscriber loses (counted) messages.
SUBSCRIBER_BUFFER = 1024
# Seen messages are remembered for 2 min; validation results for less, so a message replayed after it was
# forgotten is validated again (rate limit, heartbeat freshness) instead of passing from the cache.
SEEN_TTL_S = 120
VALIDATION_CACHE_TTL_S = 60
RATE_LIMITER_MAX_KEYS = 4096  # publishers remembered per topic; the least recently seen are forgotten

# Drop reasons, the label values of ``GossipStats.dropped``.
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
MULTI_TOPIC = "multi_topic"
OVERSIZED = "oversized"
MALFORMED = "malformed"
WRONG_KIND = "wrong_kind"
NOT_SIGNER = "not_signer"
STALE = "stale"
RATE_LIMITED = "rate_limited"
SLOW_SUBSCRIBER = "slow_subscriber"
INTERNAL_ERROR = "internal_error"
DROP_REASONS = (
    UNSIGNED,
    BAD_SIGNATURE,
    MULTI_TOPIC,
    OVERSIZED,
    MALFORMED,
    WRONG_KIND,
    NOT_SIGNER,
    STALE,
    RATE_LIMITED,
    SLOW_SUBSCRIBER,
    INTERNAL_ERROR,
)


class GossipError(Exception):
    """A publish this node refuses to send (its peers would drop it), or gossip used while not running."""


@dataclass
class GossipStats:
    """Counters for Prometheus. ``accepted``: messages that passed the validator (this node's own included),
    by topic name; ``published``: this node's own, by topic name; ``dropped``: by (topic name, reason), the
    reasons being ``DROP_REASONS``."""

    accepted: Counter[str] = field(default_factory=Counter)
    published: Counter[str] = field(default_factory=Counter)
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad_streams: int = 0  # pubsub streams reset for carrying something that is not a pubsub RPC

    def dropped_total(self, *, reason: str | None = None, topic: Topic | str | None = None) -> int:
        name = topic.name if isinstance(topic, Topic) else topic
        return sum(
            n for (t, r), n in self.dropped.items() if (reason is None or r == reason) and (name is None or t == name)
        )


class RateLimiter:
    """Token buckets per key; the least recently used keys are forgotten beyond ``max_keys``."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = RATE_LIMITER_MAX_KEYS) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


def signing_payload(msg: rpc_pb2.Message) -> bytes:
    """What a pubsub message's signature covers (libp2p spec: prefix + the message without key/signature)."""
    unsigned = rpc_pb2.Message(data=msg.data, topicIDs=msg.topicIDs, from_id=msg.from_id, seqno=msg.seqno)
    return PUBSUB_SIGNING_PREFIX.encode() + unsigned.SerializeToString()


def signature_problem(msg: rpc_pb2.Message) -> str | None:
    """None if ``msg`` is signed by the Ed25519 key its ``from`` peer id embeds, else the drop reason.

    Replaces py-libp2p's ``signature_validator`` as the first check: that one raises on a ``from`` that is
    not an identity multihash with a garbage ``key`` field, and an exception there stops the whole Pubsub
    service (pubsub.py push_msg runs as a service task). TensorLink identities are Ed25519 only, so the key is
    always inside the peer id and the ``key`` field is never needed."""
    if not msg.signature:
        return UNSIGNED
    try:
        key = ID(msg.from_id).extract_public_key()
        if key is None or key.get_type() != KeyType.Ed25519 or len(msg.signature) != 64:
            return BAD_SIGNATURE
        return None if key.verify(signing_payload(msg), msg.signature) else BAD_SIGNATURE
    except Exception:
        return BAD_SIGNATURE


def _content_problem(topic: Topic, signer: str, message: Message) -> tuple[str, str] | None:
    """What every node checks in a decoded message, and what publish() refuses to send: (reason, detail)."""
    if not isinstance(message, topic.message):
        return WRONG_KIND, f"carries {topic.message.__name__}, not {type(message).__name__}"
    if topic.signer_field and (claimed := getattr(message, topic.signer_field)) != signer:
        return NOT_SIGNER, f"{type(message).__name__}.{topic.signer_field} {claimed} is not the signer {signer}"
    if topic.max_age_s is not None:
        skew_s = abs(time.time() - message.time_ms / 1000)  # type: ignore[attr-defined]
        if skew_s > topic.max_age_s:
            return STALE, f"time_ms is {skew_s:.0f} s from our clock (limit {topic.max_age_s:.0f} s)"
    return None


def _origin(msg: rpc_pb2.Message) -> str:
    try:
        return ID(msg.from_id).to_base58()
    except Exception:
        return f"<invalid {msg.from_id[:16].hex()}>"


class _Pubsub(Pubsub):
    """py-libp2p 0.8.1's Pubsub with four overrides (re-check each on a libp2p upgrade): a signature check
    first that counts its drops and cannot raise, per-peer outbound queues of our size, a stream handler
    that survives garbage, and delivery straight to our subscribers instead of through a 32-entry channel
    that drops when full (pubsub.py notify_subscriptions)."""

    def __init__(self, host: IHost, router: GossipSub, gossip: Gossip | None, **kwargs: Any) -> None:
        super().__init__(host, router, **kwargs)
        self.peer_queues = SizedRpcQueues(OUTBOUND_QUEUE_SIZE)
        self._gossip = gossip

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if self._gossip is None:  # a RawPublisher: no checks at all
            await super().push_msg(msg_forwarder, msg)
            return
        if pubsub_has_seen(self, msg):
            return  # a duplicate of a message already validated and delivered
        if msg_forwarder != self.my_id and (reason := signature_problem(msg)):
            self._gossip._record_drop(msg, msg_forwarder, reason, "")
            return
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:  # one hostile message must never stop gossip for the node
            self._gossip._record_drop(msg, msg_forwarder, INTERNAL_ERROR, repr(exc))

    async def stream_handler(self, stream: INetStream) -> None:
        # py-libp2p lets a pubsub frame that is not a protobuf RPC (or any other error while handling one)
        # escape the stream handler, which stops the host's whole Swarm: one peer could take the node down.
        try:
            await super().stream_handler(stream)
        except Exception as exc:
            peer_id = stream.muxed_conn.peer_id
            log.debug("reset pubsub stream from %s: %r", peer_id, exc)
            if self._gossip is not None:
                self._gossip.stats.bad_streams += 1
            try:
                await stream.reset()
            except Exception:
                pass
            pubsub_forget_peer(self, peer_id)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        if self._gossip is not None:
            self._gossip._deliver(publish_message)


class Subscription:
    """Messages of one topic as (signer peer id, message), in arrival order. Iterate with ``async for``;
    ``close()`` (or leaving ``with``) stops it. Iteration ends when gossip stops."""

    def __init__(self, gossip: Gossip, topic: Topic) -> None:
        self.topic = topic
        self._gossip = gossip
        self._send, self._receive = trio.open_memory_channel[tuple[str, Message]](SUBSCRIBER_BUFFER)

    def _offer(self, item: tuple[str, Message]) -> bool:
        try:
            self._send.send_nowait(item)
            return True
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True

    async def receive(self) -> tuple[str, Message]:
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[tuple[str, Message]]:
        return self

    async def __anext__(self) -> tuple[str, Message]:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._gossip._subscribers[self.topic.name].discard(self)
        self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Gossip:
    """The node's gossip: ``async with gossip.running():`` then ``publish``/``subscribe``; ``stats`` counts."""

    def __init__(self, host: IHost, topics: Iterable[Topic] = TOPICS) -> None:
        self.host = host
        self.topics = {t.name: t for t in topics}
        self.stats = GossipStats()
        self.peer_id = host.get_id().to_base58()
        self._limiters = {name: RateLimiter(t.rate_per_s, t.burst) for name, t in self.topics.items()}
        self._subscribers: dict[str, set[Subscription]] = {name: set() for name in self.topics}
        self._pubsub: _Pubsub | None = None
        self._router: GossipSub | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gossip]:
        """Start Pubsub + GossipSub on the (running) host, join every topic with its validator."""
        if self._pubsub is not None:
            raise GossipError("gossip is already running")
        router = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=DEGREE,
            degree_low=DEGREE_LOW,
            degree_high=DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            # Adaptive gossip "recovers" a degraded mesh by moving the heartbeat to 30-60 s
            # (gossipsub.py _adapt_heartbeat_parameters); keep the interval we chose.
            adaptive_gossip_enabled=False,
            max_messages_per_topic_per_second=ROUTER_MAX_MESSAGES_PER_TOPIC_PER_S,
        )
        pubsub = _Pubsub(
            self.host,
            router,
            self,
            strict_signing=True,
            seen_ttl=SEEN_TTL_S,
            validation_cache_ttl=VALIDATION_CACHE_TTL_S,
            allowed_topics=set(self.topics),
        )
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            for name, topic in self.topics.items():
                pubsub.set_topic_validator(name, self._validator(topic), False)
                await pubsub.subscribe(name)
            self._pubsub, self._router = pubsub, router
            # Peers connected before gossip started fire no "connected" event for Pubsub.
            for peer in self.host.get_connected_peers():
                pubsub.manager.run_task(pubsub.ensure_peer_stream, peer)
            try:
                yield self
            finally:
                self._pubsub = self._router = None
                for subs in self._subscribers.values():
                    for sub in list(subs):
                        sub.close()

    # -- API ---------------------------------------------------------------------------------------------
    async def publish(self, topic: Topic, message: Message) -> None:
        """Sign and gossip ``message``; raises GossipError for what every peer would drop."""
        pubsub = self._require_running()
        self._require_topic(topic)
        if problem := _content_problem(topic, self.peer_id, message):
            raise GossipError(f"{topic.name}: {problem[1]}")
        try:
            data = encode_message(message)
        except WireError as exc:
            raise GossipError(str(exc)) from None
        if not self._limiters[topic.name].allow(self.peer_id):
            raise GossipError(
                f"over the rate limit of {topic.name} ({topic.rate_per_s}/s, burst {topic.burst}); peers would drop it"
            )
        await pubsub.publish(topic.name, data)
        self.stats.published[topic.name] += 1

    def subscribe(self, topic: Topic) -> Subscription:
        """Receive every valid message of ``topic`` from now on (this node's own included)."""
        self._require_topic(topic)
        sub = Subscription(self, topic)
        self._subscribers[topic.name].add(sub)
        return sub

    def peers(self, topic: Topic) -> set[str]:
        """Connected peers subscribed to ``topic``."""
        pubsub = self._require_running()
        return {p.to_base58() for p in pubsub.peer_topics.get(topic.name, ())}

    def mesh_peers(self, topic: Topic) -> set[str]:
        """Peers in this node's GossipSub mesh for ``topic`` (those it forwards full messages to)."""
        self._require_running()
        assert self._router is not None
        return {p.to_base58() for p in self._router.mesh.get(topic.name, ())}

    # -- internals ---------------------------------------------------------------------------------------
    def _require_running(self) -> _Pubsub:
        if self._pubsub is None:
            raise GossipError("gossip is not running; use `async with gossip.running():`")
        return self._pubsub

    def _require_topic(self, topic: Topic) -> None:
        if self.topics.get(topic.name) != topic:
            raise GossipError(f"topic {topic.name} is not one of this node's topics")

    def _validator(self, topic: Topic) -> Any:
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            try:
                problem = self._check(topic, forwarder, msg)
            except Exception as exc:  # a validator that raises would stop the Pubsub service
                problem = (INTERNAL_ERROR, repr(exc))
            if problem is not None:
                self._record_drop(msg, forwarder, *problem)
                return False
            self.stats.accepted[topic.name] += 1
            return True

        return validate

    def _check(self, topic: Topic, forwarder: ID, msg: rpc_pb2.Message) -> tuple[str, str] | None:
        if len(msg.topicIDs) != 1:
            return MULTI_TOPIC, f"published to {len(msg.topicIDs)} topics"
        if len(msg.data) > topic.max_bytes:
            return OVERSIZED, f"{len(msg.data)} bytes, cap {topic.max_bytes}"
        origin = ID(msg.from_id).to_base58()
        # Our own publishes were charged in publish(); everyone else's are charged here, before decoding.
        if forwarder != self.host.get_id() and not self._limiters[topic.name].allow(origin):
            return RATE_LIMITED, f"over {topic.rate_per_s}/s, burst {topic.burst}"
        try:
            message = decode_message(msg.data)
        except WireError as exc:
            return MALFORMED, str(exc)
        return _content_problem(topic, origin, message)

    def _topic_of(self, msg: rpc_pb2.Message) -> str:
        return next((t for t in msg.topicIDs if t in self.topics), "other")

    def _record_drop(self, msg: rpc_pb2.Message, forwarder: ID, reason: str, detail: str) -> None:
        topic = self._topic_of(msg)
        self.stats.dropped[(topic, reason)] += 1
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug(
            "dropped gossip on %s from %s via %s: %s%s",
            topic,
            _origin(msg),
            forwarder,
            reason,
            f" ({detail})" if detail else "",
        )

    def _deliver(self, msg: rpc_pb2.Message) -> None:
        """Hand a validated message to this node's subscribers of its topic."""
        name = self._topic_of(msg)
        subs = self._subscribers.get(name)
        if not subs:
            return
        try:
            item = (ID(msg.from_id).to_base58(), decode_message(msg.data, expect=self.topics[name].message))
        except Exception as exc:  # validated already; cannot happen unless the validator was bypassed
            self._record_drop(msg, self.host.get_id(), INTERNAL_ERROR, f"undecodable after validation: {exc!r}")
            return
        for sub in list(subs):
            if not sub._offer(item):
                self._record_drop(msg, self.host.get_id(), SLOW_SUBSCRIBER, "subscriber buffer full")


class RawPublisher:
    """A peer that speaks GossipSub but checks nothing and publishes whatever it is given: unsigned,
    signed for another peer's id, garbage, floods. For tests and fuzzing of the real validator; never
    part of a node."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._pubsub: _Pubsub | None = None
        self._seqno = int(time.time() * 1000) << 8

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RawPublisher]:
        router = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=64,  # not subscribed: its fanout is every subscribed peer, up to 64
            degree_low=32,
            degree_high=96,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
        )
        pubsub = _Pubsub(self.host, router, None, strict_signing=False)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            for peer in self.host.get_connected_peers():
                pubsub.manager.run_task(pubsub.ensure_peer_stream, peer)
            self._pubsub = pubsub
            try:
                yield self
            finally:
                self._pubsub = None

    def subscribers(self, topic: Topic | str) -> set[str]:
        assert self._pubsub is not None, "not running"
        name = topic.name if isinstance(topic, Topic) else topic
        return {p.to_base58() for p in self._pubsub.peer_topics.get(name, ())}

    async def publish(
        self,
        topic: Topic | str | list[str],
        data: bytes,
        *,
        sign: bool = True,
        origin: str | bytes | None = None,
        seqno: int | None = None,
        key: bytes | None = None,
    ) -> None:
        """Send ``data`` as-is. ``sign=False`` leaves the signature out; ``origin`` (a peer id, or raw bytes)
        claims another publisher while the signature stays ours, i.e. a forgery; ``key`` replaces the
        public key field of a signed message."""
        assert self._pubsub is not None, "not running"
        names = topic if isinstance(topic, list) else [topic.name if isinstance(topic, Topic) else topic]
        if origin is None:
            from_id = self.host.get_id().to_bytes()
        elif isinstance(origin, str):
            from_id = ID.from_base58(origin).to_bytes()
        else:
            from_id = origin
        if seqno is None:
            self._seqno += 1
            seqno = self._seqno
        msg = rpc_pb2.Message(data=data, topicIDs=names, from_id=from_id, seqno=seqno.to_bytes(8, "big"))
        if sign:
            msg.signature = self.host.get_private_key().sign(signing_payload(msg))
            msg.key = self.host.get_public_key().serialize() if key is None else key
        await self._pubsub.push_msg(self.host.get_id(), msg)
