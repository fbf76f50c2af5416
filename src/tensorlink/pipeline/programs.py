"""Capturing the owner's model as Stage IR programs: training, evaluation and generation.

A program is captured here, on the owner, once per use: ``train`` (training mode, with the autograd the
stages need), ``eval`` (evaluation mode) and ``generate`` (an HF causal LM with a static KV cache). The
workers load each under its key and share the weights by name, so every program sees the trained ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.export import Dim

from tensorlink.ir import StageProgram, capture
from tensorlink.ir.split import Split

GENERATION_PREFIX = "model."  # where transformers' static-cache wrapper keeps the model


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


def capture_generation(module: torch.nn.Module, batch: int, example_ids: torch.Tensor, max_seq_len: int) -> Program:
    """The generation program of an HF causal LM: ``(input_ids, cache_position) -> logits`` with a
    static KV cache as buffers, which the split leaves on the stage of each layer. Its weights are
    the model's under a ``model.`` prefix; the workers share them by name."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    generation = getattr(module, "generation_config", None)
    config = getattr(module, "config", None)
    if generation is None or config is None:
        raise ValueError("generate() works on Hugging Face causal LMs (a model with a generation_config)")
    saved = (config.use_cache, generation.use_cache, generation.cache_implementation)
    config.use_cache, generation.use_cache, generation.cache_implementation = True, True, "static"
    try:
        wrapper = TorchExportableModuleWithStaticCache(cast(Any, module), batch_size=batch, max_cache_len=max_seq_len)
        seq = Dim("seq", min=1, max=max_seq_len)
        ids = example_ids.contiguous()
        whole = capture(
            wrapper,
            (),
            example_kwargs={"input_ids": ids, "cache_position": torch.arange(ids.shape[1])},
            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
            train=False,
        )
    finally:
        config.use_cache, generation.use_cache, generation.cache_implementation = saved
    return Program(whole, None, GENERATION_PREFIX)
