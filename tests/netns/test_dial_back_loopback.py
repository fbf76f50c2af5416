"""The dial-back protocol on loopback, with real libp2p hosts (no namespaces, no root needed).

Reachable → PUBLIC, confirmed by a probe over a fresh connection from another identity; announced port
closed, or another peer behind it → PRIVATE although a live connection to the server exists (the case
AutoNAT v1 gets wrong); addresses that are not the requester's → refused, never dialled; a server that
claims success without probing is not believed; requests are rate limited.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio

from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.reachability import (
    DialBack,
    DialBackConfig,
    DialBackResult,
    Reachability,
    open_dial_back,
    plan_dial_back,
    verdict,
)
from tensorlink.p2p.streams import read_message, write_message
from tensorlink.wire.messages import DialBackRequest, DialBackResponse
from tensorlink.wire.protocols import DIALBACK_PROTOCOL

pytestmark = pytest.mark.timeout(60)

CONFIG = DialBackConfig(dial_timeout_s=2.0, request_timeout_s=6.0)
REQUESTER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
OTHER = "12D3KooWHc77TMBvq1xd8WUcjCju3qbmRkgLCTnMF1gm3teMHhKd"


class Node:
    def __init__(self, host, dial_back: DialBack) -> None:  # noqa: ANN001 - a libp2p host
        self.host = host
        self.dial_back = dial_back

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addr(self) -> str:
        """Full listen multiaddr with /p2p/<id>."""
        return str(self.host.get_addrs()[0])

    @property
    def port(self) -> int:
        return int(multiaddr.Multiaddr(self.addr).value_for_protocol("tcp"))


@asynccontextmanager
async def nodes(tmp_path: Path, count: int, config: DialBackConfig = CONFIG) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        out = []
        for i in range(count):
            host = make_host(load_or_create_identity(tmp_path / f"n{i}"))
            await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            out.append(Node(host, await stack.enter_async_context(open_dial_back(host, config=config))))
        yield out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_public_when_reachable(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as (a, server):
        started = time.monotonic()
        report = await a.dial_back.check([server.addr])
        assert time.monotonic() - started < 3
        assert report.status is Reachability.PUBLIC
        (result,) = report.results
        assert result.outcome == "confirmed" and result.server == server.peer_id
        assert result.addr == f"/ip4/127.0.0.1/tcp/{a.port}" and report.public_addrs == [result.addr]
        # The probe came over a new connection from the server's prober, not over our connection.
        assert result.prober and result.prober not in (server.peer_id, a.peer_id)
        assert a.dial_back.last_report is report


async def test_private_when_announced_port_is_closed(tmp_path: Path) -> None:
    """A live connection to the server exists; it must not count as reachability."""
    async with nodes(tmp_path, 2) as (a, server):
        port = closed_port()
        report = await a.dial_back.check([server.addr], addrs=[f"/ip4/127.0.0.1/tcp/{port}"])
        assert report.status is Reachability.PRIVATE
        (result,) = report.results
        assert result.outcome == "failed" and result.dialed == (f"/ip4/127.0.0.1/tcp/{port}",)
        assert server.peer_id in {p.to_base58() for p in a.host.get_connected_peers()}


async def test_private_when_another_peer_answers_at_the_address(tmp_path: Path) -> None:
    """Noise checks the peer id: reaching *someone* at the announced address is not reaching us."""
    async with nodes(tmp_path, 3) as (a, server, other):
        report = await a.dial_back.check([server.addr], addrs=[f"/ip4/127.0.0.1/tcp/{other.port}"])
        assert report.status is Reachability.PRIVATE, report
        assert report.results[0].outcome == "failed"


@pytest.mark.parametrize(
    "addr",
    [
        "/ip4/8.8.8.8/tcp/53",  # a global IP that is not where the request came from
        "/ip6/2001:4860:4860::8888/tcp/443",
        "/ip4/127.0.0.1/tcp/{port}/p2p/" + OTHER,  # the right place, but someone else's peer id
        "/dns4/localhost/tcp/{port}",
        "/ip4/127.0.0.1/udp/{port}/quic-v1",
        "/ip4/127.0.0.1/tcp/{port}/p2p/{relay}/p2p-circuit/p2p/{me}",
        "/ip4/0.0.0.0/tcp/{port}",
    ],
    ids=["foreign-ipv4", "foreign-ipv6", "other-peer-id", "dns", "quic", "circuit", "wildcard"],
)
async def test_refuses_addresses_that_are_not_the_requesters(tmp_path: Path, addr: str) -> None:
    async with nodes(tmp_path, 2) as (a, server):
        text = addr.format(port=a.port, relay=server.peer_id, me=a.peer_id)
        started = time.monotonic()
        report = await a.dial_back.check([server.addr], addrs=[text])
        assert time.monotonic() - started < 2  # answered at once: nothing was dialled
        assert report.status is Reachability.UNKNOWN
        (result,) = report.results
        assert result.outcome == "refused" and result.dialed == ()
        assert result.observed and result.observed.startswith("/ip4/127.0.0.1/tcp/")
        assert server.dial_back.served_requests == 0 and server.dial_back.refused_requests == 1


async def test_a_server_that_claims_success_without_probing_is_not_believed(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2) as (a, liar):

        async def lie(stream) -> None:  # noqa: ANN001
            request = await read_message(stream, DialBackRequest)
            await write_message(stream, DialBackResponse(nonce=request.nonce, status="ok", addr=request.addrs[0]))
            await stream.close()

        liar.host.set_stream_handler(DIALBACK_PROTOCOL, lie)
        report = await a.dial_back.check([liar.addr])
        assert report.status is Reachability.UNKNOWN
        assert report.results[0].outcome == "unverified"


async def test_requests_are_rate_limited_per_peer(tmp_path: Path) -> None:
    async with nodes(tmp_path, 2, DialBackConfig(dial_timeout_s=2.0, request_timeout_s=6.0, peer_burst=2)) as (
        a,
        server,
    ):
        outcomes = [(await a.dial_back.check([server.addr])).results[0] for _ in range(3)]
        assert [r.outcome for r in outcomes] == ["confirmed", "confirmed", "refused"]
        assert outcomes[2].detail.startswith("rate_limited")


async def test_several_servers_and_a_dead_one(tmp_path: Path) -> None:
    """Answers are combined; a server that cannot be reached adds no evidence and costs no extra time."""
    async with nodes(tmp_path, 3) as (a, s1, s2):
        dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{OTHER}"
        report = await a.dial_back.check([s1.addr, s2.addr, dead, a.peer_id])
        outcomes = {r.server: r.outcome for r in report.results}
        assert outcomes == {s1.peer_id: "confirmed", s2.peer_id: "confirmed", OTHER: "error"}
        assert report.status is Reachability.PUBLIC


def test_plan_dials_only_the_requesters_ip() -> None:
    plan = plan_dial_back(
        [
            "/ip4/203.0.113.7/tcp/4001",  # on the observed IP: as given
            "/ip4/192.168.1.20/tcp/4002",  # LAN address behind the NAT: same port at the observed IP
            "/ip4/10.0.0.5/tcp/4001/p2p/" + REQUESTER,  # LAN again, own peer id: duplicate target
            "/ip4/8.8.4.4/tcp/4001",  # another public IP: refused
            "/ip6/fd00::1/tcp/4003",  # IPv6 LAN address, IPv4 observed: refused
            "/ip4/127.0.0.1/tcp/4004/p2p/" + OTHER,
        ],
        requester=REQUESTER,
        observed_ip="203.0.113.7",
    )
    assert plan == (
        ["/ip4/203.0.113.7/tcp/4001", "/ip4/203.0.113.7/tcp/4002"],
        ["/ip4/8.8.4.4/tcp/4001", "/ip6/fd00::1/tcp/4003", "/ip4/127.0.0.1/tcp/4004/p2p/" + OTHER],
    )
    many = [f"/ip4/192.168.1.20/tcp/{4000 + i}" for i in range(8)]
    targets, refused = plan_dial_back(many, requester=REQUESTER, observed_ip="203.0.113.7", max_targets=4)
    assert len(targets) == 4 and refused == many[4:]


def test_verdict() -> None:
    def r(outcome: str) -> DialBackResult:
        return DialBackResult("s", outcome)  # type: ignore[arg-type]

    assert verdict([]) is Reachability.UNKNOWN
    assert verdict([r("refused"), r("timeout"), r("unverified"), r("error")]) is Reachability.UNKNOWN
    assert verdict([r("failed"), r("refused")]) is Reachability.PRIVATE
    assert verdict([r("failed"), r("confirmed")]) is Reachability.PUBLIC


def test_config_bounds() -> None:
    with pytest.raises(ValueError, match="request_timeout_s"):
        DialBackConfig(dial_timeout_s=5.0, request_timeout_s=5.5)
    with pytest.raises(ValueError, match="max_targets"):
        DialBackConfig(max_targets=9)


async def test_garbage_and_stalls_on_the_protocol_are_dropped(tmp_path: Path) -> None:
    config = DialBackConfig(dial_timeout_s=2.0, request_timeout_s=6.0, io_timeout_s=1.0)
    async with nodes(tmp_path, 2, config) as (a, server):
        await a.dial_back.check([server.addr])  # connects
        # oversized length prefix, undecodable msgpack, a stalled half-written prefix
        for junk in (b"\xff\xff\xff\xff", (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1", b"\x00"):
            stream = await a.host.new_stream(server.host.get_id(), [DIALBACK_PROTOCOL])
            await stream.write(junk)
            with trio.fail_after(config.io_timeout_s + 2):
                try:
                    data = await stream.read(100)
                except Exception:
                    data = b""
            assert data == b""
        assert (await a.dial_back.check([server.peer_id])).status is Reachability.PUBLIC
