"""Fuzz every allow-listed Stage IR operator with random arguments, each case loaded and run in a child process.

    python benchmarks/ir_fuzz.py --cases 20000          # counts: ran, loaded, refused, deaths by signal, hangs
    python benchmarks/ir_fuzz.py --cases 20000 --json
    python benchmarks/ir_fuzz.py --time-ops             # dry-run time per cost unit of each op (in this process)

The cases and the child-process harness are tests/ir/op_fuzz.py (the test runs a few hundred of them); a child
that dies by a signal or hangs is reported with the case that did it, and the run goes on in a new child.
``--time-ops`` calibrates tensorlink.ir.ops.DRY_RUN_WEIGHT: for each op it loads a program of one loaded fuzz
case's call repeated 40 times, and divides the load time it adds by the cost argcheck charged for those calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ir"))

import msgspec  # noqa: E402
import op_fuzz  # noqa: E402  (tests/ir, put on the path above)

from tensorlink.ir import load  # noqa: E402
from tensorlink.ir import schema as s  # noqa: E402
from tensorlink.ir.argcheck import check_call  # noqa: E402


def fuzz(cases: int, seed: int, jobs: int) -> dict:
    per_op = math.ceil(cases / len(op_fuzz.OPS))
    started = time.perf_counter()
    report = op_fuzz.run(seed, dict.fromkeys(op_fuzz.OPS, per_op), chunk_s=3600.0, jobs=jobs)
    return {
        "ops": len(op_fuzz.OPS),
        "ran": report.ran,
        "loaded": report.outcomes["loaded"],
        "refused": report.outcomes["refused"],
        "other_errors": report.bad,
        "deaths": report.deaths,
        "hangs": report.hangs,
        "children": report.children,
        "seconds": round(time.perf_counter() - started, 1),
    }


def time_ops(seed: int, copies: int = 40) -> list[tuple[float, str, int]]:
    """(us of dry run per cost unit, op, cost of one call) for every op with a loading fuzz case."""
    rows = []
    for op in op_fuzz.OPS:
        doc = next((d for i in range(300) if op_fuzz.outcome(d := op_fuzz.case(seed, op, i)) == "loaded"), None)
        if doc is None:
            continue
        base = _load_seconds(doc)
        call = doc["graph"]["nodes"][-1]
        doc["graph"]["nodes"][-1:] = [{**call, "name": f"out{k}"} for k in range(copies - 1)] + [call]
        extra = _load_seconds(doc) - base
        node = s.Node(call["name"], op, _args(call["args"]), {k: _arg(v) for k, v in call.get("kwargs", {}).items()})
        kinds = {n: "tensor" for n in op_fuzz.INPUTS} | {"size": "int", "pair": "tensors"}
        cost = check_call(node, kinds).cost
        rows.append((extra / (copies - 1) / cost * 1e6, op, cost))
    return sorted(rows, reverse=True)


def _load_seconds(doc: dict, repeats: int = 3) -> float:
    data = op_fuzz.program_bytes(doc)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        load(data)
        best = min(best, time.perf_counter() - started)
    return best


def _args(items: list[dict]) -> list[s.Arg]:
    return [_arg(a) for a in items]


def _arg(a: dict) -> s.Arg:
    return msgspec.convert(a, s.Arg)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20_000, help="cases in all (spread evenly over the ops)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="child processes at a time")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--time-ops", action="store_true", help="dry-run time per cost unit of each op instead")
    args = parser.parse_args()
    if args.time_ops:
        for us, op, cost in time_ops(args.seed):
            print(f"{us:8.1f} us/unit  cost {cost:4d}  {op}")
        return
    result = fuzz(args.cases, args.seed, args.jobs)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['ran']} cases over {result['ops']} ops in {result['seconds']} s ({result['children']} children): "
        f"{result['loaded']} loaded, {result['refused']} refused, {len(result['deaths'])} deaths by signal, "
        f"{len(result['hangs'])} hangs, {len(result['other_errors'])} other errors"
    )
    for line in result["deaths"] + result["hangs"] + result["other_errors"]:
        print("  ", line)


if __name__ == "__main__":
    main()
