"""CUDA staging of the data plane (transport/staging.py) on its own: no channel, no libp2p, so it runs
wherever CUDA does (tests/transport/test_channel_cuda.py covers tensors crossing real channels)."""

from __future__ import annotations

import pytest
import torch

from tensorlink import _C
from tensorlink.transport.staging import DeviceStager

pytestmark = pytest.mark.gpu


def test_staging_orders_copies_after_the_producer_and_before_the_consumer() -> None:
    """A copy must not read a tensor before the kernel that writes it has run, even though it runs on
    another stream; and the consumer must not read the device copy before it lands."""
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
