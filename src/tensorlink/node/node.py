"""The Node: composition root of a running peer. It owns the host and starts every service on it."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Gauge, generate_latest

import tensorlink
from tensorlink.node.config import NodeConfig
from tensorlink.node.status import StatusServer
from tensorlink.p2p.host import connect_peers, make_host, parse_multiaddr
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of

log = logging.getLogger(__name__)
SOFTWARE = f"tensorlink/{tensorlink.__version__}"
BOOTSTRAP_RETRY_S = 2.0


class Node:
    def __init__(self, config: NodeConfig, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.key_pair = load_or_create_identity(data_dir)
        self.peer_id = peer_id_of(self.key_pair)
        self.listen = [parse_multiaddr(a, what="listen address") for a in config.listen]
        self.host = make_host(
            self.key_pair, announce=config.announce, bootstrap=config.bootstrap, psk_hex=config.network_key
        )
        self.capability: Any = None  # selfbench.Capability on workers
        self.reachability = "unknown"
        self.started = time.time()
        self.status_server = StatusServer(self.status, self.metrics)
        self.registry = CollectorRegistry()
        self._peers_gauge = Gauge("tensorlink_peers", "connected peers", registry=self.registry)
        self._uptime_gauge = Gauge("tensorlink_uptime_seconds", "seconds since start", registry=self.registry)

    # -- what the status endpoint shows ------------------------------------------------------------

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "role": self.config.role,
            "software": SOFTWARE,
            "addrs": self.addrs(),
            "reachability": self.reachability,
            "relay": self.config.relay,
            "peers": sorted(p.to_base58() for p in self.host.get_connected_peers()),
            "workers": [],
            "validators": [],
            "stages": [],
            "jobs": [],
            "capability": None if self.capability is None else self.capability.__dict__,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def metrics(self) -> bytes:
        self._peers_gauge.set(len(self.host.get_connected_peers()))
        self._uptime_gauge.set(time.time() - self.started)
        return generate_latest(self.registry)

    # -- running -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGINT or SIGTERM. The signal receiver stays open through shutdown, so a second
        signal while stopping is absorbed instead of surfacing as a KeyboardInterrupt traceback."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:
                services = trio.CancelScope()
                outer.start_soon(self._stop_on_signal, signals, services)
                with services:
                    await self._serve()
                outer.cancel_scope.cancel()

    async def _serve(self) -> None:
        if self.config.role == "worker":
            from tensorlink.node.selfbench import measure  # torch: workers only, validators start faster

            self.capability = measure(self.config.device, self.config.max_memory_gb)
        async with trio.open_nursery() as nursery, self.host.run(self.listen):
            port = await nursery.start(self.status_server.serve, self.config.status_port)
            self._print_banner(port)
            nursery.start_soon(self._join)
            await trio.sleep_forever()

    async def _join(self) -> None:
        """Keep trying the bootstrap peers until one answers: they may start after us."""
        if not self.config.bootstrap:
            return
        while not await connect_peers(self.host, self.config.bootstrap):
            await trio.sleep(BOOTSTRAP_RETRY_S)
        log.info("joined the network through %d bootstrap peer(s)", len(self.host.get_connected_peers()))

    async def _stop_on_signal(self, signals: Any, services: trio.CancelScope) -> None:
        async for signum in signals:
            if services.cancel_called:
                log.info("received %s again; already stopping", signal.Signals(signum).name)
                continue
            log.info("received %s, stopping", signal.Signals(signum).name)
            services.cancel()

    def _print_banner(self, status_port: int) -> None:
        lines = [
            "TensorLink node running",
            f"  peer id:      {self.peer_id}",
            f"  role:         {self.config.role}",
            *(f"  listening:    {a}" for a in self.addrs()),
            f"  reachability: {self.reachability}",
        ]
        if self.capability:
            c = self.capability
            lines.append(
                f"  offers:       {c.device} ({c.device_name}), {c.free_memory_bytes / 1e9:.1f} GB free, "
                f"{c.gflops:.0f} GFLOP/s"
            )
        if not self.config.bootstrap:
            addr = next(iter(self.addrs()), None)
            lines.append("  no bootstrap peers: running alone. Others join this node with")
            lines.append(f"      python -m tensorlink.node --bootstrap {addr}")
        lines.append(f"  status:       http://127.0.0.1:{status_port}/status")  # last: tests wait for it
        print("\n".join(lines), flush=True)


def run_node(config: NodeConfig, data_dir: Path) -> int:
    node = Node(config, data_dir)
    trio.run(node.run)
    log.info("stopped")
    return 0
