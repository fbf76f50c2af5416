"""Hostile input to the wire decoders: whatever a peer sends, the answer is a valid result or a WireError
that names the problem, never another exception, a crash or an allocation sized by the attacker.

Frame headers are forged with a correct header CRC (computed by the independent ``crc32c`` package) so
the fuzzing reaches the field validation behind the checksum instead of stopping at it.
"""

from __future__ import annotations

import math
import re
import struct
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import crc32c
import msgspec
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from samples import sample

from tensorlink.wire import ChecksumError, Compression, Route, WireError, decode_frame, encode_frame
from tensorlink.wire.dtypes import CODE_BY_DTYPE, DTYPE_BY_CODE
from tensorlink.wire.frame import HEADER_SIZE, Frame, FrameHeader, decode_header
from tensorlink.wire.limits import MAX_FRAME_PAYLOAD
from tensorlink.wire.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ChannelAccept,
    ChannelOffer,
    ChannelSelect,
    ErrorReply,
    Heartbeat,
    Hello,
    Message,
    WorkerCapability,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.slow  # about 25 s on two cores

T = TypeVar("T")
MiB = 1 << 20
MAX_DIM = 1 << 48
CASES: Counter[str] = Counter()  # property name -> examples run; reported in the terminal summary


def fuzz(max_examples: int) -> Callable[[T], T]:
    """Hypothesis settings for this module: bounded example counts, no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts(case_counts: Counter[str]) -> Iterator[None]:
    """Hand this module's counts to the terminal summary (conftest.py) and, under -s, to stderr."""
    yield
    case_counts.update(CASES)
    for name, n in sorted(CASES.items()):
        sys.stderr.write(f"\n{name}: {n} cases")
    sys.stderr.write("\n")


def peak_bytes(fn: Callable[[], T]) -> tuple[T | BaseException, int]:
    """Run fn under tracemalloc; return its result (or the exception it raised) and the peak bytes."""
    tracemalloc.start()
    try:
        try:
            result: T | BaseException = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back for the caller to check its type
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------------
# Control messages
# ---------------------------------------------------------------------------------------------------

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MESSAGE_ERROR = re.compile(
    r"^(malformed control message: .+"
    r"|control message of \d+ bytes exceeds the largest allowed \(\d+ bytes\)"
    r"|\w+ message of \d+ bytes exceeds its cap of \d+"
    r"|protocol version \d+ is not supported \(this node speaks \d+\))$",
    re.S,
)

peer_ids = st.text(BASE58, min_size=1, max_size=128)
roles = st.sampled_from(["worker", "validator", "user"])
u64 = st.integers(0, 2**63 - 1)
WIDE = "\u00e9\u20ac\U0001f680a"  # 2, 3, 4 and 1 UTF-8 bytes: long texts of these overflow the byte caps
short_text = st.text(max_size=256) | st.text(WIDE, min_size=120, max_size=256)
multiaddrs = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=48).map(
    lambda s: "/" + s
)
free_and_total = st.tuples(u64, u64).map(sorted)  # free memory never exceeds total memory
valid_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, role=roles, software=short_text),
    st.builds(
        Heartbeat,
        peer_id=peer_ids,
        role=roles,
        seq=u64,
        time_ms=u64,
        load=st.floats(0.0, 1.0),
        stages=st.integers(0, 4096),
    ),
    st.builds(
        lambda memory, **fields: WorkerCapability(free_memory_bytes=memory[0], memory_bytes=memory[1], **fields),
        memory=free_and_total,
        peer_id=peer_ids,
        device=st.sampled_from(["cpu", "cuda"]),
        device_name=short_text,
        gflops=st.floats(0.0, 1e9),
        software=short_text,
        addrs=st.lists(multiaddrs, max_size=16),
    ),
    st.builds(
        ChannelOffer,
        job=st.binary(min_size=16, max_size=16),
        ephemeral_key=st.binary(min_size=32, max_size=32),
        nonce=st.binary(min_size=32, max_size=32),
    ),
    st.builds(
        ChannelAccept,
        job=st.binary(min_size=16, max_size=16),
        ephemeral_key=st.binary(min_size=32, max_size=32),
        token=st.binary(min_size=32, max_size=32),
        addrs=st.lists(multiaddrs, max_size=8),
    ),
    st.builds(ChannelSelect, direct=st.booleans(), reason=short_text),
    st.builds(
        ErrorReply,
        code=st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z"),
        message=st.text(max_size=1024) | st.text(WIDE, min_size=500, max_size=1024),
    ),
)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from(["worker", "cuda", "/ip4/1.2.3.4", BASE58[:20], "hello"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
FIELD_NAMES = sorted({name for t in MESSAGE_TYPES for name in t.__struct_fields__} | {"kind", "extra"})
KINDS = [t.__struct_config__.tag for t in MESSAGE_TYPES]
# msgpack headers that declare far more content than any message may hold (all > MAX_MESSAGE_BYTES)
HUGE_HEADERS = [
    b"\xdb\xff\xff\xff\xff",  # str32, 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xdd\xff\xff\xff\xff",  # array32, 4 G elements
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdb\x7f\xff\xff\xff",
    b"\xdd\x00\x10\x00\x00",  # array32 of 2^20 elements
    b"\xda\xff\xff",  # str16, 64 KiB
    b"\xc5\xff\xff",  # bin16
    b"\xdc\xff\xff",  # array16
    b"\xde\xff\xff",  # map16
]


def as_fields(msg: Message) -> dict[str, Any]:
    """The wire map of a message as a plain dict (kind first, as the encoder writes it)."""
    return {"kind": type(msg).__struct_config__.tag, **msgspec.structs.asdict(msg)}


def map_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already-encoded keys and values, so either may be replaced by raw bytes."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


def check_decode(data: bytes) -> Message | None:
    """decode_message(data) must give a valid Message or a WireError saying what was wrong; nothing else."""
    try:
        msg = decode_message(data)
    except WireError as exc:
        assert MESSAGE_ERROR.match(str(exc)), f"WireError does not say what was wrong: {exc!r}"
        return None
    assert type(msg) in MESSAGE_TYPES
    assert msg.v == PROTOCOL_VERSION
    assert len(data) <= type(msg).max_bytes
    return msg


@fuzz(400)
@given(msg=valid_messages)
def test_valid_messages_roundtrip_or_are_refused_for_size(msg: Message) -> None:
    """Encoder and decoder agree: a message within its cap round-trips, one over it is refused by both."""
    CASES["messages: valid round trip"] += 1
    data = msgspec.msgpack.encode(msg)
    if len(data) > type(msg).max_bytes:
        CASES["messages: valid round trip (of which over the kind's cap)"] += 1
        with pytest.raises(WireError, match=rf"{type(msg).__name__} message is {len(data)} bytes, over its cap"):
            encode_message(msg)
        with pytest.raises(WireError, match=r"exceeds its cap|exceeds the largest allowed"):
            decode_message(data)
    else:
        assert encode_message(msg) == data
        assert decode_message(data, expect=type(msg)) == msg


@fuzz(600)
@given(
    data=st.binary(max_size=300)
    | st.builds(lambda h, b: bytes([h]) + b, st.integers(0x80, 0x8F), st.binary(max_size=300))
)
def test_random_bytes_never_escape_as_another_exception(data: bytes) -> None:
    CASES["messages: random bytes"] += 1
    check_decode(data)


@fuzz(400)
@given(
    kind=st.sampled_from(KINDS) | st.text(max_size=12) | msgpack_values,
    fields=st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), msgpack_values, max_size=9),
)
def test_random_maps_decode_faithfully_or_fail_cleanly(kind: Any, fields: dict[str, Any]) -> None:
    """Maps with the right field names and random values: a decoded message holds exactly what was sent."""
    CASES["messages: random maps"] += 1
    fields = {"kind": kind, **{k: v for k, v in fields.items() if k != "kind"}}
    data = msgspec.msgpack.encode(fields)
    msg = check_decode(data)
    if msg is not None:
        for name, value in fields.items():
            if name != "kind":
                assert getattr(msg, name) == value


@fuzz(500)
@given(msg=valid_messages, data=st.data())
def test_mutated_valid_messages_decode_faithfully_or_fail_cleanly(msg: Message, data: st.DataObject) -> None:
    """A valid message with fields dropped, replaced by random values or added."""
    CASES["messages: mutated valid maps"] += 1
    fields = as_fields(msg)
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
        fields.pop(name, None)
    for name, value in data.draw(st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_values, max_size=3)).items():
        fields[name] = value
    decoded = check_decode(msgspec.msgpack.encode(fields))
    if decoded is not None:
        CASES["messages: mutated valid maps (of which decoded)"] += 1
        assert decoded.__struct_config__.tag == fields["kind"]
        assert all(getattr(decoded, k) == v for k, v in fields.items() if k != "kind")


@fuzz(400)
@given(msg=valid_messages, data=st.data())
def test_every_truncation_is_refused_as_truncated(msg: Message, data: st.DataObject) -> None:
    CASES["messages: truncations"] += 1
    encoded = msgspec.msgpack.encode(msg)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(WireError, match="malformed control message: Input data was truncated"):
        decode_message(encoded[:cut])


@fuzz(600)
@given(msg=valid_messages, data=st.data())
def test_bit_flips_and_overwrites_never_escape(msg: Message, data: st.DataObject) -> None:
    CASES["messages: bit flips and overwrites"] += 1
    encoded = bytearray(msgspec.msgpack.encode(msg))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    flipped = bytearray(encoded)
    flipped[bit // 8] ^= 1 << (bit % 8)
    check_decode(bytes(flipped))
    overwrites = st.dictionaries(st.integers(0, len(encoded) - 1), st.integers(0, 255), max_size=4)
    for pos, value in data.draw(overwrites).items():
        encoded[pos] = value
    check_decode(bytes(encoded))


@fuzz(500)
@given(
    msg=valid_messages,
    huge=st.sampled_from(HUGE_HEADERS),
    tail=st.binary(max_size=32),
    where=st.sampled_from(["top", "map", "key", "value", "in-array", "in-map"]),
    data=st.data(),
)
def test_huge_declared_lengths_are_refused_without_allocating(
    msg: Message, huge: bytes, tail: bytes, where: str, data: st.DataObject
) -> None:
    """A length header claiming gigabytes, anywhere in the message, costs no memory and is refused."""
    CASES["messages: huge declared lengths"] += 1
    enc = msgspec.msgpack.encode
    pairs = [(enc(k), enc(v)) for k, v in as_fields(msg).items()]
    i = data.draw(st.integers(0, len(pairs) - 1))
    hostile = huge + tail
    if where == "top":
        blob = hostile
    elif where == "map":
        blob = data.draw(st.sampled_from([b"\xdf\xff\xff\xff\xff", b"\xde\xff\xff"])) + map_of(pairs)[1:]
    else:
        key, value = pairs[i]
        if where == "key":
            key = hostile
        else:
            value = {"value": hostile, "in-array": b"\x91" + hostile, "in-map": b"\x81\xa1x" + hostile}[where]
        pairs[i] = (key, value)
        if not data.draw(st.booleans()):
            pairs = pairs[: i + 1]
        blob = map_of(pairs)
    assert len(blob) < MAX_MESSAGE_BYTES
    result, peak = peak_bytes(lambda: check_decode(blob))
    if isinstance(result, BaseException):
        raise result
    assert result is None, f"a message declaring {huge!r} decoded: {result!r}"
    assert peak < MiB, f"decoding {len(blob)} hostile bytes peaked at {peak} bytes"


@pytest.mark.parametrize("huge", HUGE_HEADERS, ids=lambda h: h.hex())
def test_huge_length_alone_allocates_nothing_large(huge: bytes) -> None:
    result, peak = peak_bytes(lambda: decode_message(huge))
    assert isinstance(result, WireError), result
    assert re.search(r"truncated|Expected `object`", str(result)), str(result)
    assert peak < 64 * 1024


# ---------------------------------------------------------------------------------------------------
# Tensor frames
# ---------------------------------------------------------------------------------------------------

HEADER = struct.Struct("<4sHBBB3sIQ16sQIII4x8q")  # csrc/frame_header.h; the 4x is the header CRC at 60
assert HEADER.size == HEADER_SIZE
ITEMSIZE = {code: dtype.itemsize for code, dtype in DTYPE_BY_CODE.items()}
FLOATING = {code for code, dtype in DTYPE_BY_CODE.items() if dtype.is_floating_point}
HEADER_ERROR = (
    r"truncated frame header|bad frame magic|unsupported frame version|frame header checksum mismatch"
    r"|reserved header bytes are not zero|ndim \d+ exceeds the maximum of 8|shape slot \d beyond ndim is not zero"
    r"|dimension \d has size -?\d+, outside 0\.\.2\^48"
    r"|shape extent \(product of the non-zero dimensions\) exceeds 2\^48"
    r"|unknown dtype code \d+"
    r"|unknown compression code \d+|block size must be 0 without int8 compression"
    r"|(bf16|fp16) compression needs a float32 or float64 tensor|int8 compression needs a floating dtype"
    r"|int8 block size \d+ is outside 1\.\.16777216"
    r"|payload length \d+ does not match dtype, shape and compression \(expected \d+\)"
    r"|payload of \d+ bytes exceeds the cap of \d+ bytes"
)
FRAME_ERROR = HEADER_ERROR + (
    r"|frame is \d+ bytes but its header declares 128 \+ \d+|payload checksum mismatch"
    r"|bool payload holds bytes other than 0 and 1|int8 frame has negative or non-finite block scales"
)


def forge_header(
    *,
    dtype: int,
    shape: list[int],
    ndim: int | None = None,
    compression: int = 0,
    block_size: int = 0,
    payload_len: int,
    payload_crc: int = 0,
    job: bytes = bytes(16),
    step: int = 0,
    micro_batch: int = 0,
    stage: int = 0,
    reserved: bytes = bytes(3),
) -> bytearray:
    """A header with any field values and a correct header CRC, so validation behind the CRC is reached."""
    slots = list(shape) + [0] * (8 - len(shape))
    header = bytearray(
        HEADER.pack(
            b"TLFR",
            1,
            dtype,
            compression,
            len(shape) if ndim is None else ndim,
            reserved,
            block_size,
            payload_len,
            job,
            step,
            micro_batch,
            stage,
            payload_crc,
            *slots,
        )
    )
    return seal(header)


def seal(header: bytearray) -> bytearray:
    """Store the CRC32C of bytes 0..59 and 64..127 at offset 60 (little-endian)."""
    header[60:64] = crc32c.crc32c(bytes(header[:60]) + bytes(header[64:128])).to_bytes(4, "little")
    return header


def prefix_numel(shape: list[int]) -> int | None:
    """Element count, or None where the native rule refuses the shape: a dim outside 0..2^48, or an
    extent (product of the non-zero dims) past 2^48, whatever the order of the dims."""
    if not all(0 <= dim <= MAX_DIM for dim in shape):
        return None
    if math.prod(dim for dim in shape if dim) > MAX_DIM:
        return None
    return math.prod(shape)


def expected_payload_len(dtype: int, compression: int, numel: int, block: int) -> int | None:
    """The payload length the format requires, or None where the combination is invalid."""
    if dtype not in ITEMSIZE:
        return None
    if compression == 0 and block == 0:
        return numel * ITEMSIZE[dtype]
    if compression in (1, 2) and block == 0 and dtype in FLOATING and ITEMSIZE[dtype] > 2:
        return numel * 2
    if compression == 3 and dtype in FLOATING and 1 <= block <= 1 << 24:
        return -(-numel // block) * 4 + numel
    return None


FRAME_SPECS: list[tuple[torch.dtype, tuple[int, ...], Compression, int]] = [
    (torch.float32, (3, 4), Compression.NONE, 0),
    (torch.float32, (3, 4), Compression.BF16, 0),
    (torch.float32, (5, 2), Compression.FP16, 0),
    (torch.float32, (33,), Compression.INT8, 8),
    (torch.float64, (7,), Compression.NONE, 0),
    (torch.float64, (2, 5), Compression.FP16, 0),
    (torch.float64, (9,), Compression.INT8, 4096),
    (torch.float16, (2, 3), Compression.NONE, 0),
    (torch.float16, (10,), Compression.INT8, 3),
    (torch.bfloat16, (4, 4), Compression.INT8, 16),
    (torch.bfloat16, (5,), Compression.NONE, 0),
    (torch.int64, (2, 2), Compression.NONE, 0),
    (torch.int32, (3,), Compression.NONE, 0),
    (torch.int16, (2, 1, 3), Compression.NONE, 0),
    (torch.int8, (8,), Compression.NONE, 0),
    (torch.uint8, (4,), Compression.NONE, 0),
    (torch.bool, (6,), Compression.NONE, 0),
    (torch.float32, (), Compression.NONE, 0),
    (torch.float32, (0, 5), Compression.NONE, 0),
]
ROUTE = Route(job=bytes(range(16)), step=2**40 + 3, micro_batch=7, stage=2)
VALID_FRAMES: list[bytes] = [
    encode_frame(sample(shape, dt, seed, scale=100), ROUTE, compression=c, block_size=block or 4096).to_bytes()
    for seed, (dt, shape, c, block) in enumerate(FRAME_SPECS)
]
frame_ids = st.integers(0, len(VALID_FRAMES) - 1)
frames_with_payload = st.sampled_from([i for i, f in enumerate(VALID_FRAMES) if len(f) > HEADER_SIZE])


def check_frame(buf: bytearray, *, verify: bool = True) -> Frame | None:
    """decode_frame must give a Frame that matches its header, or a WireError naming the problem."""
    try:
        frame = decode_frame(buf, verify=verify)
    except WireError as exc:
        assert re.search(FRAME_ERROR, str(exc)), f"unexpected WireError text: {exc!r}"
        return None
    header = decode_header(bytes(buf[:HEADER_SIZE]))
    assert tuple(frame.tensor.shape) == header.shape
    assert frame.tensor.dtype == DTYPE_BY_CODE[header.dtype]
    assert frame.route == Route(header.job, header.step, header.micro_batch, header.stage)
    return frame


def test_forged_headers_match_the_encoder() -> None:
    """The forging helper writes what encode_frame writes; otherwise forged cases would only test the CRC."""
    for frame in VALID_FRAMES:
        header = decode_header(frame)
        forged = forge_header(
            dtype=header.dtype,
            shape=list(header.shape),
            compression=header.compression,
            block_size=header.block_size,
            payload_len=header.payload_len,
            payload_crc=header.payload_crc,
            job=header.job,
            step=header.step,
            micro_batch=header.micro_batch,
            stage=header.stage,
        )
        assert bytes(forged) == frame[:HEADER_SIZE]


def test_valid_frames_decode() -> None:
    """The corpus the mutations start from is itself valid."""
    for seed, ((dt, shape, c, _), frame) in enumerate(zip(FRAME_SPECS, VALID_FRAMES, strict=True)):
        out = decode_frame(bytearray(frame))
        assert out.tensor.dtype == dt and tuple(out.tensor.shape) == shape and out.route == ROUTE
        if c is Compression.NONE:
            assert torch.equal(out.tensor, sample(shape, dt, seed, scale=100))


@fuzz(400)
@given(
    data=st.binary(max_size=400)
    | st.builds(lambda b: b"TLFR\x01\x00" + b, st.binary(min_size=120, max_size=400))
    | st.builds(lambda b: seal(bytearray(b"TLFR\x01\x00" + b)), st.binary(min_size=122, max_size=122))
)
def test_random_bytes_to_frame_decoders(data: bytes) -> None:
    """Random bytes, random bytes behind a valid magic, and random headers with a correct CRC."""
    CASES["frames: random bytes"] += 1
    check_frame(bytearray(data))
    try:
        decode_header(bytes(data))
    except WireError as exc:
        assert re.search(HEADER_ERROR, str(exc)), repr(exc)


@fuzz(300)
@given(index=frame_ids, data=st.data())
def test_frame_truncations_and_extensions(index: int, data: st.DataObject) -> None:
    CASES["frames: truncations"] += 1
    frame = VALID_FRAMES[index]
    payload_len = len(frame) - HEADER_SIZE
    cut = data.draw(st.integers(0, len(frame) - 1))
    if cut < HEADER_SIZE:
        with pytest.raises(WireError, match=rf"truncated frame header: {cut} of 128 bytes"):
            decode_frame(bytearray(frame[:cut]))
        with pytest.raises(WireError, match=rf"truncated frame header: {cut} of 128 bytes"):
            decode_header(frame[:cut])
    else:
        with pytest.raises(WireError, match=rf"frame is {cut} bytes but its header declares 128 \+ {payload_len}"):
            decode_frame(bytearray(frame[:cut]))
        assert decode_header(frame[:cut]).payload_len == payload_len  # the header alone is intact
    extra = data.draw(st.binary(min_size=1, max_size=64))
    longer = len(frame) + len(extra)
    with pytest.raises(WireError, match=rf"frame is {longer} bytes but its header declares 128 \+ {payload_len}"):
        decode_frame(bytearray(frame + extra))


@fuzz(400)
@given(index=frame_ids, data=st.data())
def test_any_single_bit_flip_is_detected(index: int, data: st.DataObject) -> None:
    """A flip in the payload is a ChecksumError; in the header, a WireError naming magic, version or CRC."""
    CASES["frames: single bit flips"] += 1
    buf = bytearray(VALID_FRAMES[index])
    bit = data.draw(st.integers(0, len(buf) * 8 - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    pos = bit // 8
    if pos >= HEADER_SIZE:
        with pytest.raises(ChecksumError, match=r"payload checksum mismatch \(corrupted in transit\)"):
            decode_frame(buf)
        return
    if pos < 4:
        expected = "bad frame magic"
    elif pos < 6:
        expected = "unsupported frame version"
    else:
        expected = r"frame header checksum mismatch \(header corrupted\)"
    for decode in (lambda: decode_frame(buf), lambda: decode_header(bytes(buf))):
        with pytest.raises(WireError, match=expected) as info:
            decode()
        assert isinstance(info.value, ChecksumError) == (pos >= 6)


@fuzz(300)
@given(index=frames_with_payload, data=st.data())
def test_payload_flip_is_a_checksum_error(index: int, data: st.DataObject) -> None:
    """Payload-only flips, one to 32 adjacent bits (a burst CRC32C always detects)."""
    CASES["frames: payload bursts"] += 1
    buf = bytearray(VALID_FRAMES[index])
    start = data.draw(st.integers(HEADER_SIZE * 8, len(buf) * 8 - 1))
    width = data.draw(st.integers(1, min(32, len(buf) * 8 - start)))
    for bit in range(start, start + width):
        if data.draw(st.booleans()) or bit in (start, start + width - 1):
            buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ChecksumError, match="payload checksum mismatch"):
        decode_frame(buf)


@fuzz(300)
@given(index=frame_ids, data=st.data())
def test_overwritten_frames_without_verification(index: int, data: st.DataObject) -> None:
    """With verify=False the payload is trusted blindly: it must still decode to its header's shape or fail
    as a WireError (bool bytes, int8 scales), never with another exception."""
    CASES["frames: overwrites, verify=False"] += 1
    buf = bytearray(VALID_FRAMES[index])
    lo = data.draw(st.sampled_from([0, HEADER_SIZE]))
    if lo >= len(buf):
        lo = 0
    overwrites = st.dictionaries(st.integers(lo, len(buf) - 1), st.integers(0, 255), min_size=1, max_size=8)
    for pos, value in data.draw(overwrites).items():
        buf[pos] = value
    check_frame(buf, verify=False)
    check_frame(buf)


HUGE_DIMS = [2**k + d for k in (16, 24, 31, 32, 47, 48, 62) for d in (-1, 0, 1)] + [2**63 - 1, -1, -(2**63)]
VALID_CODINGS = [
    (dtype, compression, block)
    for dtype in sorted(DTYPE_BY_CODE)
    for compression, block in [(0, 0), (1, 0), (2, 0), (3, 1), (3, 5), (3, 4096), (3, 1 << 24)]
    if expected_payload_len(dtype, compression, 1, block) is not None
]
# hostile replacements for one header field at a time
HOSTILE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "dtype": st.integers(0, 255),
    "compression": st.integers(0, 255),
    "ndim": st.integers(0, 255),
    "slot": st.tuples(
        st.integers(0, 7), st.integers(0, 6) | st.sampled_from(HUGE_DIMS) | st.integers(-(2**63), 2**63 - 1)
    ),
    "block_size": st.sampled_from([0, 1, 4096, 2**24, 2**24 + 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    "reserved": st.binary(min_size=3, max_size=3),
    "payload_len": st.sampled_from([0, 1, 2**32, MAX_FRAME_PAYLOAD, MAX_FRAME_PAYLOAD + 1, 2**63, 2**64 - 1])
    | st.integers(0, 2**64 - 1),
    "payload_len+-1": st.sampled_from([-1, 1]),
}


@fuzz(700)
@given(
    coding=st.sampled_from(VALID_CODINGS),
    shape=st.lists(st.integers(0, 6), max_size=4),
    mutations=st.lists(st.sampled_from(sorted(HOSTILE_FIELDS)), max_size=3),
    route=st.tuples(
        st.binary(min_size=16, max_size=16),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    data=st.data(),
)
def test_forged_headers_with_a_correct_crc(
    coding: tuple[int, int, int],
    shape: list[int],
    mutations: list[str],
    route: tuple[bytes, int, int, int],
    data: st.DataObject,
) -> None:
    """Differential check of the native header validator against the format's rules written out here:
    start from a valid header, replace up to three fields with hostile values, re-seal the CRC. The header
    must be accepted exactly when it is valid, and a frame built on it must decode to that shape."""
    CASES["frames: forged headers"] += 1
    dtype, compression, block_size = coding
    slots = shape + [0] * (8 - len(shape))
    payload_len = expected_payload_len(dtype, compression, math.prod(shape), block_size)
    assert payload_len is not None
    f: dict[str, Any] = dict(
        dtype=dtype,
        compression=compression,
        ndim=len(shape),
        block_size=block_size,
        reserved=bytes(3),
        payload_len=payload_len,
    )
    for field in mutations:
        value = data.draw(HOSTILE_FIELDS[field], label=field)
        if field == "slot":
            slots[value[0]] = value[1]
        elif field == "payload_len+-1":
            f["payload_len"] = min(2**64 - 1, max(0, f["payload_len"] + value))
        else:
            f[field] = value
    ndim, payload_len = f["ndim"], f["payload_len"]
    dims = slots[: min(ndim, 8)]
    numel = prefix_numel(dims) if ndim <= 8 else None
    want = None if numel is None else expected_payload_len(f["dtype"], f["compression"], numel, f["block_size"])
    valid = (
        f["reserved"] == bytes(3)
        and ndim <= 8
        and all(s == 0 for s in slots[ndim:])
        and want is not None
        and payload_len == want
        and payload_len <= MAX_FRAME_PAYLOAD
    )
    small = payload_len <= 4096
    payload = data.draw(st.binary(min_size=payload_len, max_size=payload_len) if small else st.binary(max_size=64))
    payload_crc = crc32c.crc32c(payload)
    if not data.draw(st.booleans() | st.just(True), label="correct payload crc"):
        payload_crc = data.draw(st.integers(0, 2**32 - 1), label="payload crc")
    crc_ok = payload_crc == crc32c.crc32c(payload)
    header = forge_header(
        shape=slots, payload_crc=payload_crc, job=route[0], step=route[1], micro_batch=route[2], stage=route[3], **f
    )

    result, peak = peak_bytes(lambda: decode_header(bytes(header)))
    assert peak < MiB, f"decode_header peaked at {peak} bytes"
    if isinstance(result, WireError):
        assert re.search(HEADER_ERROR, str(result)), repr(result)
        assert "checksum" not in str(result), "the forged CRC is wrong: this case tests nothing"
        assert not valid, f"a valid header was refused: {result}"
    elif isinstance(result, BaseException):
        raise result
    else:
        CASES["frames: forged headers (of which accepted)"] += 1
        assert valid, f"an invalid header was accepted: {result!r}"
        assert isinstance(result, FrameHeader)
        assert (result.dtype, result.compression, result.block_size) == (f["dtype"], f["compression"], f["block_size"])
        assert (result.shape, result.payload_len, result.payload_crc) == (tuple(dims), payload_len, payload_crc)
        assert (result.job, result.step, result.micro_batch, result.stage) == route

    buf = header + payload
    frame, peak = peak_bytes(lambda: check_frame(buf))
    if isinstance(frame, BaseException):
        raise frame
    assert peak < MiB + 2 * len(payload), f"decode_frame peaked at {peak} bytes"
    bad_payload = bool(
        valid and small and numel and payload_is_refused(f["dtype"], f["compression"], f["block_size"], numel, payload)
    )
    assert (frame is not None) == (valid and small and crc_ok and not bad_payload)
    CASES["frames: forged headers (of which decoded to a tensor)"] += frame is not None


def payload_is_refused(dtype: int, compression: int, block: int, numel: int, payload: bytes) -> bool:
    """Whether decode_payload must refuse this (checksummed) payload: bool bytes or int8 scales."""
    if compression == 0 and DTYPE_BY_CODE[dtype] is torch.bool:
        return any(b > 1 for b in payload)
    if compression == 3:
        scales = struct.unpack(f"<{-(-numel // block)}f", payload[: 4 * -(-numel // block)])
        return any(not math.isfinite(s) or s < 0 for s in scales)
    return False


def huge_shape(exponents: list[int]) -> list[int]:
    """Powers of two whose element count lies in 2^20..2^48: big enough to hurt, small enough to be valid."""
    out: list[int] = []
    for e in exponents:
        out.append(min(e, 48 - sum(out)))
    out[0] += max(0, 20 - sum(out))
    return [1 << e for e in out]


@fuzz(400)
@given(
    coding=st.sampled_from(VALID_CODINGS),
    shape=st.lists(st.integers(0, 30), min_size=1, max_size=8).map(huge_shape),
    mode=st.sampled_from(["exact", "mismatch"]),
    max_payload=st.sampled_from([MAX_FRAME_PAYLOAD, 1 * MiB, 1 << 40]),
    body=st.binary(max_size=256),
    data=st.data(),
)
def test_forged_huge_lengths_are_refused_without_allocating(
    coding: tuple[int, int, int], shape: list[int], mode: str, max_payload: int, body: bytes, data: st.DataObject
) -> None:
    """Headers declaring megabytes to petabytes, correctly checksummed, behind a few hundred real bytes."""
    CASES["frames: forged huge lengths"] += 1
    dtype, compression, block = coding
    numel = prefix_numel(shape)
    assert numel is not None and 1 << 20 <= numel <= MAX_DIM
    want = expected_payload_len(dtype, compression, numel, block)
    assert want is not None
    declared = want if mode == "exact" else data.draw(st.sampled_from([want - 1, want + 1, 2**64 - 1, 0, 1 << 30]))
    assume(mode == "exact" or declared != want)
    header = forge_header(dtype=dtype, shape=shape, compression=compression, block_size=block, payload_len=declared)
    buf = header + body

    result, peak = peak_bytes(lambda: decode_frame(buf, max_payload=max_payload))
    assert isinstance(result, WireError), f"expected a WireError, got {result!r}"
    assert peak < MiB, f"refusing a frame declaring {declared} bytes peaked at {peak} bytes"
    if mode == "mismatch":
        pattern = rf"payload length {declared} does not match dtype, shape and compression \(expected {want}\)"
        assert re.search(pattern, str(result)), str(result)
    elif want > max_payload:
        cap_error = rf"payload of {want} bytes exceeds the cap of {max_payload} bytes"
        assert re.search(cap_error, str(result)), str(result)
        with pytest.raises(WireError, match=cap_error):
            decode_header(header, max_payload=max_payload)
    else:
        assert re.search(rf"frame is {len(buf)} bytes but its header declares 128 \+ {want}", str(result))
        assert decode_header(header, max_payload=max_payload).payload_len == want


@pytest.mark.parametrize("shape", [[0, 2**48, 2**48], [2**48, 2**48, 0], [2**24, 0, 2**25]])
def test_zero_element_shape_with_huge_dims_is_a_wire_error(shape: list[int]) -> None:
    """No elements, but an extent no tensor library can stride: refused whatever the order of the dims."""
    header = forge_header(dtype=CODE_BY_DTYPE[torch.float32], shape=shape, payload_len=0)
    with pytest.raises(WireError, match=r"shape extent \(product of the non-zero dimensions\) exceeds 2\^48"):
        decode_frame(bytearray(header))
