"""What a worker offers, measured at start: device, memory, and matmul throughput."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch

BENCH_SECONDS = 0.5


@dataclass(frozen=True)
class Capability:
    device: str
    device_name: str
    memory_bytes: int
    free_memory_bytes: int
    gflops: float


def pick_device(requested: str | None) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:200]
    except OSError:
        pass
    return platform.processor()[:200] or platform.machine()


def _memory(device: str) -> tuple[int, int]:
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    page = os.sysconf("SC_PAGE_SIZE")
    return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def current_free_memory(device: str, cap: int) -> int:
    """Free memory now, never more than the node offers (its --max-memory cap)."""
    return min(cap, _memory(device)[1])


def measure_matmul_gflops(device: str, seconds: float = BENCH_SECONDS, windows: int = 10) -> float:
    """float32 matmul throughput on the stage device: the number validators rank workers by.

    The best of ``windows`` short windows, not the average: a node starts while others import torch on
    the same cores, and an average would rank identical machines 1.5x apart (seen in a LocalSwarm),
    which the partitioner would turn into a lopsided split."""
    n = 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(windows):
        if device == "cuda":
            torch.cuda.synchronize()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            torch.mm(a, b)
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def measure(requested_device: str | None, max_memory_gb: float | None) -> Capability:
    device = pick_device(requested_device)
    total, free = _memory(device)
    if max_memory_gb is not None:
        cap = int(max_memory_gb * 1e9)
        total, free = min(total, cap), min(free, cap)
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return Capability(device, name, total, free, round(measure_matmul_gflops(device), 2))
