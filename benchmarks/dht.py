"""Put and get latency of the TensorLink DHT (tensorlink.p2p.dht.Directory) on a swarm of real libp2p hosts
in one process on 127.0.0.1, beside py-libp2p's own KadDHT.put_value/get_value in the same run and
hivemind's published numbers.

    python benchmarks/dht.py                 # 50 nodes, table with ratios
    python benchmarks/dht.py --nodes 30      # smaller swarm
    python benchmarks/dht.py --json          # one JSON object (nodes, get_p50_ms, get_success, put_p50_ms, ...)

The swarm is connected all to all before anything is timed, because that is where a swarm of our nodes
ends up anyway (the AutoConnector's target is 104 connections) and the dialing would otherwise land in
the timed part. Operations run one at a time, so each latency is one operation on an otherwise idle
swarm. Gets are made by nodes that do not hold the record, so every get crosses the network.

Anchor: hivemind's DHT benchmark, 1024 peers on one machine: store 14.9 ms mean, get 6.6 ms mean
(published numbers, not rerun here).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import multiaddr
import trio
from rich.console import Console
from rich.table import Table

from tensorlink.p2p.dht import Directory
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity
from tensorlink.p2p.records import WORKERS, record_key, sign_record, verify_record
from tensorlink.wire.messages import WorkerCapability

HIVEMIND = {"peers": 1024, "store_mean_ms": 14.9, "get_mean_ms": 6.6}
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
OP_TIMEOUT_S = 60.0


def capability(peer_id: str, free_gib: int) -> WorkerCapability:
    return WorkerCapability(
        peer_id=peer_id,
        device="cpu",
        device_name="benchmark cpu",
        memory_bytes=64 << 30,
        free_memory_bytes=free_gib << 30,
        gflops=100.0,
        software="tensorlink-bench",
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(name: str, samples_ms: list[float], ok: int, total: int, requests: list[int]) -> dict[str, float]:
    return {
        f"{name}_mean_ms": round(statistics.fmean(samples_ms), 1) if samples_ms else float("nan"),
        f"{name}_p50_ms": round(percentile(samples_ms, 50), 1) if samples_ms else float("nan"),
        f"{name}_p95_ms": round(percentile(samples_ms, 95), 1) if samples_ms else float("nan"),
        f"{name}_success": round(ok / total, 3) if total else float("nan"),
        f"{name}_requests": round(statistics.fmean(requests), 1) if requests else float("nan"),
    }


class Swarm:
    def __init__(self, stack: AsyncExitStack, root: Path) -> None:
        self.stack = stack
        self.root = root
        self.nodes: list[Directory] = []
        self.streams = [0]  # DHT requests opened by any node: the cost of one operation

    async def add(self) -> Directory:
        data_dir = self.root / f"node{len(self.nodes)}"
        data_dir.mkdir()
        key_pair = load_or_create_identity(data_dir)
        host = make_host(key_pair)
        new_stream = host.new_stream

        async def counting_new_stream(*args: object, **kwargs: object) -> object:
            self.streams[0] += 1
            return await new_stream(*args, **kwargs)

        host.new_stream = counting_new_stream  # type: ignore[method-assign]
        await self.stack.enter_async_context(host.run([LOOPBACK]))
        node = Directory(host, key_pair, server=True)
        await self.stack.enter_async_context(node.running())
        self.nodes.append(node)
        return node

    async def connect_all(self, concurrency: int = 16) -> None:
        limiter = trio.CapacityLimiter(concurrency)

        async def connect(a: Directory, b: Directory) -> None:
            async with limiter:
                for _ in range(3):
                    if await a.connect_bootstrap(b.addrs(), refresh=False):
                        await b.add_peer(a.addrs()[0])
                        return

        async with trio.open_nursery() as nursery:
            for i, a in enumerate(self.nodes):
                for b in self.nodes[:i]:
                    nursery.start_soon(connect, a, b)

    def holds(self, node: Directory, key: str) -> bool:
        return key.encode() in node.dht.value_store.store

    def reader_for(self, rng: random.Random, publisher: Directory, key: str) -> Directory:
        """A random node that does not hold the record; in a swarm smaller than k=20 every node holds it,
        so one is picked anyway and its copy set aside (``unheld``) for the get."""
        readers = [n for n in self.nodes if n is not publisher and not self.holds(n, key)]
        return rng.choice(readers or [n for n in self.nodes if n is not publisher])

    async def unheld(self, node: Directory, key: str, op: Callable[[], Awaitable[object]]) -> tuple[float, int, object]:
        """Time ``op`` with the node's local copy of ``key`` (if any) set aside, then put it back."""
        store = node.dht.value_store.store
        saved = store.pop(key.encode(), None)
        try:
            return await self.timed(op)
        finally:
            store.pop(key.encode(), None)  # get_value caches what it found
            if saved is not None:
                store[key.encode()] = saved

    async def timed(self, op: Callable[[], Awaitable[object]]) -> tuple[float, int, object]:
        before = self.streams[0]
        start = time.perf_counter()
        with trio.fail_after(OP_TIMEOUT_S):
            result = await op()
        return (time.perf_counter() - start) * 1e3, self.streams[0] - before, result


async def run(nodes: int, publishers: int, gets: int, library_ops: int, seed: int, console: Console | None) -> dict:
    rng = random.Random(seed)

    def say(text: str) -> None:
        if console is not None:
            console.log(text)

    with tempfile.TemporaryDirectory(prefix="tl-dht-bench-") as tmp:
        async with AsyncExitStack() as stack:
            swarm = Swarm(stack, Path(tmp))
            start = time.perf_counter()
            for _ in range(nodes):
                await swarm.add()
            say(f"{nodes} nodes up in {time.perf_counter() - start:.1f} s; connecting all pairs")
            await swarm.connect_all()
            await trio.sleep(1.0)  # let identify and the routing-table updates settle
            setup_s = time.perf_counter() - start
            connections = sum(len(n.dht.host.get_connected_peers()) for n in swarm.nodes) // 2
            say(f"swarm ready in {setup_s:.1f} s: {connections} connections")

            # Puts: each publisher publishes once (with its publisher announcement), then refreshes its
            # record (a plain store: what a node does every ttl/2), one operation at a time.
            pubs = rng.sample(swarm.nodes, min(publishers, nodes))
            expected: dict[str, WorkerCapability] = {}
            first_ms, first_req, first_ok = [], [], 0
            put_ms, put_req, put_ok = [], [], 0
            for round_ in ("first", "refresh"):
                for p in pubs:
                    message = capability(p.peer_id, rng.randrange(1, 64))
                    ms, requests, _ = await swarm.timed(lambda p=p, m=message: p.publish(WORKERS, m, 600))
                    holders = sum(swarm.holds(n, record_key(WORKERS, p.peer_id)) for n in swarm.nodes if n is not p)
                    stored = holders >= min(10, nodes - 1)
                    if round_ == "first":
                        first_ms.append(ms), first_req.append(requests)
                        first_ok += stored
                    else:
                        put_ms.append(ms), put_req.append(requests)
                        put_ok += stored
                    expected[p.peer_id] = message
                samples = first_ms if round_ == "first" else put_ms
                say(f"{len(pubs)} {round_} publishes: p50 {percentile(samples, 50):.0f} ms")

            # Gets: a random record, fetched by a random node that does not hold it.
            get_ms, get_req, get_ok = [], [], 0
            for _ in range(gets):
                p = rng.choice(pubs)
                key = record_key(WORKERS, p.peer_id)
                reader = swarm.reader_for(rng, p, key)
                ms, requests, got = await swarm.unheld(reader, key, lambda r=reader, p=p: r.fetch(WORKERS, p.peer_id))
                get_ms.append(ms), get_req.append(requests)
                get_ok += got is not None and got.publisher == p.peer_id and got.message == expected[p.peer_id]
            say(f"{gets} fetches: p50 {percentile(get_ms, 50):.0f} ms, {get_ok}/{gets} correct")

            # Baseline in the same run: py-libp2p's own put_value and get_value on the same swarm.
            lib_get_ms, lib_get_req, lib_get_ok = [], [], 0
            lib_put_ms, lib_put_req, lib_put_ok = [], [], 0
            for _ in range(library_ops):
                p = rng.choice(pubs)
                key = record_key(WORKERS, p.peer_id)
                data = sign_record(p._key_pair, WORKERS, expected[p.peer_id], ttl_s=600)
                ms, requests, _ = await swarm.timed(lambda p=p, k=key, d=data: p.dht.put_value(k, d))
                lib_put_ms.append(ms), lib_put_req.append(requests)
                lib_put_ok += sum(swarm.holds(n, key) for n in swarm.nodes if n is not p) >= min(10, nodes - 1)
                reader = swarm.reader_for(rng, p, key)
                ms, requests, value = await swarm.unheld(reader, key, lambda r=reader, k=key: r.dht.get_value(k))
                lib_get_ms.append(ms), lib_get_req.append(requests)
                lib_get_ok += isinstance(value, bytes) and verify_record(key, value).message == expected[p.peer_id]
            say(f"{library_ops} library put_value/get_value pairs done; stopping the swarm")
            stop = time.perf_counter()
        stop_s = time.perf_counter() - stop

    result: dict[str, object] = {
        "nodes": nodes,
        "publishers": len(pubs),
        "gets": gets,
        "library_ops": library_ops,
        "connections": connections,
        "setup_s": round(setup_s, 1),
        "stop_s": round(stop_s, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        **summary("get", get_ms, get_ok, gets, get_req),
        **summary("put", put_ms, put_ok, len(pubs), put_req),
        **summary("first_publish", first_ms, first_ok, len(pubs), first_req),
        **summary("lib_get", lib_get_ms, lib_get_ok, library_ops, lib_get_req),
        **summary("lib_put", lib_put_ms, lib_put_ok, library_ops, lib_put_req),
        "hivemind_peers": HIVEMIND["peers"],
        "hivemind_store_mean_ms": HIVEMIND["store_mean_ms"],
        "hivemind_get_mean_ms": HIVEMIND["get_mean_ms"],
    }
    result["get_vs_hivemind"] = round(float(result["get_mean_ms"]) / HIVEMIND["get_mean_ms"], 1)  # type: ignore[arg-type]
    result["put_vs_hivemind"] = round(float(result["put_mean_ms"]) / HIVEMIND["store_mean_ms"], 1)  # type: ignore[arg-type]
    result["lib_get_vs_get"] = round(float(result["lib_get_mean_ms"]) / float(result["get_mean_ms"]), 2)  # type: ignore[arg-type]
    result["lib_put_vs_put"] = round(float(result["lib_put_mean_ms"]) / float(result["put_mean_ms"]), 2)  # type: ignore[arg-type]
    return result


def print_table(r: dict, console: Console) -> None:
    table = Table(
        title=f"DHT latency, {r['nodes']} nodes in one process on 127.0.0.1 (all-to-all connected); "
        f"{r['publishers']} publishers, {r['gets']} gets by nodes without a copy"
    )
    for column in ("operation", "mean ms", "p50 ms", "p95 ms", "ok", "requests/op", "vs hivemind"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    rows = [
        ("fetch (Directory.fetch)", "get", r["hivemind_get_mean_ms"]),
        ("publish, refresh (Directory.publish)", "put", r["hivemind_store_mean_ms"]),
        ("publish, first (+ announcement)", "first_publish", r["hivemind_store_mean_ms"]),
        ("py-libp2p KadDHT.get_value", "lib_get", r["hivemind_get_mean_ms"]),
        ("py-libp2p KadDHT.put_value", "lib_put", r["hivemind_store_mean_ms"]),
    ]
    for label, key, anchor in rows:
        mean = float(r[f"{key}_mean_ms"])
        table.add_row(
            label,
            f"{mean:.1f}",
            f"{float(r[f'{key}_p50_ms']):.1f}",
            f"{float(r[f'{key}_p95_ms']):.1f}",
            f"{float(r[f'{key}_success']):.0%}",
            f"{float(r[f'{key}_requests']):.1f}",
            f"{mean / float(anchor):.1f}× slower",
        )
    peers = r["hivemind_peers"]
    table.add_row(f"hivemind get ({peers} peers, published)", f"{r['hivemind_get_mean_ms']}", "", "", "", "", "1.0×")
    table.add_row(
        f"hivemind store ({peers} peers, published)", f"{r['hivemind_store_mean_ms']}", "", "", "", "", "1.0×"
    )
    console.print(table)
    console.print(
        f"KadDHT.get_value takes {r['lib_get_vs_get']}× as long as Directory.fetch, KadDHT.put_value "
        f"{r['lib_put_vs_put']}× as long as a refresh publish. Not timed: start + all-to-all connect "
        f"{r['setup_s']} s ({r['connections']} connections), stop {r['stop_s']} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--nodes", type=int, default=50, help="swarm size (default 50)")
    parser.add_argument("--publishers", type=int, default=20, help="nodes that publish a record (default 20)")
    parser.add_argument("--gets", type=int, default=50, help="fetches from non-holders (default 50)")
    parser.add_argument("--library-ops", type=int, default=10, help="put_value/get_value pairs (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for who publishes and who reads")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    # py-libp2p logs every reset stream and refused request as a warning; the table is the output here.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    console = None if args.json else Console(stderr=True)
    result = trio.run(run, args.nodes, args.publishers, args.gets, args.library_ops, args.seed, console)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, Console(width=max(Console().width, 120)))


if __name__ == "__main__":
    main()
