// CLADNet dashboard: vanilla JS + SVG, talking to the controller only (same origin);
// monitoring comes through its /v1/monitoring proxy of the collector's queries.
// Health rules are the CLI's (cladnet/cli/status.py).
"use strict";

const DOWN_AFTER = 30, BROKEN_AFTER = 180, SVG = "http://www.w3.org/2000/svg";
const state = { token: sessionStorage.getItem("cladnet-token"), network: null,
                monitoring: false, host: null, hosts: [], iface: null, timer: null };
const $ = (id) => document.getElementById(id);

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
  if (r.status === 401) { throw new Error("unauthorized: check the token"); }
  const body = await r.json();
  if (!r.ok) { throw new Error(body.message || r.statusText); }
  return body;
}

// A group action (admin only: a viewer's click gets the API's "forbidden" message).
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
  $("error").textContent = message || "";
}

async function start() {
  try {
    await api("/v1/networks");
  } catch (e) { showLogin(String(e.message)); return; }
  $("login").hidden = true; $("main").hidden = false; $("logout").hidden = false;
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
    li.onclick = () => { state.network = n.name; state.host = null; refresh(); };
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
      svg.append(line);
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

function chart(metric, points) {
  const svg = el("svg", { class: "chart", viewBox: "0 0 300 70", preserveAspectRatio: "none",
                          "data-metric": metric, "data-points": points.length });
  if (points.length > 1) {
    const ts = points.map((p) => p[0]), vs = points.map((p) => p[1]);
    const [t0, t1] = [Math.min(...ts), Math.max(...ts)], top = Math.max(...vs, 1);
    const d = points.map(([t, v], k) => `${k ? "L" : "M"}${(300 * (t - t0)) / (t1 - t0 || 1)},${
      65 - (60 * v) / top}`).join(" ");
    svg.append(el("path", { d, fill: "none", stroke: "#1d3557", "stroke-width": 1.5 }));
  }
  return svg;
}

// The agent names its WireGuard interface like agent/main.py's interface_name().
const wgInterface = (network) => ("cl-" + network.replace(/[^a-zA-Z0-9-]/g, "")).slice(0, 15);

// A host has one network_receive_bytes_total per interface; the collector refuses to
// guess (ambiguous series), so the chart asks for the interface picked here.
async function interfacePicker(h) {
  const latest = await monitoring(`/hosts/${encodeURIComponent(h.name)}/latest?network=${
    encodeURIComponent(state.network)}`);
  const names = Object.keys(latest.metrics)
    .map((k) => /^network_receive_bytes_total\{interface="(.*)"\}$/.exec(k))
    .filter((m) => m).map((m) => m[1]).sort();
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

async function showHost(h) {
  const panel = $("host-panel");
  panel.replaceChildren(Object.assign(document.createElement("h2"), { textContent: h.name }),
                        hostTable(h), peerTable(h));
  if (!state.monitoring) { panel.append("Charts need a collector (--collector-url)."); return; }
  for (const metric of ["cpu_usage_ratio", "memory_usage_ratio", "network_receive_bytes_total"]) {
    try {
      const title = Object.assign(document.createElement("h3"), { textContent: metric });
      let q = `/series?host=${encodeURIComponent(h.name)}&metric=${metric}&since=600&step=10`;
      if (metric === "network_receive_bytes_total") {
        const picker = await interfacePicker(h);
        title.append(" ", picker);
        if (state.iface) { q += `&labels=${encodeURIComponent("interface=" + state.iface)}`; }
      }
      const data = await monitoring(q);
      panel.append(title, chart(metric, data.points));
    } catch (e) { panel.append(`${metric}: ${e.message}`); }
  }
}

async function showAlarms() {
  const ul = $("alarms");
  if (!state.monitoring) { ul.replaceChildren("collector not configured"); return; }
  try {
    const data = await monitoring("/alarms");
    const rules = Object.fromEntries(data.rules.map((r) => [r.id, r]));
    ul.replaceChildren(...data.alarms.map((a) => {
      const r = rules[a.rule_id];
      const rule = r ? ` (${r.metric} ${r.op} ${r.threshold})` : "";
      const li = Object.assign(document.createElement("li"), { textContent:
        `${a.rule_name} on ${a.network}/${a.host}: ${a.series} = ${Number(a.value).toFixed(2)}${rule}` });
      li.dataset.rule = a.rule_name;
      return li;
    }));
    if (!data.alarms.length) { ul.replaceChildren("no alarm firing"); }
  } catch (e) { ul.replaceChildren(`alarms: ${e.message}`); }
}

// Groups of VMs: derived state (e.g. Partial-Suspended) and each VM's state on hover;
// a click shows the group's network.
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
      label.onclick = () => { state.network = g.network; state.host = null; refresh(); };
      for (const action of ["suspend", "resume", "terminate"]) {
        const b = Object.assign(document.createElement("button"), { textContent: action });
        b.dataset.action = action;
        b.onclick = () => {
          if (action !== "terminate" || confirm(`Terminate every VM of ${g.name}?`)) {
            groupAction(g.name, action);
          }
        };
        li.append(" ", b);
      }
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
  } catch (e) { $("mesh-title").textContent = `${state.network}: ${e.message}`; }
  showAlarms();
}

$("login-form").onsubmit = (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("cladnet-token", state.token);
  start();
};
$("logout").onclick = () => { sessionStorage.removeItem("cladnet-token"); state.token = null; showLogin(); };
if (state.token) { start(); } else { showLogin(); }
