"""Relay v2 and DCUtR wiring on loopback (no namespaces, no root): reservations and their circuit
addresses, keep-alive after the relay connection drops, the per-IP reservation cap, relayed dials that
carry data, and the upgrade of a relayed connection to a direct one. The NAT behaviour itself is in
test_netns_nat.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.relay import (
    NatTraversal,
    RelayError,
    RelayPolicy,
    connection_addrs,
    connection_kind,
    open_nat_traversal,
)

pytestmark = pytest.mark.timeout(60)
ECHO = "/tensorlink-test/echo/1.0.0"


async def echo_handler(stream) -> None:  # noqa: ANN001 - a libp2p stream
    data = await stream.read(65536)
    await stream.write(data)
    await stream.close()


async def echo(nat: NatTraversal, peer: str, size: int = 4096) -> bool:
    pid = next(p for p in nat.host.get_connected_peers() if p.to_base58() == peer)
    payload = os.urandom(size)
    with trio.fail_after(10):
        stream = await nat.host.new_stream(pid, [ECHO])
        await stream.write(payload)
        back = b""
        while len(back) < size:
            chunk = await stream.read(size - len(back))
            if not chunk:
                break
            back += chunk
        await stream.close()
    return back == payload


@asynccontextmanager
async def nat_nodes(tmp_path: Path, specs: list[dict]) -> AsyncIterator[list[NatTraversal]]:
    async with AsyncExitStack() as stack:
        out = []
        for i, spec in enumerate(specs):
            host = make_host(load_or_create_identity(tmp_path / f"n{i}"))
            await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            host.set_stream_handler(ECHO, echo_handler)
            out.append(await stack.enter_async_context(open_nat_traversal(host, **spec)))
        yield out


def addr_of(nat: NatTraversal) -> str:
    return str(nat.host.get_addrs()[0])


def pid_of(nat: NatTraversal) -> str:
    return nat.host.get_id().to_base58()


async def test_reserve_dial_through_relay_and_carry_data(tmp_path: Path) -> None:
    specs = [{"relay": True, "hole_punch": False}, {"hole_punch": False}, {"hole_punch": False}]
    async with nat_nodes(tmp_path, specs) as (relay, a, b):
        reservation = await b.reserve(addr_of(relay))
        expected = f"{addr_of(relay)}/p2p-circuit/p2p/{pid_of(b)}"
        assert reservation.circuit_addrs == (expected,) and b.circuit_addrs() == [expected]
        assert reservation.relay == pid_of(relay) and reservation.expires_at > reservation.reserved_at
        assert relay.relay_reservations() == 1
        assert b.known_relays() == [pid_of(relay)]

        assert await a.dial(expected) == pid_of(b)
        assert connection_kind(a.host, pid_of(b)) == "relayed"
        assert all("/p2p-circuit" in x for x in connection_addrs(a.host, pid_of(b)))
        assert connection_kind(a.host, pid_of(relay)) == "direct"
        assert connection_kind(a.host, "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA") is None
        assert await echo(a, pid_of(b), 60_000) and await echo(b, pid_of(a), 60_000)


async def test_dial_to_a_peer_without_reservation_fails_cleanly(tmp_path: Path) -> None:
    specs = [{"relay": True, "hole_punch": False}, {"hole_punch": False}, {"hole_punch": False}]
    async with nat_nodes(tmp_path, specs) as (relay, a, b):
        with pytest.raises(RelayError, match="relayed dial"):
            await a.dial(f"{addr_of(relay)}/p2p-circuit/p2p/{pid_of(b)}", timeout_s=10)
        assert connection_kind(a.host, pid_of(b)) is None


async def test_non_relay_refuses_reservations(tmp_path: Path) -> None:
    async with nat_nodes(tmp_path, [{"hole_punch": False}, {"hole_punch": False}]) as (plain, b):
        with pytest.raises(RelayError, match="does not serve"):
            await b.reserve(addr_of(plain))
        assert b.circuit_addrs() == []


async def test_keep_alive_reserves_again_after_disconnect(tmp_path: Path) -> None:
    specs = [{"relay": True, "hole_punch": False}, {"hole_punch": False, "poll_s": 0.2}]
    async with nat_nodes(tmp_path, specs) as (relay, b):
        first = await b.reserve(addr_of(relay))
        relay_pid = next(iter(b.host.get_connected_peers()))
        await b.host.get_network().close_peer(relay_pid)
        with trio.fail_after(10):
            while not b.reservations or b.reservations[0].reserved_at == first.reserved_at:
                await trio.sleep(0.1)
            while relay.relay_reservations() != 1:
                await trio.sleep(0.1)
        assert connection_kind(b.host, pid_of(relay)) == "direct"
        await b.release(pid_of(relay))
        assert b.circuit_addrs() == []


async def test_reservations_are_capped_per_ip(tmp_path: Path) -> None:
    policy = RelayPolicy(reservations_per_ip=1)
    specs = [{"relay": True, "hole_punch": False, "policy": policy}, {"hole_punch": False}, {"hole_punch": False}]
    async with nat_nodes(tmp_path, specs) as (relay, a, b):
        await a.reserve(addr_of(relay), keep_alive=False)
        with pytest.raises(RelayError, match="RESOURCE_LIMIT_EXCEEDED"):
            await b.reserve(addr_of(relay), keep_alive=False)
        await a.reserve(addr_of(relay), keep_alive=False)  # a refresh by the holder is fine
        assert relay.relay_reservations() == 1


async def test_slots_of_departed_peers_are_reused(tmp_path: Path) -> None:
    """A slot is only usable while its holder stays connected, so a departed holder's slot is freed."""
    policy = RelayPolicy(max_reservations=1)
    specs = [{"relay": True, "hole_punch": False, "policy": policy}, {"hole_punch": False}, {"hole_punch": False}]
    async with nat_nodes(tmp_path, specs) as (relay, a, b):
        await a.reserve(addr_of(relay), keep_alive=False)
        await a.host.get_network().close_peer(next(iter(a.host.get_connected_peers())))
        with trio.fail_after(5):
            while connection_kind(relay.host, pid_of(a)) is not None:
                await trio.sleep(0.05)
        await b.reserve(addr_of(relay), keep_alive=False)
        assert relay.relay_reservations() == 1


def _reserve_for(peer_id_bytes: bytes) -> bytes:
    """A relay v2 HopMessage{type: RESERVE, peer: {id}} with its varint length prefix, encoded by hand."""
    inner = b"\x0a" + bytes([len(peer_id_bytes)]) + peer_id_bytes
    body = b"\x08\x00" + b"\x12" + bytes([len(inner)]) + inner
    assert len(body) < 128
    return bytes([len(body)]) + body


async def test_a_reservation_is_for_the_requesting_peer_only(tmp_path: Path) -> None:
    """libp2p 0.8.1 would reserve for whatever peer id the RESERVE names; ours pins it to the sender."""
    specs = [{"relay": True, "hole_punch": False}, {"hole_punch": False}, {"hole_punch": False}]
    async with nat_nodes(tmp_path, specs) as (relay, a, victim):
        await a.dial(addr_of(relay))
        relay_pid = next(iter(a.host.get_connected_peers()))
        stream = await a.host.new_stream(relay_pid, ["/libp2p/circuit/relay/0.2.0/hop"])
        await stream.write(_reserve_for(victim.host.get_id().to_bytes()))
        with trio.fail_after(5):
            assert await stream.read(4096)  # the STATUS answer
        await stream.close()
        reserved = {p.to_base58() for p in relay._protocol.resource_manager._reservations}
        assert reserved == {pid_of(a)}


async def test_relayed_connection_is_upgraded_to_direct(tmp_path: Path) -> None:
    """On loopback B is directly dialable, so DCUtR's first step (a plain direct dial) succeeds."""
    async with nat_nodes(tmp_path, [{"relay": True, "hole_punch": False}, {}, {}]) as (relay, a, b):
        await b.reserve(addr_of(relay))
        await a.dial(b.circuit_addrs()[0])
        assert await a.wait_direct(pid_of(b), timeout_s=20)
        assert connection_kind(a.host, pid_of(b)) == "direct"
        assert any("/p2p-circuit" not in x for x in connection_addrs(a.host, pid_of(b)))
        assert await echo(a, pid_of(b))


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="reservation_ttl_s"):
        RelayPolicy(reservation_ttl_s=5)
    with pytest.raises(ValueError, match="circuit_bytes"):
        RelayPolicy(circuit_bytes=0)
    limits = RelayPolicy(circuit_duration_s=120, circuit_bytes=1 << 20).limits()
    assert (limits.duration, limits.data, limits.reservation_ttl) == (120, 1 << 20, 900)
