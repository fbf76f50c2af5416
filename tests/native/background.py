"""A thread whose outcome the test thread can join: the native I/O tests drive one end of a socket from
another thread while the test thread drives the other."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Background:
    """Runs fn in a daemon thread; join() re-raises its exception or returns its result."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._result: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the joining thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 30) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background I/O did not finish (deadlock?)"
        if self._error is not None:
            raise self._error
        return self._result

    def error(self, timeout: float = 30) -> BaseException:
        """Join and return the exception the thread raised (failing if it raised none)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background I/O did not finish (deadlock?)"
        assert self._error is not None, f"expected an error, the thread returned {self._result!r}"
        return self._error
