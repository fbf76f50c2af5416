"""CUDA tensors on data-plane channels: staged through pinned pool buffers on a copy stream of their own.

Runs only where a GPU is present (tests/conftest.py skips it with the reason otherwise). Both channel
kinds: the staging happens above the transport, so the fallback must carry CUDA tensors the same way.
"""

from __future__ import annotations

import pytest
import torch
from channel_helpers import MeshFactory, config_for

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
