"""Shared pieces of the offload() tests: the models, their data per step, the local reference trained
with the same micro-batching, and the comparisons (with the one place where equal trainings differ).

Not a test module (no test_ prefix): the offload test modules import it. The models come from
tests/ir/models.py (seeded builders: two calls give the same weights).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ir"))

import models as M  # noqa: E402

import tensorlink  # noqa: E402

LR = 1e-3
WEIGHT_DECAY = 0.1
MICRO_BATCHES = 2
BATCH, SEQ = 4, 8
PARAM_RTOL = 1e-5  # every parameter tensor: norm(difference) / norm(reference)
LOSS_RTOL = 1e-5
# GPT-2's attention bias c_attn.bias is [query | key | value]. The key part adds the same number to every
# score of a query row (q . b_k does not depend on the key position), and softmax ignores a per-row
# constant: its gradient is exactly zero in exact arithmetic. In float32 it is rounding noise, which AdamW
# (dividing by sqrt of the noise's own second moment) turns into updates of about lr in size, in random
# directions. Two equivalent local trainings (e.g. micro-batches summed in another order) already differ
# there by ~3e-4 of the tensor's norm; we allow 5e-3 of the whole c_attn.bias norm for that slice only.
KEY_SLICE_RTOL = 5e-3


@contextmanager
def swarm(workers: int, **kwargs: Any) -> Iterator[tensorlink.LocalSwarm]:
    with tensorlink.LocalSwarm(workers=workers, **kwargs) as s:
        yield s


# --- models and data -------------------------------------------------------------------------------------


@dataclass
class Model:
    """A model case: how to build it (seeded) and its training batch of each step."""

    name: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[[int], dict[str, torch.Tensor]]  # step -> keyword inputs
    hf: bool


# Three batches in turn: different data on consecutive steps, and the same data again three steps later,
# so a loss that goes down shows that the model learns (steps 0 and 9 see the same batch).
ROTATION = 3


def _lm_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step % ROTATION)
    return {
        "input_ids": torch.randint(0, M.VOCAB, (BATCH, SEQ), generator=g),
        "labels": torch.randint(0, M.VOCAB, (BATCH, SEQ), generator=g),
    }


def _mlp_batch(step: int) -> dict[str, torch.Tensor]:
    x, y = M.mlp_loss_inputs(BATCH, SEQ, seed=2000 + step % ROTATION)
    return {"x": x, "y": y}


MODELS: dict[str, Model] = {
    "gpt2": Model("gpt2", lambda: M.gpt2(n_layer=2), _lm_batch, hf=True),
    "llama": Model("llama", M.llama, _lm_batch, hf=True),
    "mlp": Model("mlp", M.mlp_loss, _mlp_batch, hf=False),
}


def model_loss(module: torch.nn.Module, out: Any) -> torch.Tensor:
    """The scalar loss of a model's output: HF ModelOutput.loss, or the tensor itself (the MLP)."""
    return out if isinstance(out, torch.Tensor) else out.loss


def chunks(batch: dict[str, torch.Tensor], n: int = MICRO_BATCHES) -> list[dict[str, torch.Tensor]]:
    """The micro-batches the pipeline runs: torch.tensor_split of every input along dim 0."""
    parts = {k: torch.tensor_split(v, n) for k, v in batch.items()}
    return [{k: parts[k][m] for k in batch} for m in range(n)]


def reference_loss(ref: torch.nn.Module, batch: dict[str, torch.Tensor], n: int = MICRO_BATCHES) -> torch.Tensor:
    """The pipeline's loss computed locally: the mean over micro-batches of each one's loss."""
    return sum(model_loss(ref, ref(**c)) for c in chunks(batch, n)) / n  # type: ignore[return-value]


def adamw(params: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


# --- comparisons ---------------------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """norm(a - b) / norm(b) (absolute where b is all zeros), in float64."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def key_slice(name: str, tensor: torch.Tensor) -> slice | None:
    """The key columns of a GPT-2 c_attn.bias (zero gradient in exact arithmetic), else None; also for
    optimizer state named ``<parameter>:<key>`` (e.g. its exp_avg)."""
    if name.split(":")[0].endswith("attn.c_attn.bias") and tensor.dim() == 1:
        n_embd = tensor.shape[0] // 3
        return slice(n_embd, 2 * n_embd)
    return None


def state_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Every float tensor of ``want`` against ``got`` (same keys) within PARAM_RTOL; the key slice of
    each c_attn.bias within KEY_SLICE_RTOL of that bias's norm. Returns what is off, for the message."""
    errors = []
    assert set(got) == set(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    for name, ref in want.items():
        value = got[name]
        assert value.shape == ref.shape and value.dtype == ref.dtype, name
        if not ref.is_floating_point():
            if not torch.equal(value, ref):
                errors.append(f"{name}: differs")
            continue
        ks = key_slice(name, ref)
        if ks is None:
            err = rel(value, ref)
            if not err <= PARAM_RTOL:
                errors.append(f"{name}: {err:.2e} relative")
            continue
        keep = torch.ones(ref.shape[0], dtype=torch.bool)
        keep[ks] = False
        err = rel(value[keep], ref[keep])
        if not err <= PARAM_RTOL:
            errors.append(f"{name} (query and value part): {err:.2e} relative")
        key_err = float((value[ks] - ref[ks]).double().norm()) / float(ref.double().norm())
        if not key_err <= KEY_SLICE_RTOL:
            errors.append(f"{name} (key part): {key_err:.2e} of the bias norm")
    return errors


def assert_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    errors = state_errors(got, want)
    assert not errors, "parameters differ from the local reference:\n" + "\n".join(errors)


def assert_losses_close(got: list[float], want: list[float]) -> None:
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not abs(g - w) <= LOSS_RTOL * abs(w)]
    assert not bad, f"losses differ (step, pipeline, local): {bad}\npipeline {got}\nlocal    {want}"


# --- one training run, offloaded and local side by side -------------------------------------------------------


@dataclass
class Run:
    model: Any  # the OffloadedModel
    opt: Any  # its RemoteOptimizer
    ref: torch.nn.Module
    ref_opt: torch.optim.Optimizer
    losses: list[float]
    ref_losses: list[float]


def train_side_by_side(
    network: Any,
    case: Model,
    *,
    workers: int,
    steps: int,
    schedule: str = "1f1b",
    outputs: str | None = None,
    setup: Callable[[Run], None] | None = None,
    before_step: Callable[[Run], None] | None = None,
    after_step: Callable[[Run], None] | None = None,
    **offload_kwargs: Any,
) -> Run:
    """Offload a fresh copy of ``case`` and train it ``steps`` steps with AdamW; train a second copy
    locally the same way (same micro-batches). ``setup(run)`` runs once both optimizers exist (e.g. to
    make LR schedulers), ``before_step(run)`` runs after both backwards (e.g.
    gradient clipping), ``after_step(run)`` after both optimizer steps (e.g. LR schedulers)."""
    torch.manual_seed(0)
    ref = case.build()
    module = case.build()
    if outputs is None:
        outputs = "loss" if case.hf else "all"
    model = tensorlink.offload(
        module,
        network=network,
        workers=workers,
        micro_batches=MICRO_BATCHES,
        schedule=schedule,
        outputs=outputs,
        **offload_kwargs,
    )
    run = Run(model, None, ref, adamw(ref.parameters()), [], [])
    try:
        run.opt = model.optimizer(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY)
        if setup is not None:
            setup(run)
        for step in range(steps):
            batch = case.batch(step)
            loss = model_loss(module, model(**batch))
            loss.backward()
            ref_loss = reference_loss(ref, batch)
            ref_loss.backward()
            if before_step is not None:
                before_step(run)
            run.opt.step()
            run.ref_opt.step()
            run.opt.zero_grad()
            run.ref_opt.zero_grad()
            if after_step is not None:
                after_step(run)
            run.losses.append(float(loss.detach()))
            run.ref_losses.append(float(ref_loss.detach()))
    except BaseException:
        model.close()
        raise
    return run
