"""A job whose stage exactly fits its worker's offer is placed and trains, and the reservation the worker shows
in /status covers everything it charged the stage (it never had to grow).

The offer is computed here as the owner computes its request (capture at the largest micro-batch, profile at the
declared maxima, partition.declare) and given to a real worker process as --max-memory: the validator places
the stage there only if its estimate fits, and the worker refuses anything past its reservation, which cannot
grow (the offer is all there is). Before the estimate counted what the worker charges, the validator reserved
2.4 MB per stage of this model while the worker charged 146 MB at load.
"""

from __future__ import annotations

import math

import offload_cases as C
import pytest
import torch

import tensorlink
from tensorlink.ir.split import profile
from tensorlink.pipeline.driver import Settings
from tensorlink.pipeline.offload import _example
from tensorlink.pipeline.programs import capture_program
from tensorlink.stage.runtime import OPTIMIZER_SLOTS
from tensorlink.validator.partition import declare, unit_memory
from tensorlink.worker.assignments import MIN_STAGE_BYTES

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

BATCH, SEQ, STEPS = 32, 64, 2  # a stage of ~160 MB, over the 32 MiB every stage reserves at least


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {k: torch.randint(0, C.M.VOCAB, (BATCH, SEQ), generator=g) for k in ("input_ids", "labels")}


def estimate(module: torch.nn.Module) -> int:
    """The bytes a validator reserves for the model as one stage, from the request the owner will make."""
    first = {k: torch.tensor_split(v, C.MICRO_BATCHES)[0] for k, v in batch(0).items()}
    settings = Settings(workers=1, micro_batches=C.MICRO_BATCHES, max_seq_len=module.config.n_positions)
    program = capture_program(module, *_example([], first), train=True, max_seq_len=settings.max_seq_len)
    symbols = program.whole.program.signature.symbols
    units = profile(program.whole, {name: high for name, (_, high) in symbols.items()})
    slots = OPTIMIZER_SLOTS["AdamW"]
    kept = settings.kept(fused=True)  # outputs="loss": 1F1B with the backward fused, 1 stage: one micro-batch kept
    return sum(unit_memory(declare(u, optimizer_slots=slots, kept=kept), slots) for u in units)


def test_a_stage_that_exactly_fits_its_worker_is_placed_and_trains() -> None:
    needed = estimate(C.M.gpt2(n_layer=2))
    assert needed > MIN_STAGE_BYTES
    offer_gb = math.ceil(needed) / 1e9 + 1e-12  # --max-memory in GB; the worker offers int(gb * 1e9) bytes
    with C.swarm(1, worker_memory_gb=offer_gb) as swarm:
        worker = swarm.workers[0]
        assert worker.status()["capability"]["free_memory_bytes"] == needed
        module = C.M.gpt2(n_layer=2)
        model = tensorlink.offload(module, network=swarm, workers=1, micro_batches=C.MICRO_BATCHES, outputs="loss")
        try:
            opt = model.optimizer(torch.optim.AdamW, lr=C.LR)
            losses = []
            for step in range(STEPS):
                loss = C.model_loss(module, model(**batch(step)))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
            assert all(math.isfinite(x) for x in losses)
            (stage,) = worker.status()["stages"]
            (running,) = worker.status()["running"]
            assert model.pipeline.plan is not None
            assert stage["memory_bytes"] == model.pipeline.plan.placements[0].memory_bytes == needed  # never grown
            charged = running["peak_charged_bytes"]  # below the estimate by the frames each unit declares (~18 %)
            print(f"reserved {needed} bytes, charged at most {charged} ({charged / needed:.0%})")
            assert running["steps"] >= STEPS and 0.75 * needed < charged <= needed, (charged, needed)
            wider = {k: torch.cat([v, v]) for k, v in batch(0).items()}  # micro-batches larger than reserved for
            with pytest.raises(tensorlink.OffloadError, match="the first call sets the largest micro-batch"):
                model(**wider)
        finally:
            model.close()
