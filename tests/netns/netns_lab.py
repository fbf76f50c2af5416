"""A small internet in network namespaces: a public relay and two private hosts, each behind its own
MASQUERADE NAT router that drops unsolicited inbound packets.

    relay 10.77.1.2 ─┐
                     core (router, 10.77.{1,2,3}.1) ─┬─ natA 10.77.2.2 ── A 192.168.101.2
                                                     └─ natB 10.77.3.2 ── B 192.168.102.2

The core has no route to the 192.168.x LANs, so the only way in is through a NAT mapping. All names
carry a per-lab tag (the test process id and a random part, so parallel runs don't clash); every
namespace is deleted on exit, also after a failure, and deleting a namespace removes its veth ends and
iptables rules with it. Namespaces of a lab whose process died are swept at the next start.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("peer.py")

RELAY_IP, NAT_A_WAN, NAT_B_WAN = "10.77.1.2", "10.77.2.2", "10.77.3.2"
A_IP, B_IP = "192.168.101.2", "192.168.102.2"
PORT = 4001


def prerequisites_missing() -> str | None:
    if os.geteuid() != 0:
        return "the NAT tests build network namespaces and need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT tests need `{tool}` (make install provides iptables: apt-get install -y iptables)"
    return None


def sh(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


class NatLab:
    def __init__(self, *, random_fully: bool = False) -> None:
        self.random_fully = random_fully
        self.tag = f"tl{os.getpid()}x{secrets.token_hex(2)}"
        self.ns = {role: f"{self.tag}-{role}" for role in ("core", "relay", "nata", "a", "natb", "b")}
        self.created: list[str] = []
        self.peers: list[PeerProcess] = []

    # ------------------------------------------------------------------------------------ topology

    def __enter__(self) -> NatLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, role: str, *args: str) -> None:
        sh("ip", "-n", self.ns[role], *args)

    def _exec(self, role: str, *args: str) -> None:
        sh("ip", "netns", "exec", self.ns[role], *args)

    def _link(self, a: str, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str) -> None:
        sh("ip", "link", "add", a_if, "netns", self.ns[a], "type", "veth", "peer", "name", b_if, "netns", self.ns[b])
        for role, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            self._ip(role, "addr", "add", addr, "dev", ifname)
            self._ip(role, "link", "set", ifname, "up")

    @staticmethod
    def sweep_stale() -> None:
        """Delete namespaces left by a lab whose test process died without cleaning up (say, SIGKILL)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
        for line in listing.splitlines():
            match = re.match(r"^(tl(\d+)x[0-9a-f]{4}-[a-z]+)\b", line)
            if match and not os.path.exists(f"/proc/{match.group(2)}"):
                subprocess.run(["ip", "netns", "del", match.group(1)], capture_output=True, timeout=20)

    def _build(self) -> None:
        self.sweep_stale()
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            self.created.append(name)
        for role in self.ns:
            self._ip(role, "link", "set", "lo", "up")
        self._link("core", "c-r", "10.77.1.1/24", "relay", "eth0", f"{RELAY_IP}/24")
        self._link("core", "c-a", "10.77.2.1/24", "nata", "wan", f"{NAT_A_WAN}/24")
        self._link("core", "c-b", "10.77.3.1/24", "natb", "wan", f"{NAT_B_WAN}/24")
        self._link("nata", "lan", "192.168.101.1/24", "a", "eth0", f"{A_IP}/24")
        self._link("natb", "lan", "192.168.102.1/24", "b", "eth0", f"{B_IP}/24")
        self._ip("relay", "route", "add", "default", "via", "10.77.1.1")
        self._ip("nata", "route", "add", "default", "via", "10.77.2.1")
        self._ip("natb", "route", "add", "default", "via", "10.77.3.1")
        self._ip("a", "route", "add", "default", "via", "192.168.101.1")
        self._ip("b", "route", "add", "default", "via", "192.168.102.1")
        for router in ("core", "nata", "natb"):
            self._exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for router in ("nata", "natb"):
            masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
            self._exec(router, *masquerade, *(["--random-fully"] if self.random_fully else []))
            # Only replies to what the LAN sent get in; everything unsolicited is dropped (not refused).
            self._exec(router, "iptables", "-P", "FORWARD", "DROP")
            self._exec(
                router,
                "iptables",
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            )
            self._exec(router, "iptables", "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
            self._exec(
                router,
                "iptables",
                "-A",
                "INPUT",
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            )
            self._exec(router, "iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP")

    def close(self) -> None:
        for peer in self.peers:
            peer.stop()
        self.peers.clear()
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.created.clear()

    # --------------------------------------------------------------------------------------- peers

    def start(self, role: str, listen_ip: str, log_dir: Path, *, relay: bool = False) -> PeerProcess:
        args = [
            "ip", "netns", "exec", self.ns[role],
            sys.executable, str(PEER_SCRIPT), "--listen", f"/ip4/{listen_ip}/tcp/{PORT}",
        ]  # fmt: skip
        if relay:
            args.append("--relay")
        peer = PeerProcess(role, args, log_dir / f"{role}.log")
        self.peers.append(peer)
        return peer


class PeerProcess:
    """A peer.py process: JSON commands on stdin, JSON replies on stdout, its log in a file."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO / "src"))
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.info: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                continue
        self._lines.put(None)

    def _next(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        try:
            item = self._lines.get(timeout=remaining)
        except queue.Empty:
            raise TimeoutError from None
        if item is None:
            raise RuntimeError(f"peer {self.name} exited ({self.proc.poll()}); log:\n{self.log_tail()}")
        return item

    def wait_ready(self, timeout: float = 45.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            while True:
                item = self._next(deadline)
                if item.get("event") == "ready":
                    self.info = item
                    return item
        except TimeoutError:
            raise AssertionError(f"peer {self.name} not ready in {timeout:.0f} s; log:\n{self.log_tail()}") from None

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    def send(self, cmd: str, **kwargs: Any) -> int:
        self._next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next_id, "cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._next_id

    def reply(self, request_id: int, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            while request_id not in self._replies:
                item = self._next(deadline)
                if "id" in item:
                    self._replies[item["id"]] = item
        except TimeoutError:
            raise AssertionError(f"peer {self.name}: no reply in {timeout:.0f} s; log:\n{self.log_tail()}") from None
        reply = self._replies.pop(request_id)
        if "error" in reply:
            raise AssertionError(
                f"peer {self.name}: {reply['error']}\n{reply.get('trace', '')}\nlog:\n{self.log_tail()}"
            )
        return reply

    def call(self, cmd: str, timeout: float = 30.0, **kwargs: Any) -> dict[str, Any]:
        return self.reply(self.send(cmd, **kwargs), timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"id": -1, "cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=3)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


def start_swarm(lab: NatLab, log_dir: Path) -> tuple[PeerProcess, PeerProcess, PeerProcess]:
    """The relay and workers A and B up, both workers connected to the relay."""
    relay = lab.start("relay", RELAY_IP, log_dir, relay=True)
    a = lab.start("a", A_IP, log_dir)
    b = lab.start("b", B_IP, log_dir)
    for peer in (relay, a, b):
        peer.wait_ready()
    for worker in (a, b):
        assert worker.call("connect", addr=relay.addr)["peer"] == relay.peer_id
        relay.call("wait_peer", peer=worker.peer_id)
    return relay, a, b
