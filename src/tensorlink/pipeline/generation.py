"""``generate`` with Hugging Face's semantics: HF's own ``GenerationMixin.generate`` runs here, on the owner,
and only the model call goes to the workers.

Every generation argument (greedy, sampling with temperature/top-k/top-p/min-p, repetition penalty,
``num_return_sequences``, eos/pad, length limits, left-padded batches, streamers, beam search) therefore behaves
as in HF by construction. The pieces:

- ``GenerationModule``: what is captured and split over the stages, ``(input_ids, attention_mask, position_ids,
  cache_position) -> logits`` with a static KV cache as buffers (each layer's cache stays on that layer's stage).
  The attention mask spans the whole cache (the owner pads it with zeros), so padding works as in HF.
- ``Decoder``: the remote side (the pipeline implements it; tests run the same program in-process).
- ``RemoteCache`` and ``RemoteCausalLM``: the cache and the model HF's ``generate`` sees. The cache only counts
  positions and forwards beam reorders; the model turns each call into one ``Decoder.step``.

Sampling happens here, from the last position's logits: HF's logits processors and ``torch.multinomial`` then
consume this process's random stream exactly as a local ``generate`` does, so sampled tokens equal HF's under the
same ``torch.manual_seed``, and every processor HF has works unchanged. The cost is one ``[batch, vocab]`` row
per step on the wire; for huge vocabularies sampling on the last stage (carrying the generator state there) would
save that bandwidth. It is not built.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch.export import Dim
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from tensorlink.ir import StageProgram, capture

PREFIX = "model."  # the generation program's weights are the model's under this prefix (the wrapper's attribute)
SUPPORTED_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")
_LOGITS_ONLY = "use return_dict_in_generate=True with output_scores or output_logits (only logits come back)"
# Arguments that cannot work with a remote static cache, each with what to use instead.
UNSUPPORTED = {
    "assistant_model": "generate without an assistant (speculative decoding needs a cache it can crop)",
    "assistant_tokenizer": "generate without an assistant (speculative decoding needs a cache it can crop)",
    "prompt_lookup_num_tokens": "generate without prompt lookup (it needs a cache it can crop)",
    "assistant_early_exit": "generate without early-exit assistance (it needs a cache it can crop)",
    "custom_generate": "call generate() without custom_generate (it runs other code than HF's own decoding)",
    "inputs_embeds": "pass input_ids (the workers' program embeds the tokens)",
    "cache": "leave the cache out: the workers keep a static KV cache of max_seq_len positions",
    "past_key_values": "leave the cache out: the workers keep a static KV cache of max_seq_len positions",
    "cache_implementation": "leave it unset: the workers keep a static KV cache of max_seq_len positions",
    "prefill_chunk_size": "leave it unset: the prompt goes to the workers in one call",
    "output_attentions": _LOGITS_ONLY,
    "output_hidden_states": _LOGITS_ONLY,
}


class GenerationError(ValueError):
    """A generate() call this pipeline cannot serve; the message says what to do instead."""


class Decoder(Protocol):
    """The remote side of generation, for programs captured by ``capture_generation`` at ``max_len`` positions."""

    max_len: int  # positions of the workers' KV cache: prompt plus new tokens may not exceed it

    def prepare(self, batch: int) -> None:
        """A generation program for ``batch`` rows is loaded on the stages; their caches are reset."""

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One prefill or decode call of the program (``GenerationModule.forward``'s inputs) -> the last
        position's logits ``[batch, vocab]``."""

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Every stage replaces its KV cache rows by rows ``beam_idx`` (beam search)."""


# -- the captured program --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _static_cache_settings(model: PreTrainedModel) -> Iterator[None]:
    """transformers' static-cache wrapper checks these settings when it is built; the user's model keeps its own."""
    config, generation = model.config, model.generation_config
    saved = (config.use_cache, generation.use_cache, generation.cache_implementation)
    config.use_cache, generation.use_cache, generation.cache_implementation = True, True, "static"
    try:
        yield
    finally:
        config.use_cache, generation.use_cache, generation.cache_implementation = saved


class GenerationModule(TorchExportableModuleWithStaticCache):
    """transformers' static-cache export wrapper (its cache buffers ``key_cache_<i>``/``value_cache_<i>``, batch
    first, are what a stage's ReorderCache selects rows of), called with an attention mask over the whole cache
    and explicit positions, as HF's generate calls a model: left padding masks and positions work unchanged."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        for layer in self.static_cache.layers:  # where this call writes: the cache keeps no position of its own
            cast(StaticLayer, layer).cumulative_length.copy_(cache_position[0])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self.static_cache,
            use_cache=True,
        )
        return cast(torch.Tensor, out.logits)


def generation_module(model: torch.nn.Module, batch: int, max_len: int) -> GenerationModule:
    model = causal_lm(model)
    with _static_cache_settings(model):
        module = GenerationModule(model, batch_size=batch, max_cache_len=max_len)
    # capture() puts the module back in the mode it found it in, recursively: a new module's default (training)
    # would leave the user's model in training mode.
    return module.train(model.training)


def _example_inputs(batch: int, seq: int, max_len: int) -> dict[str, torch.Tensor]:
    """The inputs of a prefill of ``seq`` tokens, in the program's keyword order."""
    mask = torch.zeros(batch, max_len, dtype=torch.bool)  # bool: it goes with every step, one byte per position
    mask[:, :seq] = True
    return {
        "input_ids": torch.zeros(batch, seq, dtype=torch.long),
        "attention_mask": mask,
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
        "cache_position": torch.arange(seq),
    }


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    if not isinstance(model, PreTrainedModel) or not model.can_generate():
        raise GenerationError(
            "generate() works on Hugging Face causal LMs (a PreTrainedModel that can generate), "
            f"not {type(model).__name__}"
        )
    return model


@dataclass(frozen=True)
class GenerationProgram:
    """The whole generation program for ``batch`` rows and ``max_len`` positions; its weights are the
    model's under ``prefix`` (the pipeline loads it under the key "generate" and the stages share the weights)."""

    whole: StageProgram
    batch: int
    max_len: int
    prefix: str = PREFIX


def capture_generation(model: torch.nn.Module, batch: int, max_len: int) -> GenerationProgram:
    """Capture ``model`` (an HF causal LM) as the generation program; the sequence length is dynamic, 1..max_len
    (a prefill of the prompt, then one token per call), the batch fixed (it sizes the KV cache)."""
    module = generation_module(model, batch, max_len)
    seq = Dim("seq", min=1, max=max_len)
    whole = capture(
        module,
        (),
        example_kwargs=_example_inputs(batch, min(2, max_len), max_len),
        dynamic_shapes={
            "input_ids": {1: seq},
            "attention_mask": None,  # always the whole cache
            "position_ids": {1: seq},
            "cache_position": {0: seq},
        },
        train=False,
    )
    return GenerationProgram(whole, batch, max_len)


# -- what HF's generate sees on the owner ----------------------------------------------------------------------


class RemoteCache(Cache):
    """The KV cache as HF's generate sees it: the tokens the workers' caches hold, and beam reorders for them.
    A reorder is kept until the next step and composed with any before it (beam search reorders after every
    token, also after the last one, and mostly keeps every row where it is): at most one ReorderCache per step,
    none where nothing moves. Positions past the written ones are masked, so a new generation needs no zeroing."""

    is_compileable = False  # HF then passes our 2D mask through instead of building 4D masks for a static cache

    def __init__(self, decoder: Decoder) -> None:
        super().__init__(layers=[])
        self.decoder = decoder
        self.length = 0
        self.pending: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.decoder.max_len

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.length = 0
        self.pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        rows = beam_idx.to("cpu", torch.long)
        self.pending = rows if self.pending is None else self.pending[rows]

    def step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One call of the program on the workers; the cache then holds the call's tokens too."""
        if self.pending is not None:
            if not torch.equal(self.pending, torch.arange(len(self.pending))):
                self.decoder.reorder(self.pending)
            self.pending = None
        logits = self.decoder.step(inputs)
        self.length += inputs["input_ids"].shape[1]
        return logits


class RemoteCausalLM(PreTrainedModel, GenerationMixin):
    """The model HF's generate drives: the user's config and generation config, no weights; each forward is one
    Decoder step. Built per generate() call from the user's local model."""

    main_input_name = "input_ids"
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True  # no attention runs here: HF need not check

    def __init__(self, local: PreTrainedModel, decoder: Decoder) -> None:
        super().__init__(copy.deepcopy(local.config))  # PreTrainedModel sets fields on its config: not the user's
        self.generation_config = copy.deepcopy(local.generation_config)
        self.generation_config.cache_implementation = None  # the workers' cache is ours; a user's choice is refused
        self.decoder = decoder
        self._dtype = local.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # the owner's side: tokens, logits and sampling are here

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _prepare_generation_config(self, generation_config: Any, **kwargs: Any) -> tuple[GenerationConfig, dict]:
        """HF's merge of the arguments with the generation config, then a refusal of what cannot work remotely,
        before anything is sent (a deprecated mode would otherwise load code from the Hub)."""
        config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)  # type: ignore[misc]
        for name in UNSUPPORTED:
            if getattr(config, name, None) not in (None, False):
                raise GenerationError(f"generate() on an offloaded model does not support {name}: {UNSUPPORTED[name]}")
        mode = config.get_generation_mode()
        if mode.value not in SUPPORTED_MODES:
            raise GenerationError(
                f"generate() on an offloaded model does not support {mode.value.replace('_', ' ')}; use greedy "
                "decoding, sampling or beam search (num_beams with num_beam_groups=1, no constraints, no penalty_alpha)"
            )
        return config, model_kwargs

    def _prepare_cache_for_generation(  # type: ignore[override]  # HF's says bool, returns nothing
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Where HF would build a cache: check the length fits the workers' cache, have the decoder load a
        program for the rows generate will run (prompts x beams or return sequences), and hand HF our cache."""
        if max_cache_length > self.decoder.max_len:
            raise GenerationError(
                f"max_length {generation_config.max_length} (prompt plus new tokens) needs {max_cache_length} cache "
                f"positions; the workers' cache has {self.decoder.max_len} (max_seq_len): shorten the prompt, ask for "
                "fewer new tokens or offload with a larger max_seq_len"
            )
        rows = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences)
        self.decoder.prepare(rows)
        model_kwargs["cache"] = RemoteCache(self.decoder)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RemoteCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 1,
        return_dict: bool = True,
    ) -> CausalLMOutputWithPast:
        """One program call: the mask padded with zeros to the cache's length, the positions HF computed
        (from the mask: left padding) and where in the cache this call writes."""
        if cache is None or not use_cache:
            raise GenerationError("generate() on an offloaded model needs its KV cache; leave use_cache at True")
        batch, seq = input_ids.shape
        start = cache.get_seq_length()
        end = start + seq
        if end > self.decoder.max_len:  # generate's own length check ran; this guards any other caller
            raise GenerationError(f"{end} positions do not fit the workers' cache of {self.decoder.max_len}")
        mask = torch.zeros(batch, self.decoder.max_len, dtype=torch.bool)
        mask[:, :end] = True if attention_mask is None else attention_mask.to(torch.bool)
        positions = torch.arange(start, end).expand(batch, seq) if position_ids is None else position_ids
        inputs = {
            "input_ids": input_ids.to(torch.long).contiguous(),
            "attention_mask": mask,
            "position_ids": positions.to(torch.long).contiguous(),
            "cache_position": torch.arange(start, end),
        }
        logits = cache.step(inputs)
        return CausalLMOutputWithPast(logits=logits[:, None, :], cache=cache)


@torch.no_grad()
def generate(
    local: torch.nn.Module,
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **hf_kwargs: Any,
) -> Any:
    """HF's ``generate`` for ``local`` (the user's HF causal LM: its config and generation config; its weights
    are not used), each model call run by ``decoder``. Returns what HF's generate returns for these arguments."""
    local = causal_lm(local)
    for name in UNSUPPORTED:
        if hf_kwargs.get(name) is not None:
            raise GenerationError(f"generate() on an offloaded model does not support {name}: {UNSUPPORTED[name]}")
    model = RemoteCausalLM(local, decoder)
    if attention_mask is not None:
        hf_kwargs["attention_mask"] = attention_mask
    return model.generate(input_ids, **hf_kwargs)
