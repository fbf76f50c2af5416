"""Run one stage program at given input shapes in this process, under a data-size limit, and report how much memory
the run really took. Used by test_memory_bound.py in a subprocess, so that the limit and the peak are this run's.

    python memory_probe.py PROGRAM_FILE SHAPES_JSON ALLOWANCE_BYTES BACKWARD(0|1)

Loads the program, runs it once at the smallest declared shapes (lazy initialisation, thread pools), resets the
peak-RSS counter, caps RLIMIT_DATA at the data size now plus ALLOWANCE_BYTES, then runs forward (and backward) at
SHAPES. Prints one JSON line: the bound load() computed, the peak RSS growth of the run, and whether it failed
for lack of memory (exit status 3) or not (0).
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch

from tensorlink.ir import load


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _inputs(module, shapes: list[list[int]]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    sig = module._program.signature
    out = []
    for spec, shape in zip(sig.inputs, shapes, strict=True):
        dtype = getattr(torch, spec.dtype)
        out.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
    return out[: sig.positional], dict(zip(sig.keywords, out[sig.positional :], strict=True))


def _run(module, shapes: list[list[int]], backward: bool) -> None:
    args, kwargs = _inputs(module, shapes)
    out = module(*args, **kwargs)
    leaves = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else [out]
    loss = sum(t.float().sum() for t in leaves if t.is_floating_point() and t.requires_grad)
    if backward and isinstance(loss, torch.Tensor):
        loss.backward()


def main() -> None:
    path, shapes_json, allowance, backward = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    torch.set_num_threads(1)
    with open(path, "rb") as f:
        module = load(f.read())
    sig = module._program.signature
    low = [[d if isinstance(d, int) else sig.symbols[d][0] for d in spec.shape] for spec in sig.inputs]
    _run(module, low, backward)
    module.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    limit = _status("VmData") + allowance
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    failed = False
    try:
        _run(module, json.loads(shapes_json), backward)
    except (MemoryError, RuntimeError, ValueError) as exc:  # the loader reports a failed node as IRError (ValueError)
        failed = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)
        if not failed:
            raise
    print(json.dumps({"bound": module.memory_bound, "peak": _status("VmHWM") - before, "out_of_memory": failed}))
    sys.exit(3 if failed else 0)


if __name__ == "__main__":
    main()
