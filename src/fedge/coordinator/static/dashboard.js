// fedge dashboard: polls /v1/admin/dashboard every 2 s and draws it. No libraries, no CDN.
// Everything from devices (ids, messages, reasons) goes in with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const PHASE_COLORS = ["#0969da", "#8250df", "#1a7f37", "#bc4c00", "#cf222e", "#6e7781", "#9a6700"];

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function token() { return sessionStorage.getItem("fedge-admin-token") || ""; }

async function fetchData() {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch("/v1/admin/dashboard", { headers, cache: "no-store" });
  if (response.status === 401) { const body = await response.json(); throw { login: true, detail: body.detail }; }
  if (!response.ok) throw new Error("HTTP " + response.status);
  return response.json();
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function fmt(value, digits, unit) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return value.toFixed(digits) + (unit || "");
  return String(value);
}

function drawFleet(data) {
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren();
  for (const d of data.fleet) {
    const r = d.readings || {};
    const row = el("tr", { class: d.online ? "" : "offline", "data-device": d.device });
    row.append(el("td", {}, d.device));
    row.append(el("td", {}, d.last_seen ? ago(data.now - d.last_seen) : "never"));
    row.append(el("td", {}, d.revoked ? "revoked" : d.eligible ? "eligible" : d.online ? "online" : "offline"));
    row.append(el("td", {}, d.version || "–"));
    const ok = d.policy === "ok";
    row.append(el("td", { class: "reason " + (d.policy ? (ok ? "ok" : "no") : "") }, d.policy || "–"));
    row.append(el("td", {}, r.cpu_load === undefined ? "–" : Math.round(r.cpu_load * 100) + "%"));
    row.append(el("td", {}, fmt(r.memory_available_mb, 0, " MB")));
    row.append(el("td", {}, r.battery_percent === undefined ? (r.on_ac === undefined ? "–" : "AC")
      : Math.round(r.battery_percent) + "%" + (r.on_ac ? " (AC)" : "")));
    row.append(el("td", {}, fmt(r.temperature_c, 0, " °C")));
    row.append(el("td", {}, fmt(r.examples_per_s, 0)));
    body.append(row);
  }
  const online = data.fleet.filter((d) => d.online).length;
  document.getElementById("fleet-count").textContent = `${data.fleet.length} devices, ${online} online`;
}

function lineChart(svg, points, label) {
  svg.replaceChildren();
  const W = 400, H = 200, L = 44, B = 24, T = 10, R = 10;
  if (points.length === 0) { svg.append(el("svg:text", { x: L, y: H / 2, class: "muted" }, "no data yet")); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(el("svg:line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d0d7de" }));
  svg.append(el("svg:line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d0d7de" }));
  svg.append(el("svg:text", { x: 2, y: T + 10, "font-size": 11 }, y1.toFixed(3)));
  svg.append(el("svg:text", { x: 2, y: H - B, "font-size": 11 }, y0.toFixed(3)));
  svg.append(el("svg:text", { x: W - R - 70, y: H - 6, "font-size": 11 }, `round ${x1}`));
  const d = points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
  svg.append(el("svg:path", { d, fill: "none", stroke: "#0969da", "stroke-width": 2 }));
  for (const p of points) {
    svg.append(el("svg:circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: "#0969da", class: "point" }));
  }
  svg.setAttribute("aria-label", label);
}

function drawTimeline(data) {
  const svg = document.getElementById("timeline");
  svg.replaceChildren();
  const rounds = data.rounds.slice(-60);
  const W = 800, H = 160, B = 20;
  if (rounds.length === 0) { svg.append(el("svg:text", { x: 10, y: 80 }, "no round has ended yet")); return; }
  const phaseNames = [...new Set(rounds.flatMap((r) => Object.keys(r).filter((k) => k.startsWith("phase_"))))];
  const longest = Math.max(...rounds.map((r) => r.duration_s || 0), 1e-3);
  const w = W / rounds.length;
  rounds.forEach((r, i) => {
    const x = i * w, h = ((r.duration_s || 0) / longest) * (H - B - 4);
    const title = `round ${r.round} attempt ${r.attempt}: ${r.state}, ${fmt(r.duration_s, 2, " s")}, ` +
      `${r.reported}/${r.invited} reported`;
    if (phaseNames.length && r.state === "complete") {
      let y = H - B;
      phaseNames.forEach((name, k) => {
        const ph = ((r[name] || 0) / longest) * (H - B - 4);
        y -= ph;
        const rect = el("svg:rect", { x: x + 1, y, width: Math.max(w - 2, 1), height: ph, fill: PHASE_COLORS[k % 7] });
        rect.append(el("svg:title", {}, `${title}; ${name.slice(6)}: ${fmt(r[name], 3, " s")}`));
        svg.append(rect);
      });
    } else {
      const fill = r.state === "complete" ? "#0969da" : r.state === "abandoned" ? "#cf222e" : "#8c959f";
      const rect = el("svg:rect", { x: x + 1, y: H - B - h, width: Math.max(w - 2, 1), height: h, fill });
      rect.append(el("svg:title", {}, title));
      svg.append(rect);
    }
  });
  svg.append(el("svg:text", { x: 0, y: H - 4, "font-size": 11 }, `round ${rounds[0].round}`));
  svg.append(el("svg:text", { x: W - 80, y: H - 4, "font-size": 11 }, `round ${rounds[rounds.length - 1].round}`));
  document.getElementById("phases-legend").textContent = phaseNames.length
    ? "phases: " + phaseNames.map((n) => n.slice(6).replace(/_s$/, "")).join(", ")
    : `bar height: round duration (longest ${longest.toFixed(2)} s); red: abandoned`;
}

function drawPrivacy(data) {
  const box = document.getElementById("privacy");
  if (!data.privacy) return;
  box.replaceChildren();
  const p = data.privacy;
  const spent = p.epsilon || 0, budget = p.budget;
  box.append(el("p", {}, `ε spent ${spent.toFixed(3)} at δ = ${p.delta}` + (budget ? ` of a budget of ${budget}` : "")));
  if (budget) {
    const bar = el("div", { class: "bar" });
    const fill = el("div", {});
    fill.style.width = Math.min(100, (100 * spent) / budget).toFixed(1) + "%";
    bar.append(fill);
    box.append(bar);
  }
  if (p.stopped) box.append(el("p", { class: "error" }, p.stopped));
}

function drawRefusals(data) {
  const list = document.getElementById("refusals");
  list.replaceChildren();
  const entries = Object.entries(data.refusals || {});
  if (entries.length === 0) list.append(el("li", { class: "muted" }, "none"));
  for (const [code, n] of entries) list.append(el("li", {}, `${code}: ${n}`));
}

function drawEvents(data) {
  const body = document.querySelector("#events tbody");
  body.replaceChildren();
  for (const e of data.events.slice().reverse()) {
    const row = el("tr", { class: e.level === "info" ? "" : "no" });
    row.append(el("td", {}, new Date(e.received_at * 1000).toLocaleTimeString()));
    row.append(el("td", {}, e.device));
    row.append(el("td", {}, e.kind));
    row.append(el("td", { class: "reason" }, e.message));
    body.append(row);
  }
  if (data.events.length === 0) {
    const row = el("tr", {});
    row.append(el("td", { colspan: 4, class: "muted" }, "no events"));
    body.append(row);
  }
}

function draw(data) {
  const state = document.getElementById("state");
  state.textContent = data.state;
  state.className = "pill " + data.state;
  document.getElementById("progress").textContent =
    `${data.rounds_complete} of ${data.rounds_target} rounds` +
    (data.open ? `; round ${data.open.round}: ${data.open.reported}/${data.open.invited} reported` : "");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  drawFleet(data);
  const evaluated = data.rounds.filter((r) => r.state === "complete");
  lineChart(document.getElementById("accuracy"),
    evaluated.filter((r) => typeof r.accuracy === "number").map((r) => [r.round, r.accuracy]), "accuracy");
  lineChart(document.getElementById("loss"),
    evaluated.filter((r) => typeof r.loss === "number").map((r) => [r.round, r.loss]), "loss");
  drawTimeline(data);
  drawPrivacy(data);
  drawRefusals(data);
  drawEvents(data);
}

async function poll() {
  try {
    const data = await fetchData();
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    draw(data);
  } catch (error) {
    if (error && error.login) {
      document.getElementById("main").hidden = true;
      document.getElementById("login").hidden = false;
      document.getElementById("login-error").textContent = token() ? error.detail : "";
    } else {
      document.getElementById("updated").textContent = "cannot reach the coordinator; retrying";
    }
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("fedge-admin-token", document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
});

poll();
