"""Many channels at once: between every ordered pair of three hosts, several channels (some for the same
job), all moving tensors concurrently and all intact; channels between the same pair are independent."""

from __future__ import annotations

import pytest
import torch
import trio
from channel_helpers import (
    MeshFactory,
    assert_closed_in_status,
    config_for,
    direct,
    exchange,
    fallback,
    job_id,
    open_in_status,
    write_raw,
)

from tensorlink.transport import Channel, ChannelError
from tensorlink.wire.frame import Route

HOSTS = 3
PER_PAIR = 8
FRAMES = 4


def payload(opener: int, acceptor: int, index: int, k: int, large: bool) -> torch.Tensor:
    """Distinct content per (channel, frame). With ``large`` frame 0 of each channel is over the direct
    channel's 1 MiB inline limit, so worker threads of many channels run at once (the fallback, about
    20x slower here, moves less)."""
    n = (300_000 if large else 60_000) if k == 0 else 5_000 + 97 * k
    return torch.arange(n, dtype=torch.float32) + (opener * 1e6 + acceptor * 1e5 + index * 1e3 + k)


def job_of(opener: int, acceptor: int, index: int) -> bytes:
    # pairs of channels share a job: a job is not a channel id, two channels may serve one job
    return job_id(opener, acceptor, index // 2)


async def test_48_channels_move_tensors_concurrently(channel_mesh: MeshFactory, kind: str) -> None:
    """Every opener sends FRAMES tensors on each of its channels while every acceptor echoes them back
    doubled; each frame comes back on the channel it was sent on, in order, with its route."""
    async with channel_mesh(HOSTS, config_for(kind)) as mesh:
        nodes = mesh.nodes
        index_of = {node.peer_id: i for i, node in enumerate(nodes)}
        echoed: list[int] = []

        async def echo(channel: Channel) -> None:
            for _ in range(FRAMES):
                frame = await channel.recv()
                # the acceptor's end is bound to the opener and job the frames come from
                assert (frame.route.job, frame.route.stage) == (channel.job, index_of[channel.peer])
                await channel.send(frame.tensor * 2, frame.route)
            echoed.append(1)

        async def serve(acceptor: int, nursery: trio.Nursery) -> None:
            for _ in range((HOSTS - 1) * PER_PAIR):
                channel = await nodes[acceptor].service.accept()
                assert channel.kind == ("direct" if kind == "direct" else "libp2p")
                nursery.start_soon(echo, channel)

        async def drive(opener: int, acceptor: int, index: int) -> None:
            job = job_of(opener, acceptor, index)
            channel = await nodes[opener].service.open(nodes[acceptor].peer_id, job)
            assert index_of[channel.peer] == acceptor
            for k in range(FRAMES):
                route = Route(job, step=k, micro_batch=index, stage=opener)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(channel.send, payload(opener, acceptor, index, k, kind == "direct"), route)
                    frame = await channel.recv()
                assert frame.route == route
                assert torch.equal(frame.tensor, payload(opener, acceptor, index, k, kind == "direct") * 2)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for acceptor in range(HOSTS):
                    nursery.start_soon(serve, acceptor, nursery)
                async with trio.open_nursery() as openers:
                    for opener in range(HOSTS):
                        for acceptor in range(HOSTS):
                            if opener != acceptor:
                                for index in range(PER_PAIR):
                                    openers.start_soon(drive, opener, acceptor, index)
        assert len(echoed) == HOSTS * (HOSTS - 1) * PER_PAIR
        for i, node in enumerate(nodes):
            status = node.service.status()
            assert len(status) == 2 * (HOSTS - 1) * PER_PAIR  # opened and accepted ends
            assert all(entry["closed"] is None for entry in status)
            peers = {index_of[entry["peer"]] for entry in status}
            assert peers == set(range(HOSTS)) - {i}


@pytest.mark.parametrize("how", ["aclose", "corrupt"])
async def test_channels_between_the_same_peers_are_independent(channel_mesh: MeshFactory, kind: str, how: str) -> None:
    """Two channels between the same two hosts, for different jobs: frames never cross between them,
    and one of them closing (cleanly or on bad input) leaves the other working in both directions."""
    job1, job2 = job_id(6, 1), job_id(6, 2)
    async with channel_mesh(2, config_for(kind)) as mesh:
        with trio.fail_after(20):
            a1, b1 = await mesh.pair(0, 1, job1)
            a2, b2 = await mesh.pair(0, 1, job2)
            # sent on channel 2 first, then channel 1: each receiver gets only its own job's frame
            await a2.send(torch.full((4,), 2.0), Route(job2, step=2))
            await a1.send(torch.full((4,), 1.0), Route(job1, step=1))
            frame1, frame2 = await b1.recv(), await b2.recv()
            assert frame1.route.job == job1 and torch.equal(frame1.tensor, torch.full((4,), 1.0))
            assert frame2.route.job == job2 and torch.equal(frame2.tensor, torch.full((4,), 2.0))

            if how == "aclose":
                await a1.aclose()
            elif kind == "direct":
                await write_raw(direct(a1)._sock, bytes(200))
            else:
                await fallback(a1)._stream.write(b"?")  # not a record kind
            with pytest.raises(ChannelError):
                await b1.recv()
            assert b1.closed and not b2.closed and not a2.closed

            x = torch.randn(50_000)
            got, _ = await exchange(a2, b2, x, Route(job2, step=3))
            assert torch.equal(got, x)
            got, _ = await exchange(b2, a2, x * 5, Route(job2, step=4))
            assert torch.equal(got, x * 5)
            assert [entry["job"] for entry in open_in_status(mesh.nodes[1].service)] == [job2.hex()]
            assert_closed_in_status(mesh.nodes[1].service, b1)


async def test_more_large_sends_than_worker_threads_do_not_deadlock(channel_mesh: MeshFactory) -> None:
    """Large frames move in worker threads that block while the peer is not reading. With more such
    sends in flight than trio's default thread limit (40), the receivers that come later must still
    get threads of their own, or nothing ever moves again."""
    channels = 44
    x = torch.arange(2 << 20, dtype=torch.float32)  # 8 MiB: more than the socket buffers hold unread
    async with channel_mesh(2, config_for("direct", pool_bytes=1 << 30, max_channels_per_peer=64)) as mesh:
        pairs = [await mesh.pair(0, 1, job_id(7, i)) for i in range(channels)]
        received: list[int] = []

        async def receive(channel: Channel) -> None:
            frame = await channel.recv()
            assert torch.equal(frame.tensor, x)
            received.append(1)

        with trio.fail_after(8):
            async with trio.open_nursery() as nursery:
                for sender, _ in pairs:
                    nursery.start_soon(sender.send, x)
                await trio.sleep(0.5)  # models receivers that come later than the senders
                for _, receiver in pairs:
                    nursery.start_soon(receive, receiver)
        assert len(received) == channels
