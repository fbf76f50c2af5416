"""NAT traversal between real peer processes in network namespaces (see netns_lab.py for the topology).

Port-preserving NATs: the dial-back check finds both workers PRIVATE and the relay PUBLIC; worker A
reaches worker B through the relay at B's circuit address; DCUtR then replaces the relayed connection
with a direct one through both NATs (hole punching), and data flows on it. Port-randomising NATs
(``MASQUERADE --random-fully``): hole punching fails and the relayed connection stays and carries data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_lab import (
    NAT_A_WAN,
    NAT_B_WAN,
    PORT,
    RELAY_IP,
    NatLab,
    PeerProcess,
    prerequisites_missing,
    start_swarm,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NatLab]:
    missing = prerequisites_missing()
    if missing:
        pytest.fail(missing)
    with NatLab(random_fully=request.param) as lab:
        yield lab


def check_reachability(relay: PeerProcess, a: PeerProcess, b: PeerProcess) -> None:
    """All three checks at once: each worker asks the relay, the relay asks both workers."""
    pending = [
        (a, a.send("check", servers=[relay.peer_id])),
        (b, b.send("check", servers=[relay.peer_id])),
        (relay, relay.send("check", servers=[a.peer_id, b.peer_id])),
    ]
    verdicts = {peer.name: peer.reply(request_id, timeout=20) for peer, request_id in pending}
    for worker, wan in (("a", NAT_A_WAN), ("b", NAT_B_WAN)):
        report = verdicts[worker]
        assert report["status"] == "private", report
        (result,) = report["results"]
        # The relay saw the NAT's address and dialled the worker's port there: dropped by the NAT.
        assert result["outcome"] == "failed", result
        assert result["dialed"] == [f"/ip4/{wan}/tcp/{PORT}"], result
        assert result["observed"].startswith(f"/ip4/{wan}/tcp/"), result
    report = verdicts["relay"]
    assert report["status"] == "public", report
    assert [r["outcome"] for r in report["results"]] == ["confirmed", "confirmed"], json.dumps(report, indent=1)
    assert {r["addr"] for r in report["results"]} == {f"/ip4/{RELAY_IP}/tcp/{PORT}"}


def relayed_dial(relay: PeerProcess, a: PeerProcess, b: PeerProcess) -> str:
    """B and A reserve slots on the relay; A dials B's circuit address and echoes data through it."""
    circuit_b = f"/ip4/{RELAY_IP}/tcp/{PORT}/p2p/{relay.peer_id}/p2p-circuit/p2p/{b.peer_id}"
    assert circuit_b in b.call("reserve", relay=relay.addr)["circuit_addrs"]
    a.call("reserve", relay=relay.addr)
    dialed = a.call("dial", addr=circuit_b, size=256 * 1024)
    assert dialed["peer"] == b.peer_id
    assert dialed["kind"] == "relayed", dialed
    assert dialed["echo"]["ok"], dialed
    assert any("/p2p-circuit" in addr for addr in dialed["echo"]["stream_conn"]), dialed
    return circuit_b


@pytest.mark.parametrize("lab", [False], indirect=True, ids=["port-preserving-nat"])
@pytest.mark.timeout(130)
def test_relay_then_hole_punch_to_direct(lab: NatLab, tmp_path: Path) -> None:
    started = time.monotonic()
    relay, a, b = start_swarm(lab, tmp_path)
    check_reachability(relay, a, b)
    relayed_dial(relay, a, b)

    # DCUtR upgrades the relayed connection by itself (both sides drive it every 2 s). The first attempt
    # sometimes misses (both NAT mappings must line up; a failed attempt takes ~22 s), so allow a second.
    upgraded = a.reply(a.send("wait_direct", peer=b.peer_id, timeout=55), timeout=60)
    assert upgraded["direct"], f"{upgraded}\nA log:\n{a.log_tail()}\nB log:\n{b.log_tail()}"
    # The direct connection goes to B's NAT at B's listen port: a hole punched through both NATs.
    assert f"/ip4/{NAT_B_WAN}/tcp/{PORT}" in [addr.split("/p2p/")[0] for addr in upgraded["addrs"]], upgraded
    echoed = a.call("echo", peer=b.peer_id, size=1 << 20)
    assert echoed["ok"] and echoed["kind"] == "direct", echoed
    assert echoed["stream_conn"] and not any("/p2p-circuit" in x for x in echoed["stream_conn"]), echoed
    seen_by_b = b.call("kind", peer=a.peer_id)
    assert seen_by_b["kind"] == "direct", seen_by_b
    assert time.monotonic() - started < 100


@pytest.mark.parametrize("lab", [True], indirect=True, ids=["random-fully-nat"])
@pytest.mark.timeout(150)
def test_relay_kept_when_nat_randomises_ports(lab: NatLab, tmp_path: Path) -> None:
    relay, a, b = start_swarm(lab, tmp_path)
    check_reachability(relay, a, b)
    relayed_dial(relay, a, b)

    # Wait for A's first DCUtR attempt to run to its end; it cannot get through a port-randomising NAT.
    # A failing attempt takes ~22 s in py-libp2p (not configurable), more on a loaded machine.
    deadline = time.monotonic() + 75
    while True:
        state = a.call("attempts", peer=b.peer_id)
        if state["attempts"] >= 1 and not state["running"]:
            break
        assert time.monotonic() < deadline, f"DCUtR attempt did not finish: {state}\nA log:\n{a.log_tail()}"
        time.sleep(0.5)
    assert state["kind"] == "relayed", state
    echoed = a.call("echo", peer=b.peer_id, size=1 << 20)
    assert echoed["ok"] and echoed["kind"] == "relayed", echoed
    assert any("/p2p-circuit" in x for x in echoed["stream_conn"]), echoed
    back = b.call("echo", peer=a.peer_id, size=64 * 1024)
    assert back["ok"] and back["kind"] == "relayed", back
