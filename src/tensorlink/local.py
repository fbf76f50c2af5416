"""LocalSwarm: a real TensorLink network on this machine, for tests, demos and trying offload() out.

Each node is its own ``python -m tensorlink.node`` process on 127.0.0.1 with a data dir of its own;
workers bootstrap from the validators. All start at once (a node takes seconds to import torch and
libp2p): the validators' identities are created and their ports picked here first, so their addresses
are known before they run, and workers retry the bootstrap until a validator answers. Entering the
context waits until every validator lists every worker as live, with its capacity claim checked (until
then a validator counts a worker at the minimum speed, and a split would be lopsided), and every worker
knows every validator, so a job can be placed at once; leaving it stops only the processes it started.
Every node is told the swarm's validators (``--validator``): the swarm's configuration is the network's
list of trusted validators, as a real network's config.toml would be.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tensorlink.p2p.identity import load_or_create_identity, peer_id_of

BANNER_TIMEOUT_S = 60.0  # torch import and the self-benchmark take seconds on a loaded 2-core CI machine
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 40


class SwarmError(RuntimeError):
    """A node of the swarm did not start or join; the message carries the tail of its log."""


@dataclass
class SwarmNode:
    """One node process of the swarm: what it said in its banner and where its log is."""

    role: str
    name: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    peer_id: str = ""
    addr: str = ""  # first listen address, with /p2p/<peer id>
    status_port: int = 0
    _banner: dict[str, list[str]] = field(default_factory=dict)

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url, timeout=5) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def read_banner(self) -> bool:
        """Parse the banner once the node has printed it (its last line is the status URL)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        fields: dict[str, list[str]] = {}
        for match in re.finditer(r"^\s+(peer id|listening|status):\s+(\S+)", text, re.M):
            fields.setdefault(match.group(1), []).append(match.group(2))
        if "status" not in fields:
            return False
        self.peer_id = fields["peer id"][0]
        self.addr = fields["listening"][0]
        self.status_port = int(fields["status"][0].rsplit(":", 1)[1].split("/", 1)[0])
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)


class LocalSwarm:
    """``with LocalSwarm(workers=2) as swarm:`` starts the nodes and waits until they see each other.

    ``worker_memory_gb`` caps what each worker offers (``--max-memory``): one number for all, or one per
    worker. ``threads_per_worker`` is each worker's torch thread count (``--threads``), so that several
    workers on one machine do not oversubscribe its cores. Logs go to ``log_dir`` (kept) or to the
    swarm's temporary directory (removed on exit, like the data dirs).
    """

    def __init__(
        self,
        workers: int = 2,
        validators: int = 1,
        *,
        threads_per_worker: int = 1,
        worker_memory_gb: float | Sequence[float] | None = None,
        log_dir: str | Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        worker_flags: Sequence[str] = (),
        validator_flags: Sequence[str] = (),
    ) -> None:
        if validators < 1:
            raise ValueError("a swarm needs at least one validator: workers bootstrap from it")
        memory = worker_memory_gb if isinstance(worker_memory_gb, Sequence) else [worker_memory_gb] * workers
        if len(memory) != workers:
            raise ValueError(f"worker_memory_gb lists {len(memory)} values for {workers} workers")
        self.n_workers = workers
        self.n_validators = validators
        self.threads_per_worker = threads_per_worker
        self.worker_memory_gb: list[float | None] = list(memory)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.worker_flags = list(worker_flags)  # extra `python -m tensorlink.node` flags, e.g. --audit-inputs
        self.validator_flags = list(validator_flags)
        self.validators: list[SwarmNode] = []
        self.workers: list[SwarmNode] = []
        self._root: Path | None = None

    @property
    def nodes(self) -> list[SwarmNode]:
        return [*self.validators, *self.workers]

    @property
    def validator_addrs(self) -> list[str]:
        return [v.addr for v in self.validators]

    @property
    def validator_peer_ids(self) -> list[str]:
        return [v.peer_id for v in self.validators]

    def __enter__(self) -> LocalSwarm:
        self._root = Path(tempfile.mkdtemp(prefix="tensorlink-swarm-"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every node this swarm started (all signalled first, so they stop in parallel) and remove
        its temporary directory."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _start(self) -> None:
        dirs = [self._data_dir(f"validator{i}") for i in range(self.n_validators)]
        ids = [peer_id_of(load_or_create_identity(d)) for d in dirs]
        trusted = [flag for peer in ids for flag in ("--validator", peer)]
        bootstrap: list[str] = []
        for data_dir, peer in zip(dirs, ids, strict=True):
            listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
            # a validator bootstraps from the ones before it, so the first one is up without waiting
            flags = ["--role", "validator", *trusted, *bootstrap, *self.validator_flags]
            self.validators.append(self._spawn("validator", data_dir, listen, flags))
            bootstrap += ["--bootstrap", f"{listen}/p2p/{peer}"]
        # Workers start once the validators listen: a worker that dials too early lands in libp2p's
        # negative dial cache and may not retry within the ready timeout on a loaded machine.
        self._wait_banner(self.validators)
        for i, memory in enumerate(self.worker_memory_gb):
            flags = ["--role", "worker", "--threads", str(self.threads_per_worker), *trusted, *bootstrap]
            flags += self.worker_flags
            if memory is not None:
                flags += ["--max-memory", str(memory)]
            self.workers.append(self._spawn("worker", self._data_dir(f"worker{i}"), "/ip4/127.0.0.1/tcp/0", flags))
        self._wait_banner(self.workers)
        self._wait_joined()

    def _data_dir(self, name: str) -> Path:
        """A new node's data dir, with its identity key created now so that its peer id is known."""
        assert self._root is not None
        data_dir = self._root / name
        data_dir.mkdir()
        load_or_create_identity(data_dir)
        return data_dir

    def _spawn(self, role: str, data_dir: Path, listen: str, flags: list[str]) -> SwarmNode:
        assert self._root is not None
        log_dir = self.log_dir or self._root
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{data_dir.name}.log"
        args = ["--data-dir", str(data_dir), "--listen", listen, "--status-port", "0", *flags]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorlink.node", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return SwarmNode(role, data_dir.name, data_dir, log_path, proc)

    def _wait_banner(self, nodes: list[SwarmNode]) -> None:
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                if node.read_banner():
                    waiting.remove(node)
                elif node.proc.poll() is not None:
                    raise self._error(node, f"exited with code {node.proc.returncode} before it was up")
            if waiting and time.monotonic() > deadline:
                raise self._error(waiting[0], f"printed no start banner within {BANNER_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def _wait_joined(self) -> None:
        """Until every validator lists every worker as live and checked, and every worker knows every
        validator."""
        workers = {w.peer_id for w in self.workers}
        validators = {v.peer_id for v in self.validators}
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            missing: list[tuple[SwarmNode, str]] = []
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise self._error(node, f"exited with code {node.proc.returncode} while the swarm formed")
                try:
                    status = node.status()
                except OSError as exc:
                    missing.append((node, f"did not answer on its status endpoint ({exc})"))
                    continue
                if node.role == "validator":
                    lacking = workers - {w["peer_id"] for w in status["workers"] if w.get("capacity_check")}
                    what = "worker"
                else:
                    lacking = validators - {v["peer_id"] for v in status["validators"]}
                    what = "validator"
                if lacking:
                    missing.append((node, f"does not list (and check) {what}(s) {', '.join(sorted(lacking))}"))
            if not missing:
                return
            if time.monotonic() > deadline:
                node, why = missing[0]
                raise self._error(node, f"{why} after {self.ready_timeout_s:.0f} s")
            time.sleep(0.2)

    def _error(self, node: SwarmNode, what: str) -> SwarmError:
        return SwarmError(f"{node.name} ({node.role}) {what}; last lines of {node.log_path}:\n{node.log_tail()}")


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now; the node binds it a moment later (a race other programs rarely win)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
