// evo ui: every page is a shell filled from /api and refreshed when the event relay
// (/api/stream, server-sent events) says something it shows has changed. Read-only.
"use strict";

const body = document.body;
const PAGE = body.dataset.page, JOB = body.dataset.job, SWEEP = body.dataset.sweep;
window.evoLoadedAt = Date.now(); // a reload would reset it: the tests check it does not

// --- helpers --------------------------------------------------------------------------------
async function api(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k ?? ""));
  return e;
}
function fill(table, rows, cells) {
  const tb = document.querySelector(table + " tbody");
  tb.replaceChildren(...rows.map(r => {
    const tr = el("tr");
    for (const c of cells(r)) tr.append(c instanceof Node ? el("td", {}, c) : el("td", {text: c ?? ""}));
    return tr;
  }));
}
const link = (href, text) => el("a", {href}, text);
const jobLink = id => id ? link("/jobs/" + encodeURIComponent(id), id) : "";
const sweepLink = id => id ? link("/sweeps/" + encodeURIComponent(id), id) : "";
function when(t) { return t ? new Date(t * 1000).toLocaleString() : ""; }
let serverNow = null; // the server's clock, when a page has it (the browser's may differ)
function ago(t) { return t ? secs((serverNow ?? Date.now() / 1000) - t) + " ago" : ""; }
function secs(s) {
  if (s == null) return "";
  if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 5400) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}
const num = v => v == null ? "" : typeof v !== "number" ? String(v)
  : (Math.abs(v) >= 1000 || Number.isInteger(v) ? String(v) : v.toPrecision(4));
function chips(id, entries) {
  document.getElementById(id).replaceChildren(...entries.map(([k, v]) =>
    el("span", {class: "chip", "data-key": k}, el("b", {}, k), " ", String(v))));
}
function plot(id, traces, layout) {
  Plotly.react(id, traces, Object.assign({margin: {t: 10, r: 10, b: 40, l: 50}, height: 240,
    showlegend: traces.length > 1, legend: {orientation: "h"}}, layout || {}),
    {displaylogo: false, responsive: true});
}
function byKey(rows, key) {
  const out = new Map();
  for (const r of rows) { if (!out.has(r[key])) out.set(r[key], []); out.get(r[key]).push(r); }
  return out;
}

// --- live: the relay, with each page's refresh debounced -------------------------------------
// One refresh at a time: asked again while one runs, it runs once more after it, so the last
// answer painted is always for the page's current filters (never an older request's).
let refresh = async () => {}, touches = () => true, timer = null, onEvent = null;
let busy = false, again = false;
async function update() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    do { again = false; try { await refresh(); } catch (e) { console.error(e); } } while (again);
  } finally { busy = false; }
}
function schedule() { // events come in bursts: at most one refresh a second from them
  if (!timer) timer = setTimeout(() => { timer = null; update(); }, 1000);
}
function connect() {
  const live = document.getElementById("live");
  const src = new EventSource("/api/stream");
  src.onopen = () => { live.textContent = "live"; live.className = "on"; };
  src.onerror = () => { live.textContent = "reconnecting"; live.className = "off"; };
  // closed when the page goes, so a browser's few connections per host (six) are not held
  // by pages left behind; a page brought back from the history joins again
  window.addEventListener("pagehide", () => src.close(), {once: true});
  src.onmessage = m => {
    const ev = JSON.parse(m.data);
    if (ev.type === "BrokerAway") { live.textContent = "broker away"; live.className = "off"; live.title = ev.error; return; }
    if (ev.type === "BrokerBack") { live.textContent = "live"; live.className = "on"; live.title = ""; update(); return; }
    document.getElementById("seq").textContent = "seq " + ev.seq;
    if (onEvent) onEvent(ev);
    if (touches(ev)) schedule();
  };
}

// --- pages ----------------------------------------------------------------------------------
const pages = {};

pages.overview = async () => {
  const d = await api("/api/overview");
  serverNow = d.now;
  chips("counts", Object.entries(d.counts).sort());
  fill("#nodes", d.nodes, n => [n.node, el("span", {class: "state " + n.state, text: n.state}),
    n.alive ? ago(n.drained_since) : ago(n.since), n.alive && n.heard_s != null ? secs(n.heard_s) + " ago" : "",
    `${n.running} / ${n.slots}`, (n.labels || []).join(","), num(n.cpus), num(n.mem_gb), num(n.gpus),
    n.busy_fraction == null ? "" : (100 * n.busy_fraction).toFixed(0) + "%", num(n.jobs_completed),
    n.ends_in_s == null ? "" : secs(n.ends_in_s)]);
  fill("#queue", d.queue, r => [jobLink(r.job_id), sweepLink(r.sweep_id), r.name || r.model_type || "",
    num(r.priority), num(r.attempts), r.why]);
  const series = (rows, y) => [...byKey(rows, "node")].map(([node, rs]) =>
    ({name: node, x: rs.map(r => new Date(r.t * 1000)), y: rs.map(r => r[y]), mode: "lines", type: "scatter"}));
  plot("cpu", series(d.cpu, "cpu"), {yaxis: {range: [0, 100]}});
  plot("mem", series(d.mem || d.cpu, "mem"), {yaxis: {range: [0, 100]}});
  if (d.gpu.length) {
    plot("gpu", series(d.gpu, "util"), {yaxis: {range: [0, 100]}});
    plot("vram", series(d.gpu, "vram_gb"));
  } else { // no node has reported a GPU: no empty axes
    for (const id of ["gpu", "vram"]) { Plotly.purge(id); document.getElementById(id).replaceChildren(el("p", {class: "note"}, "no GPU samples from any node in the last hour")); }
  }
};
pages.overview.touches = () => true;

function filterForm(onChange) {
  const form = document.getElementById("filters");
  const params = new URLSearchParams(location.search);
  for (const f of form.elements) if (params.get(f.name)) f.value = params.get(f.name);
  form.addEventListener("change", () => onChange(form));
  form.addEventListener("submit", e => { e.preventDefault(); onChange(form); });
  return form;
}
function formQuery(form, extra) {
  const qs = new URLSearchParams();
  for (const f of form.elements) if (f.name && f.value) qs.set(f.name, f.value);
  for (const [k, v] of Object.entries(extra || {})) qs.set(k, v);
  return qs;
}
function options(select, values, current) {
  const keep = current ?? select.value;
  const key = JSON.stringify(values);
  if (select.dataset.values === key && select.value === (keep || "")) return; // an open list stays open
  select.dataset.values = key;
  select.replaceChildren(el("option", {value: ""}, "any"), ...values.map(v => el("option", {value: v}, v)));
  if (keep && !values.includes(keep)) select.append(el("option", {value: keep}, keep));
  select.value = keep || "";
}

let jobsPage = 0;
const size = Number(new URLSearchParams(location.search).get("size")) || 0; // rows per page
pages.jobs = async () => {
  const form = pages.jobs.form || (pages.jobs.form = filterForm(f => { jobsPage = 0;
    history.replaceState(null, "", "?" + formQuery(f, size ? {size} : {})); update(); }));
  if (pages.jobs.first === undefined) {
    pages.jobs.first = true;
    jobsPage = Math.max(0, Math.floor(Number(new URLSearchParams(location.search).get("page")) || 0));
    const pick = new URLSearchParams(location.search);
    for (const f of form.elements) if (f.name) f.dataset.want = pick.get(f.name) || "";
    document.getElementById("prev").onclick = () => { if (jobsPage > 0) { jobsPage--; update(); } };
    document.getElementById("next").onclick = () => { jobsPage++; update(); };
  }
  const qs = formQuery(form, {page: jobsPage, ...(size ? {size} : {})});
  for (const f of form.elements) if (f.name && !f.value && f.dataset.want) qs.set(f.name, f.dataset.want);
  const d = await api("/api/jobs?" + qs);
  for (const f of form.elements) if (f.name) { options(f, d.options[f.name] || [], f.value || f.dataset.want); f.dataset.want = ""; }
  jobsPage = d.page; // as the server clamped it
  const first = d.total ? d.page * d.size + 1 : 0, last = Math.min((d.page + 1) * d.size, d.total);
  document.getElementById("range").textContent = `${first}-${last} of ${d.total}`;
  document.getElementById("next").disabled = last >= d.total;
  document.getElementById("prev").disabled = d.page === 0;
  fill("#jobs", d.rows, r => [jobLink(r.job_id), sweepLink(r.sweep_id), r.what || "", r.model_type || "",
    el("span", {class: "state " + r.state, text: r.state}), r.node || "", num(r.attempts),
    when(r.submitted_at), secs(r.duration_s)]);
};
pages.jobs.touches = ev => ev.job_id != null;

function curveTraces(curves, label) { // a line per job, metric and attempt (a retry starts over)
  const out = [], epochs = new Map();
  for (const c of curves) { const k = c.job_id; if (!epochs.has(k)) epochs.set(k, new Set()); epochs.get(k).add(c.lease_epoch); }
  const attempt = c => epochs.get(c.job_id).size > 1 ? ` (lease ${c.lease_epoch})` : "";
  for (const [key, rs] of byKey(curves.map(c => ({...c, key: (label ? c.job_id + " " : "") + c.name + attempt(c)})), "key"))
    out.push({name: key, x: rs.map(r => r.step), y: rs.map(r => r.value), mode: "lines+markers", type: "scatter"});
  return out;
}

pages.job = async () => {
  const d = await api("/api/jobs/" + encodeURIComponent(JOB));
  if (d.error) { document.getElementById("what").textContent = d.error; return; }
  const j = d.job;
  const st = document.getElementById("state"); st.textContent = j.state; st.className = "state " + j.state;
  document.getElementById("what").replaceChildren(
    j.sweep_id ? el("span", {}, "sweep ", sweepLink(j.sweep_id), " · ") : "",
    (j.name || j.callable || j.trainer || (j.command || []).join(" ") || ""),
    j.model_type ? " · " + j.model_type : "", j.node ? " · on " + j.node : "",
    j.duration_s ? " · took " + secs(j.duration_s) : "", j.error ? el("div", {class: "err"}, j.error) : "");
  chips("metrics", Object.entries(j.metrics || {}).map(([k, v]) => [k, num(v)]));
  plot("curves", curveTraces(d.curves, false), {xaxis: {title: {text: "step"}}, height: 300});
  fill("#attempts", d.attempts, a => [num(a.attempt), a.node || "", (a.devices || []).join(","), when(a.leased_at),
    when(a.started_at), when(a.ended_at), a.outcome || "", a.exit_code ?? "", a.error || ""]);
  document.getElementById("stdout").textContent = d.output.stdout || "(no output)";
  document.getElementById("stderr").textContent = d.output.stderr || "";
  fill("#checkpoints", d.checkpoints, c => [num(c.seq), c.step ?? "", c.path || "", num(c.size),
    (c.digest || "").slice(0, 16)]);
  const env = (d.attempts.length && d.attempts[d.attempts.length - 1].env) || {};
  document.getElementById("fingerprints").textContent = JSON.stringify(
    {...d.fingerprints, seed: j.seed, environment: env}, null, 2);
  document.getElementById("commands").textContent = d.commands.join("\n");
  document.getElementById("spec").textContent = JSON.stringify(j.spec, null, 2);
};
pages.job.touches = ev => ev.job_id === JOB;

pages.sweeps = async () => {
  const d = await api("/api/sweeps");
  fill("#sweeps", d.rows, s => [sweepLink(s.sweep_id), s.name || "", s.method || "grid",
    el("span", {class: "state " + s.state, text: s.state}), num(s.jobs), num(s.queued), num(s.running),
    num(s.completed), num(s.failed), num(s.pruned), s.metric ? `${s.metric} (${s.mode || "auto"})` : "",
    jobLink(s.best_job)]);
};
pages.sweeps.touches = () => true;

// Parallel coordinates, drawn as SVG: a line per trial (the best `top` of the leaderboard),
// an axis per parameter and one for the metric; a parameter searched on a log range gets a
// log axis, a list of choices a categorical one.
function axisOf(name, values, space) {
  const dim = space[name];
  const numeric = values.every(v => typeof v === "number");
  if (!numeric || Array.isArray(dim) && !dim.every(v => typeof v === "number")) {
    const cats = Array.isArray(dim) ? dim.map(String) : [...new Set(values.map(String))].sort();
    for (const v of values) if (!cats.includes(String(v))) cats.push(String(v)); // not in the space (edited)
    return {name, kind: "categorical", ticks: cats, pos: v => cats.length < 2 ? 0.5 : cats.indexOf(String(v)) / (cats.length - 1)};
  }
  const log = !!(dim && !Array.isArray(dim) && dim.log);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (dim && !Array.isArray(dim) && dim.low != null) { lo = Math.min(lo, dim.low); hi = Math.max(hi, dim.high); }
  const f = log ? Math.log10 : (x => x);
  const a = f(lo), b = f(hi);
  const pos = v => b === a ? 0.5 : (f(v) - a) / (b - a);
  const ticks = [];
  if (log) { for (let e = Math.floor(a); e <= Math.ceil(b); e++) { const t = 10 ** e; if (t >= lo * 0.999 && t <= hi * 1.001) ticks.push(t); } }
  if (ticks.length < 2) ticks.splice(0, ticks.length, ...(hi === lo ? [lo] : log ? [lo, hi] : [0, 1, 2, 3, 4].map(k => lo + (hi - lo) * k / 4)));
  return {name, kind: log ? "log" : "linear", ticks, pos};
}
function parallel(svg, rows, space, metric, lowerBetter) {
  if (!rows.length) { svg.replaceChildren(); return; } // nothing ranked yet
  const NS = "http://www.w3.org/2000/svg";
  const W = svg.clientWidth || 960, H = svg.clientHeight || 320, top = 30, bottom = 30;
  if (new Set(rows.map(r => r.model_type)).size > 1) // a comparison of models: the model is a dimension
    rows = rows.map(r => ({...r, params: {model_type: r.model_type, ...r.params}}));
  const names = [...new Set(rows.flatMap(r => Object.keys(r.params)))].filter(n => rows.every(r => n in r.params));
  const axes = names.map(n => axisOf(n, rows.map(r => r.params[n]), space));
  const m = axisOf(metric, rows.map(r => r.value), {});
  if (lowerBetter) { const up = m.pos; m.pos = v => 1 - up(v); m.name = metric; } // the best on top
  axes.push(m);
  const x = i => 60 + i * (W - 120) / Math.max(axes.length - 1, 1);
  const y = p => top + (1 - p) * (H - top - bottom);
  const mk = (tag, attrs, text) => { const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text != null) e.textContent = text; return e; };
  svg.replaceChildren();
  const vals = rows.map(r => r.value), vlo = Math.min(...vals), vhi = Math.max(...vals);
  const shade = v => { let t = vhi === vlo ? 1 : (v - vlo) / (vhi - vlo); if (lowerBetter) t = 1 - t;
    return `hsl(${(210 - 170 * t).toFixed(0)}, 70%, ${(60 - 15 * t).toFixed(0)}%)`; };
  const lines = mk("g", {class: "lines"});
  for (const r of [...rows].reverse()) { // the best drawn last, on top
    const pts = axes.map((a, i) => `${x(i).toFixed(1)},${y(a.pos(i === axes.length - 1 ? r.value : r.params[a.name])).toFixed(1)}`);
    const path = mk("polyline", {points: pts.join(" "), class: "pc-line", stroke: shade(r.value), "data-job": r.job_id});
    path.append(mk("title", {}, `#${r.rank} ${r.job_id}: ${metric}=${num(r.value)}`));
    lines.append(path);
  }
  svg.append(lines);
  axes.forEach((a, i) => {
    const g = mk("g", {class: "axis", "data-axis": a.name, "data-kind": a.kind});
    g.append(mk("line", {x1: x(i), x2: x(i), y1: y(0), y2: y(1)}));
    g.append(mk("text", {x: x(i), y: 16, "text-anchor": "middle", class: "axis-name"},
      a.name + (a.kind === "log" ? " (log)" : "") + (i === axes.length - 1 ? (lowerBetter ? " ↓ better" : " ↑ better") : "")));
    for (const t of a.ticks) g.append(mk("text", {x: x(i) + 4, y: y(a.pos(t)) + 4, class: "tick"}, typeof t === "number" ? num(t) : t));
    svg.append(g);
  });
}

let ticked = new Set();
pages.sweep = async () => {
  const top = document.getElementById("top");
  if (!pages.sweep.bound) {
    pages.sweep.bound = true;
    const form = document.getElementById("pcform");
    form.addEventListener("change", () => update());
    form.addEventListener("submit", e => { e.preventDefault(); update(); });
    document.getElementById("report").onclick = writeReport;
  }
  const d = await api(`/api/sweeps/${encodeURIComponent(SWEEP)}?top=${Number(top.value) || 50}`);
  if (d.error) { document.getElementById("name").textContent = d.error; return; }
  const s = d.sweep;
  document.getElementById("name").textContent = s.name || "";
  const st = document.getElementById("state"); st.textContent = s.state; st.className = "state " + s.state;
  chips("progress", [["method", d.method], ["metric", `${d.metric} (${d.mode || "auto"})`],
    ["jobs", s.jobs], ["queued", s.queued], ["running", s.running], ["completed", s.completed],
    ["failed", s.failed], ["pruned", s.pruned || 0]]);
  parallel(document.getElementById("pc"), d.leaderboard, d.space, d.metric, d.lower_is_better);
  document.getElementById("pcnote").textContent = `${d.leaderboard.length} of ${d.ranked} ranked trials drawn`;
  document.getElementById("pruning").hidden = !d.pruner; // before drawing: it sets the widths
  const valued = d.convergence.filter(r => r.value != null);
  plot("convergence", [{name: "trial", x: valued.map(r => r.trial), y: valued.map(r => r.value), mode: "markers", type: "scatter", opacity: 0.5},
    {name: "best so far", x: d.convergence.map(r => r.trial), y: d.convergence.map(r => r.best), mode: "lines", type: "scatter", line: {shape: "hv"}}],
    {xaxis: {title: {text: "trial, in the order asked"}}, yaxis: {title: {text: d.metric}}});
  if (d.pruner) plot("pruned", [{x: d.pruned.map(r => String(r.resource)), y: d.pruned.map(r => r.n), type: "bar", name: "pruned"}],
    {xaxis: {title: {text: "resource (reports) at the pruner's decision"}, type: "category"}});
  fill("#board", d.leaderboard, r => {
    const box = el("input", {type: "checkbox", "data-job": r.job_id});
    box.checked = ticked.has(r.job_id);
    box.onchange = () => { box.checked ? ticked.add(r.job_id) : ticked.delete(r.job_id); drawTicked(); };
    return [box, num(r.rank), jobLink(r.job_id), num(r.value),
      [...(r.model_type ? [["model", r.model_type]] : []), ...Object.entries(r.params)].map(([k, v]) => `${k}=${num(v)}`).join(" ")];
  });
  document.getElementById("commands").textContent = d.commands.join("\n");
  await drawTicked();
};
async function writeReport() {
  const note = document.getElementById("reportnote");
  note.textContent = "writing...";
  let d;
  try {
    const r = await fetch(`/api/sweeps/${encodeURIComponent(SWEEP)}/report`, {method: "POST"});
    d = await r.json();
  } catch (e) { d = {error: String(e)}; }
  note.textContent = d.error || (d.notes || []).join("; ");
  document.getElementById("reportfiles").replaceChildren(...(d.files || []).map(f =>
    el("li", {}, link(f, f.split("/").slice(3).join("/")))));
}
async function drawTicked() {
  const ids = [...ticked];
  const d = ids.length ? await api("/api/curves?jobs=" + ids.map(encodeURIComponent).join(",")) : {curves: []};
  plot("curves", curveTraces(d.curves, true), {xaxis: {title: {text: "step"}}, height: 300});
}
pages.sweep.touches = ev => ev.sweep_id === SWEEP || ev.job_id != null;

pages.events = async () => {
  const form = pages.events.form || (pages.events.form = filterForm(f => {
    history.replaceState(null, "", "?" + formQuery(f)); update(); }));
  const want = new URLSearchParams(location.search).get("type") || "";
  const d = await api("/api/events?" + formQuery(form, form.elements.type.value ? {} : (want ? {type: want} : {})));
  options(form.elements.type, d.types, form.elements.type.value || want);
  const kept = [...document.querySelectorAll("#events tbody tr.new")] // come by the stream, and
    .filter(tr => Number(tr.dataset.seq) > (d.rows.length ? d.rows[0].seq : 0)); // newer than the answer
  fill("#events", d.rows, eventCells);
  document.querySelector("#events tbody").prepend(...kept);
};
function eventCells(e) {
  return [num(e.seq), when(e.time), e.type, jobLink(e.job_id), e.node || "", sweepLink(e.sweep_id)];
}
pages.events.touches = () => false; // the tail grows from the stream itself
pages.events.onEvent = ev => {
  const form = pages.events.form;
  if (!form) return;
  if (form.elements.type.value && ev.type !== form.elements.type.value) return;
  if (form.elements.job.value && ev.job_id !== form.elements.job.value) return;
  const tb = document.querySelector("#events tbody");
  const tr = el("tr", {class: "new", "data-seq": ev.seq});
  for (const c of eventCells(ev)) tr.append(c instanceof Node ? el("td", {}, c) : el("td", {text: c ?? ""}));
  tb.prepend(tr);
  while (tb.rows.length > 500) tb.deleteRow(-1);
};

// --- start ----------------------------------------------------------------------------------
const current = pages[PAGE];
if (current) {
  refresh = current;
  touches = current.touches || (() => true);
  onEvent = current.onEvent || null;
  update();
}
connect();
window.addEventListener("pageshow", e => { if (e.persisted) { connect(); update(); } });
