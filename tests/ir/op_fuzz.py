"""Fuzz every allow-listed operator with random arguments of every kind, each case loaded and run in a child
process, and count how each case ended.

    python op_fuzz.py SEED OP:FIRST:COUNT [OP:FIRST:COUNT ...]     # the child: runs the cases, one line each

A case is a tiny stage program: ten inputs of several dtypes and ranks (one dynamic dim), two prelude nodes (a
size from ``sym_size`` and the pair ``max.dim`` returns, so that size and list references exist), then one call
of the op under test with random arguments: mostly of the schema's type (so that some cases load and run), often
anything at all (references to tensors of any dtype and rank, to sizes, to lists, to undefined names; integers
from 0 to 2**63-1 and below, ScalarType numbers among them; floats with nan and inf; bools; strings such as
"cpu" and "cuda:1"; dtype, layout, memory_format and device tags; lists; nested lists; null), and sometimes
a keyword the op does not have. Cases are numbered and regenerated from (seed, op, number), so a parent sends
only the numbers and can name the case that killed a child.

The child prints ``start <op> <i>`` before a case and ``end <op> <i> <outcome>`` after it, outcome one of
``loaded`` (load() gave a module and forward returned or raised IRError), ``refused`` (load raised IRError), or
``bad:<what>`` (any other exception: a finding). A child that dies mid-case leaves a ``start`` with no ``end``:
``run`` starts a new child after that case and reports the killer.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors.torch import save as save_safetensors
from torch.utils._pytree import tree_leaves

from tensorlink.ir import IRError, StageProgram, load
from tensorlink.ir import schema as s
from tensorlink.ir.ops import ATEN_OPS, PY_OPS, resolve

OPS = sorted(ATEN_OPS) + sorted(PY_OPS)
HIGH = 4  # the dynamic dim's declared maximum; forward runs at 2

# name -> (dtype, shape); "s0" is the dynamic dim
INPUTS: dict[str, tuple[str, list[int | str]]] = {
    "x": ("float32", ["s0", 3, 4]),
    "w": ("float32", [4, 4]),
    "idx": ("int64", ["s0", 3]),
    "mask": ("bool", ["s0", 3, 4]),
    "h": ("float16", [3, 4]),
    "img": ("float32", ["s0", 2, 5, 5]),
    "kern": ("float32", [2, 2, 3, 3]),
    "scalar": ("float32", []),
    "bf": ("bfloat16", [4]),
    "u8": ("uint8", ["s0", 3, 4]),
}
REFS = [*INPUTS, "size", "pair"]
INTS = [0, 1, -1, 2, 3, -2, 4, 5, 6, 7, 11, 12, 15, 17, 24, 63, 64, -65, 255, 256, 1000, 2**31, -(2**31) - 1,
        2**62, 2**63 - 1, -(2**63), 10**6]  # fmt: skip
FLOATS = ["nan", "inf", "-inf", "0.5", "1e308", "-0.0", "2.0", "-1.5", "1e-30"]
STRINGS = ["none", "tanh", "reflect", "replicate", "circular", "constant", "floor", "trunc", "cpu", "cuda:1",
           "meta", "", "x" * 64, "float32"]  # fmt: skip
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
TABLE = {getattr(torch, name) for name in DTYPES}  # the fixed dtype table
# integers where an enum goes: ScalarType 1000 segfaulted ATen, 27 is uint16 (outside the table), 256 wraps to uint8
ENUM_INTS = [1000, 1000, 27, 44, 15, 100, 256, 65536, -1, 2**31 - 1, 6]


def _ref(rng: random.Random) -> dict:
    return {"type": "ref", "node": rng.choice(REFS) if rng.random() > 0.03 else "nowhere"}


def _int(rng: random.Random) -> dict:
    return {"type": "lit", "value": rng.choice(INTS) if rng.random() < 0.5 else rng.randint(-4, 4)}


def _float(rng: random.Random) -> dict:
    return {"type": "float", "value": rng.choice(FLOATS)}


def wild(rng: random.Random, depth: int = 0) -> dict:
    """Any argument at all."""
    pick = rng.randrange(11 if depth < 2 else 10)
    if pick == 0:
        return _ref(rng)
    if pick == 1:
        return _int(rng)
    if pick == 2:
        return _float(rng)
    if pick == 3:
        return {"type": "lit", "value": rng.random() < 0.5}
    if pick == 4:
        return {"type": "lit", "value": rng.choice(STRINGS)}
    if pick == 5:
        return {"type": "dtype", "name": rng.choice(DTYPES)}
    if pick == 6:
        return {"type": "layout", "name": "strided"}
    if pick == 7:
        return {"type": "memory_format", "name": rng.choice(["contiguous_format", "preserve_format", "channels_last"])}
    if pick == 8:
        return {"type": "device"}
    if pick == 9:
        return {"type": "lit", "value": None}
    n = rng.choice([0, 1, 2, 3, 4, 200])
    return {"type": "list", "items": [wild(rng, depth + 1) for _ in range(n)]}


def typed(rng: random.Random, t: Any) -> dict:
    """An argument of schema type ``t``, mostly well-formed; now and then a wrong one of a related kind."""
    kind = t.kind()
    if kind == "OptionalType":
        return {"type": "lit", "value": None} if rng.random() < 0.3 else typed(rng, t.getElementType())
    if kind == "TensorType":
        return _ref(rng) if rng.random() < 0.85 else rng.choice([_int(rng), _float(rng)])
    if kind == "ListType":
        elem = t.getElementType()
        n = rng.choice([1, 1, 2, 2, 3, 4]) if rng.random() < 0.95 else rng.choice([0, 65, 129, 1025])
        if elem.kind() in ("IntType", "SymIntType"):
            items = [{"type": "lit", "value": rng.randint(-1, 4)} if rng.random() < 0.8 else typed(rng, elem)
                     for _ in range(n)]  # fmt: skip
        else:
            items = [typed(rng, elem) for _ in range(n)]
        return {"type": "list", "items": items}
    if kind == "IntType":
        return _int(rng)
    if kind == "SymIntType":
        return {"type": "ref", "node": "size"} if rng.random() < 0.2 else _int(rng)
    if kind == "FloatType":
        return _float(rng) if rng.random() < 0.8 else _int(rng)
    if kind == "NumberType":
        return rng.choice([_float(rng), _int(rng), {"type": "lit", "value": True}])
    if kind == "BoolType":
        return {"type": "lit", "value": rng.random() < 0.5}
    if kind == "StringType":
        return {"type": "lit", "value": rng.choice(STRINGS)}
    if kind in ("ScalarTypeType", "LayoutType", "MemoryFormatType"):  # an int here was the crash
        if rng.random() < 0.5:
            return {"type": "lit", "value": rng.choice(ENUM_INTS)}
        return wild(rng) if kind != "ScalarTypeType" else {"type": "dtype", "name": rng.choice(DTYPES)}
    if kind == "DeviceObjType":
        return {"type": "device"} if rng.random() < 0.6 else {"type": "lit", "value": rng.choice(["cpu", "cuda:1"])}
    return wild(rng)


def case(seed: int, op: str, i: int) -> dict:
    """The program document of case ``i`` of ``op``."""
    rng = random.Random(f"{seed}:{op}:{i}")
    args: list[dict] = []
    kwargs: dict[str, dict] = {}
    if op in PY_OPS:
        args = [typed_py(rng) for _ in range(rng.choice([2, 2, 2, 1, 3]))]
    else:
        schema = resolve(op)._schema  # type: ignore[attr-defined]
        positional = [a for a in schema.arguments if not a.kwarg_only]
        n = min(len(positional), max(0, len(positional) - rng.choice([0, 0, 0, 1, 2]))) + rng.choice([0] * 9 + [1])
        for k in range(n):
            a = positional[k] if k < len(positional) else None
            args.append(typed(rng, a.real_type) if a is not None and rng.random() < 0.85 else wild(rng))
        for a in schema.arguments:
            if a.kwarg_only and rng.random() < 0.5:
                kwargs[a.name] = typed(rng, a.real_type) if rng.random() < 0.85 else wild(rng)
        if rng.random() < 0.05:
            kwargs["no_such_argument"] = wild(rng)
    nodes = [
        {"name": "size", "target": "aten.sym_size.int", "args": [_lit_ref("x"), {"type": "lit", "value": 0}]},
        {"name": "pair", "target": "aten.max.dim", "args": [_lit_ref("x"), {"type": "lit", "value": 0}]},
        {"name": "out", "target": op, "args": args, "kwargs": kwargs},
    ]
    return {
        "ops_version": 1,
        "captured_train": True,
        "signature": {
            "positional": len(INPUTS),
            "keywords": [],
            "inputs": [{"dtype": dtype, "shape": shape} for dtype, shape in INPUTS.values()],
            "symbols": {"s0": [1, HIGH]},
            "output": "tuple",
        },
        "graph": {
            "placeholders": [{"name": n, "kind": "input", "index": k} for k, n in enumerate(INPUTS)],
            "nodes": nodes,
            "outputs": [_lit_ref("out")],
        },
    }


def typed_py(rng: random.Random) -> dict:
    return rng.choice([_ref(rng), _int(rng), _int(rng), wild(rng)])


def _lit_ref(name: str) -> dict:
    return {"type": "ref", "node": name}


_WEIGHTS = save_safetensors({})


def program_bytes(doc: dict) -> bytes:
    """Container bytes for a program document (the JSON must first pass the schema, as a worker's would)."""
    program = msgspec.json.decode(msgspec.json.encode(doc), type=s.Program)
    return StageProgram(program, _WEIGHTS).to_bytes()


def inputs(batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    out = []
    for dtype, shape in INPUTS.values():
        dims = [batch if d == "s0" else d for d in shape]
        if dtype in ("int64", "uint8"):
            out.append(torch.randint(0, 3, dims, generator=gen).to(getattr(torch, dtype)))
        elif dtype == "bool":
            out.append(torch.rand(dims, generator=gen) < 0.5)
        else:
            out.append(torch.randn(dims, generator=gen).to(getattr(torch, dtype)))
    return out


def outcome(doc: dict) -> str:
    """How one case ends: loaded, refused, or bad:<exception type> (a finding)."""
    try:
        data = program_bytes(doc)
    except (msgspec.ValidationError, IRError):
        return "refused"  # the schema refuses it before load() would see it
    try:
        module = load(data)
    except IRError:
        return "refused"
    except Exception as exc:  # what else escapes load() is the finding
        return f"bad:load:{type(exc).__name__}:{str(exc)[:120]!r}"
    try:
        out = module(*inputs())
    except IRError:
        return "loaded"
    except Exception as exc:
        return f"bad:run:{type(exc).__name__}:{str(exc)[:120]!r}"
    dtypes = {t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
    if not dtypes <= TABLE:
        return f"bad:dtype:{sorted(map(str, dtypes - TABLE))}"
    return "loaded"


# --- the parent ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    ran: int = 0
    outcomes: Counter = field(default_factory=Counter)
    deaths: list[str] = field(default_factory=list)  # "op#i: signal N"
    hangs: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    children: int = 0


def run(seed: int, per_op: dict[str, int], *, chunk_s: float = 120.0, jobs: int = 1) -> Report:
    """Run ``per_op[op]`` cases of each op, in child processes (``jobs`` at a time), resuming after any case
    that killed or hung its child."""
    pending = [(op, 0, n) for op, n in per_op.items() if n > 0]
    report = Report()
    running: list[tuple[subprocess.Popen, list[tuple[str, int, int]], float]] = []
    batch = -(-len(pending) // max(jobs, 1))  # one child per job (importing torch costs seconds)
    while pending or running:
        while pending and len(running) < jobs:
            todo, pending = pending[:batch], pending[batch:]
            spec = [f"{op}:{first}:{count}" for op, first, count in todo]
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__)), str(seed), *spec], stdout=subprocess.PIPE, text=True
            )
            report.children += 1
            running.append((child, todo, time.monotonic()))
        child, todo, started = running.pop(0)
        try:
            out, _ = child.communicate(timeout=max(1.0, chunk_s - (time.monotonic() - started)))
            hung = False
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            hung = True
        pending = _account(report, out, todo, child.returncode, hung) + pending
    return report


def _account(report: Report, out: str, todo: list[tuple[str, int, int]], rc: int, hung: bool) -> list:
    """Add a child's finished cases to the report; return the cases left after the one it died on."""
    done: dict[str, int] = {}  # op -> cases finished
    current: tuple[str, int] | None = None
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "start":
            op, i = rest.split(" ")
            current = (op, int(i))
        elif word == "end":
            op, i, result = rest.split(" ", 2)
            current = None
            done[op] = done.get(op, 0) + 1
            report.ran += 1
            report.outcomes[result.split(":")[0]] += 1
            if result.startswith("bad"):
                report.bad.append(f"{op}#{i}: {result}")
    if rc == 0 and not hung:
        return []
    if current is None:
        raise RuntimeError(f"a fuzz child exited with {rc} outside any case")
    op, i = current
    report.ran += 1
    if hung:
        report.hangs.append(f"{op}#{i}")
    else:
        report.deaths.append(f"{op}#{i}: exit {rc}" + (f" (signal {-rc})" if rc < 0 else ""))
    left = []
    for t_op, first, count in todo:
        end = first + count
        if t_op == op:
            left.append((op, i + 1, end - i - 1))
        else:
            start = first + done.get(t_op, 0)
            left.append((t_op, start, end - start))
    return [(o, f, c) for o, f, c in left if c > 0]


def _child(seed: int, specs: list[str]) -> None:
    outcome(case(seed, "aten.relu.default", 0))  # lazy imports before the first case
    for spec in specs:
        op, first, count = spec.rsplit(":", 2)
        for i in range(int(first), int(first) + int(count)):
            print(f"start {op} {i}", flush=True)
            print(f"end {op} {i} {outcome(case(seed, op, i))}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2:])
