"""CRC32C (Castagnoli): the SSE4.2 path with its 3 x 8192-byte interleaved lanes and the portable
slicing-by-8 path must agree with each other and with an independent implementation (the `crc32c`
package) for every length, alignment, starting value and size."""

from __future__ import annotations

import random

import crc32c as crc32c_pkg
import numpy as np
import pytest

from tensorlink import _C

LANE = 8192
INTERLEAVE = 3 * LANE  # bytes consumed per round of the hardware path's three lanes

# Lengths around every boundary the two implementations care about: the 8-byte word loop, the lane
# and interleave sizes (and multiples of them), plus a few arbitrary ones.
BOUNDARY_LENGTHS = sorted(
    set(range(0, 65))
    | {127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097}
    | {LANE - 1, LANE, LANE + 1, 2 * LANE - 1, 2 * LANE, 2 * LANE + 1}
    | {INTERLEAVE - 8, INTERLEAVE - 1, INTERLEAVE, INTERLEAVE + 1, INTERLEAVE + 7, INTERLEAVE + 8}
    | {2 * INTERLEAVE - 1, 2 * INTERLEAVE, 2 * INTERLEAVE + 7, 3 * INTERLEAVE + 3}
    | {100_000, (1 << 20) + 3}
)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def aligned_slice(data: bytes, misalign: int) -> memoryview:
    """A view of `data` whose first byte sits at an address that is `misalign` (mod 8) past an 8-byte boundary."""
    arr = np.empty(len(data) + 16, dtype=np.uint8)
    start = (-arr.ctypes.data) % 8 + misalign
    arr[start : start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    view = memoryview(arr)[start : start + len(data)]
    assert (arr.ctypes.data + start) % 8 == misalign
    return view


def test_known_vector() -> None:
    """The standard CRC32C check value, on both paths."""
    assert _C.crc32c(b"123456789") == 0xE3069283
    assert _C.crc32c_portable(b"123456789") == 0xE3069283
    assert _C.crc32c(b"") == 0 and _C.crc32c_portable(b"") == 0
    # 32 zero bytes / 32 0xFF bytes: RFC 3720 (iSCSI) B.4 test vectors
    assert _C.crc32c(bytes(32)) == 0x8A9136AA
    assert _C.crc32c(b"\xff" * 32) == 0x62A8AB43


def test_hardware_flag_is_a_bool() -> None:
    assert isinstance(_C.crc32c_hardware(), bool)


@pytest.mark.parametrize("n", BOUNDARY_LENGTHS)
def test_both_paths_match_reference_at_boundary_lengths(n: int) -> None:
    """Lengths around the 8-byte, 8192-byte lane and 24576-byte interleave boundaries."""
    data = random_bytes(n, seed=n)
    want = crc32c_pkg.crc32c(data)
    assert _C.crc32c(data) == want, f"dispatching (hardware={_C.crc32c_hardware()}) path, n={n}"
    assert _C.crc32c_portable(data) == want, f"portable path, n={n}"


def test_both_paths_match_reference_on_random_lengths() -> None:
    """Random lengths up to a few interleave rounds, with random starting CRC values."""
    rng = random.Random(1234)
    for i in range(150):
        n = rng.randrange(0, 4 * INTERLEAVE)
        start = rng.randrange(0, 2**32)
        data = random_bytes(n, seed=10_000 + i)
        want = crc32c_pkg.crc32c(data, value=start)
        assert _C.crc32c(data, crc=start) == want, (n, start)
        assert _C.crc32c_portable(data, crc=start) == want, (n, start)


def test_hardware_path_is_used_where_the_cpu_has_it() -> None:
    """On x86-64 with SSE4.2 the dispatching crc32c must take the hardware path (or the comparisons
    above would only test the portable path twice)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"hardware CRC32C is only implemented for x86-64, this is {platform.machine()}")
    flags = open("/proc/cpuinfo").read()
    if " sse4_2" not in flags:
        pytest.skip("this CPU has no SSE4.2")
    assert _C.crc32c_hardware() is True


@pytest.mark.parametrize("misalign", range(8))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, INTERLEAVE - 1, INTERLEAVE + 5, 2 * INTERLEAVE + 13, 70_001])
def test_unaligned_starts(misalign: int, n: int) -> None:
    """Both paths consume a byte-wise prologue up to 8-byte alignment; every misalignment must agree."""
    data = random_bytes(n, seed=misalign * 1_000_003 + n)
    view = aligned_slice(data, misalign)
    want = crc32c_pkg.crc32c(data)
    assert _C.crc32c(view) == want
    assert _C.crc32c_portable(view) == want


@pytest.mark.parametrize(
    "split",
    [0, 1, 5, 8, LANE - 3, INTERLEAVE - 1, INTERLEAVE, INTERLEAVE + 1, 2 * INTERLEAVE + 3, 4 * INTERLEAVE - 1],
)
def test_continuation(split: int) -> None:
    """crc(a + b) == crc(b, crc=crc(a)), including splits that cut across lanes, on both paths."""
    data = random_bytes(4 * INTERLEAVE + 11, seed=split)
    a, b = data[:split], data[split:]
    whole = crc32c_pkg.crc32c(data)
    assert _C.crc32c(b, crc=_C.crc32c(a)) == whole
    assert _C.crc32c_portable(b, crc=_C.crc32c_portable(a)) == whole
    # the two paths are interchangeable mid-stream
    assert _C.crc32c(b, crc=_C.crc32c_portable(a)) == whole
    assert _C.crc32c_portable(b, crc=_C.crc32c(a)) == whole


def test_continuation_in_many_small_unaligned_pieces() -> None:
    """Feeding a buffer in odd-sized pieces (each starting at a different alignment) gives the same CRC."""
    data = random_bytes(3 * INTERLEAVE + 101, seed=99)
    mv = memoryview(data)
    rng = random.Random(5)
    crc_hw = crc_sw = 0
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 3, 7, 8, 13, 4096, INTERLEAVE + 1])
        crc_hw = _C.crc32c(mv[pos : pos + step], crc=crc_hw)
        crc_sw = _C.crc32c_portable(mv[pos : pos + step], crc=crc_sw)
        pos += step
    assert crc_hw == crc_sw == crc32c_pkg.crc32c(data)


def test_accepts_any_contiguous_buffer() -> None:
    """bytes, bytearray, memoryview and numpy arrays of any item size are hashed by their raw bytes."""
    floats = np.arange(1000, dtype=np.float32)
    raw = floats.tobytes()
    want = crc32c_pkg.crc32c(raw)
    for obj in (raw, bytearray(raw), memoryview(raw), floats, memoryview(floats)):
        assert _C.crc32c(obj) == want, type(obj)
        assert _C.crc32c_portable(obj) == want, type(obj)


def test_rejects_non_contiguous_and_non_buffers() -> None:
    """A strided view has no single byte range to hash: it is refused, not hashed partially."""
    with pytest.raises(TypeError, match="contiguous"):
        _C.crc32c(memoryview(bytes(64))[::2])
    with pytest.raises(TypeError):
        _C.crc32c("not bytes")
    with pytest.raises(TypeError):
        _C.crc32c(b"x", crc=2**32)  # the running CRC is a uint32


def test_large_buffer_matches_reference() -> None:
    """256 MiB: thousands of interleave rounds, the size of a large activation frame."""
    n = (256 << 20) + 5
    data = np.random.default_rng(256).bytes(n)
    want = crc32c_pkg.crc32c(data)
    assert _C.crc32c(data) == want
    assert _C.crc32c_portable(data) == want
    # and from an odd starting address with a non-zero starting value
    view = memoryview(data)[3:]
    assert _C.crc32c(view, crc=0xDEADBEEF) == crc32c_pkg.crc32c(view, value=0xDEADBEEF)
