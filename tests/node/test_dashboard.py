"""The dashboard's server side: the status server's routes and safety headers, its bounds on event streams,
the timeline derived from snapshots, and the Grafana dashboard's metric names against a live node.

The page itself is tested in a real browser in test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from nodes import NodeProcess

from tensorlink.node import status as status_module
from tensorlink.node.dashboard import Timeline, assets
from tensorlink.node.status import MAX_EVENT_STREAMS, StatusServer, is_public_bind

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tensorlink.json"
SNAPSHOT = {"peer_id": "12D3KooW", "uptime_s": 1.0}


@asynccontextmanager
async def server(snapshot: Callable[[], dict[str, Any]] = lambda: SNAPSHOT) -> AsyncIterator[int]:
    srv = StatusServer(snapshot, lambda: b"tensorlink_peers 0\n", assets())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(srv.serve, 0)
        yield port
        nursery.cancel_scope.cancel()


async def request(port: int, head: str, read_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange; reads until the server closes or ``read_s`` passes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.replace("\n", "\r\n").encode() + b"\r\n")
        data = b""
        with trio.move_on_after(read_s):
            while chunk := await stream.receive_some(65536):
                data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str = "127.0.0.1", method: str = "GET") -> str:
    return f"{method} {path} HTTP/1.1\nHost: {host}\nConnection: close\n"


async def test_the_page_and_its_files_carry_a_strict_csp() -> None:
    async with server() as port:
        for path, ctype in [("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")]:
            code, headers, body = await request(port, get(path))
            assert code == 200 and headers["content-type"].startswith(ctype), (path, headers)
            assert headers["content-security-policy"].startswith("default-src 'self'"), headers
            assert "unsafe-inline" not in headers["content-security-policy"]
            assert headers["x-content-type-options"] == "nosniff"
            assert len(body) == int(headers["content-length"]) > 0
        _, _, page = await request(port, get("/"))
        # offline: nothing from another origin, and no inline script for the CSP to refuse
        assert not re.search(rb"(src|href)=\"(https?:)?//", page), page
        assert re.findall(rb"<script[^>]*>", page) == [b'<script src="/app.js" defer>']
        code, headers, body = await request(port, get("/", method="HEAD"))
        assert code == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_the_page_is_read_only_and_answers_only_loopback_names() -> None:
    async with server() as port:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, _, body = await request(port, get("/status", method=method) + "Content-Length: 0\n")
            assert code == 405 and b"read-only" in body, method
        code, _, body = await request(port, get("/status", host="attacker.example:80"))
        assert code == 403 and b"127.0.0.1 or localhost" in body  # a DNS-rebound page cannot read the node
        code, _, _ = await request(port, get("/events", host="attacker.example"))
        assert code == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
            code, _, body = await request(port, get("/status", host=host))
            assert code == 200 and json.loads(body) == SNAPSHOT, host
        assert (await request(port, get("/nope")))[0] == 404


async def test_events_stream_snapshots_and_are_capped() -> None:
    calls = 0

    def snapshot() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {**SNAPSHOT, "uptime_s": float(calls)}

    async with server(snapshot) as port:
        code, headers, body = await request(port, get("/events"), read_s=2.5)
        assert code == 200 and headers["content-type"] == "text/event-stream", headers
        assert headers["content-security-policy"].startswith("default-src 'self'")
        events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        assert len(events) >= 2 and events[0]["peer_id"] == SNAPSHOT["peer_id"], body
        assert events[1]["uptime_s"] > events[0]["uptime_s"]  # a fresh snapshot each time, not a replay

        async with trio.open_nursery() as nursery:
            held: list[trio.SocketStream] = []
            for _ in range(MAX_EVENT_STREAMS):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                held.append(stream)
                await stream.send_all(get("/events").replace("\n", "\r\n").encode() + b"\r\n")
                assert b"200" in (await stream.receive_some(4096)).split(b"\r\n")[0]
            code, _, body = await request(port, get("/events"))
            assert code == 503 and b"too many open dashboards" in body
            assert (await request(port, get("/status")))[0] == 200  # the page's snapshot is still served
            for stream in held:
                await stream.aclose()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):  # a closed dashboard frees its slot (at its next send)
            while (await request(port, get("/events"), read_s=0.5))[0] != 200:
                await trio.sleep(0.2)


async def test_an_event_stream_ends_after_its_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_module, "EVENT_STREAM_MAX_S", 1.5)
    async with server() as port:
        with trio.fail_after(5):
            code, _, body = await request(port, get("/events"), read_s=10)
        assert code == 200 and body.endswith(b"0\r\n\r\n")  # the chunked stream ended; the browser reconnects


def test_only_loopback_binds_are_private() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert not is_public_bind(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert is_public_bind(host), host


def test_timeline_records_failures_and_recoveries() -> None:
    clock = iter(range(100))
    timeline = Timeline(clock=lambda: float(next(clock)))

    def snap(workers: list[str], check: str | None, closed: str | None, reach: str) -> dict[str, Any]:
        return {
            "reachability": reach,
            "workers": [
                {"peer_id": w, "capacity_check": None if check is None else {"outcome": check}} for w in workers
            ],
            "validators": [],
            "data_plane": {"channels": [{"peer": "P", "job": "ab" * 8, "opened_at": 1.0, "closed": closed}]},
            "jobs": [],
            "running": [],
        }

    timeline.observe(snap(["A"], None, None, "unknown"))
    timeline.observe(snap(["A", "B"], "timeout", None, "public"))
    timeline.observe(snap(["A", "B"], "timeout", "ConnectionResetError: reset by peer", "public"))
    timeline.observe(snap(["A"], "verified", "ConnectionResetError: reset by peer", "public"))
    timeline.observe(snap(["A", "B"], "verified", "ConnectionResetError: reset by peer", "public"))
    got = [(e["kind"], e["what"]) for e in timeline.view()["events"]]
    assert got == [
        ("change", "worker B appeared"),
        ("change", "reachability: unknown -> public"),
        ("failure", "capacity check of A: timeout"),
        ("failure", "capacity check of B: timeout"),
        ("failure", "channel to P (job abababab) closed: ConnectionResetError: reset by peer"),
        ("failure", "worker B gone (its record expired)"),
        ("recovery", "capacity check of A: verified again (was timeout)"),
        ("recovery", "worker B is back"),
    ]
    assert timeline.view()["counts"] == {"change": 2, "failure": 4, "recovery": 2}


def grafana_metric_names() -> set[str]:
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the Grafana dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\btensorlink_[a-z0-9_]+", expr)}


def metric_families(text: str) -> dict[str, str]:
    """Family name -> help text, from a /metrics exposition."""
    return dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.M))


@pytest.mark.swarm
@pytest.mark.slow
def test_every_metric_the_grafana_dashboard_uses_is_on_a_live_node(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("w", "--max-memory", "1")
    code, body = node.get("/metrics")
    assert code == 200
    families = metric_families(body.decode())
    missing = grafana_metric_names() - set(families)
    assert not missing, f"deploy/grafana/tensorlink.json uses metrics the node does not export: {sorted(missing)}"
    assert all(families[name].strip() for name in grafana_metric_names())  # each has help text
    status = node.status()
    assert status["memory"]["offered_bytes"] == status["capability"]["free_memory_bytes"]
    sample = re.search(r"^tensorlink_memory_offered_bytes (\S+)$", body.decode(), re.M)
    assert sample is not None and float(sample.group(1)) == status["memory"]["offered_bytes"]
    code, page = node.get("/")
    assert code == 200 and b"<title>TensorLink node</title>" in page
    assert msgspec.json.decode(node.get("/status")[1])["peer_id"] == node.peer_id
    assert f"dashboard:    {node.status_url.rsplit('/', 1)[0]}/" in node.output
