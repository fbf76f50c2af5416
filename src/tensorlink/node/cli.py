"""Command line of `python -m tensorlink.node`."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from tensorlink.node.config import (
    CONFIG_FILE,
    DEFAULT_PORT,
    DEFAULT_STATUS_PORT,
    ConfigError,
    NodeConfig,
    default_data_dir,
)

DESCRIPTION = """\
Run a TensorLink peer: a worker lends this machine's CPU or GPU to the network, a validator matches
jobs to workers and checks their work. With no flags it starts a worker with the settings in
<data-dir>/config.toml (flags override the file); with no bootstrap peers it runs alone and prints the
address others can join it by.
"""

EPILOG = f"""\
config file: every flag has a key of the same name in <data-dir>/{CONFIG_FILE} (dashes become
underscores, repeatable flags are lists, --no-direct-channels is direct_channels = false), e.g.
    role = "validator"
    validator = ["12D3KooW..."]
    listen = ["/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"]
    bootstrap = ["/ip4/203.0.113.7/tcp/{DEFAULT_PORT}/p2p/12D3KooW..."]
    max_memory = 8

examples:
    python -m tensorlink.node --validator 12D3KooW...           # a worker on port {DEFAULT_PORT}
    python -m tensorlink.node --role validator --relay          # a validator that also relays
    python -m tensorlink.node --bootstrap /ip4/203.0.113.7/tcp/{DEFAULT_PORT}/p2p/12D3KooW...
    curl -s 127.0.0.1:{DEFAULT_STATUS_PORT}/status                          # what the node knows
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tensorlink.node",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", choices=["worker", "validator"], help="what this node does (default: worker)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help=f"address to listen on, repeatable (default: /ip4/0.0.0.0/tcp/{DEFAULT_PORT}); tcp/0 picks a free port",
    )
    p.add_argument(
        "--announce",
        action="append",
        metavar="MULTIADDR",
        help="address peers should dial, repeatable; needed behind port forwarding or when the listen "
        "address is not what others see (default: the listen addresses, wildcards expanded)",
    )
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="a known peer to join through, with /p2p/<peer id>, repeatable (default: none, run alone)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"where the identity key and {CONFIG_FILE} live; the peer id stays the same across restarts "
        "(default: $TENSORLINK_HOME or ~/.tensorlink)",
    )
    p.add_argument(
        "--network-key",
        metavar="HEX",
        help="pre-shared key of a private network, 64 hex characters (`openssl rand -hex 32`); only nodes "
        "with the same key can connect",
    )
    p.add_argument(
        "--relay",
        action="store_true",
        default=None,
        help="serve as a circuit relay so that peers behind NAT can be reached (needs a public address)",
    )
    p.add_argument(
        "--status-port",
        type=int,
        metavar="PORT",
        help=f"port of the status endpoint on 127.0.0.1: GET /status (JSON), GET /metrics (Prometheus); "
        f"0 picks a free port (default: {DEFAULT_STATUS_PORT})",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        metavar="GB",
        help="most memory this node offers to jobs, in GB (default: what is free at start)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="device that runs stages (default: cuda when a GPU is present, else cpu)",
    )
    p.add_argument(
        "--data-port",
        type=int,
        metavar="PORT",
        help="TCP port for direct, encrypted tensor channels with other nodes; open it in your firewall "
        "for full speed (default: any free port; without it channels run over libp2p, ~20x slower)",
    )
    p.add_argument(
        "--no-direct-channels",
        dest="direct_channels",
        action="store_const",
        const=False,
        help="never open direct tensor channels; move tensors over libp2p streams only",
    )
    p.add_argument(
        "--channel-cipher",
        choices=["aes-128-gcm", "aes-256-gcm"],
        help="AEAD of the direct channels this node opens; it accepts either (default: aes-128-gcm, ~20%% "
        "faster on CPUs without VAES)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads torch may use for stages (default: torch's default, one per core); lower it when "
        "several nodes share a machine",
    )
    p.add_argument(
        "--audit-inputs",
        action="store_true",
        default=None,
        help="keep a SHA-256 digest and the dtype of every tensor a job's owner sends this worker, shown in "
        "/status (to check what a job's owner really shares; costs a hash of each tensor)",
    )
    p.add_argument(
        "--validator",
        action="append",
        metavar="PEER_ID",
        help="a trusted validator of this network, repeatable: workers take stages only from these, and "
        "only their records count (default: none; a worker then refuses every assignment)",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        metavar="SECONDS",
        help="how long a worker holds a stage whose owner has not started it (default: 30)",
    )
    p.add_argument(
        "--chain-rpc",
        metavar="URL",
        help="JSON-RPC URL of the chain whose Staking contract makes validators: a peer staked there is "
        "trusted as one (with --chain-deployment)",
    )
    p.add_argument(
        "--chain-deployment",
        metavar="FILE",
        help='JSON file with the contracts\' addresses: {"chain_id", "token", "staking", "settlement"}',
    )
    p.add_argument(
        "--chain-key-file",
        metavar="FILE",
        help="validators on a chain: file holding the hex private key of the staked account, to prove it",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output; -vv includes libp2p's")
    return p


# The flags that set something else than a config key.
NOT_SETTINGS = ("data_dir", "verbose")
# Which flag moves each port a node binds, for the one line that says a port is taken.
PORT_FLAGS = {"p2p": "--listen", "status": "--status-port", "data plane": "--data-port"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help is instant; before logging is set up because importing
    # libp2p reconfigures its logger.
    from tensorlink.node.logs import setup_logging
    from tensorlink.node.node import run_node

    setup_logging(args.verbose)
    data_dir: Path = args.data_dir or default_data_dir()
    overrides = {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS}
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        from tensorlink.node.config import load_config

        config = load_config(data_dir, overrides)
        _require_chain_extra(config)
        _check_ports_free(config)
        return run_node(config, data_dir)
    except (ConfigError, ValueError, OSError) as exc:
        logging.getLogger("tensorlink.node").debug("start failed", exc_info=True)
        print(f"tensorlink.node: error: {exc}", file=sys.stderr)
        return 2


def _require_chain_extra(config: NodeConfig) -> None:
    """A chain setting needs the chain extra; say how to install it before anything starts."""
    if config.chain_rpc is None:
        return
    try:
        import tensorlink.chain  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ConfigError(f"a chain is configured (--chain-rpc), but {exc}") from None


def _check_ports_free(config: NodeConfig) -> None:
    """Refuse a port another process listens on, naming it and the flag that moves it. libp2p binds its
    TCP listeners with SO_REUSEPORT (for hole punching), so without this a second node on the same port
    starts silently and the kernel splits the first node's incoming connections between the two."""
    for what, host, port in _bound_ports(config):
        if port == 0:
            continue
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do: TIME_WAIT is fine
            try:
                probe.bind((host, port))
            except OSError as exc:
                reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise ConfigError(
                    f"{what} port {port} on {host}: {reason} (is another node running?); "
                    f"choose another with {PORT_FLAGS[what]}"
                ) from None


def _bound_ports(config: NodeConfig) -> list[tuple[str, str, int]]:
    """(what, host, port) of each TCP port the node will bind: its libp2p listen addresses, the status
    endpoint, and the direct data plane on the first listen address's IP. Addresses that are not /ip4|ip6/../tcp/..
    are left to libp2p, which names the bad ones."""
    ports = [("status", "127.0.0.1", config.status_port)]
    listen = [_tcp_endpoint(addr) for addr in config.listen]
    ports += [("p2p", host, port) for host, port in filter(None, listen)]
    if config.direct_channels and listen and listen[0] is not None:
        ports.append(("data plane", listen[0][0], config.data_port))
    return ports


def _tcp_endpoint(multiaddr: str) -> tuple[str, int] | None:
    parts = multiaddr.split("/")
    if len(parts) < 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ipaddress.ip_address(parts[2])
        return parts[2], int(parts[4])
    except ValueError:
        return None
