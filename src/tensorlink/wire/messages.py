"""Control messages: typed msgspec Structs in one tagged union, msgpack on the wire.

Every message carries the protocol version and has a size cap of its own; decoding checks the overall
cap before parsing, the schema while parsing (unknown kinds and fields, wrong types, out-of-range
values) and the kind's cap after. Any failure is a WireError that names what was wrong. Later
capabilities add their message kinds to ``MESSAGE_TYPES``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, overload

import msgspec

from tensorlink.wire.errors import WireError

PROTOCOL_VERSION = 1

U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Patterns end in \Z, not $: msgspec searches with `re`, where $ also matches before a final newline.
PeerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+\Z")]
Multiaddr = Annotated[str, msgspec.Meta(min_length=2, max_length=512, pattern=r"^/[\x21-\x7e]+\Z")]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]
JobId = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Key32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Role = Literal["worker", "validator", "user"]
Device = Literal["cpu", "cuda"]
Cipher = Literal["aes-128-gcm", "aes-256-gcm"]


class Message(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every control message. ``kind`` (the tag) and ``v`` (protocol version) are on the wire.

    Subclasses repeat ``frozen=True``: msgspec inherits it, but type checkers (PEP 681) do not."""

    v: Annotated[int, msgspec.Meta(ge=0, le=65535)] = PROTOCOL_VERSION
    max_bytes: ClassVar[int] = 1024


class Hello(Message, tag="hello", frozen=True):
    """First message on a TensorLink stream: who is speaking and which software."""

    role: Role
    software: ShortText
    max_bytes: ClassVar[int] = 512


class Heartbeat(Message, tag="heartbeat", frozen=True):
    """Periodic liveness and load of a peer, gossiped."""

    peer_id: PeerId
    role: Role
    seq: U64
    time_ms: U64
    load: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    stages: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    max_bytes: ClassVar[int] = 512


class WorkerCapability(Message, tag="worker_capability", frozen=True):
    """What a worker offers, measured at start: published in the DHT."""

    peer_id: PeerId
    device: Device
    device_name: ShortText
    memory_bytes: U64
    free_memory_bytes: U64
    gflops: Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
    software: ShortText
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)] = []
    max_bytes: ClassVar[int] = 16384

    def __post_init__(self) -> None:
        if self.free_memory_bytes > self.memory_bytes:
            raise ValueError("free_memory_bytes exceeds memory_bytes")


class ValidatorPresence(Message, tag="validator_presence", frozen=True):
    """A validator announcing itself in the DHT: users and workers find validators through these."""

    peer_id: PeerId
    software: ShortText
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)] = []
    max_bytes: ClassVar[int] = 8192


class JobRecord(Message, tag="job_record", frozen=True):
    """A job as recorded by the validator that admitted it: who owns it and which workers run which stage."""

    job: JobId
    owner: PeerId
    validator: PeerId
    stages: Annotated[list[PeerId], msgspec.Meta(max_length=200)]
    state: Literal["admitted", "running", "done", "failed"]
    max_bytes: ClassVar[int] = 16384


class ChannelOffer(Message, tag="channel_offer", frozen=True):
    """Opens a data-plane channel for a job (tensorlink.transport): the opener's ephemeral X25519 key, a
    fresh nonce and the AEAD for a direct connection, all bound into the channel keys."""

    job: JobId
    ephemeral_key: Key32
    nonce: Key32
    cipher: Cipher = "aes-128-gcm"
    max_bytes: ClassVar[int] = 512


class ChannelAccept(Message, tag="channel_accept", frozen=True):
    """Answer to a ChannelOffer: the acceptor's ephemeral key, a one-time token the opener must present
    (sealed) on the direct TCP connection, and the acceptor's data-plane addresses (empty: no direct
    path is offered, the libp2p stream carries the frames)."""

    job: JobId
    ephemeral_key: Key32
    token: Key32
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=8)] = []
    max_bytes: ClassVar[int] = 8192


class ChannelSelect(Message, tag="channel_select", frozen=True):
    """The opener's choice after trying the direct path: ``direct`` (the TCP connection is up and
    authenticated, the stream closes) or the libp2p stream itself carries the frames."""

    direct: bool
    reason: ShortText = ""
    max_bytes: ClassVar[int] = 512


class ErrorReply(Message, tag="error", frozen=True):
    """A refusal with a machine-readable code and a sentence for the log."""

    code: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*\Z")]
    message: Annotated[str, msgspec.Meta(max_length=1024)]
    max_bytes: ClassVar[int] = 2048


Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]


class DialBackRequest(Message, tag="dial_back_request", frozen=True):
    """Asks a peer to dial the requester back over a fresh connection (tensorlink.p2p.reachability).

    ``addrs`` are the requester's own announced addresses; the server dials only the IP the request
    arrived from, so nothing here can point it at a third party."""

    nonce: Nonce
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=8)]
    max_bytes: ClassVar[int] = 4608


class DialBackProbe(Message, tag="dial_back_probe", frozen=True):
    """Sent by the server's prober over the fresh connection; the requester echoes it back unchanged."""

    nonce: Nonce
    max_bytes: ClassVar[int] = 128


class DialBackResponse(Message, tag="dial_back_response", frozen=True):
    """The outcome of a dial-back: ``ok`` (``addr`` answered with the right peer id and nonce),
    ``failed`` (every dialled address failed) or ``refused`` (nothing the server may dial)."""

    nonce: Nonce
    status: Literal["ok", "failed", "refused"]
    addr: Multiaddr | None = None
    observed: Multiaddr | None = None
    dialed: Annotated[list[Multiaddr], msgspec.Meta(max_length=8)] = []
    reason: ShortText = ""
    max_bytes: ClassVar[int] = 8192


class UnitCost(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """Cost of one unit of a model (in model order), measured on the user's machine: forward FLOPs, bytes
    of parameters, and every other byte a worker holding it is charged (the micro-batches it keeps for backward
    at the declared maximum shapes, frames, buffers: tensorlink.validator.partition.declare). An array on the
    wire (3 numbers, no field names), so that 65536 units fit a JobRequest of 2 MiB."""

    flops: Annotated[float, msgspec.Meta(ge=0.0, le=1e30)]  # bounds refuse NaN and infinity too
    param_bytes: U64
    activation_bytes: U64


MAX_WORKERS_PER_JOB = 64
MAX_UNITS = 65536
MAX_STAGES = MAX_WORKERS_PER_JOB + 2  # private jobs keep the first and last stage on the user's machine
StageIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_STAGES - 1)]
UnitIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_UNITS - 1)]


class JobRequest(Message, tag="job_request", frozen=True):
    """A user asking a validator for ``workers`` workers to run its model's stages. ``owner`` must be the
    peer sending it; ``optimizer_slots`` is the optimizer's per-parameter state copies (SGD 0, SGD with
    momentum 1, AdamW 2), which the memory each stage needs depends on."""

    job: JobId
    owner: PeerId
    workers: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS_PER_JOB)]
    units: Annotated[list[UnitCost], msgspec.Meta(min_length=1, max_length=MAX_UNITS)]
    private: bool = False
    optimizer_slots: Annotated[int, msgspec.Meta(ge=0, le=4)] = 0
    device: Device | None = None
    max_bytes: ClassVar[int] = 2 << 20


class StagePlacement(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where one remote stage runs: the worker, its addresses, the inclusive unit range it holds and the
    memory reserved for it."""

    peer_id: PeerId
    addrs: Annotated[list[Multiaddr], msgspec.Meta(max_length=16)]
    stage: StageIndex
    units: tuple[UnitIndex, UnitIndex]
    memory_bytes: U64

    def __post_init__(self) -> None:
        if self.units[0] > self.units[1]:
            raise ValueError("units must be [first, last] with first <= last")


class JobPlan(Message, tag="job_plan", frozen=True):
    """The validator's answer to a JobRequest: the stage of every unit (contiguous, from 0 up to
    n_stages - 1 in steps of 0 or 1) and where each remote stage runs. With ``private`` the first and
    last stages are the user's own and have no placement."""

    job: JobId
    validator: PeerId
    n_stages: Annotated[int, msgspec.Meta(ge=1, le=MAX_STAGES)]
    unit_stage: Annotated[list[StageIndex], msgspec.Meta(min_length=1, max_length=MAX_UNITS)]
    placements: Annotated[list[StagePlacement], msgspec.Meta(max_length=MAX_WORKERS_PER_JOB)]
    max_bytes: ClassVar[int] = 1 << 20

    def __post_init__(self) -> None:
        stages = self.unit_stage
        if stages[0] != 0 or stages[-1] != self.n_stages - 1:
            raise ValueError("unit_stage must start at stage 0 and end at stage n_stages - 1")
        if any(b - a not in (0, 1) for a, b in zip(stages[:-1], stages[1:], strict=True)):
            raise ValueError("unit_stage must be non-decreasing in steps of 0 or 1 (stages are contiguous)")
        if any(p.stage >= self.n_stages for p in self.placements):
            raise ValueError("a placement names a stage past n_stages")


class StageAssign(Message, tag="stage_assign", frozen=True):
    """A validator assigning one stage of a job to a worker: who owns the job, the neighbours the stage
    exchanges activations with (None: the user, or nothing), and the memory to reserve."""

    job: JobId
    owner: PeerId
    validator: PeerId
    stage: StageIndex
    n_stages: Annotated[int, msgspec.Meta(ge=1, le=MAX_STAGES)]
    memory_bytes: U64
    prev: PeerId | None = None
    next: PeerId | None = None

    def __post_init__(self) -> None:
        if self.stage >= self.n_stages:
            raise ValueError("stage must be below n_stages")


class StageAssigned(Message, tag="stage_assigned", frozen=True):
    """A worker accepting a StageAssign (a refusal is an ErrorReply with a code)."""

    job: JobId
    stage: StageIndex
    max_bytes: ClassVar[int] = 256


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    Heartbeat,
    WorkerCapability,
    ValidatorPresence,
    JobRecord,
    ChannelOffer,
    ChannelAccept,
    ChannelSelect,
    ErrorReply,
    DialBackRequest,
    DialBackProbe,
    DialBackResponse,
    JobRequest,
    JobPlan,
    StageAssign,
    StageAssigned,
)
MAX_MESSAGE_BYTES = max(t.max_bytes for t in MESSAGE_TYPES)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[MESSAGE_TYPES])


class _VersionOnly(msgspec.Struct):
    v: int = PROTOCOL_VERSION


_version_decoder = msgspec.msgpack.Decoder(_VersionOnly)
M = TypeVar("M", bound=Message)


def encode_message(msg: Message) -> bytes:
    """msgpack bytes of msg; refuses a message its receivers would reject for size."""
    data = _encoder.encode(msg)
    if len(data) > msg.max_bytes:
        raise WireError(f"{type(msg).__name__} message is {len(data)} bytes, over its cap of {msg.max_bytes}")
    return data


@overload
def decode_message(data: bytes | bytearray | memoryview, expect: type[M]) -> M: ...
@overload
def decode_message(data: bytes | bytearray | memoryview, expect: None = None) -> Message: ...
def decode_message(data: bytes | bytearray | memoryview, expect: type[Message] | None = None) -> Message:
    """Parse and validate one message; ``expect`` narrows the accepted kind, and its size cap is then
    checked before parsing (a DHT record holding a WorkerCapability cannot make us parse 2 MiB)."""
    size = memoryview(data).nbytes
    limit = expect.max_bytes if expect is not None else MAX_MESSAGE_BYTES
    if size > limit:
        raise WireError(f"control message of {size} bytes exceeds the largest allowed ({limit} bytes)")
    msg = decode_checked(_decoder, data, "control message")
    if expect is not None and not isinstance(msg, expect):
        raise WireError(f"expected a {expect.__name__} message, got {type(msg).__name__}")
    return msg


def decode_checked(decoder: msgspec.msgpack.Decoder, data: bytes | bytearray | memoryview, what: str) -> Any:
    """Decode with ``decoder`` (a union of kinds with ``max_bytes`` and ``v``), then check the kind's own
    size cap and the protocol version; every failure is a WireError naming it. Shared by every protocol's
    message union (node messages here, stage commands in wire/stage.py)."""
    size = memoryview(data).nbytes
    try:
        msg = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed {what}: {exc}{_version_hint(data)}") from None
    except UnicodeDecodeError as exc:
        raise WireError(f"malformed {what}: invalid UTF-8 in a string ({exc.reason})") from None
    except RecursionError:
        raise WireError(f"malformed {what}: nesting too deep") from None
    if size > msg.max_bytes:
        raise WireError(f"{type(msg).__name__} message of {size} bytes exceeds its cap of {msg.max_bytes}")
    if msg.v != PROTOCOL_VERSION:
        raise WireError(f"protocol version {msg.v} is not supported (this node speaks {PROTOCOL_VERSION})")
    return msg


def _version_hint(data: bytes | bytearray | memoryview) -> str:
    """When a message fails to parse, say so if the cause is likely a different protocol version."""
    try:
        version = _version_decoder.decode(data).v
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return ""
    return (
        f" (the sender speaks protocol version {version}, this node {PROTOCOL_VERSION})"
        if version != PROTOCOL_VERSION
        else ""
    )
