"""The Node: composition root of a running peer. It owns the host and starts every service on it.

Start-up order: identity, host, DHT directory and gossip, status endpoint, bootstrap, reachability,
banner; then the loops that keep the node's records fresh, send heartbeats and (on every node, fastest
on validators) keep the list of known workers and validators current.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Gauge, generate_latest

import tensorlink
from tensorlink.node.config import NodeConfig
from tensorlink.node.dashboard import SnapshotCollector, Timeline, assets, memory_view
from tensorlink.node.status import StatusServer
from tensorlink.p2p.dht import Directory
from tensorlink.p2p.gossip import HEARTBEATS, Gossip, GossipError
from tensorlink.p2p.host import check_bootstrap, parse_multiaddr
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.peer_host import PeerHost
from tensorlink.p2p.reachability import DialBack, Reachability, open_dial_back
from tensorlink.p2p.records import VALIDATORS, WORKERS, RecordError
from tensorlink.p2p.relay import NatTraversal, RelayError, open_nat_traversal
from tensorlink.p2p.roster import Roster
from tensorlink.transport.service import ChannelService, TransportConfig
from tensorlink.validator.service import JobService
from tensorlink.validator.trust import NO_RULE_HINT, CapacityCheck, ValidatorTrust
from tensorlink.wire.messages import Heartbeat, ValidatorPresence, WorkerCapability
from tensorlink.wire.protocols import ASSIGN_PROTOCOL, CHALLENGE_PROTOCOL, JOB_PROTOCOL
from tensorlink.worker.assignments import Assignments, assign_handler
from tensorlink.worker.challenge import challenge_handler

if TYPE_CHECKING:
    from tensorlink.worker.stage_host import StageHost  # torch and the IR: imported when a worker starts

log = logging.getLogger(__name__)
SOFTWARE = f"tensorlink/{tensorlink.__version__}"
BOOTSTRAP_RETRY_S = 2.0
BOOTSTRAP_WAIT_S = 5.0  # how long the banner waits for the first bootstrap peer
DIRECTORY_REFRESH_S = {"validator": 1.0, "worker": 5.0}  # validators match jobs, so they look often
REACHABILITY_RECHECK_S = 600.0
DIAL_BACK_SERVERS = 5


class Node:
    def __init__(self, config: NodeConfig, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.key_pair = load_or_create_identity(data_dir)
        self.peer_id = peer_id_of(self.key_pair)
        self.listen = [parse_multiaddr(a, what="listen address") for a in config.listen]
        check_bootstrap(config.bootstrap)
        self.host = PeerHost.create(self.key_pair, announce=config.announce, psk_hex=config.network_key)
        self.directory = Directory(self.host.libp2p, self.key_pair, server=True)
        self.channels = ChannelService(
            self.host,
            TransportConfig(
                listen_ip=_listen_ip(self.listen[0]),
                data_port=config.data_port,
                direct=config.direct_channels,
                pool_bytes=int(config.channel_memory_gb * (1 << 30)),
                cipher=config.channel_cipher,
            ),
            admit=self._admits_channel,
        )
        self.gossip = Gossip(self.host.libp2p)
        self.staked: Any = self._staked_validators()  # validator.stake.StakedValidators where a chain is set
        self.trust = ValidatorTrust(config.validators, self.staked)
        self.capacity = CapacityCheck(self.host)  # validators: what workers' claims are worth
        self.capability: Any = None  # selfbench.Capability on workers
        self.assignments: Assignments | None = None  # workers: stages accepted from validators
        self.stage_host: StageHost | None = None  # workers: the stages being run
        self.job_service = JobService(
            self.host, self.peer_id, self._live_worker_capabilities, pending_window_s=config.claim_timeout_s
        )
        self.reachability = Reachability.UNKNOWN
        self.dial_back: DialBack | None = None
        self.nat: NatTraversal | None = None
        self.started = time.time()
        self.roster = Roster(self.directory, self.peer_id, config.role)
        self.timeline = Timeline()  # failures and recoveries, for the dashboard
        self.status_server = StatusServer(self.status, self.metrics, assets())
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(self.status))  # every number the dashboard shows
        self._gauges = {
            name: Gauge(f"tensorlink_{name}", help_text, registry=self.registry)
            for name, help_text in {
                "peers": "connected peers",
                "workers": "workers known from the DHT with a live record",
                "validators": "validators known from the DHT with a live record",
                "routing_table_peers": "peers in the DHT routing table",
                "uptime_seconds": "seconds since the node started",
            }.items()
        }
        self._gossip_accepted = Gauge(
            "tensorlink_gossip_accepted", "gossip messages accepted", ["topic"], registry=self.registry
        )
        self._gossip_dropped = Gauge(
            "tensorlink_gossip_dropped", "gossip messages dropped", ["topic", "reason"], registry=self.registry
        )

    # -- what the status endpoint shows ------------------------------------------------------------

    def addrs(self) -> list[str]:
        """What peers should dial: our own addresses, or our relay circuits while we are behind NAT."""
        own = self.host.addrs()
        if self.reachability is Reachability.PRIVATE and self.nat is not None:
            return self.nat.circuit_addrs() + own
        return own

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "peer_id": self.peer_id,
            "role": self.config.role,
            "software": SOFTWARE,
            "addrs": self.addrs(),
            "reachability": self.reachability.value,
            "relay": self.config.relay,
            "relay_reservations": [] if self.nat is None else [r.relay for r in self.nat.reservations],
            "dht_mode": "server" if self.directory.server else "client",
            "peers": sorted(self.host.connected()),
            "connections": {p: self.host.connection_kind(p) or "closed" for p in self.host.connected()},
            "workers": [
                {**view, "capacity_check": self.capacity.view(view["peer_id"])}
                for view in self.roster.views(WORKERS, now)
            ],
            "validators": [
                {**view, "trusted": self.trust.trusts(view["peer_id"])} for view in self.roster.views(VALIDATORS, now)
            ],
            "trusted_validators": self.trust.rule,
            "heartbeats": {peer: round(now - seen, 1) for peer, seen in self.roster.last_heartbeat.items()},
            "data_plane": {
                "port": self.channels.data_port,
                "direct": self.channels.offer_direct,
                "addrs": self.channels.data_addrs(),
                "channels": self.channels.status(),
            },
            "stages": [] if self.assignments is None else self.assignments.status(),
            "running": [] if self.stage_host is None else self.stage_host.status(),
            "jobs": self.job_service.status(),
            "capability": None if self.capability is None else self.capability.__dict__,
            "memory": memory_view(self.capability, self.assignments),
            "timeline": self.timeline.view(),
            "uptime_s": round(now - self.started, 1),
        }

    def metrics(self) -> bytes:
        self._gauges["peers"].set(len(self.host.connected()))
        now = time.time()
        self._gauges["workers"].set(len(self.roster.views(WORKERS, now)))
        self._gauges["validators"].set(len(self.roster.views(VALIDATORS, now)))
        self._gauges["routing_table_peers"].set(self.directory.routing_table_size())
        self._gauges["uptime_seconds"].set(time.time() - self.started)
        for topic, count in self.gossip.stats.accepted.items():
            self._gossip_accepted.labels(topic).set(count)
        for (topic, reason), count in self.gossip.stats.dropped.items():
            self._gossip_dropped.labels(topic, reason).set(count)
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
        if self.config.torch_threads is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        if self.config.role == "worker":
            from tensorlink.node.selfbench import measure  # torch: workers only, validators start faster

            self.capability = measure(self.config.device, self.config.max_memory_gb)
            self.assignments = Assignments(
                self.capability.free_memory_bytes, validators=self.trust, claim_timeout_s=self.config.claim_timeout_s
            )
            from tensorlink.worker.stage_host import StageHost  # torch and the IR: workers only

            self.stage_host = StageHost(
                self.host,
                self.channels,
                self.assignments,
                device=self.capability.device,
                max_memory_bytes=self.capability.free_memory_bytes,
                audit=self.config.audit_inputs,
            )
        async with (
            self.host.run(self.config.listen),
            self.directory.running(),
            self.gossip.running(),
            open_dial_back(self.host.libp2p, psk_hex=self.config.network_key) as self.dial_back,
            open_nat_traversal(self.host.libp2p, relay=self.config.relay) as self.nat,
            trio.open_nursery() as nursery,
        ):
            port = await nursery.start(self.status_server.serve, self.config.status_port)
            await nursery.start(self.channels.serve)
            if self.assignments is not None:
                self.host.serve(ASSIGN_PROTOCOL, assign_handler(self.assignments, self.trust.learn))
                self.host.serve(CHALLENGE_PROTOCOL, challenge_handler(self.capability.device, self.trust), limit=2)
            if self.stage_host is not None:
                await nursery.start(self.stage_host.serve)
            if self.config.role == "validator":
                self.host.serve(JOB_PROTOCOL, self.job_service.handle)
                if self.staked is not None:
                    self.host.serve(self.staked.protocol, self.staked.serve_proof)
                nursery.start_soon(self._check_capacity_forever)
            joined = trio.Event()
            nursery.start_soon(self._join, joined)
            with trio.move_on_after(BOOTSTRAP_WAIT_S if self.config.bootstrap else 0):
                await joined.wait()
            if joined.is_set():
                await self._check_reachability()
            if self.assignments is not None and not self.trust.listed and self.staked is None:
                log.warning("this worker will refuse every stage: %s", NO_RULE_HINT)
            self._print_banner(port)  # last: whoever waits for the node to be ready waits for the banner
            nursery.start_soon(self._reachability_forever)
            nursery.start_soon(self.timeline.follow, self.status)
            nursery.start_soon(self._publish_forever)
            nursery.start_soon(self._heartbeat_forever)
            nursery.start_soon(self.roster.listen, self.gossip)
            # alongside each refresh, a chain's validators: their stake (cached a minute)
            nursery.start_soon(self.roster.refresh_forever, DIRECTORY_REFRESH_S[self.config.role], self.trust.learn)

    async def _join(self, joined: trio.Event) -> None:
        """Keep trying the bootstrap peers until one answers: they may start after us."""
        if not self.config.bootstrap:
            joined.set()
            return
        while not await self.directory.connect_bootstrap(self.config.bootstrap):
            await trio.sleep(BOOTSTRAP_RETRY_S)
        joined.set()
        log.info("joined the network: %d peer(s) connected", len(self.host.connected()))

    async def _check_reachability(self) -> None:
        """Ask connected peers to dial us back on a fresh connection. Public nodes serve the DHT; private
        ones become DHT clients and take a slot on a relay so that others can still reach them."""
        assert self.dial_back is not None
        servers = self.host.connected()[:DIAL_BACK_SERVERS]
        if not servers:
            return
        report = await self.dial_back.check(servers)
        if report.status is Reachability.UNKNOWN:
            return  # nobody answered: keep what we had
        self.reachability = report.status
        # Behind NAT nobody can reach our data port: offer no direct channels (ours to others still work).
        self.channels.offer_direct = self.config.direct_channels and report.status is not Reachability.PRIVATE
        await self.directory.set_server_mode(report.status is Reachability.PUBLIC)
        if report.status is Reachability.PRIVATE:
            await self._reserve_relay()

    async def _reserve_relay(self) -> None:
        assert self.nat is not None
        if self.nat.reservations:
            return
        for relay in self.nat.known_relays():
            for addr in self.host.connection_addrs(relay):
                try:
                    reservation = await self.nat.reserve(f"{addr}/p2p/{relay}")
                    log.info("behind NAT: reachable through relay %s at %s", relay, reservation.circuit_addrs[0])
                    return
                except RelayError as exc:
                    log.info("relay %s refused a reservation: %s", relay, exc)
        log.warning(
            "behind NAT and no relay reachable: other peers cannot dial this node. Bootstrap from a node "
            "started with --relay on a public address, or forward a port and pass --announce"
        )

    async def _reachability_forever(self) -> None:
        while True:
            await trio.sleep(REACHABILITY_RECHECK_S if self.reachability is not Reachability.UNKNOWN else 10.0)
            await self._check_reachability()

    async def _publish_forever(self) -> None:
        """Keep this node's own record alive: refreshed at a third of its lifetime, so one lost refresh
        does not make the node vanish, and a stopped node vanishes within one lifetime."""
        ttl = self.config.record_ttl_s
        while True:
            try:
                if self.config.role == "worker":
                    await self.directory.publish(WORKERS, self._capability_message(), ttl)
                else:
                    presence = ValidatorPresence(peer_id=self.peer_id, software=SOFTWARE, addrs=self.addrs())
                    await self.directory.publish(VALIDATORS, presence, ttl)
            except RecordError as exc:
                log.warning("could not publish this node's record: %s", exc)
            await trio.sleep(ttl / 3)

    def _capability_message(self) -> WorkerCapability:
        from tensorlink.node.selfbench import current_free_memory

        c = self.capability
        # What validators may still promise: free now, and not already reserved for accepted stages.
        unreserved = c.free_memory_bytes - (self.assignments.reserved_bytes() if self.assignments else 0)
        return WorkerCapability(
            peer_id=self.peer_id,
            device=c.device,
            device_name=c.device_name,
            memory_bytes=c.memory_bytes,
            free_memory_bytes=max(0, min(c.memory_bytes, current_free_memory(c.device, c.memory_bytes), unreserved)),
            gflops=c.gflops,
            software=SOFTWARE,
            addrs=self.addrs()[:16],
        )

    async def _heartbeat_forever(self) -> None:
        seq = 0
        while True:
            load = min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
            beat = Heartbeat(
                peer_id=self.peer_id, role=self.config.role, seq=seq, time_ms=int(time.time() * 1000), load=load
            )
            try:
                await self.gossip.publish(HEARTBEATS, beat)
            except GossipError as exc:
                log.debug("heartbeat not sent: %s", exc)
            seq += 1
            await trio.sleep(self.config.heartbeat_s)

    def _admits_channel(self, peer: str, job: bytes) -> bool:
        """Who may open a data-plane channel here: on a worker only the owner and neighbours of a stage it
        was assigned (set before the channel service serves); elsewhere any authenticated peer."""
        return self.assignments is None or self.assignments.admits(peer, job)

    def _staked_validators(self) -> Any:
        """The chain rule (validator/stake.py) when a chain is configured, else None."""
        if self.config.chain_rpc is None or self.config.chain_deployment is None:
            return None
        from tensorlink.validator import stake  # web3 and eth: only where a chain is configured

        return stake.connect(self.config.chain_rpc, self.config.chain_deployment, self.host, self.config.chain_key_file)

    def _live_worker_capabilities(self) -> list[WorkerCapability]:
        """Live workers' records as matching may rely on them: claims credited only as far as checked."""
        return [c for c in map(self.capacity.credited, self.roster.live_claims()) if c is not None]

    async def _check_capacity_forever(self) -> None:
        """Challenge each live worker whose claim is new, changed or due again, one at a time."""
        while True:
            for claim in self.roster.live_claims():
                if self.capacity.due(claim):
                    await self.capacity.check(claim)
            await trio.sleep(DIRECTORY_REFRESH_S["validator"])

    async def _stop_on_signal(self, signals: Any, services: trio.CancelScope) -> None:
        async for signum in signals:
            if services.cancel_called:
                log.info("received %s again; already stopping", signal.Signals(signum).name)
                continue
            log.info("received %s, stopping", signal.Signals(signum).name)
            services.cancel()

    def _reachability_line(self) -> str:
        report = None if self.dial_back is None else self.dial_back.last_report
        if report is None:
            return "unknown (no peer to ask yet; checked again once peers connect)"
        confirmed = sum(1 for r in report.results if r.outcome == "confirmed")
        return f"{self.reachability.value} (dial-back by {len(report.results)} peer(s), {confirmed} reached us)"

    def _data_plane_line(self) -> str:
        if not self.config.direct_channels:
            return "libp2p streams only (--no-direct-channels)"
        if not self.channels.offer_direct:
            return f"tcp port {self.channels.data_port} (not offered: behind NAT, peers use libp2p streams)"
        cipher = self.config.channel_cipher.upper()
        return f"tcp port {self.channels.data_port}, {cipher}, libp2p streams where no direct path exists"

    def _print_banner(self, status_port: int) -> None:
        lines = [
            "TensorLink node running",
            f"  peer id:      {self.peer_id}",
            f"  role:         {self.config.role}",
            *(f"  listening:    {a}" for a in self.addrs()),
            f"  reachability: {self._reachability_line()}",
            f"  data plane:   {self._data_plane_line()}",
            f"  validators:   trusted: {self.trust.rule}",
        ]
        if self.capability:
            c = self.capability
            lines.append(
                f"  offers:       {c.device} ({c.device_name}), {c.free_memory_bytes / 1e9:.1f} GB free, "
                f"{c.gflops:.0f} GFLOP/s"
            )
        if self.config.bootstrap:
            lines.append(f"  peers:        {len(self.host.connected())} connected")
        else:
            addr = next(iter(self.addrs()), None)
            lines.append("  no bootstrap peers: running alone. Others join this node with")
            lines.append(f"      python -m tensorlink.node --bootstrap {addr}")
        lines.append(f"  dashboard:    http://127.0.0.1:{status_port}/")
        lines.append(f"  status:       http://127.0.0.1:{status_port}/status")  # last: tests wait for it
        print("\n".join(lines), flush=True)


def _listen_ip(addr: Any) -> str:
    """The IP of the first libp2p listen address: the data plane listens there too."""
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto))
        except Exception:
            continue
    return "0.0.0.0"


def run_node(config: NodeConfig, data_dir: Path) -> int:
    node = Node(config, data_dir)
    trio.run(node.run)
    log.info("stopped")
    return 0
