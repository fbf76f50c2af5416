"""Client: the user's peer. A libp2p host and a data plane on a trio loop in a background thread.

User code is synchronous PyTorch; everything networked runs on this loop and is reached with
``client.call(async_fn, *args)``, which blocks the caller until the coroutine finishes (errors are
raised in the caller's thread). One client serves any number of offloaded models.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from tensorlink.p2p.identity import new_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.transport.service import ChannelService, TransportConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
START_TIMEOUT_S = 30.0


class ClientError(RuntimeError):
    """The client could not start or reach the network; the message says what to check."""


class Client:
    """Start with ``start()`` (or as a context manager); ``close()`` stops the loop and the host."""

    def __init__(self, *, listen_ip: str = "127.0.0.1", psk_hex: str | None = None) -> None:
        self.key_pair = new_identity()
        self.peer_id = peer_id_of(self.key_pair)
        self.listen_ip = listen_ip
        self.host = PeerHost.create(self.key_pair, psk_hex=psk_hex)
        self.channels = ChannelService(self.host, TransportConfig(listen_ip=listen_ip))
        self.nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tensorlink-client", daemon=True)

    def start(self) -> Client:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._failure is not None:
            raise ClientError(f"the TensorLink client did not start: {self._failure!r}")
        return self

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None:
            raise ClientError("the client is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task on the loop (from the loop's thread or any other)."""
        assert self.nursery is not None
        if self._token is not None and threading.current_thread() is not self._thread:
            trio.from_thread.run_sync(self.nursery.start_soon, fn, *args, trio_token=self._token)
        else:
            self.nursery.start_soon(fn, *args)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=15)
        self._token = None

    async def connect(self, addrs: Sequence[str]) -> list[str]:
        """Dial full multiaddrs (with /p2p/); the peer ids reached. Unreachable ones are skipped."""
        reached = []
        for addr in addrs:
            try:
                reached.append(await self.host.connect(addr, 10.0))
            except ConnectionError as exc:
                log.info("%s", exc)
        return reached

    # -- the loop ----------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to start() or logged: the thread must not die silently
            self._failure = exc
            self._ready.set()
            log.error("TensorLink client loop stopped: %r", exc)

    async def _run(self) -> None:
        self._stop = trio.Event()
        async with self.host.run([f"/ip4/{self.listen_ip}/tcp/0"]), trio.open_nursery() as nursery:
            await nursery.start(self.channels.serve)
            self.nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
