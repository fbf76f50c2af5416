"""The DHT layer: signed TensorLink records published and fetched across real libp2p hosts on loopback.

Forged records are injected the way an attacker would: from a node whose own validator accepts
anything, which stores them, sends PUT_VALUE straight to honest nodes and serves them to whoever asks;
or straight into an honest node's local store (the library returns stored values without checking them
again). Every honest node must neither keep them nor return them.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import msgspec
import pytest
import trio

from tensorlink.p2p.dht import (
    PUBLISHER_SHARDS,
    Directory,
    publisher_key,
    publisher_shard,
    tensorlink_validator,
)
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.records import (
    JOBS,
    MAX_TTL_S,
    VALIDATORS,
    WORKERS,
    RecordError,
    RecordValidator,
    SignedRecord,
    _signed_bytes,
    record_key,
    sign_record,
    verify_record,
)
from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import ValidatorPresence, WorkerCapability

# ---------------------------------------------------------------------------------------------- helpers


def capability(peer_id: str, free_gib: int = 8) -> WorkerCapability:
    return WorkerCapability(
        peer_id=peer_id,
        device="cpu",
        device_name="test cpu",
        memory_bytes=16 << 30,
        free_memory_bytes=free_gib << 30,
        gflops=12.5,
        software="tensorlink-test",
    )


def presence(peer_id: str) -> ValidatorPresence:
    return ValidatorPresence(peer_id=peer_id, software="tensorlink-test")


def craft(key_pair, key: str, value: bytes, *, seq: int = 1, expires_ms: int | None = None) -> bytes:
    """A record with a valid signature by ``key_pair`` over exactly these fields, whatever they say."""
    expires_ms = int(time.time() * 1000) + 60_000 if expires_ms is None else expires_ms
    signature = key_pair.private_key.sign(_signed_bytes(key, value, seq, expires_ms))
    return msgspec.msgpack.encode(SignedRecord(key, value, key_pair.public_key.to_bytes(), seq, expires_ms, signature))


def tamper(data: bytes, **fields: object) -> bytes:
    """The record with some fields changed after signing."""
    record = msgspec.msgpack.decode(data, type=SignedRecord)
    return msgspec.msgpack.encode(msgspec.structs.replace(record, **fields))


@pytest.fixture
def keys(tmp_path: Path):
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        out.append(load_or_create_identity(tmp_path / name))
    return out


def make_permissive(node: Directory) -> Directory:
    """Turn a node into an attacker: its own validator accepts anything, so it stores any record locally,
    sends it in PUT_VALUE to whoever it likes and serves it to whoever asks."""
    node.dht.validator.validate = lambda key, value: None  # type: ignore[method-assign]
    node.dht.validator.select = lambda key, values: 0  # type: ignore[method-assign]
    node.sweep = lambda: 0  # type: ignore[method-assign]  # and it keeps serving what it holds
    return node


def exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


# ------------------------------------------------------------------- verify_record, one case at a time


def test_a_valid_record_verifies(keys) -> None:
    a = keys[0]
    a_id = peer_id_of(a)
    data = sign_record(a, WORKERS, capability(a_id), ttl_s=60, seq=7)
    record = verify_record(record_key(WORKERS, a_id), data)
    assert (record.publisher, record.seq, record.message, record.namespace) == (a_id, 7, capability(a_id), WORKERS)


def test_verify_refuses_each_forgery_with_its_reason(keys) -> None:
    a, b = keys
    a_id, b_id = peer_id_of(a), peer_id_of(b)
    a_key, b_key = record_key(WORKERS, a_id), record_key(WORKERS, b_id)
    good = sign_record(a, WORKERS, capability(a_id), ttl_s=60, seq=5)
    value = msgspec.msgpack.decode(good, type=SignedRecord).value
    now_ms = int(time.time() * 1000)
    cases: list[tuple[str, str, bytes, type[Exception], str]] = [
        ("wrong signer for the key", b_key, craft(a, b_key, value), RecordError,
         f"record under {b_id} is signed by a different peer ({a_id})"),
        ("someone else's record replayed under another key", b_key, good, RecordError,
         f"record for {a_key!r} was offered under key {b_key!r}"),
        ("bad signature", a_key, tamper(good, signature=bytes(64)), RecordError,
         f"record {a_key!r} has an invalid signature"),
        ("tampered value", a_key, tamper(good, value=msgspec.msgpack.encode(capability(a_id, free_gib=1))),
         RecordError, f"record {a_key!r} has an invalid signature"),
        ("tampered seq", a_key, tamper(good, seq=6), RecordError, f"record {a_key!r} has an invalid signature"),
        ("tampered expiry", a_key, tamper(good, expires_ms=now_ms + 3_000_000), RecordError,
         f"record {a_key!r} has an invalid signature"),
        ("another key's signature", a_key, tamper(good, public_key=b.public_key.to_bytes()), RecordError,
         f"record under {a_id} is signed by a different peer ({b_id})"),
        ("expired", a_key, craft(a, a_key, value, expires_ms=now_ms - 2000), RecordError,
         f"record {a_key!r} expired 2.0 s ago"),
        ("ttl too long", a_key, craft(a, a_key, value, expires_ms=now_ms + int((MAX_TTL_S + 60) * 1000)),
         RecordError, f"record {a_key!r} claims to live longer than 3600 s"),
        ("oversized record", a_key, craft(a, a_key, bytes(70_000)), RecordError,
         f"record of {len(craft(a, a_key, bytes(70_000)))} bytes exceeds the cap of 66048"),
        ("value over every message cap", a_key, craft(a, a_key, bytes(20_000)), WireError,
         "control message of 20000 bytes exceeds the largest allowed (16384 bytes)"),
        ("wrong message kind for the namespace", a_key, craft(a, a_key, msgspec.msgpack.encode(presence(a_id))),
         WireError, "expected a WorkerCapability message, got ValidatorPresence"),
        ("message about another peer", a_key, craft(a, a_key, msgspec.msgpack.encode(capability(b_id))),
         RecordError, f"record {a_key!r} describes peer {b_id}, not its publisher"),
        ("non-TensorLink namespace", f"/pk/{a_id}", craft(a, f"/pk/{a_id}", value), RecordError,
         f"record key {'/pk/' + a_id!r} is not /<namespace>/<peer id> with a known namespace"),
        ("unnamespaced key", a_id, craft(a, a_id, value), RecordError,
         f"record key {a_id!r} is not /<namespace>/<peer id> with a known namespace"),
        ("key with extra segments", a_key + "/x", craft(a, a_key + "/x", value), RecordError,
         f"record key {a_key + '/x'!r} is not /<namespace>/<peer id> with a known namespace"),
    ]  # fmt: skip
    for name, key, data, error, text in cases:
        with pytest.raises(error, match=exactly(text)):
            verify_record(key, data, now=now_ms / 1000)
        # The DHT hook refuses it with the same sentence (it reads the clock itself, so not the seconds).
        with pytest.raises(ValueError, match=exactly(text) if name != "expired" else r" expired \d+\.\d s ago$"):
            RecordValidator().validate(key, data)


def test_verify_refuses_malformed_and_unsigned_bytes(keys) -> None:
    a_id = peer_id_of(keys[0])
    key = record_key(WORKERS, a_id)
    with pytest.raises(RecordError, match=r"^malformed record: "):
        verify_record(key, b"\x93garbage")
    with pytest.raises(RecordError, match=r"^malformed record: Object missing required field `signature`"):
        verify_record(key, msgspec.msgpack.encode({"key": key, "value": b"", "public_key": bytes(32), "seq": 1,
                                                   "expires_ms": 1}))  # fmt: skip


def test_sign_record_refuses_what_others_would_refuse(keys) -> None:
    a = keys[0]
    a_id = peer_id_of(a)
    with pytest.raises(RecordError, match=exactly("namespace tl-worker holds WorkerCapability, not ValidatorPresence")):
        sign_record(a, WORKERS, presence(a_id), ttl_s=60)
    with pytest.raises(RecordError, match=exactly("record ttl 7200 s is outside 0..3600 s")):
        sign_record(a, WORKERS, capability(a_id), ttl_s=7200)
    with pytest.raises(RecordError, match=exactly("record ttl 0 s is outside 0..3600 s")):
        sign_record(a, WORKERS, capability(a_id), ttl_s=0)


def test_select_prefers_the_newest_valid_record(keys) -> None:
    a = keys[0]
    a_id = peer_id_of(a)
    key = record_key(WORKERS, a_id)
    old = sign_record(a, WORKERS, capability(a_id), ttl_s=60, seq=1)
    new = sign_record(a, WORKERS, capability(a_id), ttl_s=60, seq=2)
    forged_newer = tamper(new, seq=99)
    validator = RecordValidator()
    assert validator.select(key, [old, new]) == 1
    assert validator.select(key, [new, old]) == 0
    assert validator.select(key, [old, forged_newer]) == 0


def test_the_dht_validator_knows_only_tensorlink_namespaces(keys) -> None:
    a = keys[0]
    a_id = peer_id_of(a)
    validator = tensorlink_validator()
    validator.validate(record_key(WORKERS, a_id), sign_record(a, WORKERS, capability(a_id), ttl_s=60))
    for key in (f"/pk/{a_id}", f"/ipns/{a_id}", f"/evil/{a_id}", "plain-key"):
        with pytest.raises(Exception, match="No validator registered"):
            validator.validate(key, b"anything")


def test_publisher_keys_are_multihashes_and_shards_spread() -> None:
    key = publisher_key(WORKERS, 3)
    assert key[:2] == b"\x12\x20" and len(key) == 34
    assert len({publisher_key(ns, s) for ns in (WORKERS, VALIDATORS, JOBS) for s in range(PUBLISHER_SHARDS)}) == (
        3 * PUBLISHER_SHARDS
    )
    shards = [publisher_shard(f"peer-{i}") for i in range(1600)]
    assert set(shards) == set(range(PUBLISHER_SHARDS))
    assert max(shards.count(s) for s in range(PUBLISHER_SHARDS)) < 2 * 1600 / PUBLISHER_SHARDS


def test_directory_refuses_a_key_pair_that_is_not_the_hosts(keys) -> None:
    from tensorlink.p2p.host import make_host

    with pytest.raises(ValueError, match="not the host's identity"):
        Directory(make_host(keys[0]), keys[1], server=True)


# ------------------------------------------------------------------------------------ small swarms


async def test_forged_records_are_refused_by_every_node(dht_swarm) -> None:
    with trio.fail_after(60):
        async with dht_swarm(6) as s:
            attacker = make_permissive(s.nodes[0])
            honest = s.nodes[1:]
            victim = honest[0]
            kp = attacker._key_pair  # the attacker signs with its own key; it cannot sign as anyone else
            a_id, v_id = attacker.peer_id, victim.peer_id
            a_key, v_key = record_key(WORKERS, a_id), record_key(WORKERS, v_id)
            now_ms = int(time.time() * 1000)
            good_value = msgspec.msgpack.encode(capability(a_id))

            async def push(key: str, data: bytes) -> list[bool]:
                """The attacker stores the record itself and sends PUT_VALUE to every honest node."""
                attacker.dht.value_store.put(key.encode(), data)
                accepted = []
                for node in honest:
                    with trio.fail_after(15):
                        accepted.append(
                            await attacker.dht.value_store._store_at_peer(node.dht.local_peer_id, key.encode(), data)
                        )
                return accepted

            # Control: a valid record relayed by the attacker is taken by every honest node, so PUT_VALUE
            # reaches them and the refusals below are the validators' doing.
            valid = sign_record(kp, WORKERS, capability(a_id), ttl_s=60)
            assert await push(a_key, valid) == [True] * len(honest)
            assert all(a_key.encode() in node.dht.value_store.store for node in honest)
            for node in honest:
                node.dht.value_store.remove(a_key.encode())

            forged: list[tuple[str, str, bytes]] = [
                ("wrong signer for the key", v_key, craft(kp, v_key, msgspec.msgpack.encode(capability(v_id)))),
                ("bad signature", a_key, tamper(valid, signature=bytes(64))),
                ("tampered value", a_key, tamper(valid, value=msgspec.msgpack.encode(capability(a_id, 1)))),
                ("expired", a_key, craft(kp, a_key, good_value, expires_ms=now_ms - 1000)),
                ("ttl too long", a_key, craft(kp, a_key, good_value, expires_ms=now_ms + 2 * 3600_000)),
                ("oversized", a_key, craft(kp, a_key, bytes(200_000))),
                ("wrong kind", a_key, craft(kp, a_key, msgspec.msgpack.encode(presence(a_id)))),
                ("non-TensorLink namespace", f"/evil/{a_id}", craft(kp, f"/evil/{a_id}", good_value)),
                ("libp2p /pk namespace", f"/pk/{a_id}", kp.public_key.serialize()),
                ("unnamespaced key", "plain-key", b"anything"),
            ]
            for name, key, data in forged:
                assert await push(key, data) == [False] * len(honest), name
                assert not [n.peer_id for n in honest if key.encode() in n.dht.value_store.store], name
                # The attacker serves it to whoever asks; nobody takes it from there either.
                record, _ = await victim._get_from(attacker.dht.local_peer_id, key.encode())
                assert record is not None and record.value == data, name
                if key.startswith("/tl-worker/"):
                    for node in honest:  # with 5 peers known, every fetch asks the attacker too
                        assert await node.fetch(WORKERS, key.rsplit("/", 1)[1]) is None, name
                else:
                    with trio.fail_after(15):
                        assert await honest[1].dht.get_value(key) is None, name
                assert not [n.peer_id for n in honest if key.encode() in n.dht.value_store.store], name
                attacker.dht.value_store.remove(key.encode())

            # Straight into an honest node's store: its own fetch and sweep drop it, nobody else takes it.
            expired = craft(kp, a_key, good_value, expires_ms=now_ms - 1000)
            victim.dht.value_store.put(a_key.encode(), expired)
            assert await honest[1].fetch(WORKERS, a_id) is None
            assert await victim.fetch(WORKERS, a_id) is None
            assert a_key.encode() not in victim.dht.value_store.store
            victim.dht.value_store.put(a_key.encode(), expired)
            assert victim.sweep() == 1 and a_key.encode() not in victim.dht.value_store.store

            # An honest node refuses to put a foreign key itself.
            for key in (f"/pk/{v_id}", "plain-key"):
                with pytest.raises(Exception, match="No validator registered"):
                    await victim.dht.put_value(key, b"x")


async def test_expired_records_are_not_returned(dht_swarm) -> None:
    with trio.fail_after(60):
        async with dht_swarm(6) as s:
            publisher, reader = s.nodes[0], s.nodes[1]
            record = await publisher.publish(VALIDATORS, presence(publisher.peer_id), ttl_s=3)
            got = await reader.fetch(VALIDATORS, publisher.peer_id)
            assert got is not None and got.seq == record.seq and got.message == presence(publisher.peer_id)
            holders = s.holders(VALIDATORS, publisher.peer_id)
            assert len(holders) == 6  # k = 20 >= 6: every node stores it
            await trio.sleep(max(0.0, record.expires_ms / 1000 - time.time()) + 0.2)
            for node in s.nodes:
                assert await node.fetch(VALIDATORS, publisher.peer_id) is None
            # fetch dropped it from the store of every node that asked; sweep finds nothing left
            assert s.holders(VALIDATORS, publisher.peer_id) == []
            assert all(node.sweep() == 0 for node in s.nodes)


async def test_newer_seq_replaces_older_and_older_never_replaces_newer(dht_swarm) -> None:
    with trio.fail_after(60):
        async with dht_swarm(6) as s:
            publisher, reader = s.nodes[0], s.nodes[1]
            pid = publisher.peer_id
            key = record_key(WORKERS, pid).encode()
            await publisher.publish(WORKERS, capability(pid, free_gib=8), ttl_s=60, seq=100)
            old = publisher.dht.value_store.get(key).value
            assert (await reader.fetch(WORKERS, pid)).seq == 100

            await publisher.publish(WORKERS, capability(pid, free_gib=2), ttl_s=60, seq=101)
            got = await reader.fetch(WORKERS, pid)
            assert got.seq == 101 and got.message.free_memory_bytes == 2 << 30
            assert {verify_record(key.decode(), n.dht.value_store.get(key).value).seq for n in s.nodes} == {101}

            # The publisher itself refuses to go back ...
            with pytest.raises(RecordError, match="already holds a newer record than seq 100"):
                await publisher.publish(WORKERS, capability(pid, free_gib=8), ttl_s=60, seq=100)
            # ... and a replay of the older (validly signed) record changes nothing anywhere.
            replayer = make_permissive(s.nodes[2])
            replayer.dht.value_store.remove(key)
            with trio.fail_after(15):
                await replayer.dht.put_value(key.decode(), old)
            others = [n for n in s.nodes if n is not replayer]
            assert {verify_record(key.decode(), n.dht.value_store.get(key).value).seq for n in others} == {101}
            for node in others:
                assert (await node.fetch(WORKERS, pid)).seq == 101
            # A node holding a stale copy learns the newer one from the network and keeps that instead.
            s.nodes[3].dht.value_store.put_record(key, replayer.dht.value_store.get(key))
            assert (await s.nodes[3].fetch(WORKERS, pid)).seq == 101
            assert verify_record(key.decode(), s.nodes[3].dht.value_store.get(key).value).seq == 101


async def test_client_mode_nodes_publish_and_fetch_but_serve_nothing(dht_swarm) -> None:
    with trio.fail_after(60):
        async with dht_swarm(5, clients=1) as s:
            client = s.clients[0]
            assert not client.server
            await client.publish(WORKERS, capability(client.peer_id), ttl_s=60)
            key = record_key(WORKERS, client.peer_id).encode()
            assert len(s.holders(WORKERS, client.peer_id)) == 6  # 5 servers + its own copy
            # It holds its record but answers no DHT request (no /ipfs/kad/1.0.0 handler in client mode).
            with trio.fail_after(10):
                assert await s.servers[0].dht.value_store._get_from_peer(client.dht.local_peer_id, key) is None
            got = await s.servers[0].fetch(WORKERS, client.peer_id)
            assert got is not None and got.publisher == client.peer_id
            assert await s.servers[1].publishers(WORKERS) == [client.peer_id]

            # A server that turns out to be NATed switches to client mode and keeps its routing table.
            node = s.servers[4]
            await node.set_server_mode(False)
            assert not node.server and node.routing_table_size() >= 4
            got = await node.fetch(WORKERS, client.peer_id)
            assert got is not None and got.publisher == client.peer_id
            await node.set_server_mode(True)
            assert node.server


# ------------------------------------------------------------------------------------ 30-node swarm


@pytest.mark.slow
async def test_swarm_of_30_publishes_fetches_lists_and_refuses(dht_swarm) -> None:
    rng = random.Random(20261120)
    with trio.fail_after(150):
        async with dht_swarm(28, clients=2) as s:
            assert len(s.nodes) == 30
            # A short-lived record, checked again at the end once it has expired.
            short_lived = rng.choice(s.servers)
            short = await short_lived.publish(VALIDATORS, presence(short_lived.peer_id), ttl_s=3)

            publishers = [s.clients[0], *rng.sample(s.servers, 7)]
            expected = {p.peer_id: capability(p.peer_id, free_gib=rng.randrange(1, 16)) for p in publishers}
            async with trio.open_nursery() as nursery:
                for p in publishers:
                    nursery.start_soon(p.publish, WORKERS, expected[p.peer_id], 120.0)

            # Every publisher's record, fetched by two random nodes that do not hold it where possible.
            fetched = 0
            for p in publishers:
                holders = s.holders(WORKERS, p.peer_id)
                assert len(holders) >= 15, f"{p.peer_id} stored at only {len(holders)} nodes"
                readers = [n for n in s.nodes if n not in holders] or [n for n in s.nodes if n is not p]
                for reader in rng.sample(readers, min(2, len(readers))):
                    got = await reader.fetch(WORKERS, p.peer_id)
                    assert got is not None, f"{reader.peer_id} could not fetch {p.peer_id}"
                    assert (got.publisher, got.message) == (p.peer_id, expected[p.peer_id])
                    fetched += 1
            assert fetched == 2 * len(publishers)

            # Every live publisher, listed from a node that publishes nothing.
            lister = rng.choice([n for n in s.nodes if n not in publishers])
            assert await lister.publishers(WORKERS) == sorted(expected)
            listed = await lister.records(WORKERS)
            assert {r.publisher: r.message for r in listed} == expected

            # A late joiner in client mode that knows one node finds everything.
            joiner = await s.add_node(server=False)
            assert await joiner.connect_bootstrap([rng.choice(s.servers).addrs()[0]]) != []
            someone = rng.choice(publishers)
            got = await joiner.fetch(WORKERS, someone.peer_id)
            assert got is not None and got.message == expected[someone.peer_id]
            assert await joiner.publishers(WORKERS) == sorted(expected)

            # A forged record for a node that has published nothing: nobody keeps or returns it.
            attacker = make_permissive(rng.choice([n for n in s.servers if n not in publishers]))
            victim = rng.choice([n for n in s.servers if n not in publishers and n is not attacker])
            v_key = record_key(WORKERS, victim.peer_id)
            forged = craft(attacker._key_pair, v_key, msgspec.msgpack.encode(capability(victim.peer_id)))
            attacker.dht.value_store.put(v_key.encode(), forged)
            for node in rng.sample([n for n in s.servers if n is not attacker], 10):
                with trio.fail_after(15):
                    assert not await attacker.dht.value_store._store_at_peer(
                        node.dht.local_peer_id, v_key.encode(), forged
                    )
            assert s.holders(WORKERS, victim.peer_id) == [attacker]
            for reader in rng.sample([n for n in s.nodes if n is not attacker], 5):
                assert await reader.fetch(WORKERS, victim.peer_id) is None

            # The short-lived record has expired by now (or soon): no node returns it.
            await trio.sleep(max(0.0, short.expires_ms / 1000 - time.time()) + 0.2)
            readers = rng.sample([n for n in s.nodes if n is not short_lived], 5)
            for reader in [short_lived, *readers]:
                assert await reader.fetch(VALIDATORS, short_lived.peer_id) is None
