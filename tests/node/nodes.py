"""Real node processes for tests: started through `python -m tensorlink.node`, read through their
start banner and status endpoint, stopped with a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 30.0


class NodeProcess:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = ["--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", "0", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorlink.node", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait_ready(self) -> NodeProcess:
        """Block until the banner is printed; then peer_id, addr and status_url are known."""
        if not self._ready.wait(READY_TIMEOUT_S):
            self.kill()
            raise AssertionError(f"node did not print its banner within {READY_TIMEOUT_S} s:\n{self.output}")
        self.peer_id = self._field("peer id")
        self.addr = self._field("listening")
        self.status_url = self._field("status")
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("  status:"):
                self._ready.set()
        self._ready.set()

    def _field(self, label: str) -> str:
        for line in self.lines:
            match = re.match(rf"\s+{label}:\s+(\S+)", line)
            if match:
                return match.group(1)
        raise AssertionError(f"no '{label}:' line in the banner:\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=5) as response:
            return json.loads(response.read())

    def get(self, path: str) -> tuple[int, bytes]:
        url = self.status_url.rsplit("/", 1)[0] + path
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_for(self, predicate: Any, timeout_s: float, what: str) -> dict[str, Any]:
        """Poll /status until predicate(status) holds; fail with the last status otherwise."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"{what} not seen within {timeout_s} s; last status: {json.dumps(status)[:2000]}")

    def stop(self, sig: int = signal.SIGTERM, within_s: float = 2.0) -> float:
        """Signal the node and return how long it took to exit; fails past within_s."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node did not stop within {within_s} s of {signal.Signals(sig).name}") from None
        self._reader.join(timeout=2)
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
