"""The node's directory: signed TensorLink records in a Kademlia DHT, and who publishes them.

``Directory`` wraps py-libp2p's ``KadDHT`` (wire protocol ``/ipfs/kad/1.0.0``) so that the rest of
TensorLink sees only namespaces, messages and peer ids. What it adds to the library, and why:

- Only TensorLink keys exist. The DHT runs a strict ``NamespacedValidator`` with ``RecordValidator``
  for each namespace in ``records.NAMESPACES`` and nothing else (not even the library's default
  ``/pk`` and ``/ipns``), so every node refuses to store a record that is unsigned, forged, oversized,
  expired, of the wrong kind or in a foreign namespace, and refuses such a record in a GET answer.
- Records expire by their own signed expiry, not the DHT's 24 h storage TTL. The library hands back
  stored values without checking them again, and answers GET_VALUE with them. So every answer is
  verified when it arrives, and a sweep drops expired records from the local store.
- Lookups walk with GET_VALUE / GET_PROVIDERS, not the library's lookup. ``KadDHT.put_value`` and
  ``get_value`` first look up the closest peers with FIND_NODE on the record key itself, and servers
  refuse FIND_NODE for a key that is neither a multihash nor at most 50 bytes (``/tl-worker/<id>`` is
  66), so those lookups never leave the local routing table. GET_VALUE answers name the closest peers
  for any key. The walk asks the closest known peers WALK_ALPHA at a time, moves on to the closer
  peers their answers name, and stops when enough valid answers are in or the closest known peers have
  all been asked. On a 50-node swarm a fetch sent 3 requests where ``get_value`` sent 41
  (benchmarks/dht.py).
- A fetch waits for a few valid answers (a copy cached here counts as one) and the newest valid
  sequence number wins, so a stale cached copy does not hide a newer record.
- Publishers of a namespace can be listed. A publish also announces the node as a provider of one of
  ``PUBLISHER_SHARDS`` keys of the namespace (sha2-256 multihashes), sharded because a node keeps at
  most 20 providers per key (``ProviderStore.add_provider``); the announcement walks like a lookup.
- Every network wait is bounded (``trio.move_on_after``): a silent peer costs a timeout, not a hang.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service

from tensorlink.p2p._libp2p import get_from_peer, providers_from_peer, send_add_provider, store_at_peer
from tensorlink.p2p.identity import peer_id_of
from tensorlink.p2p.records import (
    NAMESPACES,
    Namespace,
    RecordError,
    RecordValidator,
    VerifiedRecord,
    record_key,
    sign_record,
    verify_record,
)
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import Message

log = logging.getLogger(__name__)

K = 20  # replication factor: the library stores values and provider records at the 20 closest peers
PUBLISHER_SHARDS = 16  # 16 keys x 20 providers per key per holder: room for ~250 publishers per namespace
WALK_ALPHA = 3  # requests in flight per round of a walk
WALK_CLOSEST = 6  # a walk ends once this many of the closest known peers have answered
FETCH_QUORUM = 3  # valid answers a fetch waits for before it picks the newest
REPROVIDE_INTERVAL_S = 600.0  # repeat the publisher announcement at most this often per namespace
CONNECT_TIMEOUT_S = 5.0
REFRESH_TIMEOUT_S = 15.0
PUBLISH_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0  # one request to one peer (the library's QUERY_TIMEOUT)
FETCH_TIMEOUT_S = 15.0
LIST_TIMEOUT_S = 30.0  # publishers() and records() as a whole
FETCH_CONCURRENCY = 8
SWEEP_INTERVAL_S = 30.0


def publisher_key(namespace: Namespace, shard: int) -> bytes:
    """The provider key (a sha2-256 multihash) under which publishers of ``namespace`` in ``shard`` are
    announced. A multihash because that is what provider records are keyed by; ``KadDHT.provide(str)``
    would take it as hex (or a CID) and UTF-8 encode any other string, so the bytes are passed to the
    provider store directly."""
    digest = hashlib.sha256(f"tensorlink/publishers/v1/{namespace.name}/{shard}".encode()).digest()
    return bytes([0x12, 0x20]) + digest


def publisher_shard(peer_id: str) -> int:
    """The shard a publisher announces itself in: fixed per peer, spread evenly over peers."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big") % PUBLISHER_SHARDS


def tensorlink_validator() -> NamespacedValidator:
    """Our namespaces with RecordValidator, strict: any other key (``/pk``, ``/ipns``, unnamespaced) is refused."""
    validator = RecordValidator()
    return NamespacedValidator(dict.fromkeys(NAMESPACES, validator), strict_validation=True)


def _peer_info(target: str | multiaddr.Multiaddr | PeerInfo) -> PeerInfo:
    if isinstance(target, PeerInfo):
        return target
    return info_from_p2p_addr(target if isinstance(target, multiaddr.Multiaddr) else multiaddr.Multiaddr(target))


class Directory:
    """TensorLink's view of the DHT: publish and fetch signed records by namespace and peer id.

    ``server=True`` for nodes others can dial (they store records and answer queries); ``False`` for
    NATed nodes, which publish and query through servers but accept no DHT streams.
    """

    def __init__(self, host: IHost, key_pair: KeyPair, *, server: bool) -> None:
        if host.get_id() != ID.from_pubkey(key_pair.public_key):
            raise ValueError("the key pair is not the host's identity; records must be signed by the host's key")
        self._host = host
        self._key_pair = key_pair
        self._peer_id = peer_id_of(key_pair)
        self._provided_at: dict[str, float] = {}  # namespace -> when our announcement last reached a peer
        # validator_changed=True keeps the library from adding its /pk and /ipns validators next to ours.
        self._validator = tensorlink_validator()
        self._dht = KadDHT(
            host,
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=self._validator,
            validator_changed=True,
            strict_validation=True,
        )

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def server(self) -> bool:
        return self._dht.mode == DHTMode.SERVER

    @property
    def dht(self) -> KadDHT:
        """The underlying KadDHT, for diagnostics and tests."""
        return self._dht

    def addrs(self) -> list[str]:
        """Our listen addresses with ``/p2p/<id>``: what another node passes to ``connect_bootstrap``."""
        return [str(addr) for addr in self._host.get_addrs()]

    def routing_table_size(self) -> int:
        return self._dht.get_routing_table_size()

    # ------------------------------------------------------------------ lifecycle and peers

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Directory]:
        """Run the DHT service and the expiry sweep for the duration of the block (the host must be
        running already); leaving the block stops both."""
        async with background_trio_service(self._dht), trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_forever)
            log.info("DHT started in %s mode for %s", "server" if self.server else "client", self._peer_id)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
        log.info("DHT stopped for %s", self._peer_id)

    async def connect_bootstrap(
        self, targets: Iterable[str | multiaddr.Multiaddr | PeerInfo], *, refresh: bool = True
    ) -> list[str]:
        """Connect to bootstrap peers (``…/p2p/<id>`` multiaddrs or PeerInfos) concurrently and add them to
        the routing table; then, if ``refresh``, look up our own id so the table holds our neighbours.
        Returns the peer ids that connected; unusable or unreachable ones are logged, not raised."""
        infos: list[PeerInfo] = []
        for target in targets:
            try:
                infos.append(_peer_info(target))
            except Exception as exc:
                log.warning("bootstrap address %s is unusable: %s", target, exc)
        connected: list[str] = []

        async def connect_one(info: PeerInfo) -> None:
            if info.peer_id == self._host.get_id():
                return
            with trio.move_on_after(CONNECT_TIMEOUT_S) as scope:
                try:
                    await self._host.connect(info)
                except Exception as exc:
                    log.warning("bootstrap peer %s did not connect: %s", info.peer_id, exc)
                    return
                await self._dht.add_peer(info.peer_id)
                connected.append(info.peer_id.to_base58())
            if scope.cancelled_caught:
                log.warning("bootstrap peer %s did not answer within %.0f s", info.peer_id, CONNECT_TIMEOUT_S)

        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(connect_one, info)
        log.info("connected to %d of %d bootstrap peers", len(connected), len(infos))
        if refresh and connected:
            await self.refresh()
        return connected

    async def add_peer(self, peer: str | multiaddr.Multiaddr | PeerInfo) -> bool:
        """Add a peer to the routing table: a base58 peer id whose addresses are known already, or a
        ``…/p2p/<id>`` multiaddr or PeerInfo (its addresses are remembered for an hour). Nothing is dialed
        now; the first request to the peer does that."""
        if isinstance(peer, str) and not peer.startswith("/"):
            return await self._dht.add_peer(ID.from_base58(peer))
        info = _peer_info(peer)
        self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        return await self._dht.add_peer(info.peer_id)

    async def refresh(self, timeout_s: float = REFRESH_TIMEOUT_S) -> None:
        """Look up our own id, which fills the routing table with our neighbours and tells them about us.
        The library's full refresh (one more lookup per bucket) runs by itself every 10 minutes."""
        start = time.perf_counter()
        with trio.move_on_after(timeout_s) as scope:
            await self._dht.peer_routing.find_closest_peers_network(self._host.get_id().to_bytes())
        log.info(
            "routing table refresh %s after %.2f s: %d peers",
            "cut off" if scope.cancelled_caught else "done",
            time.perf_counter() - start,
            self.routing_table_size(),
        )

    async def set_server_mode(self, server: bool) -> None:
        """Switch between server (reachable) and client (NATed) mode, e.g. once reachability is known."""
        if server == self.server:
            return
        await self._dht.switch_mode(DHTMode.SERVER if server else DHTMode.CLIENT)
        if not server:
            # Switching to client mode empties the whole routing table (KadDHT.switch_mode calls
            # RoutingTable.cleanup_routing_table); a client still needs one to look anything up.
            for peer_id in self._host.get_connected_peers():
                await self._dht.add_peer(peer_id)
        log.info(
            "DHT switched to %s mode (%d peers in the routing table)",
            "server" if server else "client",
            self.routing_table_size(),
        )

    # ------------------------------------------------------------------ records

    async def publish(
        self, namespace: Namespace, message: Message, ttl_s: float, *, seq: int | None = None
    ) -> VerifiedRecord:
        """Sign ``message`` as this node's record in ``namespace`` (seq defaults to the time in ms), store it
        at the k closest peers and announce this node as a publisher of the namespace (again at most every
        REPROVIDE_INTERVAL_S). Raises WireError if the message is too large, RecordError (a WireError) if it
        is the wrong kind, the ttl is out of range or the seq is older than the one already published. Peers
        that do not store it are logged, not raised: the record is signed, and any holder can pass it on."""
        data = sign_record(self._key_pair, namespace, message, ttl_s=ttl_s, seq=seq)
        key = record_key(namespace, self._peer_id)
        record = verify_record(key, data)
        local = self._dht.value_store.get(key.encode())
        if local is not None and self._validator.select(key, [data, local.value]) != 0:
            # the peers holding the newer one would refuse it anyway; say so before any traffic
            raise RecordError(f"{key} already holds a newer record than seq {record.seq}")
        start = time.perf_counter()
        announce = time.monotonic() - self._provided_at.get(namespace.name, -1e18) > REPROVIDE_INTERVAL_S
        shard_key = publisher_key(namespace, publisher_shard(self._peer_id))
        stored: tuple[int, int] = (0, 0)

        async def put() -> None:
            nonlocal stored
            stored = await self._put(key, data)

        async def provide() -> None:
            taken, tried = await self._provide(shard_key)
            if taken:
                self._provided_at[namespace.name] = time.monotonic()
            elif tried:
                log.warning("none of %d peers took the announcement of %s as a publisher", tried, namespace.name)

        with trio.move_on_after(PUBLISH_TIMEOUT_S) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(put)
                if announce:
                    nursery.start_soon(provide)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if scope.cancelled_caught:
            log.warning("publishing %s seq=%d cut off after %.0f s", key, record.seq, PUBLISH_TIMEOUT_S)
        elif stored[1] and not stored[0]:
            log.warning("published %s seq=%d but none of %d peers stored it", key, record.seq, stored[1])
        else:
            log.info(
                "published %s seq=%d ttl=%.0fs at %d/%d peers%s in %.0f ms",
                key, record.seq, ttl_s, stored[0], stored[1], " with announcement" if announce else "", elapsed_ms,
            )  # fmt: skip
        return record

    async def fetch(
        self, namespace: Namespace, peer_id: str, *, timeout_s: float = FETCH_TIMEOUT_S
    ) -> VerifiedRecord | None:
        """The newest valid record ``peer_id`` published in ``namespace``, or None if no peer (and not our
        own store) has one that is still valid. Waits for FETCH_QUORUM valid answers at most."""
        key = record_key(namespace, peer_id)
        key_bytes = key.encode()
        start = time.perf_counter()
        best: VerifiedRecord | None = None
        best_raw: Record | None = None  # the protobuf record as a peer sent it, to refresh a stale local copy
        answers = 0
        local = self._dht.value_store.get(key_bytes)
        if local is not None:
            try:
                best = verify_record(key, local.value)
                answers = 1
            except WireError as exc:
                self._dht.value_store.remove(key_bytes)
                local = None
                log.info("dropped %s from the local store: %s", key, exc)
        if peer_id == self._peer_id and best is not None:
            return best  # we are the source of our own records
        local_seq = best.seq if best is not None else -1

        async def ask(peer: ID) -> list[ID] | None:
            nonlocal best, best_raw, answers
            record, closer = await self._get_from(peer, key_bytes)
            if isinstance(record, Record):
                try:
                    verified = verify_record(key, record.value)
                except WireError as exc:
                    log.warning("peer %s answered %s with a record we refuse: %s", peer, key, exc)
                else:
                    answers += 1
                    if best is None or verified.seq > best.seq:
                        best, best_raw = verified, record
            return closer if record is not None or closer else None

        with trio.move_on_after(timeout_s) as scope:
            known = await self._walk(key_bytes, ask, lambda: answers >= FETCH_QUORUM)
        if local is not None and best_raw is not None and best is not None and best.seq > local_seq:
            self._dht.value_store.put_record(key_bytes, best_raw)  # we hold this key: hold the newest
        log.debug(
            "fetch %s: %s from %d answers, %s, %.0f ms",
            key, f"seq={best.seq}" if best else "nothing", answers,
            "cut off" if scope.cancelled_caught else f"{len(known)} peers known", (time.perf_counter() - start) * 1e3,
        )  # fmt: skip
        return best

    async def publishers(self, namespace: Namespace, *, timeout_s: float = LIST_TIMEOUT_S) -> list[str]:
        """Peer ids that announced themselves as publishers of ``namespace``, alive or not (their records
        say which are). All shards are walked concurrently."""
        found: set[str] = set()
        with trio.move_on_after(timeout_s) as scope:
            async with trio.open_nursery() as nursery:
                for shard in range(PUBLISHER_SHARDS):
                    nursery.start_soon(self._collect_providers, publisher_key(namespace, shard), found)
        if scope.cancelled_caught:
            log.warning(
                "listing publishers of %s cut off after %.0f s (%d found)", namespace.name, timeout_s, len(found)
            )
        return sorted(found)

    async def records(self, namespace: Namespace, *, timeout_s: float = LIST_TIMEOUT_S) -> list[VerifiedRecord]:
        """Every currently valid record in ``namespace``, by publisher: the publishers are listed, then their
        records fetched concurrently (FETCH_CONCURRENCY at a time), all within ``timeout_s``."""
        deadline = trio.current_time() + timeout_s
        peers = await self.publishers(namespace, timeout_s=timeout_s)
        results: dict[str, VerifiedRecord] = {}
        limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)

        async def fetch_one(peer_id: str) -> None:
            async with limiter:
                remaining = deadline - trio.current_time()
                if remaining > 0:
                    record = await self.fetch(namespace, peer_id, timeout_s=min(remaining, FETCH_TIMEOUT_S))
                    if record is not None:
                        results[peer_id] = record

        with trio.move_on_after(max(0.0, deadline - trio.current_time())) as scope:
            async with trio.open_nursery() as nursery:
                for peer_id in peers:
                    nursery.start_soon(fetch_one, peer_id)
        if scope.cancelled_caught:
            log.warning(
                "records of %s cut off after %.0f s: %d of %d publishers answered",
                namespace.name, timeout_s, len(results), len(peers),
            )  # fmt: skip
        return [results[p] for p in sorted(results)]

    def sweep(self) -> int:
        """Drop records that are no longer valid (mostly: expired) from the local store and return how
        many; the library would keep them for 24 h and keep serving them."""
        store = self._dht.value_store.store
        dropped = 0
        for key_bytes, (record, _validity) in list(store.items()):
            try:
                verify_record(key_bytes.decode(), record.value)
            except (WireError, UnicodeDecodeError):
                store.pop(key_bytes, None)
                dropped += 1
        if dropped:
            log.debug("swept %d expired or invalid records from the local store", dropped)
        return dropped

    # ------------------------------------------------------------------ internals

    async def _walk(
        self, key: bytes, ask: Callable[[ID], Awaitable[list[ID] | None]], enough: Callable[[], bool]
    ) -> list[ID]:
        """Kademlia walk towards ``key``: keep WALK_ALPHA requests in flight to the closest known peers not
        asked yet (each bounded by REQUEST_TIMEOUT_S), learn closer peers from the answers, and stop
        starting new ones once ``enough()`` or the WALK_CLOSEST closest known peers have all been asked.
        Requests in flight are let finish rather than cancelled. ``ask`` returns the closer peers a peer
        named, or None if it did not answer usefully (it is then dropped from this walk). Returns the
        peers that answered or were named, closest first."""
        me = self._host.get_id()
        peerstore = self._host.get_peerstore()

        def dialable(peer: ID) -> bool:
            """Known addresses, and not known to lack the DHT protocol. The library puts client-mode
            peers in its routing table whenever they send it a request (KadDHT._do_handle_stream adds
            every sender with skip_server_mode_check=True), and asking them only fails."""
            try:
                if not peerstore.addrs(peer):
                    return False
                protocols = peerstore.get_protocols(peer)
            except Exception:  # PeerStoreError: unknown or expired
                return False
            return not protocols or PROTOCOL_ID in protocols

        known = {p for p in self._dht.routing_table.find_local_closest_peers(key, K) if dialable(p)}
        if len(known) < WALK_CLOSEST:  # e.g. a client that has just connected
            known.update(p for p in self._host.get_connected_peers() if dialable(p))
        known.discard(me)
        asked: set[ID] = set()
        done_send, done_recv = trio.open_memory_channel[None](WALK_ALPHA)

        async def ask_one(peer: ID) -> None:
            closer: list[ID] | None = None
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    closer = await ask(peer)
                if closer is None:
                    known.discard(peer)  # silent, gone, or not a DHT server (e.g. a client the library listed)
                else:
                    known.update(p for p in closer if p != me and p not in known and dialable(p))
            finally:
                done_send.send_nowait(None)

        in_flight = 0
        async with trio.open_nursery() as nursery:
            while True:
                if not enough():
                    ranked = sort_peer_ids_by_distance(key, list(known))[:WALK_CLOSEST]
                    for peer in [p for p in ranked if p not in asked][: WALK_ALPHA - in_flight]:
                        asked.add(peer)
                        in_flight += 1
                        nursery.start_soon(ask_one, peer)
                if in_flight == 0:
                    break
                await done_recv.receive()
                in_flight -= 1
        return sort_peer_ids_by_distance(key, list(known))

    async def _get_from(self, peer: ID, key: bytes) -> tuple[Record | None, list[ID]]:
        """One GET_VALUE request: the record the peer holds (unchecked) and the closer peers it names."""
        result = await get_from_peer(self._dht.value_store, peer, key)
        if not isinstance(result, tuple):
            return None, []
        record, closer = result
        return (record if isinstance(record, Record) else None), list(closer)

    async def _put(self, key: str, data: bytes) -> tuple[int, int]:
        """Store ``data`` here and at the K closest peers to ``key``; returns (stored, tried).

        Not ``KadDHT.put_value``: its lookup sends FIND_NODE with the record key itself, and servers refuse
        FIND_NODE for a key that is neither a multihash nor at most 50 bytes (ours are 66), so the lookup
        never gets past the local routing table. GET_VALUE answers name the closest peers for any key, so
        the walk uses those."""
        key_bytes = key.encode()
        self._dht.value_store.put(key_bytes, data)

        async def ask(peer: ID) -> list[ID] | None:
            record, closer = await self._get_from(peer, key_bytes)
            return closer if record is not None or closer else None

        closest = (await self._walk(key_bytes, ask, lambda: False))[:K]
        stored = [0]

        async def store_at(peer: ID) -> None:
            # A server resets every DHT stream beyond 12 it is handling (KadDHT.handle_stream), which a
            # burst of publishes reaches easily: one retry after a short random pause gets most of them.
            for attempt in range(2):
                if attempt:
                    await trio.sleep(random.uniform(0.05, 0.3))
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    if await store_at_peer(self._dht.value_store, peer, key_bytes, data):
                        stored[0] += 1
                        return

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(store_at, peer)
        return stored[0], len(closest)

    async def _provide(self, key: bytes) -> tuple[int, int]:
        """Announce this node as a provider of ``key`` here and at the K closest peers; returns (taken, tried).
        Like ``ProviderStore.provide``, but its FIND_NODE lookup is replaced by a GET_PROVIDERS walk: the
        same one ``publishers`` does, and cheaper (ADD_PROVIDER is fire-and-forget, so "taken" means sent)."""
        store = self._dht.provider_store
        store.providing_keys.add(key)
        store.add_provider(key, PeerInfo(self._host.get_id(), self._host.get_addrs()))

        async def ask(peer: ID) -> list[ID] | None:
            providers, closer = await providers_from_peer(store, peer, key)
            return closer if providers or closer else None

        closest = (await self._walk(key, ask, lambda: False))[:K]
        taken = [0]

        async def announce_to(peer: ID) -> None:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                if await send_add_provider(store, peer, key):
                    taken[0] += 1

        async with trio.open_nursery() as nursery:
            for peer in closest:
                nursery.start_soon(announce_to, peer)
        return taken[0], len(closest)

    async def _collect_providers(self, key: bytes, found: set[str]) -> None:
        store = self._dht.provider_store
        found.update(info.peer_id.to_base58() for info in store.get_providers(key))

        async def ask(peer: ID) -> list[ID] | None:
            providers, closer = await providers_from_peer(store, peer, key)
            found.update(info.peer_id.to_base58() for info in providers)
            return closer if providers or closer else None  # ([], []) is what a failed request returns

        await self._walk(key, ask, lambda: False)

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            self.sweep()
