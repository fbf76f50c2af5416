"""A node that cannot start says why in one line on stderr, with the flag or command that fixes it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nodes import NodeProcess

pytestmark = pytest.mark.swarm

# What the chain extra installs (and what they pull in): blocked, every import of them fails.
CHAIN_MODULES = ("web3", "eth_account", "eth_tester", "eth", "py_ecc", "eth_abi", "eth_utils", "eth_keys", "hexbytes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorlink.node", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_a_busy_port_is_one_line_naming_it_and_its_flag(
    tmp_path: Path, start_node: Callable[..., NodeProcess]
) -> None:
    p2p, status, data = free_port(), free_port(), free_port()
    first = start_node(
        "first", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--status-port", str(status), "--data-port", str(data)
    )
    cases = [
        (["--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--status-port", "0"], f"p2p port {p2p}", "--listen"),
        (["--listen", f"/ip4/0.0.0.0/tcp/{p2p}", "--status-port", "0"], f"p2p port {p2p}", "--listen"),
        (["--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", str(status)], f"status port {status}", "--status-port"),
        (["--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", "0", "--data-port", str(data)], f"port {data}",
         "--data-port"),
    ]  # fmt: skip
    for args, port, flag in cases:
        second = run_cli(tmp_path / "second", *args)
        assert second.returncode == 2, second.stdout + second.stderr
        [line] = second.stderr.splitlines()  # one line, no traceback, nothing logged before it
        assert port in line and "address already in use" in line and f"choose another with {flag}" in line, line
        assert "TensorLink node running" not in second.stdout
    assert first.status()["peer_id"] == first.peer_id  # the first node is untouched
    assert first.stop() < 2.0


def _blocking_chain(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreters cannot import the chain extra's libraries (a sitecustomize
    that marks them missing), as after `pip install tensorlink-p2p` without `[chain]`."""
    site = tmp_path / "no_chain"
    site.mkdir()
    block = f"import sys\nfor name in {CHAIN_MODULES!r}:\n    sys.modules[name] = None\n"
    (site / "sitecustomize.py").write_text(block)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_without_the_chain_extra_a_node_starts_and_a_chain_setting_says_how_to_install_it(tmp_path: Path) -> None:
    env = _blocking_chain(tmp_path)
    node = NodeProcess(tmp_path / "plain", "--role", "validator", env=env)
    try:
        node.wait_ready()
        assert node.status()["peer_id"] == node.peer_id
        assert node.stop() < 2.0
        assert "Traceback" not in node.output
    finally:
        node.kill()
    deployment = tmp_path / "deployment.json"
    deployment.write_text('{"chain_id": 31337, "token": "0x", "staking": "0x", "settlement": "0x"}')
    result = run_cli(
        tmp_path / "chained", "--status-port", "0", "--listen", "/ip4/127.0.0.1/tcp/0",
        "--chain-rpc", "http://127.0.0.1:8545", "--chain-deployment", str(deployment), env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("tensorlink.node: error: a chain is configured (--chain-rpc), but tensorlink.chain ")
    assert line.endswith("is not installed): pip install 'tensorlink-p2p[chain]'"), line
