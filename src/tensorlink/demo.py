"""`python -m tensorlink.demo`: the whole story of TensorLink on one machine, in about four minutes.

It starts a LocalSwarm (a validator and two workers, each its own ``python -m tensorlink.node``
process on 127.0.0.1), builds a small byte-level GPT-2 from a config (nothing is downloaded), offloads
it with ``tensorlink.offload``, trains it on the corpus shipped in ``tensorlink.data`` with a progress
bar, generates a sample on the workers, and shows where each stage ran and what it held.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tensorlink.data import CORPUS, corpus_text

END = 256  # the end-of-text token: ids 0..255 are the bytes themselves
VOCAB = END + 1
CONTEXT = 128  # the model's position table: the longest sequence it trains on or generates
DEFAULT_PROMPT = "The first stage "

INTRO = """\
A small GPT-2 is about to train across separate processes that find each other the way peers on the \
internet do. A [bold]validator[/] and [bold]{workers} workers[/] start on this machine, each a \
`python -m tensorlink.node` process with its own key, talking over encrypted libp2p connections. \
[bold]tensorlink.offload(model)[/] captures the model as a graph of allow-listed operators (no code \
travels), the validator splits it into stages by measured cost and assigns them to workers, and \
activations then flow from worker to worker on encrypted data-plane channels. This process only sends \
text in and gets the loss back, then asks the workers to write a sample with the weights they trained."""


# -- the byte-level tokenizer ---------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    """Text to token ids: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    """Token ids to text: bytes back to UTF-8; the end token (and anything outside a byte) is dropped."""
    return bytes(i for i in ids if 0 <= i < END).decode("utf-8", errors="replace")


# -- options --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tensorlink.demo",
        description=(
            "Train a small GPT-2 across a local TensorLink swarm and watch it learn. Starts a validator "
            "and worker node processes on 127.0.0.1, builds a byte-level GPT-2 from a config (no downloads), "
            "offloads it with tensorlink.offload(), trains it on a short English text shipped with the "
            "package while a progress bar shows the loss, tokens/s and which worker holds which stage, "
            "then generates a sample on the workers and shows where each stage ran. Ctrl-C stops it and "
            "every process it started."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (optimizer updates)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=200.0,
        help="seconds of training at most: on a slow or busy machine training ends early and the learning "
        "rate schedule runs on elapsed time instead of steps (0: no limit)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes to start (one stage each)")
    parser.add_argument(
        "--micro-batches", type=int, default=4, help="micro-batches per step, pipelined through the stages (1F1B)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=CONTEXT, help=f"bytes per sequence (at most {CONTEXT})")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    parser.add_argument(
        "--private",
        action="store_true",
        help="keep the first and the last stage on this machine, so the text and the labels never leave it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the order of the data")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text the sample starts from")
    parser.add_argument(
        "--sample-tokens", type=int, default=100, help=f"bytes to generate (greedy); with the prompt at most {CONTEXT}"
    )
    parser.add_argument("--log-dir", default=None, help="keep the nodes' logs here (default: removed at the end)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.micro_batches < 1 or args.micro_batches > args.batch_size:
        parser.error("--micro-batches must be between 1 and --batch-size")
    if not 8 <= args.seq_len <= CONTEXT:
        parser.error(f"--seq-len must be between 8 and {CONTEXT} (the model's position table)")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    if args.sample_tokens < 1:
        parser.error("--sample-tokens must be at least 1")
    if len(encode(args.prompt)) + args.sample_tokens > CONTEXT:
        parser.error(
            f"--prompt ({len(encode(args.prompt))} bytes) and --sample-tokens ({args.sample_tokens}) together exceed "
            f"the model's context of {CONTEXT} positions"
        )
    return args


# -- the model and the data -----------------------------------------------------------------------------


def build_model(seed: int) -> torch.nn.Module:
    """A 4-layer byte-level GPT-2 (~0.9 M parameters) from a config: nothing is downloaded."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # the hf extra; `make demo` installs it
        raise SystemExit(
            f"the demo builds its GPT-2 with transformers, which is not installed ({exc}); run `make demo`, "
            "or: pip install 'tensorlink-p2p[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=END,
        eos_token_id=END,
        use_cache=False,
        # Untied input and output embeddings: measured on this corpus, the tied model sits on the
        # letter-frequency plateau (loss ~2.97) for ~100 steps, the untied one leaves it after ~40.
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(config)


@dataclass
class Corpus:
    train: torch.Tensor
    held_out: torch.Tensor  # [n, seq_len] windows of text the model never trains on
    n_bytes: int

    @classmethod
    def load(cls, seq_len: int, batch: int) -> Corpus:
        text = corpus_text()
        ids = torch.tensor(encode(text), dtype=torch.long)
        cut = int(len(ids) * 0.9)
        train, rest = ids[:cut], ids[cut:]
        n = min(batch, len(rest) // seq_len)
        held_out = rest[: n * seq_len].view(n, seq_len)
        return cls(train, held_out, len(ids))

    def batch(self, size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - seq_len, (size,), generator=gen)
        return torch.stack([self.train[s : s + seq_len] for s in starts.tolist()])


# -- what each stage holds, in words --------------------------------------------------------------------


def _short(name: str) -> str:
    return name.removeprefix("transformer.").removesuffix(".weight").removesuffix(".bias")


def describe_stages(stages: list[dict[str, Any]], model: torch.nn.Module) -> list[str]:
    """Each stage's parameters as layer ranges: 'wte, wpe, h.0–h.1, h.2 up to mlp.c_fc'."""
    named = list(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, p in named:
        aliases.setdefault(id(p), []).append(name)
    alias_of = {name: [a for a in aliases[id(p)] if a != name] for name, p in named}
    blocks: dict[str, set[str]] = {}  # block index -> all its parameter names
    for name, _ in named:
        parts = _short(name).split(".")
        if len(parts) > 2 and parts[0] == "h":
            blocks.setdefault(parts[1], set()).add(name)
    seen: set[str] = set()
    out = []
    for stage in stages:
        params = list(stage["params"])
        items: list[tuple[str, str]] = []  # ("mod", "wte") or ("block", "2"), in order
        tied: list[str] = []
        for name in params:
            short = _short(name)
            parts = short.split(".")
            if name in seen and alias_of.get(name):  # a tied weight: a copy of one held by an earlier stage
                label = f"{_short(alias_of[name][0])} (tied to {short})"
                if label not in tied:
                    tied.append(label)
            elif len(parts) > 2 and parts[0] == "h":
                if not items or items[-1] != ("block", parts[1]):
                    items.append(("block", parts[1]))
            elif ("mod", short) not in items:
                items.append(("mod", short))
        out.append(", ".join(_layer_words(items, params, blocks) + tied) or "(no parameters)")
        seen.update(params)
    return out


def _layer_words(items: list[tuple[str, str]], params: list[str], blocks: dict[str, set[str]]) -> list[str]:
    """Whole blocks in a row become 'h.0–h.3'; a block cut in two says where the cut is."""
    held = set(params)
    words: list[str] = []
    whole: list[str] = []
    for i, (kind, value) in enumerate([*items, ("end", "")]):
        if kind == "block" and blocks[value] <= held:
            whole.append(value)
            continue
        if whole:
            words.append(f"h.{whole[0]}" if len(whole) == 1 else f"h.{whole[0]}–h.{whole[-1]}")
            whole = []
        if kind == "mod":
            words.append(value)
        elif kind == "block":
            subs = [".".join(_short(n).split(".")[2:]) for n in params if n in blocks[value]]
            if i == len(items) - 1 and i > 0:
                words.append(f"h.{value} up to {subs[-1]}")
            elif i == 0 and len(items) > 1:
                words.append(f"h.{value} from {subs[0]}")
            else:
                words.append(f"h.{value} ({', '.join(dict.fromkeys(subs))})")
    return words


def short_id(peer_id: str) -> str:
    return f"{peer_id[:8]}…{peer_id[-6:]}" if len(peer_id) > 16 else peer_id


def _host_port(addr: str) -> str:
    """'/ip4/127.0.0.1/tcp/4001/p2p/...' -> '127.0.0.1:4001'."""
    parts = addr.split("/")
    return f"{parts[2]}:{parts[4]}" if len(parts) > 4 and parts[1] in ("ip4", "ip6") else addr


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# -- the run --------------------------------------------------------------------------------------------


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first 5 % of training, then a cosine decay to 10 % of the peak."""
    if progress < warmup:
        return max(progress / warmup, 0.02)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


class Trainer:
    """One optimizer step per call on the offloaded model, with the demo's schedule: warm-up then cosine,
    following the steps or, under --time-limit, the clock, whichever is further along."""

    def __init__(self, model: Any, corpus: Corpus, args: argparse.Namespace) -> None:
        self.model, self.corpus, self.args = model, corpus, args
        self.t0 = 0.0  # when the timed training began (after the first step); 0: not yet
        self.steps = 0
        self.losses: list[float] = []
        self.opt = model.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: lr_factor(self.progress()))
        self.gen = torch.Generator().manual_seed(args.seed)
        self.tokens_per_step = args.batch_size * args.seq_len

    def progress(self) -> float:
        by_steps = self.steps / self.args.steps
        if self.args.time_limit > 0 and self.t0:
            return max(by_steps, (time.monotonic() - self.t0) / self.args.time_limit)
        return by_steps

    def step(self) -> float:
        x = self.corpus.batch(self.args.batch_size, self.args.seq_len, self.gen)
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1
        self.sched.step()
        value = loss.detach().item()
        self.losses.append(value)
        return value


def _console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: wide enough for the tables, whatever COLUMNS says
        console = Console(highlight=False, width=120)
    return console


def _prepare(console: Any, args: argparse.Namespace) -> tuple[Corpus, Any, float]:
    """The data, the local model and its held-out loss before training, each described."""
    # Leave the cores to the workers: in this process torch only captures the model and evaluates once.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    corpus = Corpus.load(args.seq_len, args.batch_size)
    local = build_model(args.seed)
    n_params = sum(p.numel() for p in local.parameters())
    cfg: Any = local.config  # a GPT2Config (nn.Module's __getattr__ is typed Tensor | Module)
    console.print(
        f"[bold]Model[/]: GPT-2 built from a config, byte-level (vocabulary {VOCAB}: 256 bytes + an end token), "
        f"{cfg.n_layer} blocks, width {cfg.n_embd}, {cfg.n_head} heads, context {cfg.n_positions}: "
        f"[bold]{n_params:,}[/] parameters ({n_params * 4 / 1e6:.1f} MB in fp32; AdamW state doubles that "
        "on the workers)."
    )
    console.print(
        f"[bold]Data[/]: tensorlink/data/{CORPUS}, {corpus.n_bytes / 1000:.1f} KB of English prose on how "
        f"pipeline training works; the last 10 % ({corpus.held_out.numel():,} bytes) is held out."
    )
    with torch.no_grad():
        start_held = float(local(input_ids=corpus.held_out, labels=corpus.held_out).loss)
    console.print(
        f"Before training the held-out loss is [bold]{start_held:.3f}[/] (chance: ln {VOCAB} = {math.log(VOCAB):.3f})."
    )
    return corpus, local, start_held


def _show_swarm(console: Any, swarm: Any, up_s: float) -> dict[str, str]:
    """The swarm's nodes and what each offers; returns peer id -> node name."""
    from rich.table import Table

    console.print(f"[green]✓[/] Swarm up in {up_s:.1f} s:")
    nodes = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    for col in ("node", "peer id", "listens on", "offers"):
        nodes.add_column(col, overflow="fold")
    offers = {w["peer_id"]: w for w in swarm.validators[0].status()["workers"]}
    for node in swarm.nodes:
        rec = offers.get(node.peer_id)
        offer = "matches jobs to workers"
        if rec:
            gb, gflops = rec.get("memory_bytes", 0) / 1e9, rec.get("gflops", 0)
            offer = f"{rec.get('device', '?')} · {gb:.1f} GB · {gflops:.0f} GFLOP/s"
        nodes.add_row(node.name, node.peer_id, _host_port(node.addr), offer)
    console.print(nodes)
    return {node.peer_id: node.name for node in swarm.nodes}


def _first_step(
    console: Any, trainer: Trainer, local: Any, names: dict[str, str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first step sets the pipeline up; show the plan it got. Returns the stages and what each holds."""
    from rich.table import Table

    with console.status(
        "First step: capturing the model with torch.export, asking the validator for workers, splitting it "
        "into stages by measured cost, and loading each stage on its worker…"
    ):
        t0 = time.monotonic()
        trainer.step()
        setup_s = time.monotonic() - t0
    stages = trainer.model.stages()
    layers = describe_stages(stages, local)
    console.print(f"[green]✓[/] Pipeline set up and first step done in {setup_s:.1f} s. The plan:")
    plan = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    for col in ("stage", "runs on", "peer id", "holds", "parameters"):
        plan.add_column(col, justify="right" if col == "parameters" else "left")
    for s, what in zip(stages, layers, strict=True):
        where = s["where"]
        plan.add_row(str(s["stage"]), names.get(where, where), short_id(where), what, f"{s['parameters']:,}")
    console.print(plan)
    return stages, layers


def _train(console: Any, args: argparse.Namespace, trainer: Trainer, holders: str) -> float:
    """The remaining steps under a progress bar; returns the seconds they took."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    losses = trainer.losses
    console.print(
        f"Training: {args.steps} steps of {args.batch_size}×{args.seq_len} bytes in {args.micro_batches} "
        f"micro-batches (1F1B), AdamW lr {args.lr:g} with warm-up and cosine decay"
        + (f", at most {args.time_limit:.0f} s" if args.time_limit > 0 else "")
        + f". Loss at step 1: [bold]{losses[0]:.3f}[/]."
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("loss [bold cyan]{task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[where]}"),
        console=console,
    )
    report_every = max(1, args.steps // 10)
    smooth = losses[0]
    ended_early = False
    trainer.t0 = time.monotonic()
    with progress:
        task = progress.add_task("training", total=args.steps, completed=1, loss=f"{smooth:.3f}", tps="-",
                                 where=holders)  # fmt: skip
        tps = 0.0
        for step in range(2, args.steps + 1):
            t0 = time.monotonic()
            value = trainer.step()
            dt = time.monotonic() - t0
            smooth = 0.9 * smooth + 0.1 * value
            tps = trainer.tokens_per_step / dt if not tps else 0.8 * tps + 0.2 * trainer.tokens_per_step / dt
            progress.update(task, completed=step, loss=f"{smooth:.3f}", tps=f"{tps:,.0f}")
            if step % report_every == 0 or step == args.steps:
                progress.console.print(
                    f"  step {step:4d}  loss {smooth:.3f}  {tps:6,.0f} tok/s  "
                    f"lr {trainer.opt.param_groups[0]['lr']:.1e}  {time.monotonic() - trainer.t0:5.1f} s"
                )
            if args.time_limit > 0 and time.monotonic() - trainer.t0 > args.time_limit and step < args.steps:
                ended_early = True
                break
    train_s = time.monotonic() - trainer.t0
    if ended_early:
        console.print(
            f"[yellow]Time limit reached after {len(losses)} of {args.steps} steps[/] (--time-limit "
            f"{args.time_limit:.0f} s; the learning rate schedule followed the clock)."
        )
    return train_s


def _sample(console: Any, args: argparse.Namespace, model: Any, local: Any, corpus: Corpus) -> tuple[float, float]:
    """The held-out loss on the workers, a greedy sample there and a sampled one here with the weights fetched
    back. Returns the held-out loss on the workers and here."""
    from rich.panel import Panel
    from rich.text import Text

    model.eval()
    with torch.no_grad():
        end_held = float(model(input_ids=corpus.held_out, labels=corpus.held_out).loss)
    prompt_ids = torch.tensor([encode(args.prompt)], dtype=torch.long)
    with console.status(f"Generating {args.sample_tokens} bytes greedily on the workers…"):
        t0 = time.monotonic()
        out = model.generate(prompt_ids, max_new_tokens=args.sample_tokens)
        gen_s = time.monotonic() - t0
    new = decode(out[0, prompt_ids.shape[1] :].tolist())
    # The weights come back from the workers (state_dict() does the same): the local copy must score the
    # held-out text as the workers did, and it can sample, which greedy decoding on the workers cannot.
    model.fetch()
    local.eval()
    with torch.no_grad():
        fetched_held = float(local(input_ids=corpus.held_out, labels=corpus.held_out).loss)
        torch.manual_seed(args.seed)
        sampled = local.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=args.sample_tokens,
            do_sample=True, temperature=0.8, top_k=40, pad_token_id=END,
        )  # fmt: skip
    sample = Text()
    sample.append(f"greedy, on the workers ({gen_s:.1f} s):\n", style="dim")
    sample.append(args.prompt, style="bold")
    sample.append(new)
    sample.append("\n\nsampled (temperature 0.8) on this machine with the weights fetched back:\n", style="dim")
    sample.append(args.prompt, style="bold")
    sample.append(decode(sampled[0, prompt_ids.shape[1] :].tolist()))
    console.print(Panel(sample, title=f"Samples ({args.sample_tokens} bytes each)", expand=False, width=100))
    return end_held, fetched_held


def _show_stages(
    console: Any, swarm: Any, stages: list[dict[str, Any]], layers: list[str], names: dict[str, str]
) -> None:
    """Where each stage ran, as the workers themselves report it."""
    from rich import box
    from rich.table import Table

    reports: dict[str, dict[str, Any]] = {}
    for node in swarm.workers:
        try:
            reports[node.peer_id] = node.status()
        except OSError:
            pass
    table = Table(title="Where each stage ran", header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("stage", "ran on", "holds", "parameters", "weights + AdamW", "steps run¹", "data plane out / in"):
        table.add_column(col, justify="left" if col in ("stage", "ran on", "holds") else "right")
    for s, what in zip(stages, layers, strict=True):
        where = s["where"]
        status = reports.get(where, {})
        running = [r for r in status.get("running", []) if r.get("stage") == s["stage"]]
        steps_run = str(running[0].get("steps", "?")) if running else ("-" if where not in names else "?")
        channels = status.get("data_plane", {}).get("channels", [])
        sent = sum(c.get("bytes_sent", 0) for c in channels)
        recv = sum(c.get("bytes_received", 0) for c in channels)
        traffic = f"{fmt_bytes(sent)} / {fmt_bytes(recv)}" if channels else "-"
        table.add_row(
            str(s["stage"]),
            f"{names[where]}\n{short_id(where)}" if where in names else where,
            what,
            f"{s['parameters']:,}",
            fmt_bytes(s["parameters"] * 4 * 3),
            steps_run,
            traffic,
        )
    console.print(table)
    console.print("[dim]¹ as the worker reports it: training steps, the held-out check and one per sampled byte[/]")


def _summarize(console: Any, trainer: Trainer, held: tuple[float, float, float], train_s: float, t_start: float) -> int:
    """The closing lines: training and held-out loss, speed. Returns the exit status (0: the loss went down).
    ``held``: the held-out loss before training, after it on the workers, and here with the fetched weights."""
    start_held, end_held, fetched_held = held
    losses = trainer.losses
    steps_done = len(losses)
    first = sum(losses[:5]) / len(losses[:5])
    last = sum(losses[-10:]) / len(losses[-10:])
    mean_tps = trainer.tokens_per_step * (steps_done - 1) / train_s if steps_done > 1 else 0.0
    verdict = "[green]it learned[/]" if end_held < start_held - 1.0 else "[yellow]it barely moved[/]"
    console.print(
        f"[bold]Training loss[/] {first:.3f} (first 5 steps) → [bold]{last:.3f}[/] (last 10 of {steps_done}); "
        f"[bold]held-out loss[/] {start_held:.3f} → [bold]{end_held:.3f}[/]: {verdict}."
    )
    same = "the same" if abs(fetched_held - end_held) < 1e-3 else "[red]a different[/]"
    console.print(
        f"The weights fetched back from the workers give {same} held-out loss here ({fetched_held:.3f}). "
        f"Training took {train_s:.0f} s at {mean_tps:,.0f} tokens/s on average; the whole demo "
        f"{time.monotonic() - t_start:.0f} s."
    )
    console.print("[dim]Benchmarks of the parts (wire codec, Stage IR, data plane): make bench.[/]")
    return 0 if end_held < start_held else 1


def run(args: argparse.Namespace) -> int:
    """The demo, step by step: describe the model, start the swarm, offload and plan, train, sample, report."""
    from rich.panel import Panel

    import tensorlink

    console = _console()
    t_start = time.monotonic()
    console.rule("[bold]TensorLink demo: one model, trained across a swarm")
    console.print(Panel(INTRO.format(workers=args.workers), title="What happens", expand=False, width=100))
    corpus, local, start_held = _prepare(console, args)

    # A generous ready timeout: on a busy machine a worker that dialled the validator before it listened
    # can wait tens of seconds before libp2p dials it again (its negative cache).
    swarm_cm = tensorlink.LocalSwarm(
        workers=args.workers, validators=1, threads_per_worker=1, log_dir=args.log_dir, ready_timeout_s=120.0
    )
    with console.status(
        f"Starting a LocalSwarm: 1 validator and {args.workers} workers, separate node processes on 127.0.0.1 "
        "(each imports torch, measures its matmul speed and joins through the validator)…"
    ):
        t0 = time.monotonic()
        swarm = swarm_cm.__enter__()
    model = None
    try:
        names = _show_swarm(console, swarm, time.monotonic() - t0)
        model = tensorlink.offload(
            local,
            network=swarm,
            workers=args.workers,
            micro_batches=args.micro_batches,
            schedule="1f1b",
            private=args.private,
            outputs="loss",
        )
        trainer = Trainer(model, corpus, args)
        stages, layers = _first_step(console, trainer, local, names)
        holders = " → ".join(f"{names.get(s['where'], s['where'])}:s{s['stage']}" for s in stages)
        train_s = _train(console, args, trainer, holders)
        end_held, fetched_held = _sample(console, args, model, local, corpus)
        _show_stages(console, swarm, stages, layers, names)
        return _summarize(console, trainer, (start_held, end_held, fetched_held), train_s, t_start)
    finally:
        if model is not None:
            with console.status("Releasing the workers and stopping the swarm…"):
                model.close()
                swarm_cm.__exit__(None, None, None)
        else:
            swarm_cm.__exit__(None, None, None)


def _reasons(exc: BaseException) -> list[str]:
    """The innermost messages of an exception (group): trio nests the real error a few levels down."""
    subs = getattr(exc, "exceptions", None)  # an exception group (builtin from 3.11, a backport on 3.10)
    if isinstance(subs, tuple) and subs:
        return [r for sub in subs for r in _reasons(sub)]
    return [f"{type(exc).__name__}: {exc}"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nInterrupted: the pipeline was closed and every node process the demo started has stopped.",
              file=sys.stderr)  # fmt: skip
        return 130
    except Exception as exc:  # a failed node or step: say what, without pages of trio's nested groups
        reasons = "\n  ".join(_reasons(exc))
        print(f"\nThe demo stopped: {reasons}", file=sys.stderr)
        if args.log_dir is None:
            print("Run it again with --log-dir DIR to keep the nodes' logs.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
