"""The status endpoint, on 127.0.0.1 unless the operator asks otherwise: the dashboard page at /, GET
/status (JSON), GET /events (the same snapshot every second as server-sent events) and GET /metrics
(Prometheus text).

A small HTTP/1.1 server on trio and h11 (sans-IO, well kept), bounded in every way a client could abuse:
request size, time to send it, concurrent connections, concurrent event streams and how long one lasts.
It is read-only (GET and HEAD only). Every answer carries a Content-Security-Policy that allows only the
node's own files (no inline script, no other origin) and nosniff; on a loopback bind a request must
name a loopback host, so a web page elsewhere cannot read the node through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import h11
import msgspec
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT_S = 5.0  # to send a request, and for each write of an answer
MAX_CONNECTIONS = 32
MAX_EVENT_STREAMS = 4  # open dashboards at once; more are answered 503 (EventSource retries)
EVENT_PERIOD_S = 1.0
EVENT_STREAM_MAX_S = 300.0  # then the stream ends and the browser reconnects: no connection is held forever
EVENT_RETRY_MS = 2000
LOOPBACK_NAMES = ("localhost",)
SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
]
JSON = "application/json"


class StatusServer:
    """Serves snapshots produced by the node; the callables run on the trio thread, so they read node
    state without locks. ``assets`` maps a URL path to a file's (body, content type): the dashboard."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        assets: dict[str, tuple[bytes, str]] | None = None,
    ) -> None:
        self._status = status
        self._metrics = metrics
        self._assets = assets or {}
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self._event_slots = trio.Semaphore(MAX_EVENT_STREAMS)
        self.port: int | None = None
        self.host = "127.0.0.1"

    # trio 0.35 has TaskStatus; libp2p's trio-typing 0.10 stubs (which mypy reads first) predate it
    async def serve(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.host = host
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._slots.value == 0:
            await stream.aclose()  # over the connection cap: refuse rather than queue
            return
        async with self._slots, stream:
            try:
                await self._serve_one(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
                log.debug("status client dropped: %s", exc)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        with trio.fail_after(REQUEST_TIMEOUT_S):
            request = await _read_request(conn, stream)
        if request is None:
            return
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if target == "/events" and request.method == b"GET" and self._host_allowed(request):
            await self._events(conn, stream)
            return
        status, body, ctype = self._answer(request, target)
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=_headers(ctype, len(body)))))
            if request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))

    def _answer(self, request: h11.Request, target: str) -> tuple[int, bytes, str]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, b'{"error": "read-only: only GET and HEAD are served"}\n', JSON
        if not self._host_allowed(request):
            return 403, b'{"error": "this status port answers only requests for 127.0.0.1 or localhost"}\n', JSON
        if target == "/status":
            return 200, msgspec.json.encode(self._status()) + b"\n", JSON
        if target == "/metrics":
            return 200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8"
        if target == "/events":
            return 405, b'{"error": "/events is an event stream: GET it"}\n', JSON
        if target in self._assets:
            body, ctype = self._assets[target]
            return 200, body, ctype
        return 404, b'{"error": "not found; try /, /status, /events or /metrics"}\n', JSON

    def _host_allowed(self, request: h11.Request) -> bool:
        """On a loopback bind, only requests naming a loopback host (DNS rebinding defence); a public bind
        (the operator's explicit choice) answers any name."""
        if is_public_bind(self.host):
            return True
        host = dict(request.headers).get(b"host", b"").decode("ascii", "replace")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]") in LOOPBACK_NAMES or _is_loopback(name.strip("[]"))

    async def _events(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        """The snapshot every EVENT_PERIOD_S for EVENT_STREAM_MAX_S, to at most MAX_EVENT_STREAMS clients."""
        if self._event_slots.value == 0:
            body = b'{"error": "too many open dashboards; close one"}\n'
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await stream.send_all(conn.send(h11.Response(status_code=503, headers=_headers(JSON, len(body)))))
                await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            return
        async with self._event_slots:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                response = h11.Response(status_code=200, headers=_headers("text/event-stream", None))
                await stream.send_all(conn.send(response))
                await stream.send_all(conn.send(h11.Data(data=f"retry: {EVENT_RETRY_MS}\n\n".encode())))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_closed, stream, nursery.cancel_scope)
                with trio.move_on_after(EVENT_STREAM_MAX_S):
                    while True:
                        event = b"data: " + msgspec.json.encode(self._status()) + b"\n\n"  # compact JSON: one line
                        with trio.fail_after(REQUEST_TIMEOUT_S):
                            await stream.send_all(conn.send(h11.Data(data=event)))
                        await trio.sleep(EVENT_PERIOD_S)
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                nursery.cancel_scope.cancel()


async def _until_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Ends an event stream as soon as its client goes away (a closed tab frees its slot at once); what
    the client sends meanwhile is read and dropped, a bounded amount at a time."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                return None
            conn.receive_data(data)
            continue
        return event if isinstance(event, h11.Request) else None


def _headers(ctype: str, length: int | None) -> list[tuple[str, str]]:
    size = [] if length is None else [("content-length", str(length))]
    return [("content-type", ctype), *size, ("connection", "close"), *SECURITY_HEADERS]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_public_bind(host: str) -> bool:
    """Whether binding ``host`` exposes the status port beyond this machine (needs --status-public)."""
    return not (_is_loopback(host) or host in LOOPBACK_NAMES)


def base_url(host: str, port: int) -> str:
    """The dashboard's URL for the banner: a wildcard bind is reached on this machine at 127.0.0.1."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
