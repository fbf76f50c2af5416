"""Tensors round-trip over real channels of both kinds, with their routes, in both directions at once.

Every test runs over direct TCP channels (sealed records on a connection of their own) and over the
libp2p-stream fallback (``TransportConfig(direct=False)``): the Channel API must not depend on the path.
"""

from __future__ import annotations

import pytest
import torch
import trio
from channel_helpers import (
    CHANNEL_KIND,
    CHANNEL_PATH,
    MeshFactory,
    assert_closed_in_status,
    config_for,
    exchange,
    job_id,
    open_in_status,
)

from tensorlink.transport import Channel
from tensorlink.wire.compression import Compression, int8_error_bound
from tensorlink.wire.frame import Route
from tensorlink.wire.limits import DEFAULT_INT8_BLOCK

JOB = job_id(1, 2, 3)
FP16_MIN_NORMAL = 2.0**-14


def samples() -> list[torch.Tensor]:
    """What a pipeline sends, and the edge cases: every dtype class, empty, scalar, odd shapes, a
    non-contiguous view, and one large enough to leave the direct channel's event-loop path."""
    g = torch.Generator().manual_seed(7)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(4, 33, generator=g).to(torch.bfloat16),
        torch.randint(-(2**40), 2**40, (17,), generator=g, dtype=torch.int64),
        torch.rand(2, 3, 4, generator=g) > 0.5,
        torch.empty(0, 7),
        torch.empty(0),
        torch.tensor(3.25),
        torch.tensor(True),
        torch.randn(1, 1, 1, 1, 1, generator=g, dtype=torch.float64),
        torch.arange(24, dtype=torch.float16).reshape(4, 6).t(),  # not contiguous: sent as its values
        torch.arange(600_000, dtype=torch.float32).reshape(600, 1000),  # 2.4 MB, over INLINE_BYTES
    ]


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got, want)


async def test_round_trips_preserve_tensors_and_routes(channel_mesh: MeshFactory, kind: str) -> None:
    """Each sample arrives bit-exact with its dtype, shape and route, sent from either end."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(30):
            a, b = await mesh.pair(0, 1, JOB)
            for i, x in enumerate(samples()):
                for sender, receiver in ((a, b), (b, a)):
                    route = Route(JOB, step=1000 + i, micro_batch=i % 5, stage=2**31 - 1 - i)
                    got, got_route = await exchange(sender, receiver, x, route)
                    assert_same(got, x)
                    assert got_route == route
            # a send without a route arrives with the empty one
            got, got_route = await exchange(a, b, torch.ones(2))
            assert got_route == Route()


async def test_both_directions_at_once(channel_mesh: MeshFactory, kind: str) -> None:
    """Two senders and two receivers run on one channel at the same time (large and small frames
    interleaved per direction), and every frame arrives in order, intact, in its own direction."""
    count = 12

    def tensor(direction: int, i: int) -> torch.Tensor:
        n = 300_000 if i % 4 == 0 else 1000 + i  # mixes the direct channel's threaded and inline paths
        return torch.arange(n, dtype=torch.float32) * (direction + 1) + i

    async def send_all(channel: Channel, direction: int) -> None:
        for i in range(count):
            await channel.send(tensor(direction, i), Route(JOB, step=i, stage=direction))

    async def recv_all(channel: Channel, direction: int) -> None:
        for i in range(count):
            frame = await channel.recv()
            assert frame.route == Route(JOB, step=i, stage=direction)
            assert_same(frame.tensor, tensor(direction, i))

    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(30):
            a, b = await mesh.pair(0, 1, JOB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, a, 0)
                nursery.start_soon(recv_all, b, 0)
                nursery.start_soon(send_all, b, 1)
                nursery.start_soon(recv_all, a, 1)
            for channel in (a, b):
                stats = channel.stats()
                assert stats["frames_sent"] == stats["frames_received"] == count, stats


@pytest.mark.parametrize(
    "compression", [Compression.INT8, Compression.BF16, Compression.FP16], ids=lambda c: c.name.lower()
)
async def test_compression_stays_within_its_error_bound(
    channel_mesh: MeshFactory, kind: str, compression: Compression
) -> None:
    """A compressed send arrives in the sender's dtype, within the bound the compression documents
    (tensorlink.wire.compression), and smaller on the wire than the raw tensor."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5000, generator=g) * torch.logspace(-3, 3, 5000)  # blocks of very different scales
    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(30):
            a, b = await mesh.pair(0, 1, JOB)
            route = Route(JOB, step=5)
            got, got_route = await exchange(a, b, x, route, compression=compression)
    assert got_route == route
    assert got.dtype == x.dtype and got.shape == x.shape
    err = (got - x).abs()
    if compression is Compression.INT8:
        bound = int8_error_bound(x, DEFAULT_INT8_BLOCK)
    else:
        bound = x.abs() * (2.0**-8 if compression is Compression.BF16 else 2.0**-11)
    if compression is Compression.FP16:
        normal = x.abs() >= FP16_MIN_NORMAL  # the documented bound holds in fp16's normal range
        err, bound = err[normal], bound[normal]
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert not torch.equal(got, x)  # it really was compressed
    raw = x.numel() * x.element_size()
    assert a.stats()["bytes_sent"] < raw * (0.3 if compression is Compression.INT8 else 0.55)


async def test_kind_and_path_in_status_on_both_sides(channel_mesh: MeshFactory, kind: str) -> None:
    """Operators see how each channel travels: ``kind`` and ``path`` agree on both ends and appear in
    ``service.status()`` with the peer and job; once closed, the status no longer lists it as open."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            await exchange(a, b, torch.ones(10))
            for channel, me, other in ((a, 0, 1), (b, 1, 0)):
                assert (channel.kind, channel.path) == (CHANNEL_KIND[kind], CHANNEL_PATH[kind])
                (entry,) = mesh.nodes[me].service.status()
                assert entry["peer"] == mesh.nodes[other].peer_id
                assert entry["job"] == JOB.hex()
                assert (entry["kind"], entry["path"]) == (CHANNEL_KIND[kind], CHANNEL_PATH[kind])
                assert entry["closed"] is None
            assert a.stats()["frames_sent"] == b.stats()["frames_received"] == 1
            await a.aclose()
            assert open_in_status(mesh.nodes[0].service) == []
            assert_closed_in_status(mesh.nodes[0].service, a)


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-256-gcm"])
async def test_the_opener_picks_the_cipher(channel_mesh: MeshFactory, cipher: str) -> None:
    """Direct channels use the AEAD the opener asked for (the acceptor takes either); both ends and the
    status say which, and tensors cross intact with it."""
    configs = [config_for("direct", cipher=cipher), config_for("direct")]
    async with channel_mesh(2, configs=configs) as mesh:
        a, b = await mesh.pair(0, 1)
        assert a.cipher == b.cipher == cipher
        assert a.kind == b.kind == "direct"
        x = torch.randn(300_000, generator=torch.Generator().manual_seed(9))
        got, _ = await exchange(a, b, x)
        assert torch.equal(got, x)
        assert [c["cipher"] for c in open_in_status(mesh.nodes[1].service)] == [cipher]
