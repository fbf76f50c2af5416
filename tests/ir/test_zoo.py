"""A representative, time-bounded slice of the transformers zoo (benchmarks/zoo.py runs every architecture): each
model, built small from its config class with random weights, captures in train and eval mode, loads in a fresh
process that gets only the program bytes (transformers blocked there), and matches eager: outputs and parameter
gradients of the train program, outputs of the eval program (zoo.RTOL / zoo.ATOL, float32).

The slice covers what the operator review added: MoE routing (topk, and repeat_interleave in transformers'
batched experts), softplus, grouped-query attention, an encoder, a classifier head and an encoder-decoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import zoo  # noqa: E402  (benchmarks/, put on the path above)

CASES = [
    ("causal", "mixtral"),  # MoE: topk routing, repeat_interleave in batched experts, GQA
    ("causal", "doge"),  # softplus
    ("masked", "bert"),
    ("seqcls", "llama"),
    ("seq2seq", "t5"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("family", "arch"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_architecture_captures_and_matches_eager_in_a_fresh_process(family: str, arch: str, tmp_path: Path) -> None:
    row = zoo.run_case(arch, family, tmp_path)
    assert row["exportable"], row["reason"]
    assert row["captured_train"] and row["captured_eval"], row["reason"]
    assert row["equal"], row["reason"]


def test_small_config_shrinks_the_common_fields_and_turns_dropout_off() -> None:
    """The zoo's configs are small whatever an architecture calls its fields (GPT-2's n_embd, T5's d_model)."""
    gpt2 = zoo.small_config("gpt2")
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.vocab_size) == (zoo.HIDDEN, zoo.LAYERS, zoo.HEADS, zoo.VOCAB)
    assert gpt2.resid_pdrop == gpt2.attn_pdrop == 0.0
    mixtral = zoo.small_config("mixtral")
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (zoo.EXPERTS, zoo.ROUTED)
    assert mixtral.num_key_value_heads == zoo.KV_HEADS < mixtral.num_attention_heads


class _Constrained(torch.nn.Module):
    """Specialises the sequence (a fixed [.., 2, 4] split of 8 positions) and bounds the batch (a table of 4
    rows sliced by it): what made falcon_mamba and others fail on the default dynamic dims."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(4, 2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 2, 4) * self.table[: x.shape[0]]


def test_dims_the_model_constrains_are_captured_as_export_finds_them() -> None:
    """The default dims refused (a dim marked dynamic that the model specialises or bounds): capture retries with
    Dim.AUTO in the same bounds, declares what export found, and the worker refuses inputs outside it."""
    from tensorlink.ir import capture, load

    model = _Constrained()
    x = torch.randn(2, 8)
    program = capture(model, (x,), max_seq_len=32)
    (spec,) = program.program.signature.inputs
    assert spec.shape[1] == 8, "the specialised sequence is declared static"
    low, high = program.program.signature.symbols[str(spec.shape[0])]
    assert high == 4, "the batch keeps the bound the model puts on it"
    module = load(program.to_bytes())
    for batch in range(max(low, 1), high + 1):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(module(x), model(x))
    with pytest.raises(ValueError, match="outside its declared range"):
        module(torch.randn(high + 1, 8))
    with pytest.raises(ValueError, match="shape"):
        module(torch.randn(2, 9))
