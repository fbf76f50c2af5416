"""Tensor frames: a 128-byte validated header (see csrc/frame_header.h) followed by the raw payload.

Encoding an uncompressed contiguous CPU tensor never copies its bytes: the payload is a memoryview of
the tensor's memory and only the checksum reads it. Decoding builds the tensor over the received buffer
with ``torch.frombuffer``; pass a writable buffer (bytearray, pool buffer) to keep that copy-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from tensorlink import _C
from tensorlink.wire.compression import (
    CAST_DTYPE,
    Compression,
    dequantize_int8,
    int8_payload,
    split_int8_payload,
    tensor_bytes,
)
from tensorlink.wire.dtypes import code_of, dtype_of
from tensorlink.wire.errors import ChecksumError, WireError
from tensorlink.wire.limits import DEFAULT_INT8_BLOCK, MAX_FRAME_PAYLOAD

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

HEADER_SIZE: int = _C.HEADER_SIZE
FrameHeader = _C.FrameHeader
_NO_JOB = bytes(16)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a tensor belongs in a pipeline: which job, optimizer step, micro-batch and stage."""

    job: bytes = _NO_JOB
    step: int = 0
    micro_batch: int = 0
    stage: int = 0


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """A frame ready for a gathered write: ``header`` then ``payload``."""

    header: bytes
    payload: memoryview

    @property
    def parts(self) -> tuple[bytes, memoryview]:
        return self.header, self.payload

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.payload.nbytes

    def to_bytes(self) -> bytes:
        """One contiguous copy of the frame (for tests and small control-plane uses)."""
        return self.header + self.payload.tobytes()


class Frame(NamedTuple):
    tensor: torch.Tensor
    route: Route


def encode_frame(
    tensor: torch.Tensor,
    route: Route = Route(),
    *,
    compression: Compression = Compression.NONE,
    block_size: int = DEFAULT_INT8_BLOCK,
    max_payload: int = MAX_FRAME_PAYLOAD,
    checksum: bool = True,
) -> EncodedFrame:
    """Frame a contiguous CPU tensor. Non-contiguous or GPU tensors are refused, not silently copied.

    ``checksum=False`` leaves the payload CRC at 0, for transports whose AEAD already authenticates every
    payload byte (the direct data plane); the header keeps its own checksum either way."""
    if not tensor.is_cpu:
        raise WireError(f"frames carry host memory; this tensor is on {tensor.device} (copy it to the CPU first)")
    if not tensor.is_contiguous():
        raise WireError(
            f"tensor of shape {tuple(tensor.shape)} with strides {tensor.stride()} is not contiguous; "
            "call .contiguous() on it first (that copies it once)"
        )
    if type(compression) is not Compression:
        compression = Compression(compression)
    dtype_code = code_of(tensor.dtype)
    shape = list(tensor.shape)
    if compression is Compression.NONE:
        payload, block = tensor_bytes(tensor), 0
    elif compression is Compression.INT8:
        block = block_size
        if not tensor.is_floating_point():
            raise WireError(f"int8 compression needs a floating dtype, not {tensor.dtype}")
        payload = tensor_bytes(int8_payload(tensor, block))
    else:
        block = 0
        if not tensor.is_floating_point() or tensor.element_size() <= 2:
            raise WireError(
                f"{compression.name.lower()} compression needs a float32 or float64 tensor, not {tensor.dtype}"
            )
        payload = tensor_bytes(tensor.to(CAST_DTYPE[compression]))
    header = _C.FrameHeader(
        dtype=dtype_code,
        shape=shape,
        compression=int(compression),
        block_size=block,
        payload_len=payload.nbytes,
        payload_crc=_C.crc32c(payload) if checksum else 0,
        job=route.job,
        step=route.step,
        micro_batch=route.micro_batch,
        stage=route.stage,
    )
    return EncodedFrame(_C.encode_header(header, max_payload), payload)


def decode_header(data: ReadableBuffer, *, max_payload: int = MAX_FRAME_PAYLOAD) -> FrameHeader:
    """Validate the first HEADER_SIZE bytes of data; raises WireError naming the first problem."""
    return _C.decode_header(data, max_payload)


def decode_payload(header: FrameHeader, payload: ReadableBuffer, *, verify: bool = True) -> torch.Tensor:
    """The tensor a validated header describes, built over payload (no copy when uncompressed)."""
    view = memoryview(payload).cast("B")
    if view.nbytes != header.payload_len:
        raise WireError(f"payload is {view.nbytes} bytes but the header declares {header.payload_len}")
    if verify and _C.crc32c(view) != header.payload_crc:
        raise ChecksumError(f"payload checksum mismatch (corrupted in transit) in {header!r}")
    dtype, shape, numel = dtype_of(header.dtype), header.shape, header.numel
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))  # torch needs writable memory; one copy, only for read-only input
    if header.compression == Compression.NONE:
        tensor = torch.frombuffer(view, dtype=dtype, count=numel)
        if len(shape) != 1:  # each torch call costs a few µs, which small frames notice
            tensor = tensor.view(shape)
        if dtype is torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise WireError("bool payload holds bytes other than 0 and 1")
        return tensor
    compression = Compression(header.compression)
    if compression is Compression.INT8:
        scales, q = split_int8_payload(torch.frombuffer(view, dtype=torch.uint8), numel, header.block_size)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise WireError("int8 frame has negative or non-finite block scales")
        return dequantize_int8(scales, q, header.block_size).to(dtype).reshape(shape)
    cast = torch.frombuffer(view, dtype=CAST_DTYPE[compression], count=numel)
    return cast.to(dtype).reshape(shape)


def decode_frame(data: ReadableBuffer, *, max_payload: int = MAX_FRAME_PAYLOAD, verify: bool = True) -> Frame:
    """Decode one whole frame held in a single buffer (header followed by exactly its payload)."""
    view = memoryview(data).cast("B")
    header = decode_header(view, max_payload=max_payload)
    if view.nbytes != HEADER_SIZE + header.payload_len:
        raise WireError(f"frame is {view.nbytes} bytes but its header declares {HEADER_SIZE} + {header.payload_len}")
    tensor = decode_payload(header, view[HEADER_SIZE:], verify=verify)
    return Frame(tensor, Route(header.job, header.step, header.micro_batch, header.stage))
