// CLADNet dashboard: vanilla JS + SVG, talking to the controller only (same origin);
// monitoring comes through its /v1/monitoring proxy of the collector's queries.
// Health rules are the CLI's (cladnet/cli/status.py).
"use strict";

const DOWN_AFTER = 30, BROKEN_AFTER = 180, SVG = "http://www.w3.org/2000/svg";
const state = { token: sessionStorage.getItem("cladnet-token"), network: null,
                monitoring: false, role: null, host: null, pair: null, hosts: [], iface: null,
                drawing: 0,
                timer: null };
const $ = (id) => document.getElementById(id);

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
  if (r.status === 401) { throw new Error("unauthorized: check the token"); }
  const body = await r.json();
  if (!r.ok) { throw new Error(body.message || r.statusText); }
  return body;
}

// A group action (the buttons are an admin's; the API refuses anyone else anyway).
async function groupAction(group, action) {
  const r = await fetch(`/v1/groups/${encodeURIComponent(group)}/actions`, { method: "POST",
    headers: { Authorization: "Bearer " + state.token, "Content-Type": "application/json" },
    body: JSON.stringify({ action }) });
  const body = await r.json();
  $("group-message").textContent = r.ok ? `${group}: ${action} asked` : `${group}: ${body.message}`;
  showGroups();
}

// A collector query, proxied by the controller under its own origin and login.
const monitoring = (path) => api("/v1/monitoring" + path);

function showLogin(message) {
  $("login").hidden = false; $("main").hidden = true; $("logout").hidden = true;
  $("who").textContent = "";
  $("error").textContent = message || "";
}

async function start() {
  try {
    await api("/v1/networks");
  } catch (e) { showLogin(String(e.message)); return; }
  $("login").hidden = true; $("main").hidden = false; $("logout").hidden = false;
  state.role = (await api("/v1/whoami")).role;
  $("who").textContent = state.role;
  state.monitoring = (await (await fetch("/ui/config.json")).json()).monitoring;
  await loadNetworks();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, 5000);
}

async function loadNetworks() {
  const nets = await api("/v1/networks");
  const ul = $("networks");
  ul.replaceChildren();
  for (const n of nets) {
    const li = document.createElement("li");
    li.textContent = n.name; li.title = n.cidr; li.dataset.network = n.name;
    li.onclick = () => { state.network = n.name; state.host = null; state.pair = null; refresh(); };
    ul.append(li);
  }
  if (!state.network && nets.length) { state.network = nets[0].name; }
  await refresh();
}

const up = (h, now) => h.last_seen && now - h.last_seen <= DOWN_AFTER;

function pairState(a, b, now) {
  if (!up(a, now) || !up(b, now)) { return ["down", null]; }
  const p = ((a.status || {}).peers || []).find((x) => x.peer_id === b.id);
  if (!p) { return ["unknown", null]; }
  const joined = Math.max(a.created_at || 0, b.created_at || 0);
  if (p.handshake_age_s === null && now - joined < BROKEN_AFTER) { return ["connecting", p]; }
  if (p.handshake_age_s === null || p.handshake_age_s > BROKEN_AFTER) { return ["broken", p]; }
  if (p.latency_ms !== null && p.latency_ms >= 100) { return ["bad", p]; }
  if (p.latency_ms !== null && p.latency_ms >= 20) { return ["slow", p]; }
  return ["ok", p];
}

function colour(h) {
  const key = ((h.labels || {}).cloud || "") + "/" + ((h.labels || {}).region || "");
  let hash = 0;
  for (const c of key) { hash = (hash * 31 + c.charCodeAt(0)) % 360; }
  return `hsl(${hash}, 60%, 60%)`;
}

const EDGE = { ok: "#2a9d8f", slow: "#e9c46a", bad: "#e76f51", broken: "#d62828",
               down: "#bbb", unknown: "#bbb", connecting: "#bbb" };

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) { e.setAttribute(k, v); }
  if (text !== undefined) { e.textContent = text; }
  return e;
}

function drawMesh(hosts) {
  const svg = $("mesh"), now = Date.now() / 1000, n = hosts.length;
  svg.replaceChildren();
  const pos = hosts.map((_, i) => [300 + 220 * Math.cos(2 * Math.PI * i / n - Math.PI / 2),
                                   300 + 220 * Math.sin(2 * Math.PI * i / n - Math.PI / 2)]);
  for (let i = 0; i < n; i++) {
    for (let j = i + 1; j < n; j++) {
      // A pair is as bad as the worse of its two directions.
      const order = ["broken", "down", "connecting", "unknown", "bad", "slow", "ok"];
      const [s1, p1] = pairState(hosts[i], hosts[j], now);
      const [s2, p2] = pairState(hosts[j], hosts[i], now);
      const s = order.indexOf(s1) <= order.indexOf(s2) ? s1 : s2;
      const lat = [p1, p2].map((p) => p && p.latency_ms).filter((x) => x !== null && x !== undefined);
      const line = el("line", { x1: pos[i][0], y1: pos[i][1], x2: pos[j][0], y2: pos[j][1],
        stroke: EDGE[s], "stroke-width": 3, "stroke-dasharray": s === "broken" ? "8 6" : "",
        "data-pair": `${hosts[i].name}|${hosts[j].name}`, "data-state": s });
      line.append(el("title", {}, `${hosts[i].name} ↔ ${hosts[j].name}: ${s}` +
        (lat.length ? ` ${Math.max(...lat).toFixed(1)} ms` : "")));
      // A wide transparent twin takes the clicks: a thin or dashed line is hard to hit.
      const hit = el("line", { x1: pos[i][0], y1: pos[i][1], x2: pos[j][0], y2: pos[j][1],
        stroke: "transparent", "stroke-width": 14, class: "hit",
        "data-hit": `${hosts[i].name}|${hosts[j].name}` });
      hit.append(line.firstChild.cloneNode(true));
      hit.onclick = () => { state.pair = [hosts[i].id, hosts[j].id]; showPair(); };
      svg.append(line, hit);
    }
  }
  hosts.forEach((h, i) => {
    const c = el("circle", { cx: pos[i][0], cy: pos[i][1], r: 22, fill: colour(h),
      "data-host": h.name, "data-up": String(!!up(h, now)) });
    c.append(el("title", {}, `${h.name} ${h.overlay_ip} ${JSON.stringify(h.labels || {})}`));
    c.onclick = () => { state.host = h; state.iface = null; showHost(h); };
    svg.append(c, el("text", { x: pos[i][0], y: pos[i][1] + 38 }, h.name));
  });
}

const LINE_COLOURS = ["#1d3557", "#e76f51", "#2a9d8f", "#e9c46a", "#8338ec", "#6c757d"];

// A line chart of one or more series ([{name, points: [[t, v], …]}]) on one time axis;
// ``top`` is the scale's top (a ratio's is 1) and ``unit`` formats the largest value.
function chart(metric, series, top, unit) {
  const total = series.reduce((n, x) => n + x.points.length, 0);
  const svg = el("svg", { class: "chart", viewBox: "0 0 300 70", preserveAspectRatio: "none",
                          "data-metric": metric, "data-points": total });
  const all = series.flatMap((x) => x.points), ts = all.map((p) => p[0]);
  const [t0, t1] = [Math.min(...ts), Math.max(...ts)];
  const high = Math.max(top || 0, ...all.map((p) => p[1]), 1e-9);
  series.forEach((x, k) => {
    if (x.points.length < 2) { return; }
    const d = x.points.map(([t, v], n) => `${n ? "L" : "M"}${(300 * (t - t0)) / (t1 - t0 || 1)},${
      65 - (60 * v) / high}`).join(" ");
    svg.append(el("path", { d, fill: "none", stroke: LINE_COLOURS[k % LINE_COLOURS.length],
                            "stroke-width": 1.5, "data-series": x.name }));
  });
  const figure = Object.assign(document.createElement("figure"), { className: "chart" });
  const caption = document.createElement("figcaption");
  caption.append(`top ${unit(high)}`, ...series.filter((x) => x.name).map((x, k) => {
    const key = Object.assign(document.createElement("span"), { textContent: ` ■ ${x.name}` });
    key.style.color = LINE_COLOURS[k % LINE_COLOURS.length];
    return key;
  }));
  if (!all.length) { caption.replaceChildren("no data in the last 10 min"); }
  figure.append(svg, caption);
  return figure;
}

// Counter → per-second rate between consecutive points (a reset counts as 0).
const rate = (points) => points.slice(1).map(([t, v], k) =>
  [t, Math.max(0, (v - points[k][1]) / ((t - points[k][0]) || 1))]);
const percent = (v) => `${(100 * v).toFixed(0)} %`;
const bytesPerS = (v) => (v >= 1e6 ? `${(v / 1e6).toFixed(1)} MB/s`
  : v >= 1e3 ? `${(v / 1e3).toFixed(1)} kB/s` : `${v.toFixed(0)} B/s`);
const millis = (v) => `${v.toFixed(1)} ms`;

// The agent names its WireGuard interface like agent/main.py's interface_name().
const wgInterface = (network) => ("cl-" + network.replace(/[^a-zA-Z0-9-]/g, "")).slice(0, 15);

// A host has one network_receive_bytes_total per interface; the collector refuses to
// guess (ambiguous series), so the chart asks for the interface picked here.
function interfacePicker(h, latest) {
  const names = labelValues(latest, "network_receive_bytes_total", "interface");
  if (!names.includes(state.iface)) {
    const wg = wgInterface(state.network);
    state.iface = names.includes(wg) ? wg : names[0] || null;
  }
  const select = Object.assign(document.createElement("select"), { id: "iface-picker" });
  select.append(...names.map((n) => Object.assign(document.createElement("option"),
    { value: n, textContent: n, selected: n === state.iface })));
  select.onchange = () => { state.iface = select.value; showHost(h); };
  return select;
}

const ago = (t) => (t ? `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago` : "never");
const labelText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");

// The host's fields as a readable table (name → text), not raw JSON.
function hostTable(h) {
  const rows = [
    ["id", h.id], ["overlay IP", h.overlay_ip], ["public address", h.public_address || "—"],
    ["addresses", (h.addresses || []).join(", ") || "—"],
    ["endpoints", (h.endpoints || []).join(", ") || "—"],
    ["listen port", h.listen_port], ["labels", labelText(h.labels) || "—"],
    ["last seen", ago(h.last_seen)],
  ];
  const table = Object.assign(document.createElement("table"), { id: "host-fields" });
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.dataset.field = k;
    tr.append(Object.assign(document.createElement("th"), { textContent: k }),
              Object.assign(document.createElement("td"), { textContent: String(v) }));
  }
  return table;
}

// Per peer: handshake age and tunnel latency as this host reports them.
function peerTable(h) {
  const names = Object.fromEntries(state.hosts.map((x) => [x.id, x.name]));
  const table = Object.assign(document.createElement("table"), { id: "host-peers" });
  const head = table.insertRow();
  for (const t of ["peer", "handshake", "latency"]) {
    head.append(Object.assign(document.createElement("th"), { textContent: t }));
  }
  for (const p of ((h.status || {}).peers || [])) {
    const tr = table.insertRow();
    tr.dataset.peer = names[p.peer_id] || p.peer_id;
    for (const t of [names[p.peer_id] || p.peer_id,
      p.handshake_age_s === null ? "none" : `${Math.round(p.handshake_age_s)} s ago`,
      p.latency_ms === null || p.latency_ms === undefined ? "—" : `${p.latency_ms.toFixed(1)} ms`]) {
      tr.append(Object.assign(document.createElement("td"), { textContent: t }));
    }
  }
  return table;
}

// The names a labelled metric has in the host's latest values (``metric{key="name"}``).
function labelValues(latest, metric, key) {
  const re = new RegExp(`^${metric}\\{${key}="(.*)"\\}$`);
  return Object.keys(latest).map((k) => re.exec(k)).filter((m) => m).map((m) => m[1]).sort();
}

// A titled chart of one metric: ``series`` ([{name, labels}]) are fetched in parallel.
async function metricChart(h, title, metric, series, shape) {
  const q = (labels) => `/series?host=${encodeURIComponent(h.name)}&metric=${metric}` +
    `&since=600&step=10` + (labels ? `&labels=${encodeURIComponent(labels)}` : "");
  const data = await Promise.all(series.map(async (x) =>
    ({ name: x.name, points: shape.map((await monitoring(q(x.labels))).points) })));
  const heading = Object.assign(document.createElement("h3"), { textContent: title });
  return [heading, chart(metric, data, shape.top, shape.unit)];
}

// Drawn off-page and swapped in at once: a refresh that overtakes a slow one wins.
async function showHost(h) {
  const panel = $("host-panel"), ticket = ++state.drawing;
  const parts = [Object.assign(document.createElement("h2"), { textContent: h.name }),
                 hostTable(h), peerTable(h)];
  if (!panel.querySelector("h2") || panel.querySelector("h2").textContent !== h.name) {
    panel.replaceChildren(...parts, "Loading charts…");
  }
  if (!state.monitoring) {
    panel.replaceChildren(...parts, "Charts need a collector (--collector-url).");
    return;
  }
  let latest = {};
  try {
    latest = (await monitoring(`/hosts/${encodeURIComponent(h.name)}/latest?network=${
      encodeURIComponent(state.network)}`)).metrics;
  } catch (e) { panel.replaceChildren(...parts, `latest values: ${e.message}`); return; }
  const asRatio = { map: (p) => p, top: 1, unit: percent };
  const charts = [
    ["CPU", "cpu_usage_ratio", [{ name: "" }], asRatio],
    ["Memory", "memory_usage_ratio", [{ name: "" }], asRatio],
  ];
  const picker = interfacePicker(h, latest);
  if (state.iface) {
    charts.push(["Network received", "network_receive_bytes_total",
      [{ name: "", labels: "interface=" + state.iface }], { map: rate, top: 0, unit: bytesPerS }]);
  }
  const peers = labelValues(latest, "wireguard_peer_latency_seconds", "peer");
  charts.push(["Latency per peer", "wireguard_peer_latency_seconds",
    peers.map((p) => ({ name: p, labels: "peer=" + p })),
    { map: (ps) => ps.map(([t, v]) => [t, 1000 * v]), top: 0, unit: millis }]);
  const drawn = await Promise.all(charts.map(([title, metric, series, shape]) =>
    metricChart(h, title, metric, series, shape).catch((e) => [`${metric}: ${e.message}`])));
  drawn.forEach((one, k) => {
    if (charts[k][1] === "network_receive_bytes_total") { one[0].append(" ", picker); }
    parts.push(...one);
  });
  if (!state.iface) { parts.push("Network: no interface reported yet."); }
  parts.push(await hostAlarms(h));
  if (ticket === state.drawing) { panel.replaceChildren(...parts); }
}

// The alarms firing now on this host, each with its rule.
async function hostAlarms(h) {
  const box = Object.assign(document.createElement("div"), { id: "host-alarms" });
  box.append(Object.assign(document.createElement("h3"), { textContent: "Alarms firing" }));
  try {
    const data = await monitoring("/alarms");
    const mine = data.alarms.filter((a) => a.host === h.name && a.network === state.network);
    box.append(alarmList(mine, data.rules));
  } catch (e) { box.append(`alarms: ${e.message}`); }
  return box;
}

function alarmList(alarms, rules) {
  const byId = Object.fromEntries(rules.map((r) => [r.id, r]));
  const ul = document.createElement("ul");
  ul.className = "alarms";
  ul.append(...alarms.map((a) => {
    const r = byId[a.rule_id];
    const rule = r ? ` (${r.metric} ${r.op} ${r.threshold})` : "";
    const li = Object.assign(document.createElement("li"), { textContent:
      `${a.rule_name} on ${a.network}/${a.host}: ${a.series} = ${Number(a.value).toFixed(2)}${rule}` });
    li.dataset.rule = a.rule_name;
    return li;
  }));
  if (!alarms.length) { ul.append("none firing"); }
  return ul;
}

// A pair: both directions' health (as each side reports it) and path, and which policy
// rule allows or blocks each (the controller's /policy/explain).
async function showPair() {
  const panel = $("pair-panel");
  const [a, b] = state.pair.map((id) => state.hosts.find((x) => x.id === id));
  if (!a || !b) { panel.replaceChildren("The pair left the network."); return; }
  const now = Date.now() / 1000;
  let why;
  try {
    why = await api(`/v1/networks/${encodeURIComponent(state.network)}/policy/explain?src=${
      encodeURIComponent(a.id)}&dst=${encodeURIComponent(b.id)}`);
  } catch (e) { why = { error: e.message }; }
  const table = Object.assign(document.createElement("table"), { id: "pair-fields" });
  const head = table.insertRow();
  for (const t of ["direction", "state", "handshake", "latency", "path", "policy"]) {
    head.append(Object.assign(document.createElement("th"), { textContent: t }));
  }
  for (const [key, x, y] of [["forward", a, b], ["reverse", b, a]]) {
    // No flow either way: no tunnel is expected, so no handshake is not "broken".
    const [s, p] = why.peers === false ? ["blocked", null] : pairState(x, y, now);
    const verdict = why.error ? { reason: why.error } : why[key];
    const tr = table.insertRow();
    tr.dataset.direction = key;
    tr.dataset.allowed = String(!!verdict.allowed);
    for (const t of [`${x.name} → ${y.name}`, s,
      p && p.handshake_age_s !== null ? `${Math.round(p.handshake_age_s)} s ago` : "none",
      p && p.latency_ms !== null && p.latency_ms !== undefined ? `${p.latency_ms.toFixed(1)} ms` : "—",
      why.error ? "—" : why.path[key], verdict.reason]) {
      tr.append(Object.assign(document.createElement("td"), { textContent: t }));
    }
  }
  const notes = [];
  if (!why.error) {
    notes.push(`policy ${why.default ? "default (allows everything)" : `version ${why.version}`}`);
    if (!why.peers) { notes.push("not in each other's peer lists: no flow either way"); }
  }
  panel.replaceChildren(Object.assign(document.createElement("h2"),
    { textContent: `${a.name} ↔ ${b.name}` }), table,
    Object.assign(document.createElement("p"), { textContent: notes.join("; ") }));
}

async function showAlarms() {
  const ul = $("alarms");
  if (!state.monitoring) { ul.replaceChildren("collector not configured"); return; }
  try {
    const data = await monitoring("/alarms");
    ul.replaceChildren(...alarmList(data.alarms, data.rules).children);
    if (!data.alarms.length) { ul.replaceChildren("no alarm firing"); }
  } catch (e) { ul.replaceChildren(`alarms: ${e.message}`); }
}

// Groups of VMs: derived state (e.g. Partial-Suspended), each VM's state, and for admins
// the suspend/resume/terminate buttons; a click on the name shows the group's network.
async function showGroups() {
  const ul = $("groups");
  try {
    const groups = await api("/v1/groups");
    ul.replaceChildren(...groups.map((g) => {
      const li = document.createElement("li");
      const label = Object.assign(document.createElement("span"), { textContent: `${g.name}: ${g.state}` });
      li.append(label);
      li.dataset.group = g.name; li.dataset.state = g.state;
      li.title = g.vms.map((vm) => `${vm.name} ${vm.state} ${vm.public_ip || ""}`).join("\n");
      li.classList.toggle("bad", g.state !== "Running");
      label.onclick = () => { state.network = g.network; state.host = null; state.pair = null; refresh(); };
      for (const action of state.role === "admin" ? ["suspend", "resume", "terminate"] : []) {
        const b = Object.assign(document.createElement("button"), { textContent: action });
        b.dataset.action = action;
        b.onclick = () => {
          if (action !== "terminate" || confirm(`Terminate every VM of ${g.name}?`)) {
            groupAction(g.name, action);
          }
        };
        li.append(" ", b);
      }
      // Each VM's state in plain sight (a failed one with the cloud's message).
      const vms = Object.assign(document.createElement("ul"), { className: "vms" });
      vms.append(...g.vms.map((vm) => {
        const item = Object.assign(document.createElement("li"), { textContent:
          `${vm.name}: ${vm.state}${vm.public_ip ? " " + vm.public_ip : ""}${
            vm.error ? " — " + vm.error : ""}` });
        item.dataset.vm = vm.name; item.dataset.state = vm.state;
        item.classList.toggle("bad", vm.state !== "Running");
        return item;
      }));
      li.append(vms);
      return li;
    }));
    if (!groups.length) { ul.replaceChildren("no groups"); }
  } catch (e) { ul.replaceChildren(`groups: ${e.message}`); }
}

// Pair health is the collector's (one query per refresh, as for `cladnet status`); the
// controller only knows who is alive. Without a collector every pair is "unknown".
async function pairHealth(network) {
  if (!state.monitoring) { return {}; }
  try {
    return (await monitoring(`/networks/${encodeURIComponent(network)}/pairs`)).hosts;
  } catch (e) { return {}; }
}

function withHealth(hosts, health) {
  const ids = Object.fromEntries(hosts.map((h) => [h.name, h.id]));
  return hosts.map((h) => ({ ...h, status: { peers: Object.entries((health[h.name] || {}).peers || {})
    .filter(([name]) => name in ids).map(([name, p]) => ({ peer_id: ids[name], ...p })) } }));
}

async function refresh() {
  showGroups();
  if (!state.network) { return; }
  for (const li of $("networks").children) {
    li.classList.toggle("active", li.dataset.network === state.network);
  }
  try {
    const hosts = withHealth(await api(`/v1/networks/${encodeURIComponent(state.network)}/hosts`),
                             await pairHealth(state.network));
    $("mesh-title").textContent = `${state.network}: ${hosts.length} hosts`;
    state.hosts = hosts;
    drawMesh(hosts);
    if (state.host) { const h = hosts.find((x) => x.id === state.host.id); if (h) { showHost(h); } }
    if (state.pair) { showPair(); }
  } catch (e) { $("mesh-title").textContent = `${state.network}: ${e.message}`; }
  showAlarms();
}

$("login-form").onsubmit = (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("cladnet-token", state.token);
  start();
};
$("logout").onclick = () => {
  sessionStorage.removeItem("cladnet-token");
  clearInterval(state.timer);  // no more calls without a token
  Object.assign(state, { token: null, role: null, host: null, pair: null });
  $("groups").replaceChildren();
  showLogin();
};
if (state.token) { start(); } else { showLogin(); }
