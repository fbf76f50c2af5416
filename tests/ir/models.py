"""Small models with random weights for the Stage IR tests, and the inputs to run them on.

Every builder seeds torch itself, so two calls give the same weights. `dropout=0.0` (the default) turns every
dropout off, so train-mode runs are deterministic and can be compared bit for bit; pass a positive value to test the
train/eval switch. Inputs come from `*_inputs(batch, seq)`, also seeded, so the example (batch 2, seq 8) and the
check (batch 3, seq 12) are different shapes.

transformers is imported lazily: only the tests that build HF models pay for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 128
N_POSITIONS = 64
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
CHECK_BATCH, CHECK_SEQ = 3, 12
MAX_SEQ = 32


# --- HF models -------------------------------------------------------------------------------------------------


def gpt2(n_layer: int = 2, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: n_embd 64, 4 heads, vocab 128, 64 positions, tied wte/lm_head, no KV cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        use_cache=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=dropout,
        embd_pdrop=dropout,
        resid_pdrop=dropout,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2 builder: embeddings are not tied"
    return model.train()


def llama(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM: 2 layers, hidden 64, 4 heads, 2 KV heads (GQA), vocab 128, no KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=N_POSITIONS,
        use_cache=False,
        attention_dropout=dropout,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def bert(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """BertModel: 2 layers, hidden 64, 4 heads, vocab 128 (with its pooler)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=N_POSITIONS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return BertModel(config).train()


def token_inputs(batch: int, seq: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),)


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """All ones except the last quarter of row 0 (right padding): exercises HF's mask construction."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(1, seq // 4) :] = 0
    return mask


# --- GPT-2 pipeline stages ------------------------------------------------------------------------------------


class GPT2First(nn.Module):
    """First stage: token + position embeddings, dropout, blocks[0:1]. input_ids (B, T) -> hidden (B, T, D)."""

    def __init__(self, model: nn.Module, end: int = 1) -> None:
        super().__init__()
        tr = model.transformer
        self.wte, self.wpe, self.drop = tr.wte, tr.wpe, tr.drop
        self.h = nn.ModuleList(tr.h[:end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            hidden = block(hidden)
        return hidden


class GPT2Middle(nn.Module):
    """Middle stage: blocks[start:end] on hidden states (causal attention, no mask)."""

    def __init__(self, model: nn.Module, start: int = 1, end: int = 2) -> None:
        super().__init__()
        self.h = nn.ModuleList(model.transformer.h[start:end])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            hidden = block(hidden)
        return hidden


class GPT2Last(nn.Module):
    """Last stage: blocks[start:], ln_f, lm_head. hidden (B, T, D) -> logits (B, T, V). lm_head is untied here:
    the stage holds no wte, so its weight is an ordinary parameter."""

    def __init__(self, model: nn.Module, start: int = 2) -> None:
        super().__init__()
        tr = model.transformer
        self.h = nn.ModuleList(tr.h[start:])
        self.ln_f = tr.ln_f
        self.lm_head = model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            hidden = block(hidden)
        return self.lm_head(self.ln_f(hidden))


def gpt2_stages(dropout: float = 0.0, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(first, middle, last) cut out of one 3-layer GPT-2: blocks [0:1], [1:2], [2:3]."""
    model = gpt2(n_layer=3, dropout=dropout, seed=seed)
    return GPT2First(model, 1).train(), GPT2Middle(model, 1, 2).train(), GPT2Last(model, 2).train()


class LlamaMiddle(nn.Module):
    """A Llama block range on hidden states: rotary embeddings (computed under no_grad, a grad region in the
    IR) and layers[start:end], causal attention without a mask."""

    def __init__(self, model: nn.Module, start: int = 1, end: int = 2) -> None:
        super().__init__()
        self.rotary_emb = model.model.rotary_emb
        self.layers = nn.ModuleList(model.model.layers[start:end])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        cos_sin = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings=cos_sin, position_ids=positions)
        return hidden


def llama_middle(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    return LlamaMiddle(llama(dropout=dropout, seed=seed)).train()


def hidden_inputs(batch: int, seq: int, seed: int = 2, dim: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, dim, generator=g),)


# --- plain PyTorch models -------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, global average pool, linear. BatchNorm's running stats and num_batches_tracked are
    buffers that a train-mode forward mutates."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    # Non-trivial running stats, so a wrong "use batch stats / use running stats" choice shows.
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.train()


def image_inputs(batch: int, seed: int = 3, size: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),)


class ResidualNet(nn.Module):
    """Two inputs, three outputs, residual connections, a buffer, dropout and a GELU MLP.

    forward(x: (B, T, 16), y: (B, T, 8)) -> (out (B, T, 16), gate (B, T, 8), summary (B, 16))"""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj_y = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.drop = nn.Dropout(dropout)
        self.gate = nn.Linear(16, 8, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x + self.proj_y(y)  # residual 1
        h = h + self.drop(self.mlp(self.norm(h)))  # residual 2
        out = h * self.scale
        gate = torch.sigmoid(self.gate(h)) * y + y  # residual 3, on the second input
        summary = torch.cumsum(out, dim=1)[:, -1] - x.mean(dim=1)
        return out, gate, summary


def residual(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualNet(dropout).train()


def residual_inputs(batch: int, seq: int, seed: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, 16, generator=g), torch.randn(batch, seq, 8, generator=g))


# --- the cases the equivalence tests run ----------------------------------------------------------------------


@dataclass
class Case:
    """A model and how to feed it: `inputs(batch, seq)` -> (args, kwargs). `max_seq_len` is passed to capture();
    None means only the batch dim is dynamic (the CNN)."""

    name: str
    build_with: Callable[[float], nn.Module]  # dropout -> model
    inputs: Callable[[int, int], tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]
    max_seq_len: int | None = MAX_SEQ
    example: tuple[int, int] = (EXAMPLE_BATCH, EXAMPLE_SEQ)
    check: tuple[int, int] = (CHECK_BATCH, CHECK_SEQ)

    def build(self) -> nn.Module:
        return self.build_with(0.0)


def _tokens(batch: int, seq: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    return token_inputs(batch, seq), {}


def _tokens_masked(batch: int, seq: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    return token_inputs(batch, seq), {"attention_mask": padding_mask(batch, seq)}


def _hidden(batch: int, seq: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    return hidden_inputs(batch, seq), {}


def _images(batch: int, _seq: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    return image_inputs(batch), {}


def _residual(batch: int, seq: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    return residual_inputs(batch, seq), {}


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("gpt2", lambda p: gpt2(n_layer=2, dropout=p), _tokens),
        Case("gpt2_padding_mask", lambda p: gpt2(n_layer=2, dropout=p), _tokens_masked),
        Case("gpt2_first", lambda p: gpt2_stages(p)[0], _tokens),
        Case("gpt2_middle", lambda p: gpt2_stages(p)[1], _hidden),
        Case("gpt2_last", lambda p: gpt2_stages(p)[2], _hidden),
        Case("llama", lambda p: llama(p), _tokens),
        Case("llama_middle", lambda p: llama_middle(p), _hidden),
        Case("bert", lambda p: bert(p), _tokens_masked),
        Case("cnn", lambda _p: cnn(), _images, max_seq_len=None, example=(EXAMPLE_BATCH, 0), check=(5, 0)),
        Case("residual", lambda p: residual(p), _residual),
    ]
}


@functools.cache
def captured(name: str, dropout: float = 0.0, train: bool = True) -> bytes:
    """StageProgram bytes of CASES[name] (with that dropout where the builder takes one), captured once per test
    session: the builders are seeded, so a fresh `build()` has exactly the weights captured here."""
    from tensorlink.ir import capture

    case = CASES[name]
    model = case.build_with(dropout)
    args, kwargs = case.inputs(*case.example)
    prog = capture(model, args, example_kwargs=kwargs or None, max_seq_len=case.max_seq_len, train=train)
    return prog.to_bytes()


# --- whole models with a loss, for split() ------------------------------------------------------------------------


class MLPLoss(nn.Module):
    """An MLP that returns its loss: forward(x (B, T, 16), y (B, T, 8)) -> mean squared error. `h` (after `inp`)
    skips `mid1` and `mid2` to the residual after `norm`, so a 3-stage split [inp | mid1 mid2 | norm out] passes it
    through the middle stage; the buffer `scale` is used only by the last layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mid1 = nn.Linear(32, 32)
        self.mid2 = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.inp(x))
        z = self.mid2(torch.relu(self.mid1(h)))
        out = self.out(self.norm(z) + h) * self.scale
        return ((out - y) ** 2).mean()  # F.mse_loss would emit aten.broadcast_tensors, not allow-listed


def mlp_loss(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLPLoss().train()


def mlp_loss_inputs(batch: int, seq: int, seed: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, 16, generator=g), torch.randn(batch, seq, 8, generator=g))


def lm_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """input_ids and (different) labels for a causal LM that computes its own loss."""
    return {"input_ids": token_inputs(batch, seq)[0], "labels": token_inputs(batch, seq, seed=7)[0]}


class CNNLoss(nn.Module):
    """SmallCNN with a loss (mean squared logits): BatchNorm buffers updated in place inside a split model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).pow(2).mean()


def cnn_loss(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CNNLoss().train()
