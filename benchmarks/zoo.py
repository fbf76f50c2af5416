"""The zoo: every architecture registered in the installed transformers, built small, captured and checked.

    python benchmarks/zoo.py [--family causal|masked|seqcls|seq2seq|all] [--limit N] [--only a,b] [--json]
                             [--timeout S] [--budget S] [--jobs N]

For each architecture of a family (transformers' auto mappings: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and the others in
FAMILIES), in a child process of its own (bounded by --timeout): build it from its config class with small sizes
(``small_config``: hidden 64, 2 layers, 4 heads, vocabulary 128, 4 experts of which 2 routed, no dropout), random
weights, seeded; then

- exportable: does plain ``torch.export.export`` (static shapes, strict=False) export it;
- captured train / eval: does ``tensorlink.ir.capture`` capture it in train and in eval mode (batch 1..MAX_BATCH
  and sequence 2..MAX_SEQ dynamic, as a pipeline captures);
- equal: loaded in a fresh process that gets only the program bytes and the inputs (tests/ir/loaded_runner.py, which
  blocks transformers from importing), do both programs match eager: the train program's outputs and parameter
  gradients, the eval program's outputs, within ``RTOL``/``ATOL`` (float32).

Models are wrapped to return their logits only (``Logits``): caches and auxiliary outputs are not what is measured.
The table lists each architecture with the reason of its first failure; ``--json`` prints the rows and the counts
(``zoo_total``, ``zoo_exportable``, ``zoo_captured``, ``zoo_equal``). tests/ir/test_zoo.py imports ``run_case``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ir"))

from loaded_runner import fwd_bwd, run_fresh  # noqa: E402  (tests/ir, put on the path above)

FAMILIES = {
    "causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seqcls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
RTOL, ATOL = 1e-4, 1e-5  # float32: the interpreter runs the same aten kernels, reordering only what export reorders
BATCH, SEQ, MAX_SEQ, MAX_BATCH, VOCAB = 2, 8, 32, 8, 128  # captured for batches 1..8 of 2..32 tokens
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, EXPERTS, ROUTED = 64, 4, 2, 16, 2, 4, 2

# transformers' MoE experts as batched matmuls: its default (grouped_mm) calls transformers' own custom operator
# on the CPU, Python code that no worker runs (capture names it), and "eager" loops over the experts that tokens hit.
EXPERTS_IMPLEMENTATION = "batched_mm"
_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                 "num_decoder_layers", "num_encoder_layers")  # fmt: skip
# Config fields by what they mean, across architectures' spellings; small_config sets those a config has.
_SMALL: list[tuple[int, tuple[str, ...]]] = [
    (HIDDEN, ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim", "word_embed_proj_dim",
             "embedding_size", "intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
             "d_ff", "d_inner", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size",
             "expert_intermediate_size", "max_position_embeddings", "n_positions", "n_ctx", "block_size")),
    (LAYERS, _LAYER_FIELDS),
    (HEADS, ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
            "decoder_attention_heads")),
    (KV_HEADS, ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")),
    (HEAD_DIM, ("head_dim", "kv_channels", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank",
               "qk_head_dim")),
    (EXPERTS, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")),
    (ROUTED, ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_top_k")),
    (VOCAB, ("vocab_size",)),
]  # fmt: skip
_SMALL_FIELD = {field: value for value, fields in _SMALL for field in fields}
_SMALL_FIELD.update({"qk_rope_head_dim": 8, "n_group": 1, "topk_group": 1, "n_shared_experts": 1})


def architectures(family: str) -> list[tuple[str, str]]:
    """(model_type, model class name) of every architecture the installed transformers registers for ``family``."""
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, FAMILIES[family]).items())


def small_config(model_type: str) -> Any:
    """The config of ``model_type`` with the common size fields shrunk (_SMALL), dropout off, no cache, and every
    token id inside the small vocabulary; sub-configs (text_config, encoder, decoder) shrunk the same way."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    return type(config)(**_shrunk(config.to_dict()), experts_implementation=EXPERTS_IMPLEMENTATION)


def _shrunk(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    layers = next((values[k] for k in _LAYER_FIELDS if isinstance(values.get(k), int)), None)
    for key, value in values.items():
        if isinstance(value, list) and layers and len(value) == layers and layers > LAYERS:
            out[key] = value[:LAYERS]  # one entry per layer (layer types, per-layer limits)
        elif isinstance(value, dict) and key.endswith("config"):
            out[key] = _shrunk(value)
        elif key in _SMALL_FIELD and isinstance(value, int) and not isinstance(value, bool):
            out[key] = _SMALL_FIELD[key]
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            out[key] = 0.0
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1
        elif key.endswith("token_id") and isinstance(value, list):
            out[key] = [v if v < VOCAB else VOCAB - 1 for v in value if isinstance(v, int)]
        else:
            out[key] = value
    out["use_cache"] = False
    if out.get("pad_token_id") is None:
        out["pad_token_id"] = 0  # sequence classification needs one for a batch; inputs never use it
    return out


class Logits(torch.nn.Module):
    """The model, returning its logits only (no cache, no auxiliary losses), as a pipeline's last stage would."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
        out = self.model(input_ids=input_ids, use_cache=False, **extra)
        return out.logits if hasattr(out, "logits") else out[0]


def build(model_type: str, family: str, seed: int = 0) -> tuple[Logits, tuple[torch.Tensor, ...]]:
    """A small, seeded ``model_type`` model of ``family`` wrapped in Logits, and its example inputs."""
    import transformers

    class_name = dict(architectures(family))[model_type]
    config = small_config(model_type)
    torch.manual_seed(seed)
    model = Logits(getattr(transformers, class_name)(config)).float()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    inputs = (ids, torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)) if family == "seq2seq" else (ids,)
    return model, inputs


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def _compare(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> str | None:
    """None if equal within tolerance, else what differs."""
    if set(actual) != set(expected):
        return f"{what}: keys differ ({sorted(set(actual) ^ set(expected))[:4]})"
    for key, want in expected.items():
        got = actual[key]
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=RTOL, atol=ATOL):
            diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
            return f"{what} {key} differs from eager (max abs diff {diff})"
    return None


def run_case(model_type: str, family: str, tmp: Path) -> dict[str, Any]:
    """One architecture: build, export, capture train and eval, run both in a fresh process, compare."""
    from torch.export import export

    from tensorlink.ir import capture

    row = _failed(family, model_type, "")
    try:
        model, inputs = build(model_type, family)
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # the small config does not suit the architecture: not counted against capture
        row["reason"] = "build: " + _reason(exc)
        return row
    programs = {}
    for mode in ("train", "eval"):
        try:
            program = capture(model, inputs, max_seq_len=MAX_SEQ, max_batch=MAX_BATCH, train=mode == "train")
            programs[mode] = program.to_bytes()
            row[f"captured_{mode}"] = True
        except Exception as exc:
            row["reason"] = row["reason"] or f"capture {mode}: " + _reason(exc)
    if len(programs) < 2:  # a capture is an export with dynamic shapes: only a failure needs the plain one
        model.eval()
        try:
            export(model, inputs, strict=False)
        except Exception as exc:
            row["reason"] = "export: " + _reason(exc)
            return row
    row["exportable"] = True
    if len(programs) < 2:
        return row
    expected = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        expected[mode] = fwd_bwd(model, list(inputs), {}, seed=0, backward=mode == "train")
    jobs = [
        {"data": programs["train"], "args": list(inputs), "mode": "train", "seed": 0},
        {"data": programs["eval"], "args": list(inputs), "mode": "eval", "load_train": False, "backward": False,
         "seed": 0},
    ]  # fmt: skip
    try:
        results = run_fresh(jobs, tmp, timeout=300)
    except Exception as exc:
        row["reason"] = "fresh process: " + _reason(exc)
        return row
    for mode, (meta, got) in zip(("train", "eval"), results, strict=True):
        if "error" in meta:
            row["reason"] = f"load/run {mode}: " + meta["error"].strip().splitlines()[-1][:300]
            return row
        want = expected[mode]
        diff = _compare(got["out"], want["outputs"], f"{mode} output")
        if diff is None and mode == "train":
            diff = _compare(got["grad"], want["grads"], "train grad")
        if diff is not None:
            row["reason"] = diff
            return row
    row["equal"] = True
    return row


# --- the driver: one child per architecture, bounded -------------------------------------------------------------


def _child(family: str, model_type: str, out: Path) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        row = run_case(model_type, family, Path(tmp))
    out.write_text(json.dumps(row))


def _failed(family: str, model_type: str, reason: str) -> dict[str, Any]:
    return {"arch": model_type, "family": family, "exportable": False, "captured_train": False,
            "captured_eval": False, "equal": False, "reason": reason}  # fmt: skip


def _run_isolated(family: str, model_type: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", family, model_type, str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return _failed(family, model_type, f"timeout after {timeout:.0f} s")
        if not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            return _failed(family, model_type, f"child exit {proc.returncode}: {last}")
        row = json.loads(out.read_text())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The zoo's counts: architectures tried, exportable by torch.export, captured in both modes, equal to eager."""
    return {
        "zoo_total": len(rows),
        "zoo_exportable": sum(r["exportable"] for r in rows),
        "zoo_captured": sum(r["captured_train"] and r["captured_eval"] for r in rows),
        "zoo_equal": sum(r["equal"] for r in rows),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    yes = {True: "yes", False: "no"}
    lines = ["| architecture | family | exportable | captured (train/eval) | equal | reason |", "|---" * 6 + "|"]
    for r in rows:
        captured = f"{yes[r['captured_train']]}/{yes[r['captured_eval']]}"
        reason = r["reason"].replace("|", "/")
        cells = [r["arch"], r["family"], yes[r["exportable"]], captured, yes[r["equal"]], reason]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="causal")
    parser.add_argument("--limit", type=int, default=None, help="first N architectures of each family")
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture")
    parser.add_argument("--budget", type=float, default=4 * 3600.0, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], Path(args.child[2]))
        return
    families = list(FAMILIES) if args.family == "all" else [args.family]
    only = set(filter(None, args.only.split(",")))
    todo = [(f, t) for f in families for t, _ in architectures(f)[: args.limit] if not only or t in only]
    rows = _run_all(todo, args.timeout, args.budget, args.jobs)
    if args.json:
        print(json.dumps({**counts(rows), "rows": rows}, indent=1))
    else:
        print(_table(rows))
        print(json.dumps(counts(rows)))


def _run_all(todo: list[tuple[str, str]], timeout: float, budget: float, jobs: int) -> list[dict[str, Any]]:
    """Run the cases ``jobs`` at a time until done or ``budget`` seconds have passed (the rest are not counted)."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + budget

    def one(case: tuple[str, str]) -> dict[str, Any] | None:
        left = deadline - time.monotonic()
        if left <= 10:
            return None
        row = _run_isolated(case[0], case[1], min(timeout, left))
        print(f"{case[0]:8} {case[1]:28} {row['reason'] or 'equal'}", file=sys.stderr, flush=True)
        return row

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [row for row in pool.map(one, todo) if row is not None]


if __name__ == "__main__":
    main()
