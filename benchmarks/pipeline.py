"""Pipeline training throughput: tensorlink.offload() on a LocalSwarm against torch.distributed.pipelining
(PiPPy) 1F1B on gloo and against a single process, same model, same batch, same optimizer, in one run.

    python benchmarks/pipeline.py            # table with ratios (about 4 minutes on 2 cores)
    python benchmarks/pipeline.py --quick    # smaller run for smoke tests (about 1.5 minutes)
    python benchmarks/pipeline.py --json     # one JSON object (vs_pippy, vs_single_process, ...)

Model: HF ``GPT2LMHeadModel`` from ``GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=8192,
n_positions=128)``, dropout 0, **untied** lm_head (as in the PiPPy research run), the same initial
weights everywhere (seed 0). Batch: 16 sequences of 128 tokens (seed 1), labels = inputs (HF's shifted
causal-LM loss); AdamW(lr=3e-4), torch's other defaults. A step is forward + backward + optimizer step +
zero_grad; the first ``--warmup`` steps are discarded (TensorLink's first one includes capture, job
placement and stage loading), then the median of ``--steps`` steps counts; samples/s = 16 / median.

1. TensorLink: ``LocalSwarm(workers=2, threads_per_worker=1)`` (one validator, two worker processes),
   ``offload(model, network=swarm, workers=2, micro_batches=8, schedule="1f1b", outputs="loss")``, steps
   of ``loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step(); opt.zero_grad()``. The split
   comes from ``model.stages()`` (the validator's cost-balanced partition) and is printed. The step time is
   the driver's wall time from the forward call to the end of ``zero_grad``.
2. PiPPy: ``PipelineStage`` + ``Schedule1F1B`` (8 micro-batches, ``scale_grads`` on, so the gradients are
   those of the batch mean), gloo on 127.0.0.1, two ``torch.multiprocessing.spawn`` ranks with one thread
   each. Stage 0 holds the embeddings and the first k blocks, stage 1 the other blocks, ``ln_f`` and
   ``lm_head``; the loss (HF's shifted cross entropy) runs on stage 1. k is TensorLink's split (rounded to
   the nearest block boundary if TensorLink cut inside a block; the table says so) and, with
   ``--pippy-splits``, the block-count split 4/4 (default in the full run) or any other k, so that the
   effect of cost-balanced partitioning is visible. Step time: per step, the later of the two ranks' ends.
3. Single process, whole batch per step (no micro-batch accumulation, as in the PiPPy research baseline),
   with 2 threads (measured before and after the pipelined runs; the faster median counts) and 1 thread.

Pinning (``--no-pin`` turns it off): the process that runs stage k (TensorLink worker, PiPPy rank) is
pinned to CPU k; the TensorLink driver (this process) and validator are not pinned; the single-process
runs are not pinned. CPU accounting: CPU seconds per timed step of every process involved (TensorLink's
workers and validator from /proc, the driver's own; each PiPPy rank's), which shows where a difference in
wall time comes from even on a loaded machine. Correctness in passing: TensorLink's loss at step 1 (initial
weights) must equal the single process's on the same batch within 1e-4 (PiPPy's is printed too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

BATCH, SEQ, MICRO_BATCHES, LR = 16, 128, 8, 3e-4
N_LAYER, N_EMBD, N_HEAD, VOCAB = 8, 256, 4, 8192
LOSS_TOLERANCE = 1e-4


@dataclass
class Plan:
    warmup: int  # discarded steps (TensorLink: the first includes set-up)
    steps: int  # timed steps per configuration
    pippy_splits: list[str]  # "tensorlink" and/or block counts of stage 0
    single_1t: bool


FULL = Plan(warmup=2, steps=12, pippy_splits=["tensorlink", "4", "5"], single_1t=True)
QUICK = Plan(warmup=1, steps=3, pippy_splits=["tensorlink"], single_1t=False)


@dataclass
class Run:
    name: str
    times: list[float]  # timed step durations, s
    losses: list[float] = field(default_factory=list)  # every step, warm-up included
    cpu_per_step: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds per timed step

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def samples_s(self) -> float:
        return BATCH / self.median_s


# --- shared helpers ----------------------------------------------------------------------------------------


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("tensorlink").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def make_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        vocab_size=VOCAB,
        n_positions=SEQ,
        use_cache=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.train()
    assert model.lm_head.weight is not model.transformer.wte.weight, "the benchmark uses an untied lm_head"
    return model


def make_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def pin_process(pid: int, cpu: int | None) -> None:
    """Pin every thread of process ``pid`` (and so every thread it starts later) to one CPU."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


def machine() -> str:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()} {model}, {os.cpu_count()} CPUs".strip()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return "?"


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: position t predicts token t+1, mean over the B x (T-1) predictions."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def blocks_of(params: list[str]) -> set[int]:
    return {int(p.split(".")[2]) for p in params if p.startswith("transformer.h.")}


# --- 3. single process -------------------------------------------------------------------------------------


def run_single(threads: int, plan: Plan, name: str) -> Run:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        x = make_batch()
        run = Run(name, [])
        for i in range(plan.warmup + plan.steps):
            start = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            took = time.perf_counter() - start
            run.losses.append(loss.item())
            if i >= plan.warmup:
                run.times.append(took)
        return run
    finally:
        torch.set_num_threads(before)


# --- 1. TensorLink -----------------------------------------------------------------------------------------


@dataclass
class TensorLinkRun(Run):
    stages: list[dict[str, Any]] = field(default_factory=list)
    setup_s: float = 0.0  # swarm start, not timed
    first_step_s: float = 0.0  # capture, job placement, stage loading and one step
    phases: dict[str, float] = field(default_factory=dict)  # median seconds per phase of a timed step


def run_tensorlink(plan: Plan, pin: bool, log_dir: Path | None) -> TensorLinkRun:
    import tensorlink

    torch.set_num_threads(1)  # the driver only splits and joins micro-batches
    model = make_model()
    x = make_batch()
    start = time.perf_counter()
    with tensorlink.LocalSwarm(workers=2, threads_per_worker=1, log_dir=log_dir) as swarm:
        setup_s = time.perf_counter() - start
        offloaded = tensorlink.offload(
            model, network=swarm, workers=2, micro_batches=MICRO_BATCHES, schedule="1f1b", outputs="loss"
        )
        try:
            opt = offloaded.optimizer(torch.optim.AdamW, lr=LR)
            run = TensorLinkRun("TensorLink", [], setup_s=setup_s)
            phases: dict[str, list[float]] = {"forward (whole 1F1B)": [], "backward (commit)": [],
                                               "opt.step": [], "zero_grad": []}  # fmt: skip
            for i in range(plan.warmup + plan.steps):
                t0 = time.perf_counter()
                loss = offloaded(input_ids=x, labels=x).loss
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                opt.zero_grad()
                t4 = time.perf_counter()
                run.losses.append(loss.detach().item())
                if i == 0:
                    run.first_step_s = t4 - t0
                    run.stages = offloaded.stages()
                    pids_by_peer = {w.peer_id: w.proc.pid for w in swarm.workers}
                    if pin:
                        for stage in run.stages:
                            if stage["where"] in pids_by_peer:
                                pin_process(pids_by_peer[stage["where"]], stage["stage"] % (os.cpu_count() or 1))
                if i == plan.warmup - 1:
                    procs = {f"stage {st['stage']} worker": pids_by_peer[st["where"]] for st in run.stages
                             if st["where"] in pids_by_peer}  # fmt: skip
                    procs["validator"] = swarm.validators[0].proc.pid
                    cpu_before = {name: cpu_seconds(pid) for name, pid in procs.items()}
                    cpu_before["driver (this process)"] = time.process_time()
                if i >= plan.warmup:
                    run.times.append(t4 - t0)
                    for key, took in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        phases[key].append(took)
            cpu_after = {name: cpu_seconds(pid) for name, pid in procs.items()}
            cpu_after["driver (this process)"] = time.process_time()
            run.cpu_per_step = {name: (cpu_after[name] - cpu_before[name]) / plan.steps for name in cpu_before}
            run.phases = {k: statistics.median(v) for k, v in phases.items()}
            return run
        finally:
            offloaded.close()


# --- 2. PiPPy ----------------------------------------------------------------------------------------------


class FirstStage(torch.nn.Module):
    """Embeddings and blocks [0, k) of the model."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.wte = model.transformer.wte
        self.wpe = model.transformer.wpe
        self.drop = model.transformer.drop
        self.blocks = torch.nn.ModuleList(model.transformer.h[:k])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class LastStage(torch.nn.Module):
    """Blocks [k, n_layer), the final LayerNorm and the LM head."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(model.transformer.h[k:])
        self.ln_f = model.transformer.ln_f
        self.lm_head = model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm_head(self.ln_f(hidden))


def _pippy_rank(rank: int, k: int, plan: Plan, port: int, pin: bool, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    quiet()
    torch.set_num_threads(1)
    if pin:
        pin_process(os.getpid(), rank % (os.cpu_count() or 1))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = make_model()
        module = FirstStage(model, k) if rank == 0 else LastStage(model, k)
        del model
        stage = PipelineStage(module, rank, 2, torch.device("cpu"))
        schedule = Schedule1F1B(stage, MICRO_BATCHES, loss_fn=lm_loss)
        opt = torch.optim.AdamW(module.parameters(), lr=LR)
        x = make_batch()
        ends, cpu, losses = [], [], []
        dist.barrier()
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        for _ in range(plan.warmup + plan.steps):
            if rank == 0:
                schedule.step(x)
            else:
                mb_losses: list[torch.Tensor] = []
                schedule.step(target=x, losses=mb_losses)
                losses.append(torch.stack(mb_losses).mean().item())
            opt.step()
            opt.zero_grad()
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"ends": ends, "cpu": cpu, "losses": losses}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_pippy(k: int, plan: Plan, pin: bool, name: str) -> Run:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tensorlink-bench-pippy-") as out_dir:
        mp.spawn(_pippy_rank, args=(k, plan, port, pin, out_dir), nprocs=2, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    ends = [max(r["ends"][i] for r in ranks) for i in range(len(ranks[0]["ends"]))]
    durations = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    cpu = {f"stage {r} rank": (ranks[r]["cpu"][-1] - ranks[r]["cpu"][plan.warmup]) / plan.steps for r in range(2)}
    return Run(name, durations[plan.warmup :], ranks[1]["losses"], cpu)


# --- the report --------------------------------------------------------------------------------------------


def split_of(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """TensorLink's split by blocks; k = blocks on stage 0, at a block boundary (rounded if needed)."""
    if len(stages) != 2:
        raise SystemExit(f"expected 2 stages from TensorLink, got {len(stages)}")
    first, last = (set(s["params"]) for s in stages)
    shared = blocks_of(list(first)) & blocks_of(list(last))
    if not {"transformer.wte.weight", "transformer.wpe.weight"} <= first or not {"lm_head.weight"} <= last:
        raise SystemExit("the PiPPy stages assume embeddings on stage 0 and the LM head on stage 1")
    k = len(blocks_of(list(first)) - shared)
    note = "at a block boundary"
    if shared:  # TensorLink cut inside a block: the block goes where most of its weights (and FLOPs) are
        (b,) = shared
        numel = {name: p.numel() for name, p in make_model().named_parameters()}
        held = [sum(numel[p] for p in s["params"] if p.startswith(f"transformer.h.{b}.")) for s in stages]
        if held[0] >= held[1]:
            k += 1
        note = (
            f"TensorLink cut inside block {b} ({held[0]:,} of its weights on stage 0, {held[1]:,} on stage 1); "
            f"PiPPy uses the nearest block boundary, {k}/{N_LAYER - k}"
        )
    return {
        "blocks": [sorted(blocks_of(s["params"])) for s in stages],
        "parameters": [s["parameters"] for s in stages],
        "k": k,
        "note": note,
        "text": " | ".join(describe(s["params"]) for s in stages),
    }


def describe(params: list[str]) -> str:
    parts = []
    if any(p.startswith("transformer.wte") or p.startswith("transformer.wpe") for p in params):
        parts.append("embeddings")
    blocks = sorted(blocks_of(params))
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if any(p.startswith("transformer.ln_f") for p in params):
        parts.append("ln_f")
    if "lm_head.weight" in params:
        parts.append("lm_head")
    return " + ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="fewer steps, PiPPy on TensorLink's split only")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (median counts)")
    parser.add_argument("--warmup", type=int, help="discarded steps per configuration (at least 1)")
    parser.add_argument(
        "--pippy-splits",
        help='comma-separated PiPPy splits: "tensorlink" (TensorLink\'s) and/or blocks on stage 0, e.g. "4"',
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin stage processes to CPUs")
    parser.add_argument("--log-dir", type=Path, help="keep the LocalSwarm node logs here")
    args = parser.parse_args()
    quiet()
    plan = QUICK if args.quick else FULL
    if args.steps is not None:
        plan.steps = max(1, args.steps)
    if args.warmup is not None:
        plan.warmup = max(1, args.warmup)
    if args.pippy_splits:
        plan.pippy_splits = [s.strip() for s in args.pippy_splits.split(",") if s.strip()]
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    console = Console(stderr=args.json, width=None if sys.stdout.isatty() else 140)
    began = time.perf_counter()
    load_before = load_average()

    def say(text: str) -> None:
        if not args.json:
            console.print(f"[dim]{time.perf_counter() - began:6.1f} s[/] {text}")

    say("single process, 2 threads")
    single2 = [run_single(2, plan, "single process, 2 threads")]
    say(f"  {single2[0].samples_s:.2f} samples/s; TensorLink (LocalSwarm start, capture, steps)")
    tl = run_tensorlink(plan, pin, args.log_dir)
    split = split_of(tl.stages)
    say(f"  {tl.samples_s:.2f} samples/s; split {split['text']}")
    pippy: dict[str, Run] = {}
    ks: dict[str, int] = {}
    for spec in plan.pippy_splits:
        k = split["k"] if spec == "tensorlink" else int(spec)
        if not 0 < k < N_LAYER:
            raise SystemExit(f"--pippy-splits: {k} blocks on stage 0 leaves a stage without blocks")
        label = f"{k}/{N_LAYER - k}"
        if k in ks.values():
            continue  # already measured (a block split equal to TensorLink's)
        key = "tensorlink" if spec == "tensorlink" else label
        say(f"PiPPy 1F1B, {label} blocks")
        pippy[key] = run_pippy(k, plan, pin, f"PiPPy 1F1B (gloo), {label} blocks")
        ks[key] = k
        say(f"  {pippy[key].samples_s:.2f} samples/s")
    single1 = None
    if plan.single_1t:
        say("single process, 1 thread")
        single1 = run_single(1, plan, "single process, 1 thread")
        say(f"  {single1.samples_s:.2f} samples/s")
    say("single process, 2 threads (again)")
    single2.append(run_single(2, plan, "single process, 2 threads"))
    say(f"  {single2[1].samples_s:.2f} samples/s")
    best2 = max(single2, key=lambda r: r.samples_s)

    reference = pippy.get("tensorlink") or next(iter(pippy.values()), None)
    loss_tl, loss_single = tl.losses[0], single2[0].losses[0]
    loss_diff = abs(loss_tl - loss_single)
    result: dict[str, Any] = {
        "machine": machine(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "model": f"GPT-2 n_layer={N_LAYER} n_embd={N_EMBD} n_head={N_HEAD} vocab={VOCAB} untied lm_head, dropout 0",
        "batch": BATCH,
        "seq": SEQ,
        "micro_batches": MICRO_BATCHES,
        "warmup_steps": plan.warmup,
        "timed_steps": plan.steps,
        "pinned": pin,
        "split": {k: v for k, v in split.items() if k != "text"} | {"text": split["text"]},
        "tensorlink_samples_s": round(tl.samples_s, 3),
        "tensorlink_step_ms": round(tl.median_s * 1e3, 1),
        "tensorlink_phases_ms": {k: round(v * 1e3, 1) for k, v in tl.phases.items()},
        "tensorlink_cpu_s_per_step": {k: round(v, 3) for k, v in tl.cpu_per_step.items()},
        "pippy_cpu_s_per_step": {key: {k: round(v, 3) for k, v in r.cpu_per_step.items()} for key, r in pippy.items()},
        "tensorlink_setup_s": round(tl.setup_s, 1),
        "tensorlink_first_step_s": round(tl.first_step_s, 1),
        "pippy_samples_s": {key: round(r.samples_s, 3) for key, r in pippy.items()},
        "pippy_k": ks,
        "single_2t_samples_s": round(best2.samples_s, 3),
        "single_2t_runs_samples_s": [round(r.samples_s, 3) for r in single2],
        "single_1t_samples_s": round(single1.samples_s, 3) if single1 else None,
        "vs_pippy": round(tl.samples_s / reference.samples_s, 3) if reference else None,
        "vs_pippy_block_split": {
            key: round(tl.samples_s / r.samples_s, 3) for key, r in pippy.items() if key != "tensorlink"
        },
        "vs_single_process": round(tl.samples_s / best2.samples_s, 3),
        "vs_single_process_1t": round(tl.samples_s / single1.samples_s, 3) if single1 else None,
        "loss_step1_tensorlink": loss_tl,
        "loss_step1_single": loss_single,
        "loss_step1_pippy": {key: r.losses[0] for key, r in pippy.items()},
        "loss_step1_diff": loss_diff,
        "loss_match": loss_diff <= LOSS_TOLERANCE,
        "loss_last": {"tensorlink": tl.losses[-1], "single": single2[0].losses[-1]}
        | {f"pippy_{key}": r.losses[-1] for key, r in pippy.items()},
        "step_times_s": {"tensorlink": [round(t, 3) for t in tl.times]}
        | {f"pippy_{key}": [round(t, 3) for t in r.times] for key, r in pippy.items()},
        "total_s": round(time.perf_counter() - began, 1),
    }
    if args.json:
        print(json.dumps(result))
        return

    table = Table(
        title=f"Pipeline training, GPT-2 8x256 (vocab {VOCAB}, untied), batch {BATCH}x{SEQ}, "
        f"{MICRO_BATCHES} micro-batches, AdamW; median of {plan.steps} steps"
    )
    table.add_column("configuration")
    table.add_column("split (stage 0 | stage 1)")
    table.add_column("samples/s", justify="right")
    table.add_column("step ms", justify="right")
    table.add_column("TensorLink / this", justify="right")
    table.add_row("TensorLink offload, 2 workers, 1F1B", split["text"], f"{tl.samples_s:.2f}",
                  f"{tl.median_s * 1e3:.0f}", "")  # fmt: skip
    for key, r in pippy.items():
        k = ks[key]
        where = f"{k}/{N_LAYER - k} blocks" + (" (TensorLink's)" if key == "tensorlink" else " (block count)")
        table.add_row(r.name, where, f"{r.samples_s:.2f}", f"{r.median_s * 1e3:.0f}",
                      f"{tl.samples_s / r.samples_s:.3f}")  # fmt: skip
    for r in single2:
        table.add_row(r.name, "", f"{r.samples_s:.2f}", f"{r.median_s * 1e3:.0f}", f"{tl.samples_s / r.samples_s:.3f}")
    if single1:
        table.add_row(single1.name, "", f"{single1.samples_s:.2f}", f"{single1.median_s * 1e3:.0f}",
                      f"{tl.samples_s / single1.samples_s:.3f}")  # fmt: skip
    console.print(table)
    if reference:
        mark = "[green]met[/]" if tl.samples_s >= reference.samples_s else "[red]missed[/]"
        console.print(f"vs_pippy = {result['vs_pippy']:.3f} (target >= 1.0) {mark}")
    console.print(f"vs_single_process = {result['vs_single_process']:.3f} (2 threads, the faster of 2 runs)")
    console.print(f"split: {split['text']} ({split['parameters'][0]:,} / {split['parameters'][1]:,} parameters; "
                  f"{split['note']})")  # fmt: skip
    mark = "[green]ok[/]" if result["loss_match"] else "[red]MISMATCH[/]"
    pippy_loss = ", ".join(f"PiPPy {key} {r.losses[0]:.6f}" for key, r in pippy.items())
    console.print(f"loss at step 1: TensorLink {loss_tl:.6f}, single process {loss_single:.6f}, "
                  f"|diff| {loss_diff:.2e} (tolerance {LOSS_TOLERANCE:g}) {mark}; {pippy_loss}")  # fmt: skip
    phases = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in tl.phases.items())
    console.print(f"TensorLink step phases, median ms: {phases}")
    cpu = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in tl.cpu_per_step.items())
    console.print(f"CPU ms per step, TensorLink: {cpu}")
    for key, r in pippy.items():
        cpu = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in r.cpu_per_step.items())
        console.print(f"CPU ms per step, PiPPy {ks[key]}/{N_LAYER - ks[key]}: {cpu}")
    console.print(f"TensorLink set-up: swarm {tl.setup_s:.1f} s, first step (capture, placement, load) "
                  f"{tl.first_step_s:.1f} s; load average {load_before} -> {result['load_average_after']}; "
                  f"total {result['total_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
