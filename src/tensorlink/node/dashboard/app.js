// The TensorLink node dashboard: draws the /status snapshot the node sends every second on /events.
// Everything a peer publishes is hostile input: the page builds its DOM with createElement and text
// nodes only (never innerHTML), and sets attributes only to values it formats itself or to data-*
// attributes, which nothing interprets. The node's Content-Security-Policy forbids inline script too.
"use strict";

(() => {
  const HISTORY = 120; // samples kept per chart (two minutes at one snapshot a second)
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STAGE_COLOURS = ["#2b6cb0", "#2f855a", "#b7791f", "#6b46c1", "#c53030", "#2c7a7b", "#97266d", "#4a5568"];
  const series = new Map(); // chart key -> numbers, newest last
  const totals = new Map(); // counter key -> [uptime_s, total] of the previous snapshot

  // --- DOM helpers -------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class" || name === "title" || name.startsWith("data-")) node.setAttribute(name, String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function id(text) {
    return el("span", { class: "id", title: text }, short(text));
  }

  function field(name, value) {
    return el("span", { "data-field": name, class: "num" }, value);
  }

  function dl(rows) {
    return el("dl", {}, rows.map(([label, value]) => [el("dt", {}, label), el("dd", {}, value)]));
  }

  function table(headers, rows) {
    return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
  }

  function notAvailable(what, why) {
    return el("p", { class: "na", "data-na": what }, `${what}: not available${why ? ` (${why})` : ""}`);
  }

  function fill(section, ...children) {
    document.querySelector(`#${section} .body`).replaceChildren(...children.flat(Infinity).filter((c) => c));
  }

  // --- numbers --------------------------------------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return "unknown";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(Number(seconds)));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    return `${d ? `${d}d ` : ""}${d || h ? `${h}h ` : ""}${m}m ${s % 60}s`;
  }

  function short(peer) {
    const text = String(peer);
    return text.length > 16 ? `${text.slice(0, 6)}…${text.slice(-6)}` : text;
  }

  function record(key, value) {
    const values = series.get(key) || [];
    values.push(Number(value));
    if (values.length > HISTORY) values.shift();
    series.set(key, values);
    return values;
  }

  // The per-second rate of a counter between this snapshot and the previous one (null on the first).
  function rate(key, uptime, total) {
    const before = totals.get(key);
    totals.set(key, [uptime, total]);
    if (!before || uptime <= before[0] || total < before[1]) return null;
    return (total - before[1]) / (uptime - before[0]);
  }

  // --- charts (SVG drawn here) ------------------------------------------------------------------------

  function sparkline(values, width = 120, height = 24) {
    const chart = svg("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}` });
    if (values.length < 2) return chart;
    const max = Math.max(...values);
    const min = Math.min(...values, 0);
    const span = max - min || 1;
    const points = values.map((v, i) => {
      const x = (i / (HISTORY - 1)) * width + (width - ((values.length - 1) / (HISTORY - 1)) * width);
      const y = height - 1 - ((v - min) / span) * (height - 2);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    chart.append(svg("polyline", { points: points.join(" ") }));
    return chart;
  }

  function lineChart(values, width = 420, height = 120) {
    const chart = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}` });
    const max = Math.max(...values);
    const min = Math.min(...values);
    const span = max - min || 1;
    const pad = 28;
    chart.append(svg("line", { x1: pad, y1: height - 12, x2: width, y2: height - 12 }));
    const top = svg("text", { x: 0, y: 10 });
    top.textContent = max.toPrecision(3);
    const bottom = svg("text", { x: 0, y: height - 14 });
    bottom.textContent = min.toPrecision(3);
    chart.append(top, bottom);
    const points = values.map((v, i) => {
      const x = pad + (values.length === 1 ? 0 : (i / (values.length - 1)) * (width - pad));
      const y = 4 + (1 - (v - min) / span) * (height - 20);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    chart.append(svg("polyline", { points: points.join(" ") }));
    return chart;
  }

  // A stage's units (layers) are the inclusive range [first, last].
  function unitCount(stage) {
    return stage.units[1] - stage.units[0] + 1;
  }

  // One bar per job: a segment per stage, as wide as the units (layers) it holds.
  function stageMap(stages) {
    const width = 420;
    const height = 22;
    const total = stages.reduce((sum, s) => sum + unitCount(s), 0) || 1;
    const chart = svg("svg", { class: "stagemap", width, height, viewBox: `0 0 ${width} ${height}` });
    let x = 0;
    for (const s of stages) {
      const w = (unitCount(s) / total) * width;
      const colour = STAGE_COLOURS[s.stage % STAGE_COLOURS.length];
      const rect = svg("rect", { x: x.toFixed(1), y: 0, width: w.toFixed(1), height, fill: colour });
      const title = svg("title", {});
      title.textContent = `stage ${s.stage}: ${s.peer_id}`;
      rect.append(title);
      const label = svg("text", { x: (x + 4).toFixed(1), y: 15 });
      label.textContent = w > 140 ? `stage ${s.stage}: ${short(s.peer_id)}` : `${s.stage}`;
      chart.append(rect, label);
      x += w;
    }
    return chart;
  }

  // --- sections -------------------------------------------------------------------------------------------

  function renderNode(s) {
    const cap = s.capability;
    const mem = s.memory || {};
    const inUse = mem.in_use_bytes;
    record("memory", inUse || 0);
    const source = { cuda_allocated: "CUDA allocated", process_rss: "process RSS" }[mem.in_use_source] || "";
    fill(
      "node",
      dl([
        ["role", field("role", s.role)],
        ["peer id", field("peer_id", s.peer_id)],
        ["software", s.software],
        ["reachability", field("reachability", s.reachability)],
        ["uptime", field("uptime", duration(s.uptime_s))],
        ["connected peers", field("peers", s.peers.length)],
        ["device", cap ? field("device", `${cap.device} (${cap.device_name})`) : "none: validators run no stages"],
        ["measured speed", cap ? field("gflops", `${Number(cap.gflops).toFixed(1)} GFLOP/s`) : "not measured (no stages)"],
        ["memory in use", [field("memory_in_use", `${bytes(inUse)}${source ? ` (${source})` : ""}`), " ", sparkline(series.get("memory"))]],
        ["memory reserved", mem.reserved_bytes === null ? "none (no stages)" : field("memory_reserved", bytes(mem.reserved_bytes))],
        ["memory offered", mem.offered_bytes === null ? "none (no stages)" : field("memory_offered", bytes(mem.offered_bytes))],
      ]),
    );
  }

  function renderSwarm(s) {
    const workers = s.workers.map((w) =>
      el(
        "tr",
        { "data-peer": w.peer_id, "data-kind": "worker" },
        el("td", {}, id(w.peer_id)),
        el("td", { "data-field": "device" }, `${w.device} (${w.device_name})`),
        el("td", { class: "num", "data-field": "gflops" }, Number(w.gflops).toFixed(1)),
        el("td", { class: "num" }, bytes(w.free_memory_bytes)),
        el("td", { "data-field": "check" }, w.capacity_check ? w.capacity_check.outcome : "not checked here"),
        el("td", { "data-field": "software" }, w.software),
        el("td", { class: "num" }, `${Math.round(w.expires_in_s)} s`),
      ),
    );
    const validators = s.validators.map((v) =>
      el(
        "tr",
        { "data-peer": v.peer_id, "data-kind": "validator" },
        el("td", {}, id(v.peer_id)),
        el("td", { "data-field": "trusted" }, v.trusted ? "trusted" : "not trusted"),
        el("td", { "data-field": "software" }, v.software),
        el("td", { class: "num" }, s.heartbeats[v.peer_id] === undefined ? "none" : `${s.heartbeats[v.peer_id]} s ago`),
        el("td", { class: "num" }, `${Math.round(v.expires_in_s)} s`),
      ),
    );
    fill(
      "swarm",
      el("h3", {}, `Workers (${s.workers.length})`),
      s.workers.length
        ? table(["peer", "device", "GFLOP/s claimed", "free memory", "capacity check", "software", "record expires"], workers)
        : el("p", { class: "na" }, "no worker records known"),
      el("h3", {}, `Validators (${s.validators.length})`),
      s.validators.length
        ? table(["peer", "trust", "software", "last heartbeat", "record expires"], validators)
        : el("p", { class: "na" }, "no validator records known"),
      el("p", {}, "Trusted validators: ", s.trusted_validators),
      notAvailable("reputation", "no reputation is kept yet"),
      notAvailable("stake amounts", "trust shows whether a validator is listed or staked"),
    );
  }

  function renderJobs(s) {
    const parts = [];
    for (const job of s.jobs.filter((j) => Array.isArray(j.stages))) {
      parts.push(el("h3", { "data-job": job.job }, `Job ${short(job.job)}: ${job.n_stages} stage(s), owner `, id(job.owner)));
      parts.push(stageMap(job.stages));
      parts.push(
        table(
          ["stage", "worker", "units (layers)", "memory reserved"],
          job.stages.map((st) =>
            el(
              "tr",
              { "data-job": job.job, "data-stage": st.stage },
              el("td", {}, st.stage),
              el("td", { "data-field": "worker" }, id(st.peer_id)),
              el("td", { "data-field": "units" }, `${st.units[0]}–${st.units[1]} (${unitCount(st)})`),
              el("td", { class: "num" }, bytes(st.memory_bytes)),
            ),
          ),
        ),
      );
    }
    const losses = s.jobs.filter((j) => Array.isArray(j.loss) && j.loss.length).map((j) => [j.job, j.loss]);
    const running = s.running.map((r) => {
      const key = `mb:${r.job}:${r.stage}`;
      const perSecond = rate(key, s.uptime_s, r.micro_batches || 0);
      const values = record(key, perSecond === null ? 0 : perSecond);
      if (Array.isArray(r.loss) && r.loss.length) losses.push([r.job, r.loss]);
      return el(
        "tr",
        { "data-job": r.job, "data-stage": r.stage },
        el("td", {}, id(r.job)),
        el("td", { "data-field": "stage" }, `${r.stage + 1} of ${r.n_stages}`),
        el("td", { class: "num", "data-field": "parameters" }, Number(r.parameters).toLocaleString("en")),
        el("td", { class: "num", "data-field": "steps" }, r.steps),
        el("td", { class: "num", "data-field": "micro_batches" }, r.micro_batches),
        el("td", { class: "num" }, field("micro_batches_per_s", perSecond === null ? "…" : perSecond.toFixed(2)), " ", sparkline(values, 80)),
        el("td", { class: "num" }, bytes(r.peak_charged_bytes)),
      );
    });
    if (s.running.length) {
      parts.push(el("h3", {}, "Stages running here"));
      parts.push(table(["job", "stage", "parameters", "steps", "micro-batches", "micro-batches/s", "peak memory"], running));
    }
    if (!s.jobs.length && !s.running.length) {
      parts.push(el("p", { class: "na" }, s.role === "validator" ? "no jobs admitted" : "no stages running here"));
    }
    parts.push(notAvailable("replicas", "each stage runs on one worker"));
    if (losses.length) {
      for (const [job, loss] of losses) parts.push(el("h3", {}, `Loss of job ${short(job)}`), lineChart(loss.map(Number)));
    } else {
      parts.push(notAvailable("loss curve", "the owner does not share its loss with this node"));
    }
    fill("jobs", parts);
  }

  function renderDataPlane(s) {
    const dp = s.data_plane;
    const byPeer = new Map();
    for (const c of dp.channels) {
      const t = byPeer.get(c.peer) || { sent: 0, received: 0, open: 0, kinds: new Set(), closed: [] };
      t.sent += c.bytes_sent || 0;
      t.received += c.bytes_received || 0;
      if (c.closed === null) {
        t.open += 1;
        t.kinds.add(c.kind);
      } else {
        t.closed.push(c.closed);
      }
      byPeer.set(c.peer, t);
    }
    const rows = [...byPeer.entries()].map(([peer, t]) => {
      const perSecond = rate(`bytes:${peer}`, s.uptime_s, t.sent + t.received);
      const values = record(`bytes:${peer}`, perSecond === null ? 0 : perSecond);
      return el(
        "tr",
        { "data-peer": peer },
        el("td", {}, id(peer)),
        el("td", { class: "num" }, t.open, t.kinds.size ? ` (${[...t.kinds].join(", ")})` : ""),
        el("td", { class: "num" }, bytes(t.sent)),
        el("td", { class: "num" }, bytes(t.received)),
        el("td", { class: "num" }, field("bytes_per_s", perSecond === null ? "…" : `${bytes(perSecond)}/s`), " ", sparkline(values, 80)),
        el("td", {}, t.closed.length ? t.closed[t.closed.length - 1] : ""),
      );
    });
    fill(
      "dataplane",
      dl([
        ["data port", dp.port === null ? "none" : dp.port],
        ["direct channels offered", dp.direct ? "yes" : "no"],
        ["open channels", field("channels_open", dp.channels.filter((c) => c.closed === null).length)],
      ]),
      rows.length
        ? table(["peer", "open channels", "sent", "received", "bytes/s", "last close"], rows)
        : el("p", { class: "na" }, "no channels"),
    );
  }

  function renderVerification(s) {
    const checked = s.workers.filter((w) => w.capacity_check);
    const passed = checked.filter((w) => w.capacity_check.outcome === "verified").length;
    fill(
      "verification",
      checked.length
        ? dl([
            ["capacity checks (workers checked)", field("checks_run", checked.length)],
            ["passed", field("checks_passed", passed)],
            ["failed", field("checks_failed", checked.length - passed)],
          ])
        : el("p", { class: "na" }, s.role === "validator" ? "capacity checks: none yet" : "capacity checks: none run here (validators run them)"),
      notAvailable("disputes", "no dispute protocol yet"),
      notAvailable("slashes", "no slashing yet"),
    );
  }

  function renderTimeline(s) {
    const tl = s.timeline || { events: [], counts: {} };
    const counts = tl.counts || {};
    const items = tl.events
      .slice()
      .reverse()
      .map((e) =>
        el("li", { class: e.kind, "data-kind": e.kind }, el("time", {}, new Date(e.at * 1000).toLocaleTimeString("en-GB")), e.what),
      );
    fill(
      "timeline",
      el("p", {}, `failures ${counts.failure || 0}, recoveries ${counts.recovery || 0}, changes ${counts.change || 0}`),
      items.length ? el("ol", { class: "timeline" }, items) : el("p", { class: "na" }, "nothing has failed or recovered since the node started"),
    );
  }

  function renderEarnings(s) {
    if (s.earnings && typeof s.earnings === "object") {
      fill("earnings", dl(Object.entries(s.earnings).map(([k, v]) => [k, field(k, v)])));
      return;
    }
    fill(
      "earnings",
      notAvailable("SNO balance", "this node settles no jobs on a chain yet"),
      notAvailable("settled jobs"),
      notAvailable("pending rewards"),
    );
  }

  // Defaults for what a snapshot may lack (an owner's view has no roster or data plane of its own).
  function complete(s) {
    return {
      workers: [], validators: [], peers: [], heartbeats: {}, jobs: [], running: [], trusted_validators: "",
      capability: null, memory: {}, timeline: { events: [], counts: {} },
      ...s,
      data_plane: { port: null, direct: false, channels: [], ...(s.data_plane || {}) },
    };
  }

  function render(snapshot) {
    const s = complete(snapshot);
    renderNode(s);
    renderSwarm(s);
    renderJobs(s);
    renderDataPlane(s);
    renderVerification(s);
    renderTimeline(s);
    renderEarnings(s);
    document.body.setAttribute("data-uptime", String(s.uptime_s));
  }

  function status(text, kind) {
    const conn = document.getElementById("conn");
    conn.textContent = text;
    conn.setAttribute("class", `conn ${kind}`);
  }

  // --- live updates -----------------------------------------------------------------------------------

  function poll() {
    fetch("/status", { cache: "no-store" })
      .then((r) => r.json())
      .then((s) => {
        render(s);
        status("live (polling)", "live");
      })
      .catch(() => status("node unreachable", "down"))
      .finally(() => setTimeout(poll, 1000));
  }

  function connect() {
    if (!window.EventSource) {
      poll();
      return;
    }
    const events = new EventSource("/events");
    events.onmessage = (e) => {
      render(JSON.parse(e.data));
      status("live", "live");
    };
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        // refused (e.g. too many open dashboards): the browser will not retry an EventSource, so poll
        status("polling", "wait");
        setTimeout(poll, 2000);
      } else {
        status("reconnecting", "wait");
      }
    };
  }

  connect();
})();
