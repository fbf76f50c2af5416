"""Tensor frames: lossless round trips for every dtype and shape class, zero-copy paths, refusals."""

from __future__ import annotations

import pytest
import torch
from samples import sample

from tensorlink import _C
from tensorlink.wire import Compression, Route, WireError, decode_frame, decode_payload, encode_frame
from tensorlink.wire.compression import int8_error_bound
from tensorlink.wire.dtypes import CODE_BY_DTYPE
from tensorlink.wire.frame import HEADER_SIZE, decode_header

ALL_DTYPES = list(CODE_BY_DTYPE)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3), (4, 1, 5), (2, 2, 2, 2, 2, 2, 2, 2)]


def roundtrip(t: torch.Tensor, **kw: object) -> tuple[torch.Tensor, Route]:
    frame = encode_frame(t, Route(job=bytes(range(16)), step=2**40 + 3, micro_batch=7, stage=2), **kw)
    out = decode_frame(bytearray(frame.to_bytes()))
    return out.tensor, out.route


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lossless_roundtrip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(shape, dtype)
    out, route = roundtrip(t)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)
    assert route == Route(job=bytes(range(16)), step=2**40 + 3, micro_batch=7, stage=2)


def test_encode_does_not_copy_the_payload() -> None:
    t = torch.arange(1024, dtype=torch.float32)
    frame = encode_frame(t)
    assert len(frame.header) == HEADER_SIZE
    t[5] = -1.0  # the payload views the tensor's memory, so the change shows through
    assert torch.frombuffer(bytearray(frame.payload), dtype=torch.float32)[5] == -1.0


def test_decode_builds_the_tensor_over_the_received_buffer() -> None:
    t = torch.arange(64, dtype=torch.int32)
    buf = bytearray(encode_frame(t).to_bytes())
    out = decode_frame(buf).tensor
    buf[HEADER_SIZE : HEADER_SIZE + 4] = (123).to_bytes(4, "little")
    assert out[0].item() == 123  # shares memory with buf: no copy was made


def test_read_only_input_still_decodes() -> None:
    t = sample((5, 3), torch.float16)
    assert torch.equal(decode_frame(encode_frame(t).to_bytes()).tensor, t)


def test_requires_grad_tensor_is_framed_by_value() -> None:
    t = torch.randn(4, 4, requires_grad=True)
    assert torch.equal(roundtrip(t)[0], t.detach())


@pytest.mark.slow
def test_256_mib_roundtrip_lossless_and_int8() -> None:
    t = torch.randn(64 << 20)  # 256 MiB of float32
    frame = encode_frame(t)
    assert frame.payload.nbytes == 256 << 20
    buf = bytearray(HEADER_SIZE + frame.payload.nbytes)
    buf[:HEADER_SIZE] = frame.header
    buf[HEADER_SIZE:] = frame.payload
    assert torch.equal(decode_frame(buf).tensor, t)
    q = encode_frame(t, compression=Compression.INT8)
    back = decode_frame(bytearray(q.to_bytes())).tensor
    assert ((back - t).abs() <= int8_error_bound(t, 4096)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_and_fp16_casts_within_their_bounds(dtype: torch.dtype) -> None:
    t = (torch.randn(10_000, dtype=dtype) * 100).clamp(-60000, 60000)
    t = torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)  # stay in fp16's normal range
    bf16, _ = roundtrip(t, compression=Compression.BF16)
    fp16, _ = roundtrip(t, compression=Compression.FP16)
    assert bf16.dtype == fp16.dtype == dtype
    assert ((bf16 - t).abs() <= t.abs() * 2**-8).all()
    assert ((fp16 - t).abs() <= t.abs() * 2**-11).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block", [1, 64, 4096])
def test_int8_frame_within_bound_and_4x_smaller(dtype: torch.dtype, block: int) -> None:
    t = (torch.randn(3, 5001) ** 3).to(dtype)
    frame = encode_frame(t, compression=Compression.INT8, block_size=block)
    out = decode_frame(bytearray(frame.to_bytes())).tensor
    assert out.dtype == dtype and out.shape == t.shape
    bound = int8_error_bound(t.float(), block)
    # the result is rounded once more into dtype: allow that rounding on top of the stated bound
    slack = t.float().abs() * {torch.float16: 2**-11, torch.bfloat16: 2**-8}.get(dtype, 0.0)
    assert ((out.float() - t.float()).abs() <= bound + slack).all()
    assert frame.payload.nbytes == t.numel() + 4 * -(-t.numel() // block)


def test_int8_refuses_non_finite_naming_the_block() -> None:
    t = torch.zeros(10_000)
    t[5000] = float("nan")
    with pytest.raises(WireError, match="non-finite.*block 1"):
        encode_frame(t, compression=Compression.INT8, block_size=4096)


def test_non_contiguous_is_refused_with_a_fix() -> None:
    t = torch.randn(4, 6).t()
    with pytest.raises(WireError, match=r"not contiguous.*\.contiguous\(\)"):
        encode_frame(t)
    assert torch.equal(roundtrip(t.contiguous())[0], t)


def test_unsupported_dtype_lists_supported_ones() -> None:
    with pytest.raises(WireError, match="complex64.*supported: float32"):
        encode_frame(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    ("t", "compression", "match"),
    [
        (torch.zeros(4, dtype=torch.int32), Compression.INT8, "floating"),
        (torch.zeros(4, dtype=torch.float16), Compression.BF16, "float32 or float64"),
        (torch.zeros(4, dtype=torch.int64), Compression.FP16, "float32 or float64"),
    ],
)
def test_compression_refused_for_wrong_dtypes(t: torch.Tensor, compression: Compression, match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode_frame(t, compression=compression)


def test_cap_is_enforced_on_both_sides() -> None:
    t = torch.zeros(1000)
    with pytest.raises(WireError, match="exceeds the cap of 100 bytes"):
        encode_frame(t, max_payload=100)
    data = bytearray(encode_frame(t).to_bytes())
    with pytest.raises(WireError, match="exceeds the cap of 3999 bytes"):
        decode_frame(data, max_payload=3999)


def test_payload_length_must_match_header() -> None:
    frame = encode_frame(torch.zeros(8))
    header = decode_header(frame.header)
    with pytest.raises(WireError, match="payload is 28 bytes but the header declares 32"):
        decode_payload(header, bytearray(28))
    with pytest.raises(WireError, match="frame is 161 bytes"):
        decode_frame(bytearray(frame.to_bytes() + b"x"))


def test_forged_bool_bytes_are_refused() -> None:
    frame = encode_frame(torch.tensor([True, False, True]))
    header = _C.FrameHeader(
        dtype=CODE_BY_DTYPE[torch.bool], shape=[3], payload_len=3, payload_crc=_C.crc32c(b"\x01\x07\x00")
    )
    forged = _C.encode_header(header, 1 << 20) + b"\x01\x07\x00"
    assert decode_frame(bytearray(frame.to_bytes())).tensor.tolist() == [True, False, True]
    with pytest.raises(WireError, match="bool payload"):
        decode_frame(bytearray(forged))


def test_forged_int8_scales_are_refused() -> None:
    payload = bytearray(encode_frame(torch.ones(8), compression=Compression.INT8, block_size=8).payload)
    payload[0:4] = bytes.fromhex("0000c0ff")  # NaN scale
    header = _C.FrameHeader(
        dtype=CODE_BY_DTYPE[torch.float32],
        shape=[8],
        compression=int(Compression.INT8),
        block_size=8,
        payload_len=len(payload),
        payload_crc=_C.crc32c(payload),
    )
    with pytest.raises(WireError, match="non-finite block scales"):
        decode_frame(bytearray(_C.encode_header(header, 1 << 20) + payload))


def test_gpu_tensors_are_refused_by_the_host_format() -> None:
    t = torch.zeros(2, device="meta")
    with pytest.raises(WireError, match="host memory.*meta"):
        encode_frame(t)
