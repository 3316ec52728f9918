// The v2g web view: draws what /api/events streams (the server's fleet view, itself read
// off the broker) and sends the operator's actions to /api/dispatch. No library, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let loggedIn = false;
let readOnly = true;

function kw(v) { return v === null || v === undefined ? "–" : `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(1)} kW`; }
function signed(v) { return `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(0)}`; }
function num(v, d = 1) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }
function mins(s) { return s >= 3600 ? `${(s / 3600).toFixed(s % 3600 ? 1 : 0)} h` : `${Math.round(s / 60)} min`; }
function cell(tr, text, cls) { const td = tr.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function setText(id, text) { $(id).textContent = text; }

let streaming = false;
let brokerUp = false;

function showLink() {
  const up = streaming && brokerUp;
  $("link").className = `pill ${up ? "on" : "off"}`;
  setText("link", !streaming ? "reconnecting…" : brokerUp ? "live" : "broker unreachable: showing the last data");
}

function render(view) {
  brokerUp = view.broker_connected;
  showLink();
  const s = view.status;
  if (s) {
    setText("online", s.vehicles_online);
    setText("plugged", s.vehicles_plugged_in);
    setText("energy", `${s.energy_kwh.toFixed(1)} kWh`);
    setText("power", kw(s.power_kw));
    setText("band", s.capability ? `${signed(s.capability.min_power_kw)} … ${signed(s.capability.max_power_kw)} kW` : "–");
    const req = s.dispatches.reduce((a, d) => a + d.requested_kw, 0);
    setText("requested", s.dispatches.length ? kw(req) : "none");
    setText("clock", `platform time ${s.ts.replace("T", " ").replace(/(\.\d+)?Z$/, " UTC")}`);
    const w = $("warnings");
    w.hidden = !(s.warnings && s.warnings.length) && !s.degraded;
    w.textContent = (s.degraded ? "degraded. " : "") + (s.warnings || []).join(" ");
  }
  renderCapability(view.capability);
  renderRefusals(view.rejected);
  $("unreadable").hidden = !view.unreadable;
  setText("unreadable", `messages this view could not read: ${view.unreadable} (see its log)`);
  renderDispatches(view.dispatches);
  renderChart(view.history);
}

function renderCapability(cap) {
  const body = $("capability").tBodies[0];
  body.replaceChildren();
  if (!cap) return;
  for (const w of cap.windows) {
    const tr = body.insertRow();
    cell(tr, mins(w.duration_s));
    cell(tr, num(w.min_power_kw));
    cell(tr, num(w.max_power_kw));
    cell(tr, w.feasible === false ? "infeasible" : "");
  }
}

function renderRefusals(rejected) {
  const body = $("refusals").tBodies[0];
  body.replaceChildren();
  const entries = Object.entries(rejected || {});
  $("norefusals").hidden = entries.length > 0;
  for (const [reason, count] of entries) {
    const tr = body.insertRow();
    cell(tr, reason);
    cell(tr, count);
  }
}

function renderDispatches(rows) {
  const body = $("dispatches").tBodies[0];
  body.replaceChildren();
  $("nodispatches").hidden = rows.length > 0;
  for (const d of rows) {
    const tr = body.insertRow();
    tr.dataset.request = d.request_id;
    cell(tr, d.request_id);
    cell(tr, d.service || "");
    cell(tr, d.status, `status s-${d.status}`);
    cell(tr, num(d.requested_kw));
    cell(tr, num(d.allocated_kw));
    cell(tr, num(d.delivered_kw));
    cell(tr, d.delivered_kwh === null ? "–" : `${num(d.delivered_kwh, 2)} / ${num(d.requested_kwh, 2)}`);
    cell(tr, d.vehicles === null ? "–" : d.vehicles);
    cell(tr, d.score === null ? "–" : num(d.score, 3));
    cell(tr, d.active && d.remaining_s !== null ? mins(d.remaining_s) : "");
    cell(tr, d.reason || "", "note");
    const act = cell(tr, "", "act");
    if (loggedIn && d.active) {
      act.append(button("amend", () => amend(d.request_id)), " ", button("cancel", () => cancel(d.request_id)));
    }
  }
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onclick);
  return b;
}

// The chart: the last hour of platform time; the 15-minute capability band shaded, fleet
// power as a line, the active requests' total as a dashed step line.
function renderChart(history) {
  const svg = $("chart");
  svg.replaceChildren();
  const W = 900, H = 260, L = 60, R = 10, T = 10, B = 24;
  if (!history.length) return;
  const t1 = history[history.length - 1][0], t0 = t1 - 3600;
  let lo = 0, hi = 0;
  for (const [, p, r, bmin, bmax] of history) {
    for (const v of [p, r, bmin, bmax]) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  // Round ticks: a step of 1, 2 or 5 times a power of ten, about four to the height.
  const raw = Math.max(hi - lo, 1) / 4, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  lo = Math.floor(lo / step) * step; hi = Math.max(Math.ceil(hi / step) * step, lo + step);
  const x = (t) => (L + ((t - t0) / 3600) * (W - L - R)).toFixed(1);
  const y = (v) => (T + ((hi - v) / (hi - lo)) * (H - T - B)).toFixed(1);
  const el = (name, attrs, text) => {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  for (let v = lo; v <= hi + step / 2; v += step) {
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    el("text", { x: L - 6, y: Number(y(v)) + 4, "text-anchor": "end" }, v.toFixed(0));
  }
  el("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), class: "grid", "stroke-width": 2 });
  for (let m = 0; m <= 60; m += 15) {
    el("text", { x: x(t0 + m * 60), y: H - 6, "text-anchor": "middle" }, m === 60 ? "now" : `−${60 - m} min`);
  }
  // The band: upper edge forward, lower edge back, one polygon per unbroken run.
  let run = [];
  const flush = () => {
    if (run.length > 1) {
      const pts = run.map((p) => `${x(p[0])},${y(p[4])}`).concat(run.slice().reverse().map((p) => `${x(p[0])},${y(p[3])}`));
      el("polygon", { points: pts.join(" "), class: "band" });
    }
    run = [];
  };
  for (const p of history) { if (p[3] === null) flush(); else run.push(p); }
  flush();
  el("polyline", { points: history.map((p) => `${x(p[0])},${y(p[1])}`).join(" "), class: "power", id: "power-line" });
  // Requested: a step line, broken where no request was active.
  let d = "", prev = null;
  for (const p of history) {
    if (p[2] === null) { prev = null; continue; }
    if (prev === null) d += `M${x(p[0])},${y(p[2])}`;
    else d += p[2] === prev[2] ? `H${x(p[0])}` : `H${x(p[0])}V${y(p[2])}`;
    prev = p;
  }
  if (d) el("path", { d, class: "req", id: "requested-line" });
}

async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function say(text) { $("answer").textContent = text; }

function answerLine(a) {
  let line = `${a.request_id} ${a.status}`;
  if (a.allocated_kw !== undefined) line += `: allocated ${kw(a.allocated_kw)}, ${a.vehicles || 0} vehicles`;
  if (a.reason) line += ` (${a.reason})`;
  return line;
}

async function amend(rid) {
  const power = prompt(`new fleet power (kW) for ${rid}; empty keeps it`);
  if (power === null) return;
  const duration = prompt("new duration from its start (e.g. 30m); empty keeps it");
  if (duration === null) return;
  const body = {};
  if (power !== "") body.power_kw = Number(power);
  if (duration !== "") body.duration = duration;
  try { say(answerLine(await post(`/api/dispatch/${encodeURIComponent(rid)}/amend`, body))); } catch (e) { say(`refused: ${e.message}`); }
}

async function cancel(rid) {
  if (!confirm(`cancel ${rid}?`)) return;
  try { say(answerLine(await post(`/api/dispatch/${encodeURIComponent(rid)}/cancel`))); } catch (e) { say(`refused: ${e.message}`); }
}

function showAuth() {
  $("readonly").hidden = !readOnly;
  $("login").hidden = readOnly || loggedIn;
  $("who").hidden = !loggedIn;
  $("send").hidden = !loggedIn;
}

async function whoami() {
  const me = await (await fetch("/api/whoami")).json();
  readOnly = me.read_only;
  loggedIn = me.logged_in;
  setText("prefix", me.topic_prefix);
  showAuth();
}

function connect() {
  const es = new EventSource("/api/events");
  es.onopen = () => { streaming = true; showLink(); };
  es.onerror = () => { streaming = false; showLink(); };
  es.onmessage = (ev) => render(JSON.parse(ev.data));
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try { await post("/api/login", { token: $("token").value }); $("token").value = ""; setText("loginmsg", ""); await whoami(); }
    catch (e) { setText("loginmsg", `login refused: ${e.message}`); }
  });
  $("logout").addEventListener("click", async () => { await post("/api/logout"); await whoami(); });
  $("request").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { service: $("service").value, duration: $("duration").value };
    for (const f of ["power_kw", "capacity_kw"]) if ($(f).value !== "") body[f] = Number($(f).value);
    for (const f of ["request_id", "start"]) if ($(f).value.trim() !== "") body[f] = $(f).value.trim();
    say("sending…");
    try { say(answerLine(await post("/api/dispatch", body))); } catch (e) { say(`refused: ${e.message}`); }
  });
  whoami().then(connect);
});
