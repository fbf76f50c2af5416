"""Inference latency: greedy decoding of a GPT-2 offloaded over 2 workers against the same model here, the
overhead of a remote call against hivemind's RemoteExpert, and the zoo's counts, in one run.

    python benchmarks/inference.py            # table with ratios (about 2 minutes on 2 cores)
    python benchmarks/inference.py --quick    # smaller run for smoke tests (about 1 minute)
    python benchmarks/inference.py --json     # one JSON object (per_hop_overhead_ms, remote_call_overhead_ms, ...)
    python benchmarks/inference.py --zoo      # also run benchmarks/zoo.py for its counts (hours)

Set-up: one ``LocalSwarm(workers=2, threads_per_worker=1)`` (one validator, two worker processes on 127.0.0.1);
this process (the driver) runs torch with one thread too, so a stage's compute costs the same here and there.

1. Decoding. HF ``GPT2LMHeadModel`` from ``GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=8192,
   n_positions=128)``, dropout 0, seed 0; a prompt of ``PROMPT`` tokens (seed 1). Local: the model's own
   ``generate(max_new_tokens=N, do_sample=False)`` (greedy, HF's KV cache). Offloaded: ``tensorlink.offload(copy,
   network=swarm, workers=2)``, then the same ``generate`` call (the first one opens the pipeline)
   (greedy; each stage keeps the KV cache of its layers). After one warm-up generate each, ``--repeats`` rounds
   alternate local and offloaded (a noisy machine slows both alike); ms per token = a generate's wall time / N
   (the prompt's step included: one step in N), the median of the rounds counts. Both must produce the same
   tokens (checked). CPU ms per token (this process, plus the workers' from /proc when offloaded) is printed
   next to the wall time: on a busy machine the wall time grows with every wait for a core, the CPU time much
   less, so it shows how much work the pipeline adds. A decode step crosses ``stages + 1`` hops (owner ->
   stage 0 -> ... -> owner), so

       per-hop overhead = (offloaded ms/token - local ms/token) / hops          (target <= 0.5 ms on loopback)

2. Remote call. hivemind's ffn expert block (``FeedforwardBlock``, hidden 1024: Linear 1024->4096, gelu,
   Linear 4096->1024, residual LayerNorm; the same definition here), offloaded to 1 worker, called forward on a
   (1, 1024) float32 input under ``torch.no_grad()``; local: the same block here. ``--calls`` calls alternate
   local and remote after a warm-up; remote_call_overhead_ms = median remote - median local (target <= 1 ms).
   hivemind: benchmarks/hivemind_remote_expert.py, run with the hivemind virtual environment's python
   (``--hivemind-python``, default ``.venv-hivemind/bin/python``, which ``make bench`` creates with
   hivemind==1.1.12: hivemind is never installed into .venv), measures RemoteExpert the same way against a
   hivemind Server on 127.0.0.1, once before and once after TensorLink's calls (the run with less overhead
   counts: a busy machine slows one of them, and hivemind gets the benefit of the doubt).
   remote_call_vs_hivemind = TensorLink's overhead / hivemind's (below 1: less overhead than hivemind). Without
   that environment the hivemind figures are null and the reason is given.

3. Zoo counts (``zoo_captured``, ``zoo_exportable``): from ``--zoo-json`` (a saved ``benchmarks/zoo.py --json``
   output) or, with ``--zoo``, by running benchmarks/zoo.py (hours on 2 cores); else null ("not run").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pipeline import cpu_seconds
from rich.console import Console
from rich.table import Table

N_LAYER, N_EMBD, N_HEAD, VOCAB, POSITIONS = 8, 256, 4, 8192, 128
PROMPT = 8
HIDDEN = 1024  # the remote call's block, as hivemind's benchmarks use
PER_HOP_TARGET_MS = 0.5
REMOTE_CALL_TARGET_MS = 1.0
ROOT = Path(__file__).resolve().parent.parent
HIVEMIND_SCRIPT = Path(__file__).resolve().parent / "hivemind_remote_expert.py"
ZOO_SCRIPT = Path(__file__).resolve().parent / "zoo.py"
HIVEMIND_TIMEOUT_S = 600.0
ZOO_TIMEOUT_S = 6 * 3600.0


@dataclass
class Plan:
    tokens: int  # new tokens per generate
    repeats: int  # timed generate rounds (local and offloaded alternate)
    calls: int  # timed remote calls (local and remote alternate)
    warmup_calls: int


FULL = Plan(tokens=64, repeats=7, calls=200, warmup_calls=20)
QUICK = Plan(tokens=32, repeats=3, calls=60, warmup_calls=10)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("tensorlink").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def machine() -> str:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()} {model}, {os.cpu_count()} CPUs".strip()


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return "?"


def make_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # eos_token_id stays GPT-2's 50256, outside this vocabulary: every generate makes all its tokens
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


class FeedforwardBlock(torch.nn.Module):
    """hivemind's "ffn" expert (hivemind/moe/server/layers/common.py), so both remote calls run the same block."""

    def __init__(self, hid_dim: int) -> None:
        super().__init__()
        self.ffn = torch.nn.Linear(hid_dim, 4 * hid_dim)
        self.ffn_output = torch.nn.Linear(4 * hid_dim, hid_dim)
        self.layer_norm = torch.nn.LayerNorm(hid_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.ffn(x)
        hidden = 0.5 * hidden * (1.0 + torch.tanh(hidden * 0.7978845608 * (1.0 + 0.044715 * hidden * hidden)))
        return F.layer_norm(x + self.ffn_output(hidden), (x.shape[-1],), self.layer_norm.weight,
                            self.layer_norm.bias, 1e-12)  # fmt: skip


# --- 1. decoding -------------------------------------------------------------------------------------------


@dataclass
class Decode:
    local_ms: list[float]  # ms per token, per round
    offloaded_ms: list[float]
    local_cpu_ms: list[float]  # CPU ms per token: this process (local), this process and the workers (offloaded)
    offloaded_cpu_ms: list[float]
    hops: int
    stages: list[str]
    tokens_equal: bool
    setup_s: float  # offload + first forward + first generate (capture of the cached program, loads)


def run_decode(swarm: Any, plan: Plan) -> Decode:
    """Wall and CPU time per token; CPU time tells a busy machine (whose waits inflate wall time) apart from
    work the pipeline adds."""
    import tensorlink

    model = make_gpt2().eval()
    remote_copy = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))

    def local() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model.generate(ids, max_new_tokens=plan.tokens, do_sample=False, pad_token_id=0)  # type: ignore[operator]
        return out

    def remote() -> torch.Tensor:
        return offloaded.generate(ids, max_new_tokens=plan.tokens, do_sample=False, pad_token_id=0)

    started = time.perf_counter()
    offloaded = tensorlink.offload(remote_copy, network=swarm, workers=2)
    try:
        first = remote()  # generate() opens the pipeline itself
        setup_s = time.perf_counter() - started
        reference = local()
        pids = [w.proc.pid for w in swarm.workers]
        decode = Decode([], [], [], [], len(offloaded.stages()) + 1, [s["where"] for s in offloaded.stages()],
                        torch.equal(first, reference), setup_s)  # fmt: skip
        for _ in range(plan.repeats):
            for times, cpu, fn, others in ((decode.local_ms, decode.local_cpu_ms, local, []),
                                           (decode.offloaded_ms, decode.offloaded_cpu_ms, remote, pids)):  # fmt: skip
                cpu_before = time.process_time() + sum(cpu_seconds(p) for p in others)
                start = time.perf_counter()
                out = fn()
                took = time.perf_counter() - start
                cpu_used = time.process_time() + sum(cpu_seconds(p) for p in others) - cpu_before
                generated = out.shape[1] - PROMPT
                assert generated == plan.tokens, f"a generate made {generated} of {plan.tokens} tokens"
                decode.tokens_equal &= torch.equal(out, reference)
                times.append(took * 1e3 / generated)
                cpu.append(cpu_used * 1e3 / generated)
        return decode
    finally:
        offloaded.close()


# --- 2. remote call ----------------------------------------------------------------------------------------


@dataclass
class Call:
    local_ms: list[float]
    remote_ms: list[float]
    max_abs_diff: float

    @property
    def overhead_ms(self) -> float:
        return statistics.median(self.remote_ms) - statistics.median(self.local_ms)


def run_remote_call(swarm: Any, plan: Plan) -> Call:
    import tensorlink

    torch.manual_seed(0)
    block = FeedforwardBlock(HIDDEN).eval()
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1))
    offloaded = tensorlink.offload(copy.deepcopy(block).train(), network=swarm, workers=1)
    try:
        with torch.no_grad():
            diff = float((offloaded(x) - block(x)).abs().max())
            call = Call([], [], diff)
            for i in range(plan.warmup_calls + plan.calls):
                for times, fn in ((call.local_ms, block), (call.remote_ms, offloaded)):
                    start = time.perf_counter()
                    fn(x)
                    if i >= plan.warmup_calls:
                        times.append((time.perf_counter() - start) * 1e3)
        return call
    finally:
        offloaded.close()


def run_hivemind(python: Path, plan: Plan) -> dict[str, Any]:
    """hivemind's RemoteExpert measured by benchmarks/hivemind_remote_expert.py under ``python``; on failure,
    {"unavailable": why}."""
    if not python.exists():
        return {"unavailable": f"{python} does not exist (`make bench` creates it with hivemind==1.1.12)"}
    cmd = [str(python), str(HIVEMIND_SCRIPT), "--calls", str(plan.calls), "--warmup", str(plan.warmup_calls)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=HIVEMIND_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"{HIVEMIND_SCRIPT.name} did not finish within {HIVEMIND_TIMEOUT_S:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"unavailable": f"{HIVEMIND_SCRIPT.name} exited with {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- 3. zoo ------------------------------------------------------------------------------------------------


def zoo_counts(run: bool, saved: Path | None) -> dict[str, Any]:
    """The zoo's counts from a saved `zoo.py --json` output, or by running it with ``run``; else null."""
    missing = {"zoo_captured": None, "zoo_exportable": None}
    if saved is not None:
        data = json.loads(saved.read_text())
        return {key: data.get(key) for key in ("zoo_total", "zoo_exportable", "zoo_captured", "zoo_equal")} | {
            "zoo_source": str(saved)
        }
    if not ZOO_SCRIPT.exists():
        return missing | {"zoo_source": "benchmarks/zoo.py does not exist"}
    if not run:
        return missing | {"zoo_source": "not run (--zoo runs benchmarks/zoo.py, hours on 2 cores; --zoo-json reads)"}
    done = subprocess.run(
        [sys.executable, str(ZOO_SCRIPT), "--json"], capture_output=True, text=True, timeout=ZOO_TIMEOUT_S, cwd=ROOT
    )
    if done.returncode != 0:
        return missing | {"zoo_source": f"zoo.py exited with {done.returncode}: {done.stderr.strip()[-300:]}"}
    data = json.loads(done.stdout)
    return {key: data.get(key) for key in ("zoo_total", "zoo_exportable", "zoo_captured", "zoo_equal")} | {
        "zoo_source": "benchmarks/zoo.py --json (this run)"
    }


# --- report ------------------------------------------------------------------------------------------------


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summary(decode: Decode, call: Call, hivemind: dict[str, Any], zoo: dict[str, Any], plan: Plan) -> dict[str, Any]:
    local_ms, offloaded_ms = statistics.median(decode.local_ms), statistics.median(decode.offloaded_ms)
    per_hop = (offloaded_ms - local_ms) / decode.hops
    hm_overhead = hivemind.get("overhead_ms")
    return {
        "machine": machine(),
        "torch": torch.__version__,
        "model": f"GPT-2 n_layer={N_LAYER} n_embd={N_EMBD} n_head={N_HEAD} vocab={VOCAB}, dropout 0",
        "prompt_tokens": PROMPT,
        "new_tokens": plan.tokens,
        "repeats": plan.repeats,
        "local_ms_per_token": rounded(local_ms),
        "offloaded_ms_per_token": rounded(offloaded_ms),
        "offloaded_vs_local": rounded(offloaded_ms / local_ms),
        "local_cpu_ms_per_token": rounded(statistics.median(decode.local_cpu_ms)),
        "offloaded_cpu_ms_per_token": rounded(statistics.median(decode.offloaded_cpu_ms)),
        "hops": decode.hops,
        "per_hop_overhead_ms": rounded(per_hop),
        "per_hop_target_met": per_hop <= PER_HOP_TARGET_MS,
        "tokens_equal": decode.tokens_equal,
        "decode_setup_s": rounded(decode.setup_s, 1),
        "local_ms_per_token_rounds": [rounded(t) for t in decode.local_ms],
        "offloaded_ms_per_token_rounds": [rounded(t) for t in decode.offloaded_ms],
        "remote_call_calls": plan.calls,
        "remote_call_local_ms": rounded(statistics.median(call.local_ms)),
        "remote_call_remote_ms": rounded(statistics.median(call.remote_ms)),
        "remote_call_overhead_ms": rounded(call.overhead_ms),
        "remote_call_target_met": call.overhead_ms <= REMOTE_CALL_TARGET_MS,
        "remote_call_max_abs_diff": call.max_abs_diff,
        "hivemind_remote_call_overhead_ms": rounded(hm_overhead),
        "hivemind_remote_ms": rounded(hivemind.get("remote_ms")),
        "hivemind_local_ms": rounded(hivemind.get("local_ms")),
        "hivemind_version": hivemind.get("hivemind_version"),
        "hivemind_unavailable": hivemind.get("unavailable"),
        "remote_call_vs_hivemind": rounded(call.overhead_ms / hm_overhead) if hm_overhead else None,
        **zoo,
    }


def print_table(console: Console, result: dict[str, Any]) -> None:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    table = Table(title=f"GPT-2 {N_LAYER}x{N_EMBD} greedy decoding, {result['new_tokens']} new tokens after a "
                  f"{PROMPT}-token prompt, median of {result['repeats']} rounds")  # fmt: skip
    table.add_column("configuration")
    table.add_column("ms / token", justify="right")
    table.add_column("vs local", justify="right")
    table.add_column("CPU ms / token", justify="right")
    table.add_row("local (HF generate, 1 thread)", ms(result["local_ms_per_token"]), "1.00",
                  ms(result["local_cpu_ms_per_token"]))  # fmt: skip
    table.add_row(f"offloaded over 2 workers ({result['hops']} hops)", ms(result["offloaded_ms_per_token"]),
                  f"{result['offloaded_vs_local']:.2f}", ms(result["offloaded_cpu_ms_per_token"]))  # fmt: skip
    console.print(table)
    mark = "[green]met[/]" if result["per_hop_target_met"] else "[red]missed[/]"
    console.print(f"per_hop_overhead_ms = {result['per_hop_overhead_ms']:.3f} (target <= {PER_HOP_TARGET_MS}) {mark}; "
                  f"same tokens as local: {result['tokens_equal']}")  # fmt: skip

    calls = Table(title=f"Remote call, FFN {HIDDEN} at batch 1, forward, median of {result['remote_call_calls']} calls")
    calls.add_column("system")
    calls.add_column("local ms", justify="right")
    calls.add_column("remote ms", justify="right")
    calls.add_column("overhead ms", justify="right")
    calls.add_row("TensorLink offload (1 worker)", ms(result["remote_call_local_ms"]),
                  ms(result["remote_call_remote_ms"]), ms(result["remote_call_overhead_ms"]))  # fmt: skip
    if result["hivemind_unavailable"]:
        calls.add_row("hivemind RemoteExpert", "n/a", "n/a", "n/a")
    else:
        calls.add_row(f"hivemind {result['hivemind_version']} RemoteExpert", ms(result["hivemind_local_ms"]),
                      ms(result["hivemind_remote_ms"]), ms(result["hivemind_remote_call_overhead_ms"]))  # fmt: skip
    console.print(calls)
    mark = "[green]met[/]" if result["remote_call_target_met"] else "[red]missed[/]"
    console.print(f"remote_call_overhead_ms = {result['remote_call_overhead_ms']:.3f} "
                  f"(target <= {REMOTE_CALL_TARGET_MS}) {mark}")  # fmt: skip
    if result["hivemind_unavailable"]:
        console.print(f"remote_call_vs_hivemind: n/a, hivemind unavailable: {result['hivemind_unavailable']}")
    else:
        console.print(f"remote_call_vs_hivemind = {result['remote_call_vs_hivemind']:.3f} (overhead ratio; < 1: "
                      "less than hivemind's)")  # fmt: skip
    console.print(f"zoo: captured {result['zoo_captured']}, exportable {result['zoo_exportable']} "
                  f"({result['zoo_source']})")  # fmt: skip
    console.print(f"set-up of the offloaded decoding (offload, first forward, first generate) "
                  f"{result['decode_setup_s']:.1f} s; load average {result['load_average_before']} -> "
                  f"{result['load_average_after']}; total {result['total_s']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, rounds and calls")
    parser.add_argument("--tokens", type=int, help="new tokens per generate")
    parser.add_argument("--repeats", type=int, help="timed generate rounds (median counts)")
    parser.add_argument("--calls", type=int, help="timed remote calls (median counts)")
    parser.add_argument("--hivemind-python", type=Path, default=ROOT / ".venv-hivemind" / "bin" / "python",
                        help="python of the virtual environment with hivemind (default: .venv-hivemind)")  # fmt: skip
    parser.add_argument("--no-hivemind", action="store_true", help="skip hivemind's RemoteExpert")
    parser.add_argument("--zoo", action="store_true", help="run benchmarks/zoo.py for its counts (hours)")
    parser.add_argument("--zoo-json", type=Path, help="read the zoo's counts from a saved `zoo.py --json` output")
    parser.add_argument("--log-dir", type=Path, help="keep the LocalSwarm node logs here")
    args = parser.parse_args()
    quiet()
    plan = QUICK if args.quick else FULL
    plan.tokens = args.tokens or plan.tokens
    plan.repeats = args.repeats or plan.repeats
    plan.calls = args.calls or plan.calls
    if PROMPT + plan.tokens > POSITIONS:
        raise SystemExit(f"--tokens: at most {POSITIONS - PROMPT} (the model has {POSITIONS} positions)")
    console = Console(stderr=args.json, width=None if sys.stdout.isatty() else 140)
    began = time.perf_counter()
    load_before = load_average()

    def say(text: str) -> None:
        if not args.json:
            console.print(f"[dim]{time.perf_counter() - began:6.1f} s[/] {text}")

    import tensorlink

    torch.set_num_threads(1)
    hivemind: list[dict[str, Any]] = [{"unavailable": "skipped (--no-hivemind)"}]
    if not args.no_hivemind:  # before and after TensorLink's calls: a busy machine slows one run, not both
        say(f"hivemind RemoteExpert ({args.hivemind_python})")
        hivemind = [timed(say, lambda: run_hivemind(args.hivemind_python, plan))]
    say("LocalSwarm: 1 validator, 2 workers")
    with tensorlink.LocalSwarm(workers=2, threads_per_worker=1, log_dir=args.log_dir) as swarm:
        say("decoding: local and offloaded over 2 workers")
        decode = timed(say, lambda: run_decode(swarm, plan))
        say("remote call: FFN on 1 worker")
        call = timed(say, lambda: run_remote_call(swarm, plan))
    if not args.no_hivemind and "unavailable" not in hivemind[0]:
        say("hivemind RemoteExpert, again")
        hivemind.append(timed(say, lambda: run_hivemind(args.hivemind_python, plan)))
    zoo = zoo_counts(args.zoo, args.zoo_json)
    best = min(hivemind, key=lambda h: h.get("overhead_ms", math.inf))  # hivemind's better run counts
    result = summary(decode, call, best, zoo, plan)
    result["hivemind_overhead_ms_runs"] = [rounded(h.get("overhead_ms")) for h in hivemind]
    result |= {"load_average_before": load_before, "load_average_after": load_average(),
               "total_s": round(time.perf_counter() - began, 1)}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print_table(console, result)


def timed(say: Callable[[str], None], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    say(f"  done in {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    main()
