// xcstack console: the overview's live charts (SVG, drawn here) and nothing else.
// No inline script anywhere (CSP script-src 'self'); no token in URLs or storage: the session
// cookie is HttpOnly and the poll is a same-origin GET.
"use strict";
(function () {
  const root = document.getElementById("overview");
  if (!root) return;
  const words = document.getElementById("words").dataset;
  const pollMs = parseInt(root.dataset.pollMs, 10) || 2000;
  const N = 60;
  const series = { rate: [], p50: [], p99: [], tokens: [], errors: [], lag: [] };
  let prev = null;

  function quantile(now, before, q) {
    // histogram buckets {le: cumulative count}; q of the requests between two polls, in seconds
    const les = Object.keys(now).sort((a, b) => parseFloat(a) - parseFloat(b));
    const delta = les.map((le) => (now[le] || 0) - ((before && before[le]) || 0));
    const total = delta[delta.length - 1] || 0;
    if (total <= 0) return null;
    for (let i = 0; i < les.length; i++) {
      if (delta[i] >= q * total) return les[i] === "+Inf" ? parseFloat(les[i - 1] || "0") : parseFloat(les[i]);
    }
    return null;
  }

  function draw(id, values, fmt) {
    const svg = document.getElementById("chart-" + id);
    const shown = values.map((v) => (v == null ? 0 : v));
    const max = Math.max(1e-9, ...shown);
    const off = N - shown.length;  // newest on the right edge
    const pts = shown.map((v, i) => `${((off + i) * 300) / (N - 1)},${78 - (v / max) * 74}`).join(" ");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("class", "line");
    svg.appendChild(line);
    const last = values[values.length - 1];
    document.getElementById("now-" + id).textContent = last == null ? "–" : fmt(last);
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function tables(data) {
    const ub = document.querySelector("#upstreams tbody");
    ub.replaceChildren();
    const names = { 0: words.closed, 1: words.open, 2: words.half };
    for (const [name, state] of Object.entries(data.metrics.breakers || {})) {
      const tr = document.createElement("tr");
      tr.dataset.upstream = name;
      tr.dataset.state = ["closed", "open", "half_open"][state] || String(state);
      cell(tr, name);
      cell(tr, names[state] || String(state), state === 0 ? "ok" : "bad");
      cell(tr, String((data.metrics.inflight || {})[name] || 0));
      ub.appendChild(tr);
    }
    const cb = document.querySelector("#checks tbody");
    cb.replaceChildren();
    for (const [name, c] of Object.entries(data.checks || {})) {
      const tr = document.createElement("tr");
      tr.dataset.check = name;
      const ok = c.status === "ok" || c.ok === true || c.ready === true;
      cell(tr, name);
      cell(tr, ok ? words.ready : words.notReady, ok ? "ok" : "bad");
      cell(tr, c.detail || "");
      cb.appendChild(tr);
    }
  }

  function uptime(s) {
    // as the server's `uptime` filter (console/web.py format_uptime)
    if (!(s >= 0)) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    return m ? `${m}m ${s % 60}s` : `${s}s`;
  }

  function processes(table) {
    // the rows are rendered by the server (names and words); a poll refreshes pid, state, restarts, uptime
    if (!table) return;
    const sup = document.querySelector("#processes tr[data-proc='supervisor'] .uptime");
    if (sup && table.supervisor) sup.textContent = uptime(table.now - table.supervisor.started_at);
    for (const p of table.processes || []) {
      const tr = document.querySelector(`#processes tr[data-proc="${CSS.escape(p.name)}"]`);
      if (!tr) continue;
      tr.querySelector(".pid").textContent = p.pid == null ? "–" : String(p.pid);
      const st = tr.querySelector(".state");
      const up = p.state === "running";
      st.textContent = !up ? words[p.state] || p.state : p.ready === true ? words.ready
        : p.ready === false ? words.notReady : words.running;
      st.className = "state " + (!up || p.ready === false ? "bad" : "ok");
      const rs = tr.querySelector(".restarts");
      rs.textContent = String(p.restarts) + (p.last_exit == null ? "" : ` (${words.lastExit} ${p.last_exit})`);
      tr.querySelector(".uptime").textContent = up && p.started_at ? uptime(table.now - p.started_at) : "–";
      tr.dataset.state = p.state;
    }
  }

  async function poll() {
    try {
      const r = await fetch("/console/overview/data", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401 || r.redirected) { window.location = "/console/login"; return; }
      const data = await r.json();
      const m = data.metrics;
      // the server shares one snapshot per second among its viewers: rates come from its own time, and
      // a snapshot already drawn is not drawn again
      const t = data.metrics_at || performance.now() / 1000;
      if (prev && t > prev.t) {
        const dt = Math.max(1e-3, t - prev.t);
        const push = (k, v) => { series[k].push(v); if (series[k].length > N) series[k].shift(); };
        push("rate", (m.requests - prev.m.requests) / dt);
        push("errors", (m.errors - prev.m.errors) / dt);
        push("tokens", (m.tokens - prev.m.tokens) / dt);
        const p50 = quantile(m.latency, prev.m.latency, 0.5);
        const p99 = quantile(m.latency, prev.m.latency, 0.99);
        const lag = quantile(m.lag, prev.m.lag, 0.99);
        push("p50", p50 == null ? null : p50 * 1000);
        push("p99", p99 == null ? null : p99 * 1000);
        push("lag", lag == null ? null : lag * 1000);
        for (const k of Object.keys(series)) draw(k, series[k], (v) => v.toFixed(k === "rate" || k === "tokens" ? 1 : 2));
      }
      if (!prev || t > prev.t) prev = { t, m };
      tables(data);
      processes(data.processes);
      root.dataset.polled = String((parseInt(root.dataset.polled || "0", 10)) + 1);
    } catch (e) {
      root.dataset.error = String(e);
    }
  }
  poll();
  setInterval(poll, pollMs);
})();
