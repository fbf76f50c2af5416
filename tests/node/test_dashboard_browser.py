"""The dashboard in a real headless browser (Debian's chromium, driven by Selenium through chromedriver).

Against a LocalSwarm training a 2-layer GPT-2 on two workers: the validator's and a worker's pages load
with no console error, show the workers, the job's stage map and live numbers that change while the job
trains, and agree with /status. Against a validator that learns a worker record carrying HTML and
script: the text shows literally and nothing executes. Screenshots are saved under the test's tmp_path.

The browser is a test dependency like iptables: `make test` installs chromium and chromium-driver, and
these tests fail (not skip) without them, saying so.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import torch
import trio

import tensorlink
from tensorlink.local import SwarmNode
from tensorlink.node.dashboard import assets
from tensorlink.node.status import StatusServer
from tensorlink.p2p.dht import Directory
from tensorlink.p2p.gossip import HEARTBEATS, Gossip, GossipError
from tensorlink.p2p.host import make_host
from tensorlink.p2p.identity import load_or_create_identity, peer_id_of
from tensorlink.p2p.records import WORKERS
from tensorlink.wire.messages import Heartbeat, WorkerCapability

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
import offload_cases as C  # noqa: E402

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

INSTALL_HINT = (
    "the dashboard tests need a real headless browser: `make test` installs it (apt-get install -y chromium "
    "chromium-driver, and selenium with the test extras)"
)
WAIT_S = 20.0
GPT2 = C.MODELS["gpt2"]


# --- the browser ------------------------------------------------------------------------------------------


class Page:
    """One headless chromium tab; ``errors()`` are the console's SEVERE entries since the last call."""

    def __init__(self) -> None:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            pytest.fail(f"selenium is not installed: {INSTALL_HINT}")
        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if chromium is None or driver is None:
            pytest.fail(f"chromium or chromedriver is not on PATH: {INSTALL_HINT}")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1700", "--no-first-run", "--disable-extensions"):  # fmt: skip
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(driver))  # no download: the given driver

    def open(self, url: str) -> None:
        self.errors()
        self.driver.get(url)
        self.wait(lambda: self.js("return document.body.getAttribute('data-uptime')") is not None, "the first render")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def texts(self, css: str) -> list[str]:
        return self.js("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css)

    def attrs(self, css: str, name: str) -> list[str]:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))"
        return self.js(script, css, name)

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page did not show {what} within {timeout_s} s; errors: {self.errors()}")

    def screenshot(self, path: Path) -> None:
        """The whole page, the window fitted to its height."""
        self.driver.set_window_size(1400, int(self.js("return document.documentElement.scrollHeight")) + 16)
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 10_000, "the screenshot is (nearly) empty"

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    p = Page()
    yield p
    p.close()


def base_url(node: Any) -> str:
    return f"http://127.0.0.1:{node.status_port}/"


# --- a swarm running a job ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm() -> Iterator[tensorlink.LocalSwarm]:
    with C.swarm(2) as s:
        yield s


def test_the_dashboard_shows_the_swarm_and_a_job_live(swarm: tensorlink.LocalSwarm, page: Page, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = GPT2.build()
    model = tensorlink.offload(module, network=swarm, workers=2, micro_batches=C.MICRO_BATCHES, outputs="loss")
    try:
        opt = model.optimizer(torch.optim.AdamW, lr=C.LR)

        def train(steps: range) -> None:
            for step in steps:
                C.model_loss(module, model(**GPT2.batch(step))).backward()
                opt.step()
                opt.zero_grad()

        train(range(2))
        job = model.pipeline.job_id.hex()
        owner = model.client.peer_id
        where = {s["stage"]: s["where"] for s in model.stages()}
        check_validator_page(swarm, page, job, where, tmp_path)
        check_worker_page(swarm, page, job, owner, where, train, tmp_path)
    finally:
        model.close()


def check_validator_page(
    swarm: tensorlink.LocalSwarm, page: Page, job: str, where: dict[int, str], tmp_path: Path
) -> None:
    validator = swarm.validators[0]
    page.open(base_url(validator))
    status = validator.status()
    assert page.texts("#node [data-field=peer_id]") == [status["peer_id"]]
    assert page.texts("#node [data-field=role]") == ["validator"]
    assert page.texts("#node [data-field=reachability]") == [status["reachability"]]
    workers = {w.peer_id for w in swarm.workers}
    page.wait(lambda: set(page.attrs("#swarm tr[data-kind=worker]", "data-peer")) == workers, "both workers")
    assert {w["peer_id"] for w in status["workers"]} == workers
    assert page.texts("#swarm tr[data-kind=worker] [data-field=check]") == ["verified", "verified"]
    # the stage map: which worker holds which units, as the validator placed them and the owner sees them
    (placed,) = [j for j in status["jobs"] if j["job"] == job]
    rows = page.wait(lambda: page.attrs(f"#jobs tr[data-job='{job}']", "data-stage"), "the job's stages")
    assert rows == [str(s["stage"]) for s in placed["stages"]] == ["0", "1"]
    held = page.attrs(f"#jobs tr[data-job='{job}'] [data-field=worker] .id", "title")
    assert held == [s["peer_id"] for s in placed["stages"]] == [where[0], where[1]]
    units = [f"{s['units'][0]}–{s['units'][1]} ({s['units'][1] - s['units'][0] + 1})" for s in placed["stages"]]
    assert page.texts(f"#jobs tr[data-job='{job}'] [data-field=units]") == units
    assert len(page.driver.find_elements("css selector", "#jobs svg.stagemap rect")) == 2
    assert "replicas: not available" in page.texts("#jobs")[0]
    assert "SNO balance: not available" in page.texts("#earnings")[0]
    page.screenshot(tmp_path / "dashboard-validator.png")
    assert page.errors() == []


def check_worker_page(
    swarm: tensorlink.LocalSwarm,
    page: Page,
    job: str,
    owner: str,
    where: dict[int, str],
    train: Callable[[range], None],
    tmp_path: Path,
) -> None:
    worker = next(w for w in swarm.workers if w.peer_id == where[0])
    page.open(base_url(worker))
    row = f"#jobs tr[data-job='{job}']"

    def shown(name: str) -> str:
        texts = page.texts(f"{row} [data-field={name}]")
        return texts[0] if texts else ""

    page.wait(lambda: shown("steps") == "2", "the stage's 2 steps")
    status = worker.status()
    (session,) = [r for r in status["running"] if r["job"] == job]
    assert shown("steps") == str(session["steps"]) and shown("micro_batches") == str(session["micro_batches"]) == "4"
    assert shown("stage") == "1 of 2"
    assert shown("parameters") == f"{session['parameters']:,}"
    assert page.texts("#node [data-field=gflops]") == [f"{status['capability']['gflops']:.1f} GFLOP/s"]
    assert page.attrs("#dataplane tr[data-peer]", "data-peer") != []
    assert owner in page.attrs("#dataplane tr[data-peer]", "data-peer")
    before = page.texts("#node [data-field=uptime]")
    sent_before = page.texts(f"#dataplane tr[data-peer='{owner}'] td")[2]
    train(range(2, 4))
    page.wait(lambda: shown("steps") == "4", "the steps trained meanwhile")
    assert shown("micro_batches") == "8"
    page.wait(lambda: page.texts("#node [data-field=uptime]") != before, "the uptime moving")
    assert page.texts(f"#dataplane tr[data-peer='{owner}'] td")[2] != sent_before  # bytes sent to the owner grew
    rates = page.texts(f"{row} [data-field=micro_batches_per_s]")
    assert rates and rates[0] != "…" and float(rates[0]) >= 0
    assert page.js("return document.querySelectorAll('svg.spark polyline').length") > 0  # charts drawn
    page.screenshot(tmp_path / "dashboard-worker.png")
    print(f"dashboard screenshots: {tmp_path}/dashboard-validator.png, {tmp_path}/dashboard-worker.png")
    assert page.errors() == []


# --- hostile records ----------------------------------------------------------------------------------------

IMG = '<img src=x onerror="window.__pwned = 1">'
SCRIPT = "<script>window.__pwned2 = 1</script>"
BOLD = "<b>bold</b>&amp;"


@asynccontextmanager
async def hostile_worker(key_dir: Path, bootstrap: str) -> AsyncIterator[str]:
    """A peer publishing a worker record whose text fields carry markup and script, and gossiping
    heartbeats so that the validator fetches it. The record is published again every second, as a real
    worker refreshes its own: the first put may find no DHT server yet."""
    key_pair = load_or_create_identity(key_dir)
    peer = peer_id_of(key_pair)
    host = make_host(key_pair)
    directory, gossip = Directory(host, key_pair, server=False), Gossip(host)

    async def beat(claim: WorkerCapability) -> None:
        for seq in range(10_000):
            with contextlib.suppress(GossipError):
                beat = Heartbeat(peer_id=peer, role="worker", seq=seq, time_ms=int(time.time() * 1000), load=0.0)
                await gossip.publish(HEARTBEATS, beat)
            await directory.publish(WORKERS, claim, 60.0)
            await trio.sleep(1.0)

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), directory.running(), gossip.running():
        assert await directory.connect_bootstrap([bootstrap])
        claim = WorkerCapability(
            peer_id=peer, device="cpu", device_name=IMG + BOLD, memory_bytes=1 << 30, free_memory_bytes=1 << 30,
            gflops=1.0, software=SCRIPT, addrs=[f"{a}/p2p/{peer}" for a in host.get_addrs()],
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat, claim)
            yield peer
            nursery.cancel_scope.cancel()


def test_markup_in_a_peer_record_shows_as_text_and_never_runs(
    swarm: tensorlink.LocalSwarm, page: Page, tmp_path: Path
) -> None:
    validator = swarm.validators[0]  # with the swarm's workers the DHT has servers to store the record at

    async def scenario() -> None:
        async with hostile_worker(tmp_path / "hostile", validator.addr) as peer:
            await trio.to_thread.run_sync(lambda: check_hostile(validator, peer, page))

    trio.run(scenario)


def check_hostile(validator: SwarmNode, peer: str, page: Page) -> None:
    deadline = time.monotonic() + 40.0
    while not (records := [w for w in validator.status()["workers"] if w["peer_id"] == peer]):
        assert time.monotonic() < deadline, "the validator did not list the hostile worker's record within 40 s"
        time.sleep(0.5)
    (record,) = records
    assert record["device_name"] == IMG + BOLD  # /status carries it as it was published: the page must escape
    page.open(validator.status_url.rsplit("/", 1)[0] + "/")
    row = f"#swarm tr[data-peer='{peer}']"
    page.wait(lambda: page.texts(f"{row} [data-field=device]"), "the hostile worker's row")
    time.sleep(2.5)  # two more renders: an onerror handler would have fired by now
    assert page.texts(f"{row} [data-field=device]") == [f"cpu ({IMG}{BOLD})"]
    assert page.texts(f"{row} [data-field=software]") == [SCRIPT]
    assert page.js("return [window.__pwned, window.__pwned2]") == [None, None]
    assert page.js("return document.querySelectorAll('main img, main script, main b').length") == 0
    assert page.errors() == []  # not even a CSP report: nothing tried to run


# --- any snapshot: what a node or an owner may serve ----------------------------------------------------------


@contextmanager
def serving(snapshot: dict[str, Any]) -> Iterator[str]:
    """A status server in a thread of its own serving ``snapshot``; yields the page's URL."""
    started: queue.Queue[tuple[int, trio.CancelScope, trio.lowlevel.TrioToken]] = queue.Queue()

    async def main() -> None:
        server = StatusServer(lambda: snapshot, lambda: b"", assets())
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, 0)
            started.put((port, nursery.cancel_scope, trio.lowlevel.current_trio_token()))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    port, scope, token = started.get(timeout=10)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(10)


def test_a_shared_loss_is_drawn_and_every_peer_string_is_text(page: Page) -> None:
    """An owner-like snapshot (no roster, no data plane) with a loss series, and peer-supplied strings in
    every place the page shows one: a channel's close reason, a timeline entry, a validator's software."""
    job = "ab" * 16
    snapshot = {
        "peer_id": "12D3KooWowner", "role": "user", "software": "tensorlink/0.1.0", "reachability": "private",
        "uptime_s": 5.0,
        "validators": [{"peer_id": "12D3KooWval", "software": SCRIPT, "trusted": False, "expires_in_s": 30.0}],
        "jobs": [{"job": job, "owner": "12D3KooWowner", "n_stages": 1, "loss": [3.0, 2.5, 2.25, 2.0],
                  "stages": [{"stage": 0, "peer_id": "12D3KooWw", "units": [0, 3], "memory_bytes": 1 << 20}]}],
        "data_plane": {"channels": [{"peer": "12D3KooWw", "job": job, "kind": "direct", "opened_at": 1.0,
                                     "closed": IMG, "bytes_sent": 10, "bytes_received": 20}]},
        "timeline": {"events": [{"at": 1.0, "kind": "failure", "what": BOLD}], "counts": {"failure": 1}},
    }  # fmt: skip
    with serving(snapshot) as url:
        page.open(url)
        points = page.js("return document.querySelector('#jobs svg.chart polyline').getAttribute('points')")
        assert len(points.split()) == 4
        assert page.texts("#jobs [data-na]") == ["replicas: not available (each stage runs on one worker)"]
        assert page.texts("#dataplane tr[data-peer] td")[-1] == IMG
        (entry,) = page.texts("#timeline li")
        assert entry.endswith(BOLD)  # after its time
        assert page.texts("#swarm tr[data-kind=validator] [data-field=software]") == [SCRIPT]
        time.sleep(2.5)
        assert page.js("return [window.__pwned, window.__pwned2]") == [None, None]
        assert page.js("return document.querySelectorAll('main img, main script, main b').length") == 0
        assert page.errors() == []
