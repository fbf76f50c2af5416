"""Bytes that were not sealed by the peer (garbage, flipped bits, replays, a corrupted fallback payload)
close the channel they arrived on with a reason that says so, and nothing else: the same two services
open a fresh channel right away and move tensors on it."""

from __future__ import annotations

import os

import pytest
import torch
import trio
from channel_helpers import (
    MeshFactory,
    assert_closed_in_status,
    assert_node_unharmed,
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
from tensorlink.transport.fallback import FRAME
from tensorlink.wire.frame import HEADER_SIZE, Route, encode_frame

JOB = job_id(3)
HEADER_RECORD = HEADER_SIZE + _C.SEAL_TAG  # a sealed frame header on the direct channel's wire
TENSOR = torch.arange(64, dtype=torch.float32)  # 256 payload bytes: one sealed chunk
FRAME_RECORDS = HEADER_RECORD + TENSOR.numel() * TENSOR.element_size() + _C.SEAL_TAG


async def capture_record(sender: Channel, receiver: Channel) -> bytes:
    """A real sealed frame: sent by the channel, read off the receiver's socket before the channel
    sees it (the receiver's record counter has not moved, so a faithful copy would still open)."""
    await sender.send(TENSOR, Route(JOB, step=1))
    return await read_raw(direct(receiver)._sock, FRAME_RECORDS)


def flip(record: bytes, offset: int) -> bytes:
    return record[:offset] + bytes([record[offset] ^ 0x01]) + record[offset + 1 :]


async def write_corrupted_fallback_frame(sender: Channel) -> None:
    """A fallback frame record written by hand to the sender's libp2p stream: a valid header that still
    carries the CRC32C of the payload before one of its bits was flipped."""
    encoded = encode_frame(TENSOR, Route(JOB, step=2))
    payload = bytearray(encoded.payload.tobytes())
    payload[10] ^= 0x40
    await fallback(sender)._stream.write(FRAME + encoded.header + bytes(payload))


@pytest.mark.parametrize("attack", ["garbage", "flipped_header", "flipped_payload", "flipped_tag", "replay"])
async def test_direct_channel_refuses_unsealed_bytes(channel_mesh: MeshFactory, attack: str) -> None:
    """Whatever reaches a direct channel's socket without the sender's key fails AES-GCM
    authentication: recv raises ChannelError whose reason names authentication, both ends are closed,
    and no tampered tensor is ever returned."""
    async with channel_mesh(2, config_for("direct")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            got, _ = await exchange(a, b, TENSOR)  # the channel works before the attack
            assert torch.equal(got, TENSOR)
            if attack == "garbage":
                injected = os.urandom(FRAME_RECORDS)
            elif attack == "replay":
                record = await capture_record(a, b)
                await write_raw(direct(a)._sock, record)
                frame = await b.recv()  # the faithful copy opens (counter 2 at both ends)...
                assert torch.equal(frame.tensor, TENSOR) and frame.route.step == 1
                injected = record  # ...and the same record again does not (the receiver expects 3)
            else:
                record = await capture_record(a, b)
                offset = {"flipped_header": 5, "flipped_payload": HEADER_RECORD + 7, "flipped_tag": len(record) - 1}
                injected = flip(record, offset[attack])
            await write_raw(direct(a)._sock, injected)

            with pytest.raises(ChannelError) as caught:
                await b.recv()
            assert "authentication" in caught.value.reason, caught.value.reason
            assert b.closed and b.closed_reason == caught.value.reason
            # every later call names the same first failure
            with pytest.raises(ChannelError, match="authentication"):
                await b.send(TENSOR)
            # the receiver shut the connection down, so the sender's end learns it is closed too
            with pytest.raises(ChannelError):
                await a.recv()
            assert a.closed
            assert_closed_in_status(mesh.nodes[1].service, b)
            assert_closed_in_status(mesh.nodes[0].service, a)
            await assert_node_unharmed(mesh)


async def test_fallback_channel_refuses_a_corrupted_payload(channel_mesh: MeshFactory) -> None:
    """On the libp2p fallback a frame whose payload does not match its CRC32C closes the channel with
    a ChecksumError reason (the tensor is never handed out), and the services go on."""
    async with channel_mesh(2, config_for("fallback")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            got, _ = await exchange(a, b, TENSOR)
            assert torch.equal(got, TENSOR)

            await write_corrupted_fallback_frame(a)

            with pytest.raises(ChannelError) as caught:
                await b.recv()
            assert "ChecksumError" in caught.value.reason, caught.value.reason
            assert b.closed
            assert_closed_in_status(mesh.nodes[1].service, b)
            await assert_node_unharmed(mesh)


async def test_fallback_peer_learns_the_channel_broke(channel_mesh: MeshFactory) -> None:
    """When one end of a fallback channel fails on bad input, the other end must not wait forever:
    like the direct channel (whose receiver shuts the socket down), the stream has to end, so the
    sender's recv raises ChannelError instead of hanging."""
    async with channel_mesh(2, config_for("fallback")) as mesh:
        with trio.fail_after(20):
            a, b = await mesh.pair(0, 1, JOB)
            await write_corrupted_fallback_frame(a)
            with pytest.raises(ChannelError, match="ChecksumError"):
                await b.recv()
        with trio.fail_after(3):
            with pytest.raises(ChannelError):
                await a.recv()
        assert a.closed
