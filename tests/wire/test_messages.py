"""Control messages: every kind round-trips, and every way a peer can get one wrong is a WireError
that says what was wrong (unknown kind or field, wrong type, out-of-range value, size, version)."""

from __future__ import annotations

from array import array
from typing import Any

import msgspec
import pytest

from tensorlink.wire import WireError
from tensorlink.wire.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ChannelAccept,
    ChannelOffer,
    ChannelSelect,
    DialBackProbe,
    DialBackRequest,
    DialBackResponse,
    ErrorReply,
    Heartbeat,
    Hello,
    JobPlan,
    JobRecord,
    JobRequest,
    Message,
    StageAssign,
    StageAssigned,
    StagePlacement,
    UnitCost,
    ValidatorPresence,
    WorkerCapability,
    decode_message,
    encode_message,
)

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
JOB = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
KEY = bytes(range(32))
TOKEN = bytes(range(100, 132))

EXAMPLES: list[Message] = [
    Hello(role="worker", software="tensorlink/0.1.0 torch/2.13.0+cu128"),
    ValidatorPresence(peer_id=PEER, software="tensorlink/0.1.0", addrs=["/ip4/203.0.113.7/tcp/4001"]),
    JobRecord(job=bytes(range(16)), owner=PEER, validator=PEER, stages=[PEER, PEER], state="running"),
    Heartbeat(peer_id=PEER, role="validator", seq=41, time_ms=1_732_140_000_123, load=0.37, stages=3),
    WorkerCapability(
        peer_id=PEER,
        device="cuda",
        device_name="NVIDIA H200",
        memory_bytes=150_031_400_960,
        free_memory_bytes=148_000_000_000,
        gflops=989_000.5,
        software="tensorlink/0.1.0 torch/2.13.0+cu128",
        addrs=["/ip4/203.0.113.7/tcp/4001", "/ip6/2001:db8::1/udp/4001/quic-v1"],
    ),
    ChannelOffer(job=JOB, ephemeral_key=KEY, nonce=TOKEN),
    ChannelAccept(job=JOB, ephemeral_key=bytes(reversed(KEY)), token=TOKEN, addrs=["/ip4/198.51.100.2/tcp/7000"]),
    ChannelSelect(direct=False, reason="no direct connection to the peer (relayed)"),
    ErrorReply(code="job_not_found", message="no job 0f1e2d3c4b5a69788796a5b4c3d2e1f0 on this worker"),
    DialBackRequest(nonce=JOB, addrs=["/ip4/192.168.1.20/tcp/4001", "/ip4/198.51.100.2/tcp/4001"]),
    DialBackProbe(nonce=JOB),
    DialBackResponse(
        nonce=JOB,
        status="ok",
        addr="/ip4/198.51.100.2/tcp/4001",
        observed="/ip4/198.51.100.2/tcp/51234",
        dialed=["/ip4/198.51.100.2/tcp/4001"],
    ),
    JobRequest(job=JOB, owner=PEER, workers=2, units=[UnitCost(1e9, 4096, 512)] * 3, optimizer_slots=2),
    JobPlan(
        job=JOB,
        validator=PEER,
        n_stages=2,
        unit_stage=[0, 0, 1],
        placements=[StagePlacement(peer_id=PEER, addrs=[], stage=1, units=(2, 2), memory_bytes=9)],
    ),
    StageAssign(job=JOB, owner=PEER, validator=PEER, stage=1, n_stages=2, memory_bytes=9, prev=PEER),
    StageAssigned(job=JOB, stage=1),
]

HEARTBEAT = {"kind": "heartbeat", "peer_id": PEER, "role": "worker", "seq": 1, "time_ms": 5, "load": 0.5}
CHANNEL_ACCEPT = {"kind": "channel_accept", "job": JOB, "ephemeral_key": KEY, "token": TOKEN}
OFFER = {"kind": "channel_offer", "job": JOB, "ephemeral_key": KEY}  # without its required nonce
HELLO = {"kind": "hello", "role": "worker", "software": "x"}


def raw(fields: dict[str, Any]) -> bytes:
    """msgpack of a plain dict: lets a test send what encode_message would refuse to build."""
    return msgspec.msgpack.encode(fields)


def tag_of(kind: type[Message]) -> str:
    return kind.__struct_config__.tag


def text_of_bytes(nbytes: int) -> str:
    """Text of exactly nbytes UTF-8 bytes in at most 1024 characters (the ErrorReply.message limit)."""
    twos = max(0, nbytes - 1024)
    assert twos <= 1024, f"{nbytes} bytes do not fit in 1024 characters of at most two bytes"
    return "\u00e9" * twos + "a" * (nbytes - 2 * twos)


def error_reply_of_size(size: int) -> ErrorReply:
    """An ErrorReply exactly ``size`` bytes on the wire, valid in every field (only the size may be wrong)."""
    empty = len(msgspec.msgpack.encode(ErrorReply(code="padded", message="")))
    text = text_of_bytes(size - empty - 2)  # a str16 header is 3 bytes where the empty string took 1
    msg = ErrorReply(code="padded", message=text)
    assert len(msgspec.msgpack.encode(msg)) == size and len(text) <= 1024
    return msg


def test_examples_cover_every_kind() -> None:
    """A kind added to MESSAGE_TYPES without an example here would go untested."""
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES)
    assert len({tag_of(t) for t in MESSAGE_TYPES}) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip_every_kind(msg: Message) -> None:
    data = encode_message(msg)
    assert len(data) <= type(msg).max_bytes
    on_wire = msgspec.msgpack.decode(data)
    assert on_wire["kind"] == tag_of(type(msg)) and on_wire["v"] == PROTOCOL_VERSION
    assert decode_message(data) == msg
    assert decode_message(bytearray(data), expect=type(msg)) == msg
    assert decode_message(memoryview(data), expect=Message) == msg


def test_defaults_fill_in_when_omitted() -> None:
    """Optional fields (v, stages, addrs) may be left out by a sender; they decode to their defaults."""
    msg = decode_message(raw(HEARTBEAT), expect=Heartbeat)
    assert msg == Heartbeat(peer_id=PEER, role="worker", seq=1, time_ms=5, load=0.5, stages=0, v=PROTOCOL_VERSION)
    accept = decode_message(raw(CHANNEL_ACCEPT))
    assert isinstance(accept, ChannelAccept) and accept.job == JOB


def test_unknown_kind() -> None:
    with pytest.raises(WireError, match=r"malformed control message: Invalid value 'takeover' - at `\$\.kind`"):
        decode_message(raw({**HEARTBEAT, "kind": "takeover"}))


def test_missing_kind() -> None:
    with pytest.raises(WireError, match="missing required field `kind`"):
        decode_message(raw({k: v for k, v in HEARTBEAT.items() if k != "kind"}))


def test_unknown_field() -> None:
    with pytest.raises(WireError, match="unknown field `admin`"):
        decode_message(raw({**HEARTBEAT, "admin": True}))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({**HEARTBEAT, "seq": "1"}, r"Expected `int`, got `str` - at `\$\.seq`"),
        ({**HEARTBEAT, "load": True}, r"Expected `float`, got `bool` - at `\$\.load`"),
        ({**HEARTBEAT, "peer_id": 7}, r"Expected `str`, got `int` - at `\$\.peer_id`"),
        ({**CHANNEL_ACCEPT, "job": JOB.hex()[:16]}, r"Expected `bytes`, got `str` - at `\$\.job`"),
        ({"kind": "hello", "role": "worker", "software": None}, r"Expected `str`, got `None` - at `\$\.software`"),
        ({"kind": "hello", "role": "worker", "software": "x", "v": 1.0}, r"Expected `int`, got `float` - at `\$\.v`"),
        ({**CHANNEL_ACCEPT, "addrs": "/ip4/1.2.3.4"}, r"Expected `array`, got `str` - at `\$\.addrs`"),
    ],
    ids=["seq-str", "load-bool", "peer-int", "job-str", "software-nil", "v-float", "addrs-str"],
)
def test_wrong_field_type(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_message(raw(fields))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({**HEARTBEAT, "seq": -1}, r"Expected `int` >= 0 - at `\$\.seq`"),
        ({**HEARTBEAT, "time_ms": 2**63}, r"Expected `int` <= 9223372036854775807 - at `\$\.time_ms`"),
        ({**HEARTBEAT, "load": 1.5}, r"Expected `float` <= 1\.0 - at `\$\.load`"),
        ({**HEARTBEAT, "load": float("nan")}, r"Expected `float` >= 0\.0 - at `\$\.load`"),
        ({**HEARTBEAT, "stages": 4097}, r"Expected `int` <= 4096 - at `\$\.stages`"),
        ({**HEARTBEAT, "role": "admin"}, r"Invalid enum value 'admin' - at `\$\.role`"),
        ({**HEARTBEAT, "peer_id": "0OIl"}, r"Expected `str` matching .* - at `\$\.peer_id`"),
        ({**HEARTBEAT, "peer_id": ""}, r"Expected `str` of length >= 1 - at `\$\.peer_id`"),
        ({**HEARTBEAT, "v": 65536}, r"Expected `int` <= 65535 - at `\$\.v`"),
        ({**CHANNEL_ACCEPT, "job": JOB[:15]}, r"Expected `bytes` of length >= 16 - at `\$\.job`"),
        ({**CHANNEL_ACCEPT, "token": TOKEN + b"!"}, r"Expected `bytes` of length <= 32 - at `\$\.token`"),
        ({**CHANNEL_ACCEPT, "addrs": ["/a"] * 9}, r"Expected `array` of length <= 8 - at `\$\.addrs`"),
        ({**CHANNEL_ACCEPT, "addrs": ["ip4/1.2.3.4"]}, r"Expected `str` matching regex '\^/.*' - at `\$\.addrs\[0\]`"),
        ({"kind": "error", "code": "Bad-Code", "message": "x"}, r"Expected `str` matching .* - at `\$\.code`"),
        ({"kind": "error", "code": "x", "message": "m" * 1025}, r"Expected `str` of length <= 1024 - at `\$\.message`"),
        ({**HELLO, "software": "s" * 257}, r"Expected `str` of length <= 256 - at `\$\.software`"),
    ],
    ids=[
        "negative-seq",
        "time-2^63",
        "load-1.5",
        "load-nan",
        "stages-4097",
        "role-admin",
        "peer-not-base58",
        "peer-empty",
        "v-65536",
        "job-15-bytes",
        "token-33-bytes",
        "offer-9-addrs",
        "addr-no-slash",
        "code-pattern",
        "message-1025",
        "software-257",
    ],
)
def test_out_of_range_value(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match="malformed control message: " + match):
        decode_message(raw(fields))


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({k: v for k, v in HEARTBEAT.items() if k != "load"}, "load"),
        ({"kind": "hello", "role": "worker"}, "software"),
        ({k: v for k, v in CHANNEL_ACCEPT.items() if k != "token"}, "token"),
        (OFFER, "nonce"),
    ],
)
def test_missing_required_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(WireError, match=f"missing required field `{name}`"):
        decode_message(raw(fields))


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_prefix_is_a_truncation_error(msg: Message) -> None:
    """A message cut anywhere (a short read) is refused as truncated, never half-decoded."""
    data = encode_message(msg)
    for cut in range(len(data)):
        with pytest.raises(WireError, match="malformed control message: Input data was truncated"):
            decode_message(data[:cut])


def test_trailing_bytes_are_refused() -> None:
    data = encode_message(EXAMPLES[0])
    with pytest.raises(WireError, match="trailing characters"):
        decode_message(data + b"\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1", r"invalid opcode '\\xc1' \(byte 0\)"),
        (b"\xc1\xc1\xc1\xc1", r"invalid opcode"),
        (b'{"kind": "hello", "role": "worker", "software": "x"}', r"Expected `object`, got `int`"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"Expected `object`, got `int`"),
        (raw([1, 2, 3]), r"Expected `object`, got `array`"),
        (raw("hello"), r"Expected `object`, got `str`"),
        (raw(None), r"Expected `object`, got `None`"),
    ],
    ids=["c1", "c1x4", "json", "http", "array", "str", "nil"],
)
def test_garbage_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match="malformed control message: .*" + match):
        decode_message(data)


def test_map_in_place_of_the_tag() -> None:
    with pytest.raises(WireError, match=r"Expected `str`, got `object` - at `\$\.kind`"):
        decode_message(raw({**HEARTBEAT, "kind": {"kind": "heartbeat"}}))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_oversized_input_is_refused_before_parsing(wrap: type) -> None:
    """Bytes that would be an "invalid opcode" if parsed get the size error: the cap comes first."""
    data = wrap(b"\xc1" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(
        WireError,
        match=rf"control message of {MAX_MESSAGE_BYTES + 1} bytes exceeds the largest allowed "
        rf"\({MAX_MESSAGE_BYTES} bytes\)",
    ):
        decode_message(data)
    with pytest.raises(WireError, match="invalid opcode"):  # one byte less is parsed
        decode_message(wrap(b"\xc1" * MAX_MESSAGE_BYTES))


def test_oversized_check_counts_bytes_not_items() -> None:
    """A memoryview of 8-byte items is measured in bytes, not in elements."""
    words = array("Q", bytes(MAX_MESSAGE_BYTES + 8))
    assert len(words) < MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match=f"control message of {MAX_MESSAGE_BYTES + 8} bytes exceeds the largest"):
        decode_message(memoryview(words))


def test_max_message_bytes_is_the_largest_kind_cap() -> None:
    assert MAX_MESSAGE_BYTES == max(t.max_bytes for t in MESSAGE_TYPES) == JobRequest.max_bytes


def test_error_reply_over_its_own_cap_under_the_global_cap() -> None:
    data = msgspec.msgpack.encode(error_reply_of_size(ErrorReply.max_bytes + 1))  # bypasses encode_message's cap
    assert len(data) < MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match=f"ErrorReply message of {len(data)} bytes exceeds its cap of 2048"):
        decode_message(data)


def test_hello_with_wide_characters_over_its_cap() -> None:
    """256 characters is within the field limit, but 256 four-byte characters are not within 512 bytes."""
    data = raw({"kind": "hello", "role": "user", "software": "\U0001f680" * 256})
    assert Hello.max_bytes < len(data) < MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match=rf"Hello message of {len(data)} bytes exceeds its cap of 512"):
        decode_message(data)


def test_expect_mismatch() -> None:
    data = encode_message(EXAMPLES[0])
    with pytest.raises(WireError, match="expected a Heartbeat message, got Hello"):
        decode_message(data, expect=Heartbeat)


@pytest.mark.parametrize("version", [0, 2, 65535])
def test_other_protocol_version_is_named(version: int) -> None:
    data = raw({"kind": "hello", "role": "worker", "software": "x", "v": version})
    with pytest.raises(WireError, match=rf"protocol version {version} is not supported \(this node speaks 1\)"):
        decode_message(data)


def test_newer_message_that_fails_to_parse_names_the_senders_version() -> None:
    """A v2 sender with a field this node does not know: the error says the versions differ."""
    data = raw({"kind": "hello", "role": "worker", "software": "x", "v": 2, "features": ["zstd"]})
    with pytest.raises(
        WireError, match=r"unknown field `features` \(the sender speaks protocol version 2, this node 1\)"
    ):
        decode_message(data)
    same = raw({"kind": "hello", "role": "worker", "software": "x", "v": 1, "features": ["zstd"]})
    with pytest.raises(WireError, match=r"unknown field `features`$"):  # no version hint for the same version
        decode_message(same)


def test_encode_refuses_a_message_over_its_cap() -> None:
    with pytest.raises(WireError, match=r"Hello message is \d+ bytes, over its cap of 512"):
        encode_message(Hello(role="worker", software="\u20ac" * 256))  # 768 bytes of text
    capability = WorkerCapability(
        peer_id=PEER,
        device="cpu",
        device_name="x",
        memory_bytes=1,
        free_memory_bytes=1,
        gflops=1.0,
        software="x",
        addrs=["/" + "\u20ac" * 511] * 16,
    )
    with pytest.raises(WireError, match=r"WorkerCapability message is \d+ bytes, over its cap of 16384"):
        encode_message(capability)


def test_encode_then_decode_agree_on_the_cap_boundary() -> None:
    """What encode_message accepts, decode_message accepts; one byte more and both refuse."""
    fits = error_reply_of_size(ErrorReply.max_bytes)
    data = encode_message(fits)
    assert len(data) == ErrorReply.max_bytes and decode_message(data, expect=ErrorReply) == fits
    over = error_reply_of_size(ErrorReply.max_bytes + 1)
    size = ErrorReply.max_bytes + 1
    with pytest.raises(WireError, match=f"ErrorReply message is {size} bytes, over its cap of 2048"):
        encode_message(over)
    with pytest.raises(WireError, match=f"ErrorReply message of {size} bytes exceeds its cap of 2048"):
        decode_message(msgspec.msgpack.encode(over))


@pytest.mark.parametrize(
    "fields",
    [{**HEARTBEAT, "peer_id": PEER + "\n"}, {"kind": "error", "code": "job_not_found\n", "message": "x"}],
    ids=["peer_id", "error-code"],
)
def test_pattern_fields_refuse_a_trailing_newline(fields: dict[str, Any]) -> None:
    with pytest.raises(WireError, match="matching"):
        decode_message(raw(fields))


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa4kind\xa5hello\xa1x" + b"\x91" * 2000 + b"\xc0",  # in _version_hint, skipping field x
        b"\x81\xa1v" + b"\x91" * 2000 + b"\xc0",  # in the main decoder, scanning for the tag
    ],
    ids=["unknown-field", "v-field"],
)
def test_deeply_nested_input_is_a_wire_error(data: bytes) -> None:
    assert len(data) < MAX_MESSAGE_BYTES
    with pytest.raises(WireError, match="malformed control message"):
        decode_message(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x83\xa4kind\xa5hello\xa4role\xa6worker\xa8software\xa1\xe8",  # in a field value
        b"\x83\xa4kind\xa5hello\xa4role\xa6worker\xa1\xff\xc0",  # in a field name
    ],
    ids=["value", "key"],
)
def test_invalid_utf8_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError, match="(?i)utf-8|malformed control message"):
        decode_message(data)


def test_error_messages_name_the_path() -> None:
    """Errors inside a list say which element: a peer can tell which address it sent was bad."""
    with pytest.raises(WireError, match=r"Expected `str` matching regex '\^/.*' - at `\$\.addrs\[2\]`"):
        decode_message(raw({**CHANNEL_ACCEPT, "addrs": ["/ok", "/ok", "bad"]}))


@pytest.mark.parametrize("addr", ["/ip4/1.2.3.4\n", "/ip4/1.2.3.4 /tcp/1", "/ip4/\x00", "/"])
def test_multiaddrs_refuse_whitespace_control_chars_and_emptiness(addr: str) -> None:
    with pytest.raises(WireError, match=r"addrs\[0\]"):
        decode_message(raw({**CHANNEL_ACCEPT, "addrs": [addr]}))


def test_capability_with_more_free_than_total_memory_is_refused() -> None:
    fields = {
        "kind": "worker_capability",
        "peer_id": PEER,
        "device": "cpu",
        "device_name": "x",
        "memory_bytes": 10,
        "free_memory_bytes": 11,
        "gflops": 1.0,
        "software": "t",
    }
    with pytest.raises(WireError, match="free_memory_bytes exceeds memory_bytes"):
        decode_message(raw(fields))
    assert decode_message(raw({**fields, "free_memory_bytes": 10})).free_memory_bytes == 10
