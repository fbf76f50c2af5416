"""Encode+decode throughput of a 64 MiB float32 activation through the tensor frame path, against
torch.save/torch.load, pickle, safetensors and a plain memcpy, all in one run on one thread.

    python benchmarks/wire.py            # table with ratios
    python benchmarks/wire.py --json     # one JSON object (keys frame_vs_memcpy, frame_vs_torch_save, int8_gbps, ...)

Each case runs best-of-N (these machines are noisy; the best run is the least disturbed one). The
baselines deserialize bytes this process made itself: they are here to be beaten, never to be used on
peer data.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import platform
import time
from collections.abc import Callable

import safetensors.torch
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tensorlink.wire import Compression, decode_payload, encode_frame
from tensorlink.wire.frame import decode_header

MIB = 1 << 20


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and lazy initialisation are not what we measure
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def frame_roundtrip(t: torch.Tensor, compression: Compression = Compression.NONE) -> Callable[[], torch.Tensor]:
    """The real path: encode (header + checksum, payload by reference), then validate the header, verify
    the checksum and build the tensor over the received buffer."""

    def run() -> torch.Tensor:
        frame = encode_frame(t, compression=compression)
        return decode_payload(decode_header(frame.header), frame.payload)

    return run


def torch_save_roundtrip(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)  # our own bytes, the baseline only

    return run


def pickle_roundtrip(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: pickle.loads(pickle.dumps(t, protocol=5))  # our own bytes, the baseline only


def safetensors_roundtrip(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: safetensors.torch.load(safetensors.torch.save({"x": t}))["x"]


def measure(size_mib: int, repeats: int, quiet: bool) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t = torch.randn(size_mib * MIB // 4)
    for name, fn in [("frame", frame_roundtrip(t)), ("int8", frame_roundtrip(t, Compression.INT8))]:
        assert fn().shape == t.shape, name  # the paths work before they are timed
    cases: dict[str, Callable[[], object]] = {
        "frame": frame_roundtrip(t),
        "memcpy": t.clone,
        "torch_save": torch_save_roundtrip(t),
        "pickle": pickle_roundtrip(t),
        "safetensors": safetensors_roundtrip(t),
        "bf16": frame_roundtrip(t, Compression.BF16),
        "int8": frame_roundtrip(t, Compression.INT8),
    }
    gbps: dict[str, float] = {}
    with Progress(transient=True, disable=quiet) as progress:
        task = progress.add_task(f"timing {size_mib} MiB round trips", total=len(cases))
        for name, fn in cases.items():
            gbps[name] = size_mib * MIB / best_seconds(fn, repeats) / 1e9
            progress.advance(task)
    return gbps


def report(gbps: dict[str, float], size_mib: int, repeats: int) -> dict[str, object]:
    frame = gbps["frame"]
    return {
        "size_mib": size_mib,
        "repeats": repeats,
        "threads": 1,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        **{f"{name}_gbps": round(value, 3) for name, value in gbps.items()},
        "frame_vs_memcpy": round(frame / gbps["memcpy"], 2),
        "frame_vs_torch_save": round(frame / gbps["torch_save"], 2),
        "frame_vs_pickle": round(frame / gbps["pickle"], 2),
        "frame_vs_safetensors": round(frame / gbps["safetensors"], 2),
        "int8_gbps": round(gbps["int8"], 3),
        "bf16_gbps": round(gbps["bf16"], 3),
    }


def print_table(result: dict[str, object], console: Console) -> None:
    labels = {
        "frame": "TensorLink frame (header + CRC32C, zero-copy)",
        "memcpy": "memcpy (tensor.clone)",
        "torch_save": "torch.save + torch.load",
        "pickle": "pickle (protocol 5)",
        "safetensors": "safetensors save + load",
        "bf16": "TensorLink frame, bf16 cast",
        "int8": "TensorLink frame, int8 blockwise",
    }
    frame = float(result["frame_gbps"])  # type: ignore[arg-type]
    table = Table(
        title=f"Encode + decode of a {result['size_mib']} MiB float32 tensor, 1 thread, best of {result['repeats']}"
    )
    table.add_column("path")
    table.add_column("GB/s", justify="right")
    table.add_column("frame is N× faster", justify="right")
    for key, label in labels.items():
        value = float(result[f"{key}_gbps"])  # type: ignore[arg-type]
        table.add_row(label, f"{value:.2f}", "" if key == "frame" else f"{frame / value:.2f}×")
    console.print(table)
    targets = [
        ("frame_vs_memcpy", 1.0, "≥"),
        ("frame_vs_torch_save", 3.0, "≥"),
        ("int8_gbps", 1.0, "≥"),
    ]
    for key, target, op in targets:
        value = float(result[key])  # type: ignore[arg-type]
        mark = "[green]met[/]" if value >= target else "[red]missed[/]"
        console.print(f"{key} = {value:.2f} (target {op} {target}) {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--size-mib", type=int, default=64, help="tensor size in MiB (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case; the best counts (default 7)")
    args = parser.parse_args()
    result = report(measure(args.size_mib, args.repeats, quiet=args.json), args.size_mib, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, Console())


if __name__ == "__main__":
    main()
