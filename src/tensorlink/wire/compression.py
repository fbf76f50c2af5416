"""Lossy compression of activations and gradients: a bf16/fp16 cast, or blockwise absmax int8.

Error bounds, per element x of a block whose largest magnitude is absmax:
- bf16 cast: |x - x'| <= |x| * 2**-8 (round to nearest, 8 significant bits).
- fp16 cast: |x - x'| <= |x| * 2**-11 for |x| in fp16's normal range (6.1e-5 .. 65504); larger values
  overflow to infinity, so use bf16 or int8 for data that may exceed it.
- int8: |x - x'| <= absmax / 254 * (1 + 2**-13) (half a step plus float32 rounding); a block with
  absmax < 1e-30 is sent as zeros.
"""

from __future__ import annotations

import enum

import torch

from tensorlink import _C
from tensorlink.wire.errors import WireError


class Compression(enum.IntEnum):
    """How a frame's payload is encoded. Values are the wire codes."""

    NONE = 0
    BF16 = 1
    FP16 = 2
    INT8 = 3


_NATIVE_NAMES = {"none": Compression.NONE, "bf16": Compression.BF16, "fp16": Compression.FP16, "int8": Compression.INT8}
assert {name: int(c) for name, c in _NATIVE_NAMES.items()} == _C.compression_table(), "compression codes drifted"

CAST_DTYPE = {Compression.BF16: torch.bfloat16, Compression.FP16: torch.float16}
INT8_RELATIVE_SLACK = 2.0**-13


def int8_payload_len(numel: int, block: int) -> int:
    """Bytes of an int8 payload: float32 scales, one per block, then one int8 per value."""
    return -(-numel // block) * 4 + numel


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy; the view keeps the tensor alive.

    Native rather than ``t.view(torch.uint8).numpy()``: those dispatcher calls cost ~10 µs, as much as
    sealing and sending a small frame (benchmarks/transport.py, 8 KiB round trips)."""
    if not t.is_cpu or not t.is_contiguous():
        raise WireError(f"tensor_bytes needs a contiguous CPU tensor, not a {t.device} one with strides {t.stride()}")
    return _C.host_memory(t.data_ptr(), t.nbytes, t)


def int8_payload(x: torch.Tensor, block: int) -> torch.Tensor:
    """Blockwise absmax int8 of a floating tensor (CPU or CUDA) as one flat uint8 tensor in the frame's
    payload layout: float32 scales, one per block, then the int8 values. Built in place, no extra copy."""
    if not x.is_floating_point():
        raise WireError(f"int8 quantization needs a floating tensor, got {x.dtype}")
    if not 1 <= block <= _C.MAX_BLOCK_SIZE:
        raise WireError(f"int8 block size {block} is outside 1..{_C.MAX_BLOCK_SIZE}")
    flat = x.detach().reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    payload = torch.empty(int8_payload_len(n, block), dtype=torch.uint8, device=flat.device)
    scales, q = split_int8_payload(payload, n, block)
    if flat.is_cuda:
        _require_cuda()
        stream = torch.cuda.current_stream(flat.device).cuda_stream
        _C.cuda_quantize_int8(flat.data_ptr(), n, block, scales.data_ptr(), q.data_ptr(), stream)
        if not bool(torch.isfinite(scales).all()):
            raise WireError("cannot int8-quantize non-finite values (NaN or infinity)")
    elif n:
        _C.quantize_int8(tensor_bytes(flat), block, tensor_bytes(scales), tensor_bytes(q))
    return payload


def split_int8_payload(payload: torch.Tensor, numel: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales float32, q int8) views of an int8 payload of numel values."""
    nscales = -(-numel // block)
    return payload[: nscales * 4].view(torch.float32), payload[nscales * 4 :].view(torch.int8)


def quantize_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8 of a floating tensor: (scales float32, q int8), both flat."""
    return split_int8_payload(int8_payload(x, block), x.numel(), block)


def dequantize_int8(scales: torch.Tensor, q: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of quantize_int8: a flat float32 tensor on q's device."""
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if q.is_cuda:
        _require_cuda()
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _C.cuda_dequantize_int8(q.data_ptr(), scales.data_ptr(), n, block, out.data_ptr(), stream)
    elif n:
        _C.dequantize_int8(tensor_bytes(q), tensor_bytes(scales), block, tensor_bytes(out))
    return out


def int8_error_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element bound on |x - dequantize(quantize(x))|, for tests and for users sizing the error."""
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block).amax(dim=1)
    bound = torch.where(absmax < _C.TINY_ABSMAX, absmax, absmax / 254 * (1 + INT8_RELATIVE_SLACK))
    return bound.repeat_interleave(block)[: flat.numel()].view_as(flat).reshape(x.shape)


def _require_cuda() -> None:
    if not _C.cuda_available():
        raise WireError("this tensor is on a GPU but tensorlink._C was built without CUDA or sees no device")
