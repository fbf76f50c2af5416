"""A receiver screens every frame by its header before it reads the payload (Channel.set_acceptor): a peer
announcing a huge frame makes it allocate nothing, the channel closes naming the header and why, and
nothing else breaks. Over direct TCP and the libp2p-stream fallback; then the same for a pipeline link,
whose mailbox is the acceptor."""

from __future__ import annotations

import pytest
import torch
import trio
from channel_helpers import (
    JOB,
    MeshFactory,
    MiB,
    assert_closed_in_status,
    assert_node_unharmed,
    config_for,
    exchange,
    fallback,
)

from tensorlink import _C
from tensorlink.stage.links import ChannelLink, Lane, LinkClosed
from tensorlink.transport import Channel, ChannelError, FrameRefused
from tensorlink.transport.channel import Acceptor
from tensorlink.transport.direct import INLINE_BYTES, DirectChannel
from tensorlink.transport.fallback import FRAME
from tensorlink.wire.dtypes import code_of
from tensorlink.wire.frame import FrameHeader, Route
from tensorlink.wire.limits import MAX_FRAME_PAYLOAD

ANNOUNCED = 512 * MiB  # fits the receiver's 1 GiB buffer pool: read unscreened, it would take a buffer this big
SENT = 64 << 10  # of that payload the hostile sender really sends
LIMIT = MiB


def announcing(nbytes: int, step: int, stage: int = 0) -> bytes:
    """An encoded header announcing a float32 tensor of ``nbytes`` (a payload the test never builds)."""
    header = _C.FrameHeader(
        dtype=code_of(torch.float32), shape=[nbytes // 4], payload_len=nbytes, job=JOB, step=step, stage=stage
    )
    return _C.encode_header(header, MAX_FRAME_PAYLOAD)


async def send_announcement(sender: Channel, header: bytes) -> None:
    """The header and only the first SENT bytes of the payload it announces, as a hostile peer would."""
    if isinstance(sender, DirectChannel):
        sealed = sender._sealed
        sealed.start_send(header, bytes(SENT))
        while not sealed.pump_send(False):
            await trio.lowlevel.wait_writable(sender._sock)
    else:
        await fallback(sender)._stream.write(FRAME + header + bytes(SENT))


def pool_bytes(channel_pool: _C.BufferPool) -> int:
    return int(channel_pool.in_use + channel_pool.cached)


def refuse_over(limit: int, seen: list[FrameHeader]) -> Acceptor:
    """An acceptor that notes each header and refuses payloads over ``limit`` bytes."""

    def accept(header: FrameHeader) -> None:
        seen.append(header)
        if header.payload_len > limit:
            raise FrameRefused(f"it announces {header.payload_len} payload bytes; this side takes at most {limit}")

    return accept


@pytest.mark.parametrize("first", ["acceptor", "announcement"])
async def test_a_frame_refused_by_its_header_takes_no_buffer(channel_mesh: MeshFactory, kind: str, first: str) -> None:
    """``first``: whether the acceptor is set before the announcement arrives or after (the fallback's reader
    has the header by then, and must wait for the acceptor before reading the payload)."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        sender, receiver = await mesh.pair(0, 1)
        pool = mesh.nodes[1].service.pool
        held = pool_bytes(pool)
        seen: list[FrameHeader] = []
        if first == "acceptor":
            receiver.set_acceptor(refuse_over(LIMIT, seen))
        await send_announcement(sender, announcing(ANNOUNCED, step=7))
        if first == "announcement":
            await trio.sleep(0.3)  # the fallback's reader has read the header and waits
            receiver.set_acceptor(refuse_over(LIMIT, seen))
        with trio.fail_after(10), pytest.raises(FrameRefused, match=f"announces {ANNOUNCED} payload bytes"):
            await receiver.recv()
        assert pool_bytes(pool) == held, "a buffer was taken for the refused frame's payload"
        assert [(h.step, h.payload_len) for h in seen] == [(7, ANNOUNCED)]
        reason = receiver.closed_reason
        assert reason is not None and reason.startswith("refused FrameHeader(dtype=float32, shape=(134217728,)"), reason
        assert f"payload_len={ANNOUNCED}, step=7" in reason and f"takes at most {LIMIT}" in reason, reason
        with pytest.raises(FrameRefused):  # the channel stays closed, and says why
            await receiver.recv()
        with trio.fail_after(10), pytest.raises(ChannelError):  # the peer's end learns it is gone
            await sender.recv()
        assert_closed_in_status(mesh.nodes[1].service, receiver)
        await assert_node_unharmed(mesh)


async def test_a_frame_that_came_before_the_acceptor_is_screened_when_received(
    channel_mesh: MeshFactory, kind: str
) -> None:
    """A frame within the credit window may be read before an acceptor is set (the fallback's reader drains
    the stream at once); the acceptor still sees it, when it is received, and may refuse it."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        sender, receiver = await mesh.pair(0, 1)
        await sender.send(torch.ones(1000), Route(JOB, step=3))
        await trio.sleep(0.3)  # the fallback's reader has taken it
        seen: list[FrameHeader] = []
        receiver.set_acceptor(refuse_over(0, seen))
        with trio.fail_after(10), pytest.raises(FrameRefused, match="announces 4000 payload bytes"):
            await receiver.recv()
        assert [h.step for h in seen] == [3]
        assert receiver.closed


async def test_the_acceptor_sees_each_header_once_before_its_payload(channel_mesh: MeshFactory, kind: str) -> None:
    """Frames the acceptor takes arrive intact: an empty one, a small one, and one past INLINE_BYTES (moved
    in a thread on the direct channel); each header is screened once, while no buffer is taken for it."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        sender, receiver = await mesh.pair(0, 1)
        pool = mesh.nodes[1].service.pool
        seen: list[tuple[int, int, int]] = []
        receiver.set_acceptor(lambda h: seen.append((h.step, h.payload_len, pool.in_use)))
        tensors = [torch.empty(0), torch.arange(10.0), torch.randn(INLINE_BYTES // 4 + 3)]
        for step, tensor in enumerate(tensors):
            with trio.fail_after(30):
                got, route = await exchange(sender, receiver, tensor, Route(JOB, step=step))
            assert torch.equal(got, tensor) and route.step == step
            del got  # its pool buffer returns to the pool: none is in use when the next header is screened
        assert seen == [(step, t.nbytes, 0) for step, t in enumerate(tensors)]


@pytest.mark.parametrize("refusal", ["unsolicited", "over_room"])
async def test_a_link_refuses_a_huge_frame_by_its_header(channel_mesh: MeshFactory, kind: str, refusal: str) -> None:
    """The owner's strict link (a frame nobody asked for) and a worker's stage link (a frame past what the
    stage's reservation leaves, its room) refuse from the header: the link fails naming the frame, the
    channel closes, and the receiver took no buffer for it."""
    async with channel_mesh(2, config_for(kind)) as mesh:
        sender, receiver = await mesh.pair(0, 1)
        pool = mesh.nodes[1].service.pool
        held = pool_bytes(pool)
        link = ChannelLink(receiver, JOB, strict=refusal == "unsolicited")
        link.mailbox.room = (lambda nbytes: LIMIT) if refusal == "over_room" else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            await send_announcement(sender, announcing(ANNOUNCED, step=5, stage=int(Lane.USER_OUT) << 24))
            with trio.fail_after(10), pytest.raises(LinkClosed) as closed:
                await link.recv(Lane.USER_OUT, 5, 0, 0)
        expected = {
            "unsolicited": "sent an unsolicited USER_OUT frame of step 5, micro-batch 0, index 0",
            "over_room": f"sent a USER_OUT frame of step 5, micro-batch 0, index 0 of {ANNOUNCED} bytes, over the "
            f"{LIMIT} bytes left to buffer",
        }[refusal]
        assert expected in str(closed.value) and "link closed" in str(closed.value), closed.value
        assert pool_bytes(pool) == held and link.mailbox.buffered_bytes == 0
        assert receiver.closed_reason is not None and f"payload_len={ANNOUNCED}" in receiver.closed_reason
        await assert_node_unharmed(mesh)
