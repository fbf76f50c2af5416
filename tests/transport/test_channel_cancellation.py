"""Cancellation: a recv that is only waiting (or holds part of a small frame) can be cancelled without
losing anything, since a pipeline cancels waits all the time (timeouts, shutdown of one task); a send
cancelled in the middle of a large frame cannot be resumed, so it closes the channel and says why."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trio
import trio.testing
from channel_helpers import (
    KiB,
    Mesh,
    MeshFactory,
    MiB,
    assert_closed_in_status,
    config_for,
    direct,
    exchange,
    fallback,
    job_id,
    read_raw,
    write_raw,
)

from tensorlink import _C
from tensorlink.transport import Channel, ChannelError
from tensorlink.wire.frame import HEADER_SIZE, Frame, Route

JOB = job_id(9)


async def cancel_while_waiting(channel: Channel) -> None:
    """Start a recv, let it block on the empty channel, then cancel it."""
    waiting = trio.Event()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await waiting.wait()
                # the recv task ran up to its first blocking point: it is parked on the socket (direct)
                # or on the frame queue (fallback), with no frame to lose
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                scope.cancel()

            nursery.start_soon(watch)
            waiting.set()
            await channel.recv()
    assert scope.cancelled_caught


async def test_cancelled_recv_keeps_the_channel(channel_mesh: MeshFactory, kind: str) -> None:
    """Cancelling a recv that waits for a frame leaves the channel open, and the next frame (sent
    after the cancel) arrives intact; several cancels in a row change nothing."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            for _ in range(3):
                await cancel_while_waiting(b)
            assert not b.closed and not a.closed
            for x in (torch.arange(10.0), torch.arange(600_000, dtype=torch.float32)):  # inline and threaded
                got, route = await exchange(a, b, x, Route(JOB, step=4))
                assert torch.equal(got, x) and route.step == 4
            await cancel_while_waiting(a)
            got, _ = await exchange(b, a, torch.ones(3))
            assert torch.equal(got, torch.ones(3))


async def test_cancelled_recv_keeps_a_partial_small_frame(channel_mesh: MeshFactory) -> None:
    """A direct recv cancelled after part of a small frame arrived keeps that part (the native pump
    is resumable): the next recv completes the same frame, intact."""
    x = torch.arange(5000, dtype=torch.float32)  # 20 KB: moved on the event loop, not in a thread
    record_bytes = HEADER_SIZE + _C.SEAL_TAG + x.numel() * 4 + _C.SEAL_TAG
    async with channel_mesh(2, config_for("direct")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            # capture the real sealed frame off b's socket, then feed it to b in two halves
            await a.send(x, Route(JOB, step=11))
            record = await read_raw(direct(b)._sock, record_bytes)
            half = HEADER_SIZE + _C.SEAL_TAG + 3000  # the header and part of the payload chunk
            await write_raw(direct(a)._sock, record[:half])
            await cancel_while_waiting(b)
            assert direct(b)._sealed.receiving  # the recv took the first half
            assert not b.closed
            await write_raw(direct(a)._sock, record[half:])
            frame = await b.recv()
            assert torch.equal(frame.tensor, x) and frame.route.step == 11
            got, _ = await exchange(a, b, x * 2)
            assert torch.equal(got, x * 2)


async def assert_fresh_channel_works(mesh: Mesh) -> None:
    a, b = await mesh.pair(0, 1, job_id(9, 1))
    x = torch.randn(20_000)
    got, _ = await exchange(a, b, x)
    assert torch.equal(got, x)


async def test_cancelled_large_send_closes_the_direct_channel(channel_mesh: MeshFactory) -> None:
    """A 64 MiB send cancelled after part of it is on the wire closes the channel with a reason that
    says so; the receiver, left with half a frame, gets ChannelError; the services go on."""
    x = torch.arange(16 * MiB, dtype=torch.float32)
    async with channel_mesh(2, config_for("direct")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.send, x)
                    # the header and part of the payload are out (unread, the kernel takes ~150 KB)
                    while a.stats()["bytes_sent"] < 64 * KiB:
                        await trio.sleep(0.01)
                    scope.cancel()
            assert a.closed
            assert a.closed_reason is not None and "cancelled in the middle of a frame" in a.closed_reason
            with pytest.raises(ChannelError, match="cancelled in the middle of a frame"):
                await a.send(torch.ones(1))
            with pytest.raises(ChannelError) as caught:
                await b.recv()
            assert "closed" in caught.value.reason, caught.value.reason
            assert b.closed
            assert_closed_in_status(mesh.nodes[0].service, a)
            assert_closed_in_status(mesh.nodes[1].service, b)
            while direct(a)._threads:  # the abandoned worker thread was woken
                await trio.sleep(0.01)
            await assert_fresh_channel_works(mesh)


async def test_cancelled_large_send_closes_the_fallback_channel(channel_mesh: MeshFactory) -> None:
    """The same on the libp2p fallback: the frame is cut off on the stream, so the channel closes
    with the reason, and the peer's end, left with a partial payload, fails instead of hanging."""
    x = torch.arange(4 * MiB, dtype=torch.float32)  # 16 MiB: written in 1 MiB pieces
    async with channel_mesh(2, config_for("fallback")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            stream: Any = fallback(a)._stream
            write = stream.write
            pieces_written = [0]
            mid_frame = trio.Event()

            async def counting_write(data: bytes) -> None:
                await write(data)
                pieces_written[0] += 1
                if pieces_written[0] == 2:
                    mid_frame.set()

            stream.write = counting_write
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.send, x)
                    await mid_frame.wait()
                    scope.cancel()
            assert a.closed_reason == "a send was cancelled in the middle of a frame"
            with pytest.raises(ChannelError, match="cancelled in the middle of a frame"):
                await a.send(torch.ones(1))
            with pytest.raises(ChannelError):
                await b.recv()
            assert b.closed
            await assert_fresh_channel_works(mesh)


async def test_cancelled_send_waiting_for_credit_keeps_the_fallback_channel(channel_mesh: MeshFactory) -> None:
    """A fallback send that is still waiting for credit has written nothing, so cancelling it leaves
    the channel open; the frames already granted and later ones arrive intact."""
    window = 1 * MiB
    x = torch.arange(128 * KiB, dtype=torch.float32)  # 512 KiB: one fits the window, the second waits
    async with channel_mesh(2, config_for("fallback", window_bytes=window)) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            await a.send(x, Route(JOB, step=1))
            with trio.move_on_after(0.3) as scope:  # models a sender that gives up on a slow peer
                await a.send(x + 1, Route(JOB, step=2))
            assert scope.cancelled_caught
            assert not a.closed and not b.closed
            frame = await b.recv()
            assert frame.route.step == 1 and torch.equal(frame.tensor, x)
            got, route = await exchange(a, b, x + 3, Route(JOB, step=3))
            assert route.step == 3 and torch.equal(got, x + 3)


async def test_cancelled_fallback_recv_does_not_lose_a_taken_frame(channel_mesh: MeshFactory) -> None:
    """A fallback recv with a timeout may be cancelled after it took a frame off the queue, while it
    returns that frame's credit (which waits for the stream's write lock, held by a large send on the
    same channel). The frame must not be lost: either that recv returns it after all, or the next one
    does."""
    big = torch.arange(8 * MiB, dtype=torch.float32)  # 32 MiB: holds b's write lock for a while
    async with channel_mesh(2, config_for("fallback")) as mesh:
        with trio.fail_after(30):
            a, b = await mesh.pair(0, 1, JOB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.send, big)
                nursery.start_soon(a.recv)  # a drains the big frame in the background
                await a.send(torch.ones(3), Route(JOB, step=7))
                queued = fallback(b)._frames_out
                while queued.statistics().current_buffer_used == 0:  # the small frame reached b
                    await trio.sleep(0.005)
                got: list[Frame] = []

                async def recv_into_got() -> None:
                    got.append(await b.recv())

                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(recv_into_got)
                        while queued.statistics().current_buffer_used:  # the recv took it
                            await trio.sleep(0.005)
                        assert fallback(b)._write_lock.locked()  # the big send still writes
                        scope.cancel()
                assert not b.closed
                if not got:  # the cancelled recv raised Cancelled: then the frame must still be there
                    with trio.fail_after(5):
                        got.append(await b.recv())
                assert got[0].route.step == 7 and torch.equal(got[0].tensor, torch.ones(3))
