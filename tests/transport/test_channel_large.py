"""A tensor of more than 256 MiB crosses a direct channel intact: one frame, many sealed chunks, moved
by worker threads on both ends into a pool buffer sized for it."""

from __future__ import annotations

import time

import torch
import trio
from channel_helpers import MeshFactory, MiB, config_for, exchange, job_id

from tensorlink import _C
from tensorlink.wire.frame import HEADER_SIZE, Route

JOB = job_id(5)
NUMEL = 64 * 1024 * 1024 + 7  # 256 MiB + 28 bytes of float32: not a multiple of the 256 KiB seal chunk
POOL_BYTES = 512 * MiB  # the receiving buffer's size class is 320 MiB


async def test_256_mib_tensor_over_a_direct_channel(channel_mesh: MeshFactory) -> None:
    """torch.arange, not randn: every element differs from its neighbours, so a dropped, duplicated or
    misplaced chunk cannot go unnoticed by torch.equal."""
    x = torch.arange(NUMEL, dtype=torch.float32)
    nbytes = x.numel() * x.element_size()
    assert _C.BufferPool.size_class(nbytes) <= POOL_BYTES
    async with channel_mesh(2, config_for("direct", pool_bytes=POOL_BYTES)) as mesh:
        with trio.fail_after(60):
            a, b = await mesh.pair(0, 1, JOB)
            route = Route(JOB, step=9, micro_batch=1, stage=2)
            started = time.perf_counter()
            got, got_route = await exchange(a, b, x, route)
            elapsed = time.perf_counter() - started
            assert got_route == route
            assert got.shape == x.shape and got.dtype == x.dtype
            assert torch.equal(got, x)
            chunks = -(-nbytes // _C.SEAL_CHUNK)
            wire = HEADER_SIZE + _C.SEAL_TAG + nbytes + chunks * _C.SEAL_TAG
            assert a.stats()["bytes_sent"] == b.stats()["bytes_received"] == wire
            assert b.pool.in_use >= nbytes  # the tensor lives in the pool buffer it was received into
            del got
            assert b.pool.in_use == 0
            # the channel is still good for ordinary traffic after the big frame
            small, _ = await exchange(b, a, x[:1000])
            assert torch.equal(small, x[:1000])
    print(f"256 MiB over a direct channel on loopback: {elapsed:.2f} s, {nbytes / elapsed / 1e9:.2f} GB/s")
