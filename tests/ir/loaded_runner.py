"""Run a stage program in a fresh process, the way a worker would, and write what it computed.

    python loaded_runner.py JOB_DIR [JOB_DIR ...]

Each JOB_DIR holds `job.json` (settings written by the test), `program.bin` (StageProgram bytes) and
`inputs.safetensors` (`arg.<i>` and `kw.<name>` tensors). The runner loads the program
with `tensorlink.ir.load` (with transformers and the test models blocked from importing), runs forward and
backward, and writes `result.safetensors` (`out.<key>`,
`grad.<parameter>`, `inputgrad.<i>`, `buffer.<name>`) and `result.json` (output structure, names, timings).
Tensors travel as safetensors only: nothing here unpickles.

The forward/backward code lives in `fwd_bwd`, which the tests import and run on the eager module too, so both
sides do exactly the same thing.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch


def flatten(out: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """(structure, {key: tensor}): a tensor -> ("tensor", {"0": t}); a tuple/list -> ("tuple", {"0": .., "1": ..});
    a dict or HF ModelOutput -> ("dict", {name: tensor}), None values dropped."""
    if isinstance(out, torch.Tensor):
        return "tensor", {"0": out}
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return "dict", {str(k): v for k, v in out.items() if v is not None}
    if isinstance(out, tuple | list):
        return "tuple", {str(i): v for i, v in enumerate(out)}
    raise TypeError(f"unexpected output type {type(out).__name__}")


def fwd_bwd(
    module: torch.nn.Module,
    args: list[torch.Tensor],
    kwargs: dict[str, torch.Tensor],
    *,
    seed: int | None = None,
    backward: bool = True,
) -> dict[str, Any]:
    """Forward, then backward with fixed output gradients (`gradouts_for`: no loss reduction to reorder).
    Floating inputs get requires_grad so their gradients (what a pipeline sends upstream) are checked too."""
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    kwargs = {k: v.detach().clone() for k, v in kwargs.items()}
    module.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = module(*args, **kwargs)
    structure, flat = flatten(out)
    t1 = time.perf_counter()
    if backward:
        keys = [k for k, v in flat.items() if v.requires_grad]
        gradouts = gradouts_for(flat)
        keys = [k for k in keys if k in gradouts]
        torch.autograd.backward([flat[k] for k in keys], [gradouts[k] for k in keys])
    t2 = time.perf_counter()
    return {
        "type": type(out).__name__,
        "structure": structure,
        "outputs": {k: v.detach() for k, v in flat.items()},
        "grads": {n: p.grad for n, p in module.named_parameters() if p.grad is not None},
        "params": [n for n, _ in module.named_parameters()],
        "no_grad_params": [n for n, p in module.named_parameters() if p.grad is None],
        "input_grads": {str(i): a.grad for i, a in enumerate(args) if a.grad is not None},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
        "fwd_s": t1 - t0,
        "bwd_s": t2 - t1,
    }


def gradouts_for(outputs: dict[str, torch.Tensor], seed: int = 99) -> dict[str, torch.Tensor]:
    """A fixed random output gradient for every floating output, seeded by its key and shape only, so both
    processes draw the same one whatever order the outputs come in."""
    out = {}
    for k, v in outputs.items():
        if v.is_floating_point():
            g = torch.Generator().manual_seed(seed + zlib.crc32(f"{k}:{tuple(v.shape)}".encode()))
            out[k] = torch.randn(v.shape, generator=g, dtype=v.dtype)
    return out


class _BlockUserCode:
    """A meta path finder that refuses the user's side: transformers and the test models. The worker must
    not need (or import) the code that defined the model."""

    BLOCKED = ("transformers", "models", "test_equivalence", "test_tamper")

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is user code; a worker never imports it")
        return None


def main(job_dirs: list[Path]) -> None:
    sys.meta_path.insert(0, _BlockUserCode())
    t0 = time.perf_counter()
    from tensorlink.ir import load

    t_import = time.perf_counter() - t0
    for job_dir in job_dirs:
        try:
            run_job(job_dir, load, t_import)
        except Exception:  # one failing job must not hide the others' results
            import traceback

            (job_dir / "error.txt").write_text(traceback.format_exc())


def run_job(job_dir: Path, load: Any, t_import: float) -> None:
    from safetensors.torch import load_file, save_file

    job = json.loads((job_dir / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    tensors = load_file(job_dir / "inputs.safetensors")
    args = [tensors[f"arg.{i}"] for i in range(job["n_args"])]
    kwargs = {k: tensors[f"kw.{k}"] for k in job["kwargs"]}
    data = (job_dir / "program.bin").read_bytes()
    t0 = time.perf_counter()
    module = load(data, device="cpu", train=job["load_train"])
    t_load = time.perf_counter() - t0
    if job["mode"] == "eval":
        module.eval()
    elif job["mode"] == "train":  # there and back: eval() must not leave anything switched off
        module.eval()
        module.train()
    res = fwd_bwd(module, args, kwargs, seed=job.get("seed"), backward=job["backward"])
    flat: dict[str, torch.Tensor] = {}
    for prefix, group in (
        ("out.", "outputs"),
        ("grad.", "grads"),
        ("inputgrad.", "input_grads"),
        ("buffer.", "buffers"),
    ):
        for k, v in res[group].items():
            flat[prefix + k] = v.detach().contiguous()
    save_file(flat, job_dir / "result.safetensors")
    meta = {k: res[k] for k in ("type", "structure", "params", "no_grad_params", "fwd_s", "bwd_s")}
    meta["module_type"] = type(module).__name__
    meta["user_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in _BlockUserCode.BLOCKED)
    meta["is_parameter"] = all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
    meta["output_keys"] = list(res["outputs"])
    meta["import_s"], meta["load_s"] = t_import, t_load
    (job_dir / "result.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])


# --- test side ------------------------------------------------------------------------------------------------


def run_fresh(jobs: list[dict[str, Any]], tmp: Path, timeout: float = 120) -> list[tuple[dict[str, Any], dict]]:
    """Run jobs in one fresh interpreter. Each job: data (program bytes), args, kwargs, and optionally
    mode ("train" | "eval" | None: as loaded), load_train (default True), seed, backward (default True).
    Returns [(meta, tensors)] with tensors grouped as {"out": .., "grad": .., "inputgrad": .., "buffer": ..};
    a job that raised has meta {"error": traceback} and no tensors."""
    import subprocess

    from safetensors.torch import load_file, save_file

    dirs = []
    for i, job in enumerate(jobs):
        d = tmp / f"job{i}"
        d.mkdir(parents=True)
        (d / "program.bin").write_bytes(job["data"])
        tensors = {f"arg.{j}": a.contiguous() for j, a in enumerate(job["args"])}
        tensors.update({f"kw.{k}": v.contiguous() for k, v in job.get("kwargs", {}).items()})
        save_file(tensors, d / "inputs.safetensors")
        settings = {
            "threads": torch.get_num_threads(),
            "n_args": len(job["args"]),
            "kwargs": list(job.get("kwargs", {})),
            "mode": job.get("mode"),
            "load_train": job.get("load_train", True),
            "seed": job.get("seed"),
            "backward": job.get("backward", True),
        }
        (d / "job.json").write_text(json.dumps(settings))
        dirs.append(d)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"fresh process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    results = []
    for d in dirs:
        if (d / "error.txt").exists():
            results.append(({"error": (d / "error.txt").read_text()}, {}))
            continue
        meta = json.loads((d / "result.json").read_text())
        flat = load_file(d / "result.safetensors")
        grouped: dict[str, dict[str, torch.Tensor]] = {"out": {}, "grad": {}, "inputgrad": {}, "buffer": {}}
        for k, v in flat.items():
            prefix, _, name = k.partition(".")
            grouped[prefix][name] = v
        results.append((meta, grouped))
    return results
