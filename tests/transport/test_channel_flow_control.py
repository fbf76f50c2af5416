"""A slow receiver makes the sender wait, for as long as it takes, and nothing else: no timer breaks the
channel (py-libp2p's Yamux resets a stream whose writer waits 5 s for window, which the fallback must
keep away from), and memory stays bounded by the pool (direct) or the credit window (fallback)."""

from __future__ import annotations

import pytest
import torch
import trio
from channel_helpers import KiB, MeshFactory, MiB, config_for, exchange, job_id

from tensorlink.transport import Channel, TransportConfig
from tensorlink.wire.frame import Route

JOB = job_id(8)
SLOW_S = 6.0  # longer than Yamux's 5 s window-update timeout
FALLBACK_WINDOW = 1 * MiB


def frames_for(kind: str) -> list[torch.Tensor]:
    """More than the path can hold in flight while the receiver sleeps: 64 MiB for the direct channel
    (loopback socket buffers take a few MiB unread), about 9 MiB against the fallback's 1 MiB credit
    window, one frame of it larger than the whole window."""
    if kind == "direct":
        sizes = [4 * MiB] * 16
    else:
        sizes = [512 * KiB] * 14 + [2 * MiB]
    return [torch.arange(size // 4, dtype=torch.float32) + i for i, size in enumerate(sizes)]


@pytest.mark.slow
async def test_slow_receiver_does_not_break_the_channel(channel_mesh: MeshFactory, kind: str) -> None:
    """The receiver takes nothing for 6 s while the sender has far more to send than fits in flight:
    the sender waits (its sends have not completed when the receiver wakes), then every frame arrives
    intact and in order, and the channel stays open and usable both ways."""
    frames = frames_for(kind)
    config = config_for(kind, window_bytes=FALLBACK_WINDOW)
    async with channel_mesh(2, config) as mesh:
        with trio.fail_after(60):
            a, b = await mesh.pair(0, 1, JOB)
            sent: list[int] = []

            async def send_all() -> None:
                for i, x in enumerate(frames):
                    await a.send(x, Route(JOB, step=i))
                    sent.append(i)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                await trio.sleep(SLOW_S)  # the slow receiver
                in_flight = len(sent)
                assert in_flight < len(frames), "all sends completed: the test did not fill the path"
                if kind == "fallback":
                    # credit: one 512 KiB frame fits the 1 MiB window, the next has to wait for it
                    assert in_flight == 1, in_flight
                    assert b.pool.in_use <= FALLBACK_WINDOW
                assert not a.closed and not b.closed, (a.closed_reason, b.closed_reason)
                for i, x in enumerate(frames):
                    frame = await b.recv()
                    assert frame.route.step == i
                    assert torch.equal(frame.tensor, x), i
                    del frame
            assert not a.closed and not b.closed, (a.closed_reason, b.closed_reason)
            for sender, receiver in ((a, b), (b, a)):
                got, _ = await exchange(sender, receiver, frames[0] * 3)
                assert torch.equal(got, frames[0] * 3)
            stats = a.stats()
            assert stats["closed"] is None and stats["frames_sent"] == len(frames) + 1


async def test_full_pool_blocks_the_sender(channel_mesh: MeshFactory) -> None:
    """Backpressure on a direct channel: the receiver holds every tensor its 16 MiB pool can give, so
    its next recv waits for pool space, the sender's sends stop completing (kernel socket buffers are
    all that fill up), the pool never exceeds its capacity, and everything flows again, intact, as soon
    as the receiver drops what it held."""
    capacity = 16 * MiB
    frame_bytes = 4 * MiB  # a size class of exactly 4 MiB: four fill the pool
    total = 24  # 96 MiB: far more than the pool and the socket buffers together
    held_count = capacity // frame_bytes
    frames = [torch.arange(frame_bytes // 4, dtype=torch.float32) + i for i in range(total)]
    configs = [TransportConfig(), TransportConfig(pool_bytes=capacity)]
    async with channel_mesh(2, configs=configs) as mesh:
        with trio.fail_after(60):
            a, b = await mesh.pair(0, 1, JOB)
            assert b.pool.capacity == capacity
            sent: list[int] = []
            held: list[torch.Tensor] = []
            pool_full = trio.Event()
            peak = [0]

            async def send_all() -> None:
                for i, x in enumerate(frames):
                    await a.send(x, Route(JOB, step=i))
                    sent.append(i)

            async def receive_all(channel: Channel) -> None:
                for i in range(total):
                    frame = await channel.recv()
                    peak[0] = max(peak[0], channel.pool.in_use)
                    assert frame.route.step == i and torch.equal(frame.tensor, frames[i]), i
                    if i < held_count:
                        held.append(frame.tensor)
                        if len(held) == held_count:
                            pool_full.set()
                    del frame

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                nursery.start_soon(receive_all, b)
                await pool_full.wait()
                assert b.pool.in_use == capacity
                await trio.sleep(1.5)  # the receiver keeps holding: the sender runs into the full path
                stalled = len(sent)
                assert stalled < total
                await trio.sleep(1.0)
                assert len(sent) == stalled, "a send completed while the receiver's pool stayed full"
                assert b.pool.in_use <= capacity
                assert not a.closed and not b.closed
                held.clear()  # the tensors go back to the pool: the blocked recv and the sender resume
            assert len(sent) == total
            assert peak[0] <= capacity
            assert b.pool.in_use == 0
            assert not a.closed and not b.closed
