// The Tandem dashboard: polls /api/v1/status every second and renders it.
//
// Data-driven: the chart draws whatever `activity.series` lists, the latency
// table whatever `phases` lists, and every entry of `sections` becomes a
// key/value panel of its own; the fixed panels are declared in PANELS. Every
// number shown is an element with data-field (a JSON Pointer into the status
// snapshot whose `seq` is on <body data-seq>) and data-format (how it is
// written), so a test can check the page against /api/v1/status?seq=N.
"use strict";

const POLL_MS = 1000;
const COLORS = ["#1a7f37", "#b42318", "#b54708", "#6941c6", "#175cd3", "#0e9384", "#c11574"];
const TOKEN_KEY = "tandem-api-token";

// ---------------------------------------------------------------- formatting

function fmt(value, format) {
  if (value === null || value === undefined) return "–";
  switch (format) {
    case "count": return Math.round(value).toLocaleString("en-US");
    case "ms": return value.toFixed(2);
    case "secs": return value.toFixed(1);
    case "pct": return (value * 100).toFixed(1) + "%";
    case "bool": return value ? "yes" : "no";
    case "time": return new Date(value).toLocaleTimeString("en-GB");
    case "text": return String(value);
    default: // auto
      if (typeof value === "number") {
        return Number.isInteger(value) ? value.toLocaleString("en-US") : value.toFixed(2);
      }
      if (typeof value === "boolean") return value ? "yes" : "no";
      return String(value);
  }
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function pointer(doc, path) {
  let v = doc;
  for (const part of path.split("/").slice(1)) {
    if (v === null || v === undefined) return undefined;
    v = v[part.replace(/~1/g, "/").replace(/~0/g, "~")];
  }
  return v;
}

// A value shown on the page, tied to its place in the snapshot.
function field(doc, path, format) {
  const e = document.createElement("span");
  e.dataset.field = path;
  e.dataset.format = format;
  e.textContent = fmt(pointer(doc, path), format);
  return e;
}

function kvTable(doc, rows) {
  const t = el("table");
  for (const [label, path, format, alert] of rows) {
    const value = pointer(doc, path);
    const tr = el("tr", {}, el("td", {}, label), el("td", {}, field(doc, path, format)));
    if (alert && alert(value)) tr.className = "bad";
    t.append(tr);
  }
  return t;
}

// ---------------------------------------------------------------- panels

let chart = null;
let chartIds = "";

function renderActivity(doc, body) {
  const a = doc.activity;
  const tiles = el("div", { class: "tiles" });
  a.series.forEach((s, i) => {
    tiles.append(el("div", { class: "tile" },
      el("div", { class: "value" }, field(doc, `/activity/series/${i}/total`, "count")),
      el("div", { class: "label" },
        el("span", { class: "swatch", style: `background:${COLORS[i % COLORS.length]}` }), s.label),
      el("div", { class: "sub" }, field(doc, `/activity/series/${i}/last_minute`, "count"),
        " in the last minute")));
  });
  tiles.append(el("div", { class: "tile" },
    el("div", { class: "value" }, field(doc, "/activity/success_ratio", "pct")),
    el("div", { class: "label" }, "success ratio"),
    el("div", { class: "sub" }, `commits / (commits + rollbacks), last ${a.window_secs} s`)));
  body.replaceChildren(tiles, chartBox(doc));
}

// The chart survives re-renders: only its data changes.
let chartDiv = null;
function chartBox(doc) {
  const a = doc.activity;
  if (!chartDiv) chartDiv = el("div", { id: "chart" });
  const ids = a.series.map((s) => s.id).join(",");
  const width = Math.max(320, (document.querySelector("main").clientWidth || 900) - 60);
  const data = [a.times_ms.map((t) => t / 1000), ...a.series.map((s) => s.per_sec)];
  if (typeof uPlot === "undefined") {
    chartDiv.textContent = "(chart library missing)";
    return chartDiv;
  }
  if (!chart || ids !== chartIds) {
    if (chart) chart.destroy();
    chartIds = ids;
    chart = new uPlot({
      width, height: 220,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      axes: [{}, { label: "per second", size: 60 }],
      series: [{}, ...a.series.map((s, i) => ({
        label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5,
        value: (u, v) => (v === null || v === undefined ? "–" : v.toFixed(1)),
      }))],
    }, data, chartDiv);
  } else {
    chart.setData(data);
    if (Math.abs(chart.width - width) > 20) chart.setSize({ width, height: 220 });
  }
  return chartDiv;
}

function renderPhases(doc, body) {
  const t = el("table", {}, el("tr", {}, ...["phase", "samples", "p50", "p95", "p99"].map((h) => el("th", {}, h))));
  doc.phases.forEach((p, i) => {
    t.append(el("tr", {}, el("td", {}, p.label),
      el("td", {}, field(doc, `/phases/${i}/count`, "count")),
      el("td", {}, field(doc, `/phases/${i}/p50_ms`, "ms")),
      el("td", {}, field(doc, `/phases/${i}/p95_ms`, "ms")),
      el("td", {}, field(doc, `/phases/${i}/p99_ms`, "ms"))));
  });
  body.replaceChildren(t);
}

function renderVerification(doc, body) {
  const v = doc.verification;
  const summary = kvTable(doc, [
    ["passes over the whole store", "/verification/passes", "count"],
    ["inconsistent scopes", "/verification/inconsistent_scopes", "count", (x) => x > 0],
    ["steps (pages of " + v.page_size + ")", "/verification/runs", "count"],
    ["failed steps", "/verification/failures", "count", (x) => x > 0],
  ]);
  const t = el("table", {}, el("tr", {}, ...["scope", "rows", "points", "missing", "orphans", "verified"].map((h) => el("th", {}, h))));
  v.scopes.forEach((s, i) => {
    const tr = el("tr", { class: s.consistent ? "" : "bad" },
      el("td", {}, field(doc, `/verification/scopes/${i}/scope`, "text")),
      el("td", {}, field(doc, `/verification/scopes/${i}/rows`, "count")),
      el("td", {}, field(doc, `/verification/scopes/${i}/points`, "count")),
      el("td", {}, field(doc, `/verification/scopes/${i}/missing`, "count")),
      el("td", {}, field(doc, `/verification/scopes/${i}/orphans`, "count")),
      el("td", {}, field(doc, `/verification/scopes/${i}/verified_at_ms`, "time")));
    t.append(tr);
  });
  const note = v.enabled
    ? (v.scopes.length ? "" : "no pass has completed yet")
    : "background verification is off";
  body.replaceChildren(summary, el("h3", {}, "last verification per scope"), t,
    el("p", { class: "muted" }, note));
}

const PANELS = [
  { id: "activity", title: "Writes and recovery per second", wide: true, render: renderActivity },
  { id: "phases", title: "Phase latency, last minute (ms)", render: renderPhases },
  {
    id: "intents", title: "Intents and recovery", rows: [
      ["live intents", "/backlog/live_intents", "count"],
      ["held by live sagas", "/backlog/held_intents", "count"],
      ["expired intents (recovery backlog)", "/backlog/expired_intents", "count", (x) => x > 0],
      ["oldest intent age, not held (s)", "/backlog/oldest_intent_age_secs", "secs"],
      ["recovery runs", "/recovery/runs", "count"],
      ["recovery failures", "/recovery/failures", "count", (x) => x > 0],
    ],
  },
  { id: "verification", title: "Verification", render: renderVerification },
  {
    id: "http", title: "HTTP API", rows: [
      ["requests", "/http/requests", "count"],
      ["client errors (4xx)", "/http/client_errors", "count"],
      ["server errors (5xx)", "/http/server_errors", "count", (x) => x > 0],
      ["writes in flight", "/http/writes_in_flight", "count"],
    ],
  },
];

function panel(id, title, wide) {
  let p = document.getElementById("panel-" + id);
  if (!p) {
    p = el("section", { id: "panel-" + id, class: "panel" + (wide ? " wide" : "") },
      el("h2", {}, title), el("div", { class: "body" }));
    document.getElementById("panels").append(p);
  }
  return p.querySelector(".body");
}

// ---------------------------------------------------------------- page

function render(doc) {
  document.body.dataset.seq = String(doc.seq);
  document.getElementById("seq").textContent = String(doc.seq);
  const s = doc.service;
  document.getElementById("service").replaceChildren(
    `v${s.version} · up `, field(doc, "/service/uptime_secs", "secs"), " s",
    s.shutting_down ? " · shutting down" : "");
  const stores = document.getElementById("stores");
  stores.replaceChildren(...doc.stores.map((st, i) => {
    const li = el("li", { class: st.reachable ? "up" : "down", title: st.error || "reachable" },
      `${st.role}: ${st.name} — `, field(doc, `/stores/${i}/reachable`, "bool"));
    return li;
  }));
  for (const p of PANELS) {
    const body = panel(p.id, p.title, p.wide);
    if (p.render) p.render(doc, body);
    else body.replaceChildren(kvTable(doc, p.rows));
  }
  const seen = new Set(PANELS.map((p) => "panel-" + p.id));
  doc.sections.forEach((sec, i) => {
    seen.add("panel-section-" + sec.id);
    const body = panel("section-" + sec.id, sec.title, false);
    body.replaceChildren(kvTable(doc, sec.rows.map((r, j) =>
      [r.label, `/sections/${i}/rows/${j}/value`, "auto", () => r.alert])));
  });
  for (const p of [...document.querySelectorAll("section.panel")]) {
    if (!seen.has(p.id)) p.remove();
  }
}

function token() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

async function poll() {
  const t = token();
  const headers = t ? { Authorization: "Bearer " + t } : {};
  try {
    const r = await fetch("api/v1/status", { headers, cache: "no-store" });
    if (r.status === 401) {
      document.getElementById("auth").hidden = false;
      document.getElementById("auth-error").textContent = t ? "the token was refused" : "";
      return;
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    document.getElementById("auth").hidden = true;
    document.getElementById("error").textContent = "";
    render(await r.json());
  } catch (e) {
    document.getElementById("error").textContent = " · cannot reach the service: " + e.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  document.getElementById("token").value = "";
});

poll();
