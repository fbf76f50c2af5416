"""The stage protocol's control messages: what a job's owner tells a worker about the stage it runs.

One long-lived libp2p stream per (job, stage) carries these, request then reply, in order; tensors
(programs, activations, gradients, weights) ride the job's data-plane channels. Same framing and the
same hostile-input rules as ``wire.messages`` (msgpack, a schema per kind, caps), in a union of its
own so that a stage command can never be mistaken for a node-level message.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

import msgspec

from tensorlink.wire.errors import WireError
from tensorlink.wire.messages import PROTOCOL_VERSION, JobId, decode_checked

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Index = Annotated[int, msgspec.Meta(ge=0, le=2**24 - 1)]
Count = Annotated[int, msgspec.Meta(ge=1, le=4096)]
Step = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Scalar = Union[bool, int, float]
HyperValue = Union[Scalar, Annotated[list[float], msgspec.Meta(max_length=8)]]
Hyper = dict[Annotated[str, msgspec.Meta(max_length=64)], HyperValue]
ProgramKey = Literal["train", "eval", "generate"]
CacheRow = Annotated[int, msgspec.Meta(ge=0, le=4095)]  # a row of a KV cache (batch up to 4096)


class StageMessage(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Subclasses repeat ``frozen=True``: msgspec inherits it, but type checkers (PEP 681) do not."""

    v: Annotated[int, msgspec.Meta(ge=0, le=65535)] = PROTOCOL_VERSION
    max_bytes: ClassVar[int] = 4096


class InputSlot(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A stage input: the value's name, who sends it (the previous stage or the job's owner) and its
    index among the values that sender sends this stage per micro-batch."""

    name: Name
    source: Literal["prev", "user"]
    idx: Index


class OutputSlot(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    dest: Literal["next", "user"]
    idx: Index


class StageOpen(StageMessage, tag="stage_open", frozen=True):
    """First message: which assigned stage this stream drives."""

    job: JobId
    stage: Annotated[int, msgspec.Meta(ge=0, le=4095)]


class LoadProgram(StageMessage, tag="load_program", frozen=True):
    """The program's bytes follow on the owner's channel (a uint8 tensor of ``size`` bytes). A second
    program (``eval``) shares the parameters of the first by name: the worker keeps one set of weights."""

    key: ProgramKey
    size: Annotated[int, msgspec.Meta(ge=1, le=64 << 30)]
    inputs: Annotated[list[InputSlot], msgspec.Meta(max_length=4096)]
    outputs: Annotated[list[OutputSlot], msgspec.Meta(max_length=4096)]
    prefix: Annotated[str, msgspec.Meta(max_length=64)] = ""  # eval: its names = the training program's + this
    max_bytes: ClassVar[int] = 1 << 20


class RunStep(StageMessage, tag="run_step", frozen=True):
    """Run the forward of ``micro_batches`` micro-batches (and, with ``backward="fused"``, their backward
    as the schedule orders them, seeding the loss output ``loss_output`` with ``loss_scale``).
    ``backward="later"`` keeps the activations for a RunBackward; ``"none"`` keeps nothing."""

    key: ProgramKey
    step: Step
    micro_batches: Count
    schedule: Literal["gpipe", "1f1b"]
    backward: Literal["fused", "later", "none"]
    training: bool = True  # dropout and batch-norm in training mode (the owner's model.train()/eval())
    loss_output: Annotated[int, msgspec.Meta(ge=-1, le=4095)] = -1
    loss_scale: float = 1.0
    to_user: Annotated[list[Index], msgspec.Meta(max_length=4096)] = []  # last stage: outputs the owner wants
    tail: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = 0  # >0: only the last `tail` positions (dim 1) go back
    grad_to_user: Annotated[list[Name], msgspec.Meta(max_length=4096)] = []  # owner inputs it wants grads of


class RunBackward(StageMessage, tag="run_backward", frozen=True):
    """Back-propagate a ``backward="later"`` step: the last stage reads the output gradients the owner
    sent, the others those of the next stage."""

    key: ProgramKey
    step: Step
    micro_batches: Count
    grad_to_user: Annotated[list[Name], msgspec.Meta(max_length=4096)] = []


class ReorderCache(StageMessage, tag="reorder_cache", frozen=True):
    """Beam search: the KV cache rows of program ``key`` become its rows ``index``, in place. The stage checks
    the index against its cache (as long as the cache's batch, each entry below it) before touching anything."""

    key: ProgramKey
    index: Annotated[list[CacheRow], msgspec.Meta(min_length=1, max_length=4096)]
    max_bytes: ClassVar[int] = 16 << 10  # 4096 entries of up to 3 msgpack bytes each


class CommitGrads(StageMessage, tag="commit_grads", frozen=True):
    """The owner's backward reached this step's fused gradients: add ``scale`` × them to the parameters'
    gradients (1.0 when the loss was back-propagated as returned)."""

    step: Step
    scale: float


class MakeOptimizer(StageMessage, tag="make_optimizer", frozen=True):
    name: Annotated[str, msgspec.Meta(max_length=32)]
    hyper: Hyper


class OptimizerStep(StageMessage, tag="optimizer_step", frozen=True):
    hyper: Hyper  # the current values of the hyper-parameters (an LR scheduler may have changed them)


class ZeroGrad(StageMessage, tag="zero_grad", frozen=True):
    pass


class GradSquares(StageMessage, tag="grad_squares", frozen=True):
    """Ask for the sum of squared gradients of the stage's parameters, leaving out ``exclude`` (tied
    parameters counted by another stage)."""

    exclude: Annotated[list[Name], msgspec.Meta(max_length=4096)] = []


class ScaleGrads(StageMessage, tag="scale_grads", frozen=True):
    factor: float


class SendTensors(StageMessage, tag="send_tensors", frozen=True):
    """Send the named tensors to the owner on the channel, in order: ``what`` is the gradients, the
    current values (parameters and buffers; empty names: all of them) or the optimizer's state."""

    what: Literal["grads", "state", "optimizer"]
    names: Annotated[list[Name], msgspec.Meta(max_length=65536)] = []
    max_bytes: ClassVar[int] = 4 << 20


class SetGrads(StageMessage, tag="set_grads", frozen=True):
    """Replace the named parameters' gradients by tensors that follow on the channel (tied weights:
    the owner sends the sum over the stages that hold them)."""

    names: Annotated[list[Name], msgspec.Meta(max_length=4096)]
    max_bytes: ClassVar[int] = 1 << 20


class Close(StageMessage, tag="close", frozen=True):
    pass


class Done(StageMessage, tag="done", frozen=True):
    """Success. ``value``: a number some commands return (GradSquares); ``names``/``shapes``: what
    SendTensors sends, in order."""

    value: float = 0.0
    names: Annotated[list[Name], msgspec.Meta(max_length=65536)] = []
    max_bytes: ClassVar[int] = 4 << 20


class Failed(StageMessage, tag="failed", frozen=True):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    max_bytes: ClassVar[int] = 8192


STAGE_MESSAGES: tuple[type[StageMessage], ...] = (
    StageOpen,
    LoadProgram,
    RunStep,
    RunBackward,
    ReorderCache,
    CommitGrads,
    MakeOptimizer,
    OptimizerStep,
    ZeroGrad,
    GradSquares,
    ScaleGrads,
    SendTensors,
    SetGrads,
    Close,
    Done,
    Failed,
)
MAX_STAGE_MESSAGE = max(t.max_bytes for t in STAGE_MESSAGES)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[STAGE_MESSAGES])


def encode_stage(msg: StageMessage) -> bytes:
    data = _encoder.encode(msg)
    if len(data) > msg.max_bytes:
        raise WireError(f"{type(msg).__name__} is {len(data)} bytes, over its cap of {msg.max_bytes}")
    return data


def decode_stage(data: bytes) -> StageMessage:
    """One validated stage message; WireError names what is wrong."""
    msg: StageMessage = decode_checked(_decoder, data, "stage message")
    return msg
