"""The stage protocol's commands (wire/stage.py): every kind round-trips, and hostile bytes give a
WireError that names what was wrong, never a crash or a half-built command."""

from __future__ import annotations

import os

import msgspec
import pytest

from tensorlink.wire.errors import WireError
from tensorlink.wire.stage import (
    STAGE_MESSAGES,
    Close,
    CommitGrads,
    Done,
    Failed,
    GradSquares,
    InputSlot,
    LoadProgram,
    MakeOptimizer,
    OptimizerStep,
    OutputSlot,
    ReorderCache,
    RunBackward,
    RunStep,
    ScaleGrads,
    SendTensors,
    SetGrads,
    StageOpen,
    ZeroGrad,
    decode_stage,
    encode_stage,
)

JOB = bytes(range(16))
EXAMPLES = [
    StageOpen(job=JOB, stage=3),
    LoadProgram(
        key="train",
        size=1234,
        inputs=[InputSlot(name="h", source="prev", idx=0), InputSlot(name="labels", source="user", idx=1)],
        outputs=[OutputSlot(name="loss", dest="user", idx=0)],
    ),
    RunStep(key="train", step=7, micro_batches=8, schedule="1f1b", backward="fused", loss_output=0, loss_scale=0.125),
    RunBackward(key="train", step=7, micro_batches=8, grad_to_user=["x"]),
    ReorderCache(key="generate", index=[0, 0, 2]),
    CommitGrads(step=7, scale=1.0),
    MakeOptimizer(name="AdamW", hyper={"lr": 3e-4, "betas": [0.9, 0.95], "amsgrad": False}),
    OptimizerStep(hyper={"lr": 1e-4}),
    ZeroGrad(),
    GradSquares(exclude=["transformer.wte.weight"]),
    ScaleGrads(factor=0.5),
    SendTensors(what="state", names=[]),
    SetGrads(names=["transformer.wte.weight"]),
    Close(),
    Done(value=2.5, names=["a"]),
    Failed(code="no_program", message="no training program is loaded on this stage"),
]


def test_the_examples_cover_every_kind() -> None:
    assert {type(m) for m in EXAMPLES} == set(STAGE_MESSAGES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode_stage(encode_stage(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "malformed stage message"),
        (os.urandom(300), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "run_step", "key": "train"}), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "exec", "code": "import os"}), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "zero_grad", "v": 99}), "protocol version 99"),
        (msgspec.msgpack.encode({"kind": "stage_open", "job": b"short", "stage": 0}), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "scale_grads", "factor": "big"}), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "zero_grad", "pad": "x" * 10_000}), "malformed stage message"),
        (msgspec.msgpack.encode({"kind": "grad_squares", "exclude": ["www"] * 3000}), "exceeds its cap"),
    ],
)
def test_hostile_bytes_give_a_wire_error(data: bytes, says: str) -> None:
    with pytest.raises(WireError, match=says):
        decode_stage(data)


def test_encoding_refuses_a_command_over_its_cap() -> None:
    with pytest.raises(WireError, match="over its cap"):
        encode_stage(Failed(code="x", message="y" * 4000 + "\u00e9" * 3000))
