"""Signed, namespaced, expiring DHT records, and the validator every node runs on them.

A record's key is ``/<namespace>/<publisher peer id>``: only the peer that owns the key can publish it,
because the record carries the publisher's Ed25519 public key, the key's peer id must be derived from
it, and the signature covers key, value, sequence number and expiry. The value is one control message
of the kind the namespace names. Expired, oversized, forged or unsigned records are refused by every
node before they are stored or returned; the newest valid sequence number wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import msgspec
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import (
    JobRecord,
    Message,
    ValidatorPresence,
    WorkerCapability,
    decode_message,
    encode_message,
)

MAX_RECORD_BYTES = 64 * 1024
MAX_TTL_S = 3600.0  # nobody may publish a record that outlives an hour without refreshing it
CLOCK_SKEW_S = 30.0  # tolerated difference between the publisher's clock and ours
_DOMAIN = b"tensorlink-record-v1\x00"


@dataclass(frozen=True)
class Namespace:
    name: str
    message: type[Message]


WORKERS = Namespace("tl-worker", WorkerCapability)
VALIDATORS = Namespace("tl-validator", ValidatorPresence)
JOBS = Namespace("tl-job", JobRecord)
NAMESPACES = {ns.name: ns for ns in (WORKERS, VALIDATORS, JOBS)}


class RecordError(WireError):
    """A DHT record that must not be stored or believed; the message says why."""


class SignedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: Annotated[str, msgspec.Meta(max_length=256)]
    value: Annotated[bytes, msgspec.Meta(max_length=MAX_RECORD_BYTES)]
    public_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # raw Ed25519
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    expires_ms: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


@dataclass(frozen=True)
class VerifiedRecord:
    """A record that passed every check, with its value decoded."""

    namespace: Namespace
    publisher: str
    message: Message
    seq: int
    expires_ms: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SignedRecord)


def record_key(namespace: Namespace, peer_id: str) -> str:
    return f"/{namespace.name}/{peer_id}"


def _signed_bytes(key: str, value: bytes, seq: int, expires_ms: int) -> bytes:
    return _DOMAIN + _encoder.encode((key, value, seq, expires_ms))


def sign_record(
    key_pair: KeyPair, namespace: Namespace, message: Message, *, ttl_s: float, seq: int | None = None
) -> bytes:
    """The encoded record publishing ``message`` under this node's key in ``namespace``."""
    if not isinstance(message, namespace.message):
        raise RecordError(
            f"namespace {namespace.name} holds {namespace.message.__name__}, not {type(message).__name__}"
        )
    if not 0 < ttl_s <= MAX_TTL_S:
        raise RecordError(f"record ttl {ttl_s} s is outside 0..{MAX_TTL_S:.0f} s")
    if key_pair.public_key.get_type() != KeyType.Ed25519:
        raise RecordError("records are signed with Ed25519 identities only")
    now_ms = int(time.time() * 1000)
    key = record_key(namespace, ID.from_pubkey(key_pair.public_key).to_base58())
    value = encode_message(message)
    seq = now_ms if seq is None else seq
    expires_ms = now_ms + int(ttl_s * 1000)
    signature = key_pair.private_key.sign(_signed_bytes(key, value, seq, expires_ms))
    record = SignedRecord(key, value, key_pair.public_key.to_bytes(), seq, expires_ms, signature)
    return _encoder.encode(record)


def verify_record(key: str, data: bytes, *, now: float | None = None) -> VerifiedRecord:
    """Every check a node makes before storing or believing a record; raises RecordError naming the first
    that failed."""
    if len(data) > MAX_RECORD_BYTES + 512:
        raise RecordError(f"record of {len(data)} bytes exceeds the cap of {MAX_RECORD_BYTES + 512}")
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "" or parts[1] not in NAMESPACES:
        raise RecordError(f"record key {key[:80]!r} is not /<namespace>/<peer id> with a known namespace")
    namespace = NAMESPACES[parts[1]]
    try:
        record = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RecordError(f"malformed record: {exc}") from None
    if record.key != key:
        raise RecordError(f"record for {record.key[:80]!r} was offered under key {key[:80]!r}")
    try:
        public_key = Ed25519PublicKey.from_bytes(record.public_key)
        publisher = ID.from_pubkey(public_key).to_base58()
    except Exception:
        raise RecordError("record public key is not a valid Ed25519 key") from None
    if publisher != parts[2]:
        raise RecordError(f"record under {parts[2][:60]} is signed by a different peer ({publisher})")
    if not public_key.verify(_signed_bytes(record.key, record.value, record.seq, record.expires_ms), record.signature):
        raise RecordError(f"record {key[:80]!r} has an invalid signature")
    now_ms = (time.time() if now is None else now) * 1000
    if record.expires_ms <= now_ms:
        raise RecordError(f"record {key[:80]!r} expired {(now_ms - record.expires_ms) / 1000:.1f} s ago")
    if record.expires_ms > now_ms + (MAX_TTL_S + CLOCK_SKEW_S) * 1000:
        raise RecordError(f"record {key[:80]!r} claims to live longer than {MAX_TTL_S:.0f} s")
    message = decode_message(record.value, expect=namespace.message)  # WireError names what is wrong
    if (described := getattr(message, "peer_id", publisher)) != publisher:
        raise RecordError(f"record {key[:80]!r} describes peer {described}, not its publisher")
    return VerifiedRecord(namespace, publisher, message, record.seq, record.expires_ms)


class RecordValidator(Validator):
    """The libp2p DHT hook: refuses bad records and, among valid ones, picks the newest."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            verify_record(key, value)
        except WireError as exc:
            raise ValueError(str(exc)) from None

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for index, value in enumerate(values):
            try:
                seq = verify_record(key, value).seq
            except WireError:
                continue
            if seq > best_seq:
                best, best_seq = index, seq
        return best
