"""CUDA tensors on data-plane channels: staged through pinned pool buffers on a copy stream of their own.

Runs only where a GPU is present (tests/conftest.py skips it with the reason otherwise). Both channel
kinds: the staging happens above the transport, so the fallback must carry CUDA tensors the same way.
"""

from __future__ import annotations

import pytest
import torch
from channel_helpers import MeshFactory, config_for

from tensorlink.transport.staging import DeviceStager
from tensorlink.wire.frame import Route

pytestmark = pytest.mark.gpu


async def test_cuda_tensors_cross_a_channel_and_land_on_the_device(channel_mesh: MeshFactory, kind: str) -> None:
    async with channel_mesh(2, config_for(kind)) as mesh:
        a, b = await mesh.pair(0, 1)
        assert a.pool.pinned, "with a GPU the pool must hand out page-locked buffers, or copies are synchronous"
        for shape, dtype in [((1024, 1024), torch.float32), ((7, 33), torch.bfloat16), ((0,), torch.float16)]:
            sent = torch.randn(shape, device="cuda").to(dtype)
            sent_t = sent.t()  # non-contiguous: made contiguous on the device, then staged
            route = Route(bytes(range(16)), 3, 1, 2)
            await a.send(sent_t, route)
            frame = await b.recv(device="cuda")
            assert frame.tensor.is_cuda and frame.route == route
            torch.cuda.current_stream().synchronize()
            assert torch.equal(frame.tensor, sent_t)


def test_staging_orders_copies_after_the_producer_and_before_the_consumer() -> None:
    """A copy must not read a tensor before the kernel that writes it has run, even though it runs on
    another stream; and the consumer must not read the device copy before it lands."""
    from tensorlink import _C

    pool = _C.BufferPool(64 << 20, pin=True)
    stager = DeviceStager(pool, torch.device("cuda", torch.cuda.current_device()))
    producer = torch.cuda.Stream()
    with torch.cuda.stream(producer):
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(8):  # long enough that an unordered copy would see the old values
            x = x @ x.t() / 4096
        host, done = stager.to_host(x)
    done.synchronize()
    expected_sum = float(x.sum().cpu())
    assert abs(float(host.double().sum()) - expected_sum) <= 1e-3 * max(1.0, abs(expected_sum))
    back = stager.to_device(host)
    assert torch.equal(back, x)
