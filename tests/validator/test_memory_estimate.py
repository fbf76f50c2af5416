"""The validator's memory estimate of a stage covers what the worker charges that stage, and not much more.

The owner profiles the captured GPT-2 at its declared maximum input shapes (the largest micro-batch and the
captured sequence range) and declares each unit (partition.declare); the validator adds the units of a stage
(partition.stage_totals). Each stage program is then loaded as a worker loads it (StageRuntime.load, the real
IR dry run) and charged as the worker charges it: at load, and at the peak of a step that keeps every
micro-batch for backward with a micro-batch of frames in and out buffered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tensorlink.ir import StageProgram
from tensorlink.ir.split import profile, split
from tensorlink.pipeline.offload import _example
from tensorlink.pipeline.programs import capture_program
from tensorlink.stage.runtime import FixedReservation, StageRuntime, optimizer_copies
from tensorlink.validator.partition import WorkerSpec, declare, partition, stage_totals

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ir"))

import models as M  # noqa: E402

MICRO_BATCHES = 2
SLOTS = 2  # AdamW


@pytest.mark.parametrize(("batch", "seq"), [(4, 8), (32, 64)])
def test_the_estimate_covers_the_charge_of_every_stage(batch: int, seq: int) -> None:
    model = M.gpt2(n_layer=2)
    ids = torch.randint(0, M.VOCAB, (batch, seq))
    first = {k: torch.tensor_split(ids, MICRO_BATCHES)[0] for k in ("input_ids", "labels")}
    program = capture_program(model, *_example([], first), train=True, max_seq_len=model.config.n_positions)
    symbols = program.whole.program.signature.symbols
    assert max(high for name, (_, high) in symbols.items()) == model.config.n_positions  # the captured range
    assert sorted(high for _, high in symbols.values())[0] == batch // MICRO_BATCHES  # the real micro-batch, not 64
    units = profile(program.whole, {name: high for name, (_, high) in symbols.items()})
    costs = [declare(u, optimizer_slots=SLOTS, kept=MICRO_BATCHES) for u in units]
    unit_stage = partition(costs, [WorkerSpec("a", 1.0, 1 << 40), WorkerSpec("b", 1.0, 1 << 40)], private=False,
                           optimizer_slots=SLOTS)  # fmt: skip
    totals = stage_totals(costs, unit_stage, optimizer_slots=SLOTS)
    owner = {name: stage for unit, stage in zip(units, unit_stage, strict=True) for name in unit.params}
    parts = split(program.whole, owner, 2).parts
    received = [_input_bytes(part.program) for part in parts]  # frames in per micro-batch; gradients come back alike
    for k, part in enumerate(parts):
        runtime = StageRuntime(b"j" * 16, k, 2, {}, reservation=FixedReservation(1 << 40))
        runtime.load("train", part.program.to_bytes(), [], [])
        runtime.optimizer_copies = optimizer_copies("AdamW", {})
        bound = runtime.programs["train"].module.memory_bound
        frames = received[k] + (received[k + 1] if k + 1 < len(parts) else 0)
        peak = runtime.needed(reserve=False) + MICRO_BATCHES * (2 * bound + frames)
        estimate = totals[k].memory_bytes
        print(f"stage {k}: estimate {estimate}, charged at load {runtime.needed()}, at the step's peak {peak}")
        assert runtime.needed() <= peak <= estimate < 1.3 * peak, (k, estimate, peak)


def _input_bytes(program: StageProgram) -> int:
    """The bytes of a stage program's inputs at its declared maximum shapes."""
    sig = program.program.signature
    shapes = [[d if isinstance(d, int) else sig.symbols[d][1] for d in spec.shape] for spec in sig.inputs]
    dtypes = [getattr(torch, spec.dtype) for spec in sig.inputs]
    return sum(torch.empty(s, dtype=d, device="meta").nbytes for s, d in zip(shapes, dtypes, strict=True))
