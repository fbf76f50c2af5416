"""BufferPool / PooledBuffer (csrc/buffer_pool.cpp): page-aligned reusable buffers under a hard byte cap,
returned only when the last reference (tensors built over them included) is gone, with a blocking,
GIL-free acquire as the data plane's backpressure."""

from __future__ import annotations

import gc
import random
import threading
import time

import numpy as np
import pytest
import torch

from tensorlink import _C

PAGE = 4096
KiB = 1024
MiB = 1024 * KiB


def make_pool(capacity: int) -> _C.BufferPool:
    return _C.BufferPool(capacity, pin=False)


def accounting(pool: _C.BufferPool) -> tuple[int, int]:
    return pool.in_use, pool.cached


# ------------------------------------------------------------------------------------------ buffers


@pytest.mark.parametrize("n", [0, 1, PAGE - 1, PAGE, PAGE + 1, 10_000, 16 * KiB + 1, MiB, 3 * MiB + 5])
def test_buffer_is_page_aligned_writable_and_exactly_sized(n: int) -> None:
    """The view is exactly what was asked for; the block behind it is its size class, page aligned."""
    pool = make_pool(16 * MiB)
    buf = pool.acquire(n)
    assert buf.address % PAGE == 0
    assert buf.nbytes == len(buf) == n
    assert buf.capacity == _C.BufferPool.size_class(n) >= n
    view = memoryview(buf)
    assert not view.readonly and view.nbytes == n and view.itemsize == 1 and view.contiguous
    if n:
        arr = np.frombuffer(buf, dtype=np.uint8)
        assert arr.ctypes.data == buf.address
        arr[:] = np.arange(n, dtype=np.uint64).astype(np.uint8)  # touch every byte, including the last
        assert bytes(view[-1:]) == bytes([(n - 1) & 0xFF])
    assert pool.in_use == buf.capacity and pool.cached == 0


def test_pinning_follows_cuda_availability() -> None:
    """pin=True page-locks only where a CUDA device is usable; pin=False never does."""
    assert _C.BufferPool(MiB, pin=True).pinned == _C.cuda_available()
    pool = make_pool(MiB)
    assert pool.pinned is False and pool.acquire(10).pinned is False
    assert _C.BufferPool(MiB, pin=True).acquire(10).pinned == _C.cuda_available()


def test_exception_hierarchy() -> None:
    """PoolExhausted is a TimeoutError, so callers handling backpressure as a timeout catch it."""
    assert issubclass(_C.PoolExhausted, TimeoutError)


# --------------------------------------------------------------------------------------- size class


def _interesting_sizes() -> list[int]:
    sizes = set(range(0, 3 * PAGE, 97))
    for k in range(10, 40):
        for d in (-1, 0, 1, 3):
            sizes.add((1 << k) + d)
        sizes.add((1 << k) + (1 << (k - 2)) + 1)
    rng = random.Random(0)
    sizes.update(rng.randrange(1, 1 << 40) for _ in range(2000))
    return sorted(s for s in sizes if s >= 0)


def test_size_class_rules() -> None:
    """>= the request, whole pages, a single page up to 4 KiB, at most 25 % slack above 16 KiB,
    monotone, and powers of two map to themselves."""
    prev = 0
    for n in _interesting_sizes():
        cls = _C.BufferPool.size_class(n)
        assert cls >= n and cls % PAGE == 0 and cls >= PAGE, n
        if n <= PAGE:
            assert cls == PAGE, n
        elif n <= 16 * KiB:
            assert cls == -(-n // PAGE) * PAGE, n  # below 16 KiB the step is one page
        else:
            assert cls - n <= n // 4, f"{n} -> {cls}: {(cls - n) / n:.1%} slack"
        assert cls >= prev, f"size_class not monotone at {n}"
        prev = cls
    for k in range(12, 48):
        assert _C.BufferPool.size_class(1 << k) == 1 << k


def test_size_class_shares_classes_between_near_sizes() -> None:
    """Activations of nearly the same size land in one class, so their buffers are reused."""
    assert _C.BufferPool.size_class(MiB + 1) == _C.BufferPool.size_class(MiB + MiB // 4) == MiB + MiB // 4
    assert _C.BufferPool.size_class(MiB + MiB // 4 + 1) == MiB + MiB // 2


def test_size_class_refuses_absurd_sizes_instead_of_wrapping() -> None:
    """Rounding up near SIZE_MAX would wrap to a tiny class; such requests are refused outright."""
    assert _C.BufferPool.size_class(2**62) >= 2**62
    for n in (2**62 + 1, 2**64 - 2**61 + 1, 2**64 - 4097, 2**64 - 1):
        with pytest.raises(ValueError, match="absurd"):
            _C.BufferPool.size_class(n)


def test_acquire_near_size_max_is_refused() -> None:
    pool = make_pool(MiB)
    try:
        buf = pool.acquire(2**64 - 1, timeout=0.1)
    except _C.PoolExhausted:
        return
    bogus = (buf.nbytes, buf.capacity)
    del buf
    raise AssertionError(f"acquire(2**64-1) returned a buffer with nbytes, capacity = {bogus}")


# ----------------------------------------------------------------------------------------- reuse


def test_released_buffer_is_reused_and_accounted() -> None:
    pool = make_pool(MiB)
    buf = pool.acquire(10_000)
    addr, cls = buf.address, buf.capacity
    assert cls == 3 * PAGE
    assert accounting(pool) == (cls, 0)
    del buf
    assert accounting(pool) == (0, cls)
    again = pool.acquire(9_000)  # same class
    assert again.address == addr and again.capacity == cls and again.nbytes == 9_000
    assert accounting(pool) == (cls, 0)
    other = pool.acquire(20_000)  # another class: a fresh block, never the held one
    assert other.address != addr
    assert accounting(pool) == (cls + other.capacity, 0)
    del again, other
    assert accounting(pool) == (0, cls + _C.BufferPool.size_class(20_000))


def test_buffer_not_returned_while_a_tensor_over_it_lives() -> None:
    """Frames are decoded zero-copy with torch.frombuffer; the tensor must keep the block out of the pool."""
    pool = make_pool(MiB)
    buf = pool.acquire(10_000)
    addr, cls = buf.address, buf.capacity
    t = torch.frombuffer(buf, dtype=torch.float32)
    assert t.data_ptr() == addr and t.numel() == 2_500
    del buf
    gc.collect()
    assert accounting(pool) == (cls, 0), "returned to the pool while a tensor still points into it"
    other = pool.acquire(10_000)
    other_addr = other.address
    assert other_addr != addr
    other_view = np.frombuffer(other, dtype=np.float32)
    other_view[:] = 7.0  # writing the other buffer must not show through the tensor
    t.fill_(3.0)
    assert bool((t == 3.0).all()) and bool((other_view == 7.0).all())
    del other, other_view
    assert accounting(pool) == (cls, cls)
    view = t[10:20]  # a view of the tensor keeps the storage (and the buffer) alive too
    del t
    gc.collect()
    assert accounting(pool) == (cls, cls)
    assert bool((view == 3.0).all())
    del view
    gc.collect()
    assert accounting(pool) == (0, 2 * cls)
    a, b = pool.acquire(10_000), pool.acquire(10_000)
    assert {a.address, b.address} == {addr, other_addr}  # both blocks are back in the pool


def test_memoryview_and_numpy_views_keep_the_buffer() -> None:
    pool = make_pool(MiB)
    buf = pool.acquire(5000)
    mv = memoryview(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    del buf
    assert pool.in_use == 2 * PAGE
    del mv
    assert pool.in_use == 2 * PAGE
    del arr
    assert accounting(pool) == (0, 2 * PAGE)


def test_buffer_outlives_its_pool_object() -> None:
    """A buffer holds the pool alive: dropping the pool first neither frees the block nor crashes."""
    pool = make_pool(MiB)
    buf = pool.acquire(PAGE)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    del pool, buf
    gc.collect()
    t.fill_(0xAB)
    assert int(t.sum()) == 0xAB * PAGE
    del t
    gc.collect()


# -------------------------------------------------------------------------------- cap and waiting


@pytest.mark.timeout(20)
def test_full_pool_times_out_with_pool_exhausted() -> None:
    pool = make_pool(64 * KiB)
    held = [pool.acquire(16 * KiB) for _ in range(4)]
    assert accounting(pool) == (64 * KiB, 0)
    t0 = time.monotonic()
    with pytest.raises(_C.PoolExhausted, match="full") as info:
        pool.acquire(PAGE, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert 0.18 <= elapsed < 2.0, f"took {elapsed:.3f} s for a 0.2 s timeout"
    t0 = time.monotonic()
    with pytest.raises(_C.PoolExhausted):
        pool.acquire(PAGE, timeout=0)
    assert time.monotonic() - t0 < 0.5
    assert accounting(pool) == (64 * KiB, 0)  # a failed acquire leaves nothing reserved
    del held
    assert pool.acquire(64 * KiB, timeout=0).capacity == 64 * KiB


@pytest.mark.timeout(20)
def test_request_that_can_never_fit_fails_at_once() -> None:
    """No waiting for a buffer larger than the whole pool (including when its size class is)."""
    pool = make_pool(MiB)
    for n in (MiB + 1, 10 * MiB, MiB - 1 + PAGE):
        t0 = time.monotonic()
        with pytest.raises(_C.PoolExhausted, match="never fit"):
            pool.acquire(n, timeout=10)
        assert time.monotonic() - t0 < 0.5, n
    odd = make_pool(10_000)  # capacity not a page multiple: a 9000-byte request needs a 12288-byte class
    with pytest.raises(_C.PoolExhausted, match="never fit"):
        odd.acquire(9_000, timeout=10)
    assert pool.acquire(MiB, timeout=0).capacity == MiB  # exactly the capacity fits


@pytest.mark.timeout(30)
def test_waiting_acquire_wakes_when_a_buffer_is_released() -> None:
    """The wait releases the GIL: the main thread runs Python (and frees a buffer) while another thread
    is blocked in acquire; the waiter then gets the buffer."""
    pool = make_pool(64 * KiB)
    held = [pool.acquire(16 * KiB) for _ in range(4)]
    released_addr = held[0].address
    result: dict[str, object] = {}

    def waiter() -> None:
        t0 = time.monotonic()
        try:
            buf = pool.acquire(16 * KiB, timeout=10)
            result["addr"] = buf.address
            del buf
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            result["error"] = exc
        result["waited"] = time.monotonic() - t0

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    spins = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # busy Python work: impossible if the waiter held the GIL
        spins += 1
    assert th.is_alive() and not result, "acquire returned although the pool was full"
    assert spins > 1000
    del held[0]
    th.join(timeout=10)
    assert not th.is_alive(), "waiter still blocked after a buffer came back"
    assert "error" not in result, result.get("error")
    assert result["addr"] == released_addr
    assert 0.25 <= result["waited"] < 5.0
    del held
    assert accounting(pool) == (0, 64 * KiB)


@pytest.mark.timeout(30)
def test_waiter_for_a_larger_class_evicts_returned_buffers() -> None:
    """A waiter needing 32 KiB is satisfied by two returned 16 KiB buffers, which are freed to make room."""
    pool = make_pool(64 * KiB)
    held = [pool.acquire(16 * KiB) for _ in range(4)]
    result: dict[str, object] = {}

    def waiter() -> None:
        try:
            result["buf"] = pool.acquire(32 * KiB, timeout=10)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    time.sleep(0.1)
    del held[0]  # 16 KiB free: not enough yet
    time.sleep(0.2)
    assert th.is_alive() and not result
    del held[0]
    th.join(timeout=10)
    assert not th.is_alive() and "error" not in result, result
    assert result["buf"].capacity == 32 * KiB  # type: ignore[attr-defined]
    in_use, cached = accounting(pool)
    assert in_use == 64 * KiB and cached == 0
    del result["buf"], held
    assert accounting(pool) == (0, 64 * KiB)


def test_cached_buffers_of_another_class_are_evicted_to_make_room() -> None:
    pool = make_pool(64 * KiB)
    bufs = [pool.acquire(16 * KiB) for _ in range(4)]
    del bufs
    assert accounting(pool) == (0, 64 * KiB)
    big = pool.acquire(32 * KiB, timeout=0)  # must evict two cached 16 KiB blocks, not wait
    assert accounting(pool) == (32 * KiB, 32 * KiB)
    big2 = pool.acquire(32 * KiB, timeout=0)
    assert accounting(pool) == (64 * KiB, 0)
    with pytest.raises(_C.PoolExhausted):
        pool.acquire(PAGE, timeout=0.05)  # nothing cached left to evict, everything in use
    del big, big2
    assert accounting(pool) == (0, 64 * KiB)
    # a same-class hit is preferred over allocating: the cached 32 KiB blocks come back
    a = pool.acquire(30 * KiB, timeout=0)
    assert a.capacity == 32 * KiB and accounting(pool) == (32 * KiB, 32 * KiB)


def test_trim_frees_cached_buffers_only() -> None:
    pool = make_pool(MiB)
    keep = pool.acquire(100 * KiB)
    drop = [pool.acquire(50 * KiB) for _ in range(3)]
    keep_cls, drop_cls = keep.capacity, drop[0].capacity
    del drop
    assert accounting(pool) == (keep_cls, 3 * drop_cls)
    pool.trim()
    assert accounting(pool) == (keep_cls, 0)
    np.frombuffer(keep, dtype=np.uint8)[:] = 1  # the held buffer is untouched by trim
    del keep
    assert accounting(pool) == (0, keep_cls)
    pool.trim()
    assert accounting(pool) == (0, 0)


@pytest.mark.timeout(60)
def test_concurrent_acquire_release_keeps_accounting_consistent() -> None:
    """4 threads x 200 rounds of acquire/fill/verify/release under a cap smaller than their combined
    demand: no buffer is handed to two holders at once, the cap is never exceeded, and all comes back."""
    capacity = 256 * KiB
    pool = make_pool(capacity)
    sizes = [1, 5_000, 20_000, 70_000, 100_000]
    errors: list[str] = []
    over_cap: list[tuple[int, int]] = []
    start = threading.Barrier(4)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        try:
            start.wait(timeout=10)
            for i in range(200):
                n = rng.choice(sizes)
                buf = pool.acquire(n, timeout=10)
                arr = np.frombuffer(buf, dtype=np.uint8)
                arr[:] = tid + 1
                in_use, cached = accounting(pool)
                if in_use + cached > capacity:
                    over_cap.append((in_use, cached))
                if i % 16 == 0:
                    time.sleep(0.0005)
                if not (arr == tid + 1).all():
                    errors.append(f"thread {tid} round {i}: buffer {buf.address:#x} overwritten by another holder")
                del arr, buf
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {tid}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=50)
    assert not any(th.is_alive() for th in threads), "a worker is stuck"
    assert not errors, errors[:5]
    assert not over_cap, over_cap[:5]
    in_use, cached = accounting(pool)
    assert in_use == 0 and cached <= capacity
    pool.trim()
    assert accounting(pool) == (0, 0)


def test_negative_size_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        make_pool(MiB).acquire(-1)


def test_non_numeric_timeout_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="timeout must be a number"):
        make_pool(MiB).acquire(10, timeout="soon")
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        make_pool(MiB).acquire(10, timeout=-1)
