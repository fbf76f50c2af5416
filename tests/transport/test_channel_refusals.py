"""Who may not get a channel: anyone on the data port without the keys of a pending channel, and peers
the ``admit`` policy turns away. Each refusal closes that one connection or stream and nothing else:
no channel appears in ``accept()``, and legitimate channels open and work right after.

Some tests drive the libp2p half of the handshake by hand (ChannelOffer → ChannelAccept, then the
sealed hello on the data port) to get a real pending channel to aim at.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from typing import Any

import pytest
import torch
import trio
from channel_helpers import Mesh, MeshFactory, config_for, exchange, job_id, open_in_status

from tensorlink.p2p.streams import close_stream, open_stream, read_message, write_message
from tensorlink.transport import ChannelError, ChannelRefused
from tensorlink.transport.direct import DirectChannel
from tensorlink.transport.keys import (
    CHANNEL_ID_BYTES,
    HELLO_BYTES,
    HELLO_REPLY_BYTES,
    KEY_BYTES,
    TOKEN_BYTES,
    ChannelKeys,
    Ephemeral,
    check_reply,
    seal_hello,
)
from tensorlink.transport.service import MAX_HELLO_FAILURES, SETUPS_PER_PEER, ChannelService
from tensorlink.wire.messages import ChannelAccept, ChannelOffer, ChannelSelect
from tensorlink.wire.protocols import CHANNEL_PROTOCOL as PROTOCOL

JOB = job_id(4)
LEGIT_JOB = job_id(4, 1)

KEY = KEY_BYTES["aes-128-gcm"]  # the default cipher's key size


@dataclasses.dataclass
class HandOffer:
    """The opener's half of a channel set-up done by hand: the libp2p stream, the keys both sides
    derived, and the acceptor's data port from its ChannelAccept."""

    stream: Any
    keys: ChannelKeys
    port: int


async def offer_by_hand(mesh: Mesh, opener: int, acceptor: int, job: bytes = JOB) -> HandOffer:
    a, b = mesh.nodes[opener], mesh.nodes[acceptor]
    stream = await open_stream(a.host, b.peer_id, PROTOCOL)
    eph = Ephemeral()
    nonce = secrets.token_bytes(32)
    await write_message(stream, ChannelOffer(job=job, ephemeral_key=eph.public, nonce=nonce))
    accept = await read_message(stream, ChannelAccept)
    assert isinstance(accept, ChannelAccept)
    keys = eph.derive(
        accept.ephemeral_key,
        opener=a.peer_id,
        acceptor=b.peer_id,
        job=job,
        nonce=nonce,
        token=accept.token,
        cipher="aes-128-gcm",
        is_opener=True,
    )
    assert b.service.data_port is not None
    assert accept.addrs == [f"/ip4/127.0.0.1/tcp/{b.service.data_port}"]
    assert keys.channel_id in b.service._pending  # the acceptor now waits for this channel's hello
    return HandOffer(stream, keys, b.service.data_port)


async def refused(port: int, data: bytes) -> None:
    """Connect to the data port, send data, and require that the service closes the connection without
    sending a single byte back (a sealed reply would mean the hello was accepted)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with trio.fail_after(10):
            await tcp.send_all(data)
            chunk = await tcp.receive_some(4096)
    except trio.BrokenResourceError:  # reset: the service closed with some of our bytes unread
        return
    finally:
        await tcp.aclose()
    assert chunk == b"", f"the service answered {chunk!r}"  # b"": it closed the connection


def assert_no_channel(service: ChannelService) -> None:
    """Nothing waits in accept() and no channel is open on the service."""
    assert service._incoming_out.statistics().current_buffer_used == 0
    assert service.channels() == [] and open_in_status(service) == []


async def assert_legit_channel_works(mesh: Mesh) -> None:
    """A normal open to the node that saw the refusals: the first channel it accepts is this one."""
    a, b = await mesh.pair(0, 1, LEGIT_JOB)
    assert a.kind == b.kind == "direct"
    x = torch.arange(5000, dtype=torch.float32)
    got, _ = await exchange(a, b, x)
    assert torch.equal(got, x)
    got, _ = await exchange(b, a, x + 1)
    assert torch.equal(got, x + 1)


def random_keys() -> ChannelKeys:
    return ChannelKeys(
        os.urandom(KEY), os.urandom(KEY), os.urandom(CHANNEL_ID_BYTES), os.urandom(TOKEN_BYTES), "aes-128-gcm"
    )


@pytest.mark.parametrize("garbage", ["hello_sized", "large", "http", "bad_version"])
async def test_garbage_on_the_data_port_is_refused(channel_mesh: MeshFactory, garbage: str) -> None:
    """Bytes that are not a TensorLink hello close that TCP connection; the node goes on."""
    data = {
        "hello_sized": os.urandom(HELLO_BYTES),
        "large": os.urandom(1 << 20),
        "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(HELLO_BYTES, b"\r"),
        "bad_version": b"TLDC\x09" + os.urandom(HELLO_BYTES - 5),
    }[garbage]
    async with channel_mesh(2) as mesh:
        with trio.fail_after(20):
            service = mesh.nodes[1].service
            assert service.data_port is not None
            await refused(service.data_port, data)
            assert_no_channel(service)
            await assert_legit_channel_works(mesh)


async def test_a_stalled_client_is_dropped(channel_mesh: MeshFactory) -> None:
    """A client that sends part of a hello and then nothing is closed after the handshake timeout
    (connect_timeout_s + 2 s), not held forever."""
    async with channel_mesh(2, config_for("direct", connect_timeout_s=0.5)) as mesh:
        with trio.fail_after(20):
            service = mesh.nodes[1].service
            assert service.data_port is not None
            started = trio.current_time()
            await refused(service.data_port, b"TLDC\x01")
            assert trio.current_time() - started < 5
            assert_no_channel(service)
            await assert_legit_channel_works(mesh)


async def test_hello_for_an_unknown_channel_is_refused(channel_mesh: MeshFactory) -> None:
    """A well-formed hello naming no pending channel is refused, even while a real one is pending."""
    async with channel_mesh(2) as mesh:
        with trio.fail_after(20):
            service = mesh.nodes[1].service
            assert service.data_port is not None
            await refused(service.data_port, seal_hello(random_keys()))
            offer = await offer_by_hand(mesh, 0, 1)
            await refused(offer.port, seal_hello(random_keys()))
            await refused(offer.port, seal_hello(dataclasses.replace(random_keys(), send=offer.keys.send)))
            await close_stream(offer.stream)
            assert_no_channel(service)
            await assert_legit_channel_works(mesh)


async def test_hello_sealed_with_the_wrong_key_is_refused(channel_mesh: MeshFactory) -> None:
    """A hello that names a real pending channel but is sealed with another key (or carries another
    token) proves nothing and is refused; after MAX_HELLO_FAILURES such tries the pending channel is
    dropped, so even the right hello no longer opens it."""
    async with channel_mesh(2) as mesh:
        with trio.fail_after(20):
            service = mesh.nodes[1].service
            offer = await offer_by_hand(mesh, 0, 1)
            wrong = [
                dataclasses.replace(offer.keys, send=os.urandom(KEY)),
                dataclasses.replace(offer.keys, send=offer.keys.recv),  # the acceptor's own key
                dataclasses.replace(offer.keys, token=os.urandom(TOKEN_BYTES)),
            ]
            assert len(wrong) == MAX_HELLO_FAILURES
            for keys in wrong:
                await refused(offer.port, seal_hello(keys))
            assert offer.keys.channel_id not in service._pending
            await refused(offer.port, seal_hello(offer.keys))
            await close_stream(offer.stream)
            assert_no_channel(service)
            await assert_legit_channel_works(mesh)


async def test_right_hello_still_opens_after_a_wrong_one(channel_mesh: MeshFactory) -> None:
    """One failed hello does not cost the real opener its channel: the right hello then gets the
    acceptor's sealed reply, and the hand-made channel carries tensors both ways. (This also pins the
    handshake to what keys.py and the service docstring describe.)"""
    async with channel_mesh(2) as mesh:
        with trio.fail_after(20):
            a, b = mesh.nodes
            offer = await offer_by_hand(mesh, 0, 1)
            await refused(offer.port, seal_hello(dataclasses.replace(offer.keys, send=os.urandom(KEY))))
            tcp = await trio.open_tcp_stream("127.0.0.1", offer.port)
            await tcp.send_all(seal_hello(offer.keys))
            reply = b""
            while len(reply) < HELLO_REPLY_BYTES:
                chunk = await tcp.receive_some(HELLO_REPLY_BYTES - len(reply))
                assert chunk, "the service closed the connection instead of replying"
                reply += chunk
            check_reply(offer.keys, reply)
            await write_message(offer.stream, ChannelSelect(direct=True, reason="by hand"))
            mine = DirectChannel(
                socket.socket(fileno=tcp.socket.detach()),
                offer.keys,
                peer=b.peer_id,
                job=JOB,
                pool=a.service.pool,
                max_payload=a.service.config.max_payload,
            )
            theirs = await b.service.accept()
            try:
                assert (theirs.kind, theirs.peer, theirs.job) == ("direct", a.peer_id, JOB)
                x = torch.randn(300, 7)
                got, _ = await exchange(mine, theirs, x)
                assert torch.equal(got, x)
                got, _ = await exchange(theirs, mine, x * 2)
                assert torch.equal(got, x * 2)
            finally:
                await mine.aclose()


async def test_admit_false_refuses_the_opener(channel_mesh: MeshFactory, kind: str) -> None:
    """``admit(peer, job)`` returning False answers the offer with a refusal: the opener gets
    ChannelRefused, the acceptor gets no channel, and admitted jobs still open."""
    asked: list[tuple[str, bytes]] = []

    def admit(peer: str, job: bytes) -> bool:
        asked.append((peer, job))
        return job != JOB

    async with channel_mesh(2, config_for(kind), admit=admit) as mesh:
        with trio.fail_after(20):
            a, b = mesh.nodes
            with pytest.raises(ChannelRefused, match="not_admitted"):
                await a.service.open(b.peer_id, JOB)
            assert asked == [(a.peer_id, JOB)]
            assert_no_channel(b.service)
            assert a.service.channels() == [] and a.service.status() == []
            opened, accepted = await mesh.pair(0, 1, LEGIT_JOB)
            got, _ = await exchange(opened, accepted, torch.ones(3))
            assert torch.equal(got, torch.ones(3))


async def test_idle_connections_do_not_push_channels_off_the_direct_path(channel_mesh: MeshFactory) -> None:
    """Anyone who can reach the data port can open TCP connections and send nothing. That must not
    keep real openers (who hold the keys) from their direct channel: 70 idle connections, and a
    channel opened meanwhile is still direct, set up well within the opener's connect timeout."""
    async with channel_mesh(2) as mesh:
        port = mesh.nodes[1].service.data_port
        assert port is not None
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(70)]
        try:
            with trio.fail_after(20):
                started = trio.current_time()
                a, b = await mesh.pair(0, 1, LEGIT_JOB)
                assert (a.kind, b.kind) == ("direct", "direct"), a.stats()
                assert trio.current_time() - started < mesh.nodes[0].service.config.connect_timeout_s
        finally:
            for tcp in idle:
                await tcp.aclose()


async def test_a_peer_cannot_open_more_channels_than_its_cap(channel_mesh: MeshFactory) -> None:
    """Every channel may make its receiver buffer a window of frames, so a peer gets a bounded number;
    past the cap the opener gets a clear refusal, and closing one makes room again."""
    configs = [config_for("direct"), config_for("direct", max_channels_per_peer=3)]
    async with channel_mesh(2, configs=configs) as mesh:
        with trio.fail_after(30):
            pairs = [await mesh.pair(0, 1, job_id(i)) for i in range(3)]
            with pytest.raises(ChannelRefused, match="3 channels from this peer are open"):
                await mesh.nodes[0].service.open(mesh.nodes[1].peer_id, job_id(9))
            await pairs[0][1].aclose()
            a, b = await mesh.pair(0, 1, job_id(10))
            x = torch.arange(10.0)
            got, _ = await exchange(a, b, x)
            assert torch.equal(got, x)


async def test_opening_to_an_unreachable_peer_says_how_to_fix_it(channel_mesh: MeshFactory) -> None:
    """A peer id the host has never connected to is a ChannelError that says to connect first, not a
    libp2p exception from deep inside the swarm."""
    async with channel_mesh(1) as mesh:
        stranger = "12D3KooWRBhwfeP2Y4TCx1SM6s8rWoNSxcbU1ACxvVGpVgWpLgvm"
        with trio.fail_after(30), pytest.raises(ChannelError, match="connect to it first"):
            await mesh.nodes[0].service.open(stranger, JOB)


async def test_stalled_set_ups_of_one_peer_do_not_refuse_the_others(channel_mesh: MeshFactory) -> None:
    """A peer that starts set-ups and never finishes them holds at most SETUPS_PER_PEER of the node's set-up
    slots: its next open is refused saying so, another peer's channel opens at once meanwhile, and the
    stalled set-ups end at the set-up timeout, after which the first peer can open again."""
    configs = [config_for("direct"), config_for("direct", setup_timeout_s=2.0), config_for("direct")]
    async with channel_mesh(3, configs=configs) as mesh:
        with trio.fail_after(30):
            attacker, victim = mesh.nodes[0], mesh.nodes[1]
            stalled = [await offer_by_hand(mesh, 0, 1, job_id(20, i)) for i in range(SETUPS_PER_PEER)]
            with pytest.raises(ChannelRefused, match=f"already holds {SETUPS_PER_PEER} streams of {PROTOCOL}.*busy"):
                await attacker.service.open(victim.peer_id, LEGIT_JOB)
            started = trio.current_time()
            a, b = await mesh.pair(2, 1, LEGIT_JOB)
            assert trio.current_time() - started < 2.0
            got, _ = await exchange(a, b, torch.arange(4.0))
            assert torch.equal(got, torch.arange(4.0))
            await trio.sleep(2.5)  # the set-up timeout of the victim ends the stalled set-ups
            for offer in stalled:
                assert offer.keys.channel_id not in victim.service._pending
                await close_stream(offer.stream)
            mine, _ = await mesh.pair(0, 1, job_id(21))
            assert mine.kind == "direct"
