"""The CUDA half of tensorlink._C: pinned pool buffers and on-device int8 (de)quantization.

Runs only where a GPU is present (tests/conftest.py skips it with the reason otherwise).
"""

from __future__ import annotations

import pytest
import torch

from tensorlink import _C
from tensorlink.wire import WireError
from tensorlink.wire.compression import dequantize_int8, int8_error_bound, quantize_int8

pytestmark = pytest.mark.gpu


def test_pool_buffers_are_pinned_and_copy_asynchronously() -> None:
    pool = _C.BufferPool(64 << 20, pin=True)
    assert pool.pinned
    buf = pool.acquire(16 << 20)
    assert buf.pinned
    host = torch.frombuffer(buf, dtype=torch.float32)
    assert host.is_pinned()
    dev = torch.randn(host.numel(), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        host.copy_(dev, non_blocking=True)
    stream.synchronize()
    assert torch.equal(host, dev.cpu())


@pytest.mark.parametrize("block", [1, 100, 4096])
def test_cuda_quantization_matches_the_host_path(block: int) -> None:
    x = torch.randn(3 * 4096 + 17) ** 3
    scales_cpu, q_cpu = quantize_int8(x, block)
    scales_gpu, q_gpu = quantize_int8(x.cuda(), block)
    assert torch.equal(scales_gpu.cpu(), scales_cpu)
    # both round x * (127 / absmax) to nearest even; the GPU may fuse the multiply, so allow one step
    assert (q_gpu.cpu().int() - q_cpu.int()).abs().max().item() <= 1
    back = dequantize_int8(scales_gpu, q_gpu, block)
    assert back.is_cuda
    assert ((back.cpu() - x).abs() <= int8_error_bound(x, block) + scales_cpu.max() * 1e-6).all()


def test_cuda_quantization_refuses_non_finite() -> None:
    x = torch.zeros(10_000, device="cuda")
    x[9000] = float("inf")
    with pytest.raises(WireError, match="non-finite"):
        quantize_int8(x, 4096)
