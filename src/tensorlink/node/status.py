"""The status endpoint on 127.0.0.1: GET /status (JSON) and GET /metrics (Prometheus text).

A small HTTP/1.1 server on trio and h11 (sans-IO, well kept), bounded in every way a local client could
abuse: request size, time to send it, and concurrent connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import h11
import msgspec
import trio

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32


class StatusServer:
    """Serves snapshots produced by the node; the callables run on the trio thread, so they read node
    state without locks."""

    def __init__(self, status: Callable[[], dict[str, Any]], metrics: Callable[[], bytes]) -> None:
        self._status = status
        self._metrics = metrics
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self.port: int | None = None

    async def serve(self, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._slots.value == 0:
            await stream.aclose()  # over the connection cap: refuse rather than queue
            return
        async with self._slots, stream:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    await self._serve_one(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("status client dropped: %s", exc)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            return
        target = event.target.decode("ascii", "replace").split("?", 1)[0]
        if event.method not in (b"GET", b"HEAD"):
            status, body, ctype = 405, b'{"error": "only GET is served"}\n', "application/json"
        elif target == "/status":
            status, body, ctype = 200, msgspec.json.encode(self._status()) + b"\n", "application/json"
        elif target == "/metrics":
            status, body, ctype = 200, self._metrics(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body, ctype = 404, b'{"error": "not found; try /status or /metrics"}\n', "application/json"
        headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if event.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
