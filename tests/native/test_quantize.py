"""Blockwise absmax int8 quantization (csrc/quantize.cpp), called directly through _C and through
tensorlink.wire.compression. The documented contract: per block, scale = absmax / 127, q in [-127, 127],
|x - x'| <= absmax / 254 * (1 + 2**-13); blocks with absmax < 1e-30 become zeros; non-finite input is
refused naming the block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorlink import _C
from tensorlink.wire import WireError
from tensorlink.wire import compression as comp

F32 = np.float32
FLT_MAX = float(np.finfo(F32).max)
STATED_SLACK = 2.0**-13  # compression.INT8_RELATIVE_SLACK, the documented float32 rounding allowance
# Half a step plus float32 rounding can never exceed this: q comes from one float32 product with |x*inv|
# <= 127 (error < 127 * 2**-23 steps) and the scale is rounded once (error < 127 * 2**-24 steps), so
# |x - x'| < step * (0.5 + 4e-5). Used as a hard guard on gross errors even while the stated bound is broken.
HARD_SLACK = 2.0**-12


# ----------------------------------------------------------------------------------------------- helpers


def quantize_np(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """_C.quantize_int8 into freshly allocated numpy outputs of exactly the required size."""
    x = np.ascontiguousarray(x, dtype=F32)
    nblocks = -(-x.size // block)
    scales = np.full(nblocks, np.nan, dtype=F32)  # NaN: a scale the kernel forgot to write shows up
    q = np.full(x.size, -128, dtype=np.int8)  # -128: never a valid output, so unwritten values show up
    _C.quantize_int8(x, block, scales, q)
    return scales, q


def dequantize_np(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    out = np.full(q.size, np.nan, dtype=F32)
    _C.dequantize_int8(q, scales, block, out)
    return out


def block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Per-block max |x| in float32 (exact: max of float32 values)."""
    pad = (-x.size) % block
    return np.pad(np.abs(x.astype(F32)), (0, pad)).reshape(-1, block).max(axis=1)


def per_element(values: np.ndarray, block: int, n: int) -> np.ndarray:
    return np.repeat(values, block)[:n]


def error_and_bounds(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(exact |x - x'| in float64, stated bound, hard bound, scales, q) for one round trip through _C."""
    scales, q = quantize_np(x, block)
    y = dequantize_np(q, scales, block)
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))  # exact: both are float32
    absmax = per_element(block_absmax(x, block).astype(np.float64), block, x.size)
    tiny = absmax < _C.TINY_ABSMAX
    stated = np.where(tiny, absmax, absmax / 254 * (1 + STATED_SLACK))
    hard = np.where(tiny, absmax, absmax / 254 * (1 + HARD_SLACK))
    return err, stated, hard, scales, q


def distribution(name: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "normal":
        return rng.standard_normal(n).astype(F32)
    if name == "heavy_tailed":
        return (rng.standard_normal(n) ** 3 * 1e4).astype(F32)
    if name == "mixed_scales":  # blocks whose magnitudes differ by many orders, some of them tiny
        return (rng.standard_normal(n) * 10.0 ** rng.integers(-35, 30, n)).astype(F32)
    raise AssertionError(name)


DISTRIBUTIONS = ["normal", "heavy_tailed", "mixed_scales"]
BLOCKS = [1, 7, 4096]
N = 3 * 4096 * 17 + 1234  # ragged for every block size above (not a multiple of 7 or 4096)


# -------------------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_roundtrip_structure_and_half_step_error(dist: str, block: int) -> None:
    """Scales are exactly absmax/127 (0 for tiny blocks), q stays in [-127, 127], and no value is off by
    more than half a step plus float32 rounding. Hard failure for anything gross."""
    x = distribution(dist, N, seed=block)
    err, _, hard, scales, q = error_and_bounds(x, block)
    assert N % block != 0 or block == 1
    absmax = block_absmax(x, block)
    want_scales = np.where(absmax < F32(_C.TINY_ABSMAX), F32(0), absmax / F32(127))
    np.testing.assert_array_equal(scales, want_scales)
    assert q.min() >= -127 and q.max() <= 127
    worst = int(np.argmax(err - hard))
    assert (err <= hard).all(), f"element {worst}: |x - x'| = {err[worst]!r} > {hard[worst]!r} (x = {x[worst]!r})"


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_roundtrip_error_within_stated_bound(dist: str, block: int) -> None:
    """The documented bound |x - x'| <= absmax/254 * (1 + 2**-13), via _C and via wire.compression
    (whose int8_error_bound must state the same bound and whose results must be the same bytes)."""
    x = distribution(dist, N, seed=block)
    err, stated, _, scales, q = error_and_bounds(x, block)

    t = torch.from_numpy(x)
    t_scales, t_q = comp.quantize_int8(t, block)
    np.testing.assert_array_equal(t_scales.numpy(), scales)
    np.testing.assert_array_equal(t_q.numpy(), q)
    lib_bound = comp.int8_error_bound(t, block).double().numpy()
    np.testing.assert_allclose(lib_bound, stated, rtol=2**-22, atol=0)
    t_err = (t.double() - comp.dequantize_int8(t_scales, t_q, block).double()).abs().numpy()
    np.testing.assert_array_equal(t_err, err)

    bad = err > stated
    assert not bad.any(), f"{int(bad.sum())} of {N} values exceed absmax/254*(1+2**-13)"


@pytest.mark.parametrize(
    "x",
    [
        # x[1] is exactly 126.5 steps (float32 of 100*126.5/127): q=126, and 126 * fl(100/127) sits
        # 0.393707275 from x[1], over the bound 0.393701163 (1.65e-5 relative excess)
        pytest.param([100.0, 99.6063003540039], id="scale_rounding"),
        # x[1]/scale is 26.50000068 exactly, but float32 x*inv rounds to 26.5 and ties-to-even gives 26
        # instead of 27: error 0.0035483986 > bound 0.0035483890
        pytest.param([float.fromhex("-0x1.cd75ep-1"), float.fromhex("0x1.8127eep-3")], id="product_rounding"),
    ],
)
def test_stated_bound_at_rounding_midpoint(x: list[float]) -> None:
    """Rounding midpoints where float32 arithmetic lands past half a step: still within the stated
    bound, whose 2**-13 slack covers the rounding of the scale, the product and the dequantization."""
    arr = np.array(x, dtype=F32)
    err, stated, hard, _, q = error_and_bounds(arr, block=2)
    assert abs(int(q[0])) == 127
    assert err[1] <= hard[1]  # still within half a step plus float32 rounding
    assert err[1] <= stated[1], f"q={q[1]}, |x - x'| = {err[1]!r} > stated bound {stated[1]!r}"


@pytest.mark.parametrize("block", [1, 7])
def test_largest_finite_values_stay_finite(block: int) -> None:
    """Finite input must dequantize to finite output within the bound, even at the edge of float32."""
    x = np.array([FLT_MAX, -FLT_MAX, 1.0, -3e38, 0.0, 1e38, 5.0] * 2, dtype=F32)
    err, stated, _, _, _ = error_and_bounds(x, block)
    scales, q = quantize_np(x, block)
    y = dequantize_np(q, scales, block)
    assert np.isfinite(y).all(), f"dequantized {y!r} from finite {x!r}"
    assert (err <= stated).all()


def test_near_max_values_are_finite_and_bounded() -> None:
    """Just below FLT_MAX (one ulp and more) the round trip is finite and within the stated bound;
    guards the neighbourhood of the known FLT_MAX overflow."""
    below = np.nextafter(F32(FLT_MAX), F32(0))
    x = np.array([below, -below, F32(3.0e38), F32(-1.7e38), F32(1.0)], dtype=F32)
    for block in (1, 5):
        err, stated, _, _, _ = error_and_bounds(x, block)
        scales, q = quantize_np(x, block)
        y = dequantize_np(q, scales, block)
        assert np.isfinite(y).all(), y
        assert (err <= stated).all()


# ------------------------------------------------------------------------------- special value classes


@pytest.mark.parametrize("block", BLOCKS)
def test_all_zero_input_gives_zero_scales_and_values(block: int) -> None:
    x = np.zeros(3 * block + 2, dtype=F32)
    x[1::2] = -0.0
    scales, q = quantize_np(x, block)
    assert (scales == 0).all() and (q == 0).all()
    assert (dequantize_np(q, scales, block) == 0).all()


@pytest.mark.parametrize("block", BLOCKS)
def test_tiny_blocks_become_zeros(block: int) -> None:
    """absmax < 1e-30 (denormals included) is sent as zeros with scale 0; its error is at most absmax."""
    rng = np.random.default_rng(block)
    x = (rng.uniform(-1, 1, 2 * block + 3) * 9e-31).astype(F32)
    x[0] = np.float32(1.4e-45)  # smallest denormal
    scales, q = quantize_np(x, block)
    assert (scales == 0).all() and (q == 0).all()
    assert (dequantize_np(q, scales, block) == 0).all()
    err, stated, _, _, _ = error_and_bounds(x, block)
    assert (err <= stated).all() and (stated < 1e-30).all()  # the bound for tiny blocks is absmax itself


def test_tiny_threshold_is_exactly_1e_30() -> None:
    """A block at exactly float32(1e-30) is quantized normally; one ulp below is zeroed."""
    tiny = F32(_C.TINY_ABSMAX)
    assert tiny == F32(1e-30)
    below = np.nextafter(tiny, F32(0))
    x = np.array([tiny, tiny / 4, below, below / 3], dtype=F32)
    scales, q = quantize_np(x, 2)
    assert scales[0] == tiny / F32(127) and scales[1] == 0
    assert q.tolist() == [127, 32, 0, 0]  # 31.75 -> 32
    err, stated, _, _, _ = error_and_bounds(x, 2)
    assert (err <= stated).all()


def test_blocks_are_independent() -> None:
    """One huge block does not coarsen its neighbours: each block gets its own scale."""
    x = np.array([1e6, -1e6, 1e-3, 2e-3, 0.5, -0.25], dtype=F32)
    scales, q = quantize_np(x, 2)
    np.testing.assert_array_equal(scales, np.array([1e6, 2e-3, 0.5], dtype=F32) / F32(127))
    assert q.tolist() == [127, -127, 64, 127, 127, -64]  # 63.5 rounds half to even -> 64


def test_dequantize_known_values() -> None:
    q = np.array([127, -127, 0, 1, -1, 5], dtype=np.int8)
    scales = np.array([2.0, 0.5], dtype=F32)
    out = dequantize_np(q, scales, 4)
    assert out.tolist() == [254.0, -254.0, 0.0, 2.0, -0.5, 2.5]


def test_ragged_last_block_is_written() -> None:
    """The last, short block gets its own scale and every one of its values (nothing left unwritten)."""
    block = 4096
    x = np.random.default_rng(3).standard_normal(2 * block + 3).astype(F32)
    x[-3:] = [100.0, -50.0, 25.0]
    scales, q = quantize_np(x, block)
    assert scales.size == 3 and scales[-1] == F32(100.0) / F32(127)
    assert q[-3:].tolist() == [127, -64, 32]  # -63.5 -> -64 (half to even), 31.75 -> 32


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "negative_nan"])
@pytest.mark.parametrize("block", BLOCKS)
def test_non_finite_input_names_the_block(bad: object, block: int) -> None:
    n = 5 * block + 3
    x = np.linspace(-1, 1, n, dtype=F32)
    index = 3 * block + min(2, block - 1)
    if bad == "negative_nan":
        x[index : index + 1].view(np.uint32)[0] = 0xFFC00001  # NaN with the sign bit set
    else:
        x[index] = bad
    first, last = 3 * block, 4 * block - 1
    with pytest.raises(WireError, match=rf"block 3 \(elements {first}\.\.{last}\)"):
        quantize_np(x, block)
    with pytest.raises(WireError, match="non-finite"):
        comp.quantize_int8(torch.from_numpy(x), block)


def test_non_finite_in_ragged_last_block_names_its_true_range() -> None:
    x = np.ones(2 * 7 + 3, dtype=F32)
    x[-1] = np.inf
    with pytest.raises(WireError, match=r"block 2 \(elements 14\.\.16\)"):
        quantize_np(x, 7)


@pytest.mark.parametrize("block", [0, _C.MAX_BLOCK_SIZE + 1])
def test_block_size_out_of_range_is_refused(block: int) -> None:
    x = np.ones(16, dtype=F32)
    with pytest.raises(WireError, match="block size"):
        _C.quantize_int8(x, block, np.empty(16, F32), np.empty(16, np.int8))
    with pytest.raises(WireError, match="block size"):
        _C.dequantize_int8(np.zeros(16, np.int8), np.ones(16, F32), block, np.empty(16, F32))
    if block:
        with pytest.raises(WireError, match="block size"):
            comp.quantize_int8(torch.ones(16), block)


def test_compression_api_refuses_block_zero_with_wire_error() -> None:
    with pytest.raises(WireError, match="block size"):
        comp.quantize_int8(torch.ones(16), 0)


def test_undersized_outputs_are_refused_before_writing() -> None:
    """One scale or one value short: a WireError, and the outputs are left untouched."""
    x = np.ones(3 * 7 + 2, dtype=F32)  # 4 blocks of 7
    scales_short, q_ok = np.full(3, 9, F32), np.full(x.size, 9, np.int8)
    with pytest.raises(WireError, match="too small"):
        _C.quantize_int8(x, 7, scales_short, q_ok)
    scales_ok, q_short = np.full(4, 9, F32), np.full(x.size - 1, 9, np.int8)
    with pytest.raises(WireError, match="too small"):
        _C.quantize_int8(x, 7, scales_ok, q_short)
    assert (scales_short == 9).all() and (q_ok == 9).all() and (scales_ok == 9).all() and (q_short == 9).all()

    q = np.zeros(x.size, np.int8)
    with pytest.raises(WireError, match="too small"):
        _C.dequantize_int8(q, np.ones(3, F32), 7, np.empty(x.size, F32))  # scales short
    with pytest.raises(WireError, match="too small"):
        _C.dequantize_int8(q, np.ones(4, F32), 7, np.empty(x.size - 1, F32))  # dst short
    # a scales buffer one byte (not one float) short is also refused
    with pytest.raises(WireError, match="too small"):
        _C.quantize_int8(x, 7, bytearray(4 * 4 - 1), q_ok)


def test_src_must_hold_whole_floats() -> None:
    with pytest.raises(WireError, match="divisible by 4"):
        _C.quantize_int8(bytes(10), 4, bytearray(64), bytearray(64))


def test_outputs_must_be_writable() -> None:
    x = np.ones(8, dtype=F32)
    with pytest.raises(TypeError, match="writable"):
        _C.quantize_int8(x, 4, bytes(8), bytearray(8))
    with pytest.raises(TypeError, match="writable"):
        _C.dequantize_int8(bytes(8), np.ones(2, F32), 4, bytes(32))


# ------------------------------------------------------------------------------ wire.compression API


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_compression_api_accepts_floating_tensors_of_any_layout(dtype: torch.dtype) -> None:
    """Non-float32 and non-contiguous tensors are converted, quantized, and bounded the same way."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 130, generator=g) * 3).to(dtype).t()  # transposed: not contiguous
    assert not x.is_contiguous()
    scales, q = comp.quantize_int8(x, 7)
    assert scales.dtype == torch.float32 and q.dtype == torch.int8
    assert scales.numel() == -(-x.numel() // 7) and q.numel() == x.numel()
    y = comp.dequantize_int8(scales, q, 7)
    flat = x.reshape(-1).to(torch.float32)
    bound = comp.int8_error_bound(x, 7)
    assert bound.shape == x.shape
    assert bool(((flat.double() - y.double()).abs() <= bound.reshape(-1).double() * (1 + HARD_SLACK)).all())


def test_compression_api_refuses_integer_tensors() -> None:
    with pytest.raises(WireError, match="floating"):
        comp.quantize_int8(torch.arange(10), 4)


def test_compression_api_empty_tensor() -> None:
    scales, q = comp.quantize_int8(torch.empty(0, 5), 4)
    assert scales.numel() == 0 and q.numel() == 0
    assert comp.dequantize_int8(scales, q, 4).numel() == 0


def test_int8_error_bound_for_tiny_and_normal_blocks() -> None:
    x = torch.tensor([1e-31, -5e-31, 2.0, -127.0, 0.0])
    bound = comp.int8_error_bound(x, 2)
    assert bound[0] == bound[1] == torch.tensor(5e-31)  # tiny block: bound is absmax itself
    want = torch.tensor(127.0) / 254 * (1 + comp.INT8_RELATIVE_SLACK)
    assert bound[2] == bound[3] == want
    assert bound[4] == 0.0
