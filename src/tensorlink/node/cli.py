"""Command line of `python -m tensorlink.node`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tensorlink.node.config import CONFIG_FILE, DEFAULT_PORT, DEFAULT_STATUS_PORT, ConfigError, default_data_dir

DESCRIPTION = """\
Run a TensorLink peer: a worker lends this machine's CPU or GPU to the network, a validator matches
jobs to workers and checks their work. With no flags it starts a worker with the settings in
<data-dir>/config.toml (flags override the file); with no bootstrap peers it runs alone and prints the
address others can join it by.
"""

EPILOG = f"""\
config file: every flag has a key of the same name in <data-dir>/{CONFIG_FILE} (dashes become
underscores; repeatable flags are lists), e.g.
    role = "validator"
    validators = ["12D3KooW..."]
    listen = ["/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"]
    bootstrap = ["/ip4/203.0.113.7/tcp/{DEFAULT_PORT}/p2p/12D3KooW..."]

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
        dest="max_memory_gb",
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
        dest="torch_threads",
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
        dest="validators",
        help="a trusted validator of this network, repeatable: workers take stages only from these, and "
        "only their records count (default: none; a worker then refuses every assignment)",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        metavar="SECONDS",
        dest="claim_timeout_s",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help is instant; before logging is set up because importing
    # libp2p reconfigures its logger.
    from tensorlink.node.logs import setup_logging
    from tensorlink.node.node import run_node

    setup_logging(args.verbose)
    data_dir: Path = args.data_dir or default_data_dir()
    overrides = {
        "role": args.role,
        "listen": args.listen,
        "announce": args.announce,
        "bootstrap": args.bootstrap,
        "network_key": args.network_key,
        "relay": args.relay,
        "status_port": args.status_port,
        "max_memory_gb": args.max_memory_gb,
        "device": args.device,
        "data_port": args.data_port,
        "direct_channels": args.direct_channels,
        "channel_cipher": args.channel_cipher,
        "torch_threads": args.torch_threads,
        "audit_inputs": args.audit_inputs,
        "validators": args.validators,
        "claim_timeout_s": args.claim_timeout_s,
        "chain_rpc": args.chain_rpc,
        "chain_deployment": args.chain_deployment,
        "chain_key_file": args.chain_key_file,
    }
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        from tensorlink.node.config import load_config

        config = load_config(data_dir, overrides)
        return run_node(config, data_dir)
    except (ConfigError, ValueError, OSError) as exc:
        logging.getLogger("tensorlink.node").debug("start failed", exc_info=True)
        print(f"tensorlink.node: error: {exc}", file=sys.stderr)
        return 2
