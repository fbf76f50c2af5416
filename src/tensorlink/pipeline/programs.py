"""Capturing the owner's model as Stage IR programs: training, evaluation and generation.

A program is captured here, on the owner, once per use: ``train`` (training mode, with the autograd the
stages need) and ``eval`` (evaluation mode); ``generate`` (an HF causal LM with a static KV cache) is captured
by tensorlink.pipeline.generation. The
workers load each under its key and share the weights by name, so every program sees the trained ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorlink.ir import StageProgram, capture
from tensorlink.ir.split import Split


@dataclass(frozen=True)
class Program:
    """A captured program; ``prefix``: its parameters' names are the model's own with this prefix."""

    whole: StageProgram
    out_spec: Any = None
    prefix: str = ""


@dataclass(frozen=True)
class Loaded:
    """A program as the stages run it: split at the job's boundaries."""

    program: Program
    split: Split

    @property
    def whole(self) -> StageProgram:
        return self.program.whole

    @property
    def out_spec(self) -> Any:
        return self.program.out_spec


def capture_program(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    train: bool,
    max_seq_len: int | None,
) -> Program:
    """Capture ``module`` as one program on an example micro-batch; HF models without their KV cache
    (training and cache-less evaluation return no cache). Its batch dim is declared up to the example's:
    workers reserve memory for the declared maximum shapes, so the first micro-batch is the largest."""
    config: Any = getattr(module, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        batch = max((t.shape[0] for t in [*args, *kwargs.values()] if t.dim() > 0), default=2)
        whole = capture(module, args, example_kwargs=kwargs, max_seq_len=max_seq_len, max_batch=batch, train=train)
    finally:
        if use_cache:
            config.use_cache = use_cache
    return Program(whole, getattr(whole, "out_spec", None))
