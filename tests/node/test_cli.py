"""`python -m tensorlink.node` as a contributor uses it: help, config, start banner, status, stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from nodes import NodeProcess

from tensorlink.node.cli import NOT_SETTINGS, build_parser
from tensorlink.node.config import ConfigError, NodeConfig, load_config

pytestmark = pytest.mark.swarm


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorlink.node", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_explains_every_flag() -> None:
    out = run_cli("--help").stdout
    for flag in (
        "--role", "--listen", "--announce", "--bootstrap", "--data-dir", "--network-key", "--relay",
        "--status-port", "--max-memory", "--device", "--verbose",
    ):  # fmt: skip
        assert flag in out, flag
    assert "config.toml" in out and "/p2p/" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "not-an-addr"], "listen address 'not-an-addr' is not a multiaddr"),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/4001"], "has no /p2p/<peer id>"),
        (["--network-key", "abc"], "network_key"),
        (["--announce", "/ip4/0.0.0.0/tcp/4001"], "is a wildcard"),
        (["--max-memory", "-1"], "invalid setting (--max-memory): Expected `float` > 0.0 - at `$.max_memory`"),
    ],
)
def test_bad_settings_fail_with_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("--data-dir", str(tmp_path), "--status-port", "0", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_is_read_and_validated(tmp_path: Path, start_node: Callable[..., NodeProcess]) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.toml").write_text('role = "validator"\nheartbeat_s = 1.0\n')
    node = start_node("v")
    assert node.status()["role"] == "validator"
    node.stop()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.toml").write_text('rol = "validator"\n')
    result = run_cli("--data-dir", str(tmp_path / "bad"))
    assert result.returncode == 2 and "Object contains unknown field `rol`" in result.stderr


def test_every_flag_is_a_config_key_of_the_same_name() -> None:
    """As --help promises: a flag's key is its name with dashes as underscores (a --no-X flag sets X)."""
    keys = {field.encode_name for field in msgspec.structs.fields(NodeConfig)}
    for action in build_parser()._actions:
        if action.dest in (*NOT_SETTINGS, "help"):
            continue
        name = action.option_strings[-1].removeprefix("--").removeprefix("no-").replace("-", "_")
        assert action.dest == name and name in keys, action.option_strings


def test_config_keys_are_the_flag_names(tmp_path: Path) -> None:
    peer = "12D3KooWEP39od6Ssozzw6unpqe8feYY1cr5aJhXCiLQpeUpmaWH"
    (tmp_path / "config.toml").write_text(
        f'max_memory = 1.5\nthreads = 2\nvalidator = ["{peer}"]\nclaim_timeout = 5\ndirect_channels = false\n'
    )
    config = load_config(tmp_path, {"threads": 3})  # the command line wins
    assert (config.max_memory_gb, config.torch_threads, config.validators) == (1.5, 3, [peer])
    assert (config.claim_timeout_s, config.direct_channels) == (5.0, False)


def test_a_renamed_key_is_refused_with_its_new_name(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("max_memory_gb = 1.5\n")
    with pytest.raises(ConfigError, match="key 'max_memory_gb' is now 'max_memory', the name of its flag --max-memory"):
        load_config(tmp_path, {})
    (tmp_path / "config.toml").write_text("torch_threads = 2\n")
    result = run_cli("--data-dir", str(tmp_path), "--status-port", "0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"tensorlink.node: error: {tmp_path / 'config.toml'}: the key 'torch_threads' is now 'threads', the name of "
        "its flag --threads; rename it"
    ]


def test_banner_status_and_metrics(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("w", "--max-memory", "1.5")
    assert "role:         worker" in node.output
    assert node.addr.startswith("/ip4/127.0.0.1/tcp/") and node.addr.endswith(f"/p2p/{node.peer_id}")
    assert "reachability:" in node.output
    assert f"--bootstrap {node.addr}" in node.output  # how others can join a lone node
    status = node.status()
    for key in ("peer_id", "role", "addrs", "reachability", "peers", "workers", "validators", "stages", "jobs"):
        assert key in status, key
    assert status["peer_id"] == node.peer_id and status["addrs"] == [node.addr]
    assert status["capability"]["free_memory_bytes"] <= 1.5e9 and status["capability"]["gflops"] > 0
    code, body = node.get("/metrics")
    assert code == 200 and b"tensorlink_peers" in body
    assert node.get("/nope")[0] == 404


def test_status_endpoint_survives_garbage(start_node: Callable[..., NodeProcess]) -> None:
    node = start_node("w")
    host, port = node.status_url.split("/")[2].split(":")
    for junk in (b"\x00\xff" * 100, b"GET /status HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", b"POST /x"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1024)
            except ConnectionResetError:
                pass  # the node may drop a garbage request without an answer
    slow = socket.create_connection((host, int(port)), timeout=5)  # a client that never finishes its request
    slow.sendall(b"GET /sta")
    assert node.status()["peer_id"] == node.peer_id
    slow.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_within_two_seconds(start_node: Callable[..., NodeProcess], sig: int) -> None:
    node = start_node("w")
    took = node.stop(sig)
    assert took < 2.0
    assert node.proc.returncode == 0
    assert "Traceback" not in node.output and "stopping" in node.output


def test_restart_keeps_the_peer_id(tmp_path: Path, start_node: Callable[..., NodeProcess]) -> None:
    first = start_node("w")
    peer_id = first.peer_id
    first.stop()
    second = start_node("w2", data_dir=tmp_path / "w")
    assert second.peer_id == peer_id
    assert oct((tmp_path / "w" / "identity.key").stat().st_mode & 0o777) == "0o600"
