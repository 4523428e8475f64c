// The vcomp dashboard: polls GET /api/v1/dashboard and draws it.
// Every string that comes from the server (agent names, error text) is written with
// textContent, never as markup. The token, if any, comes from the URL's #token=...
// (a fragment never reaches a server's logs) and goes out only in the Authorization header.
"use strict";

const POLL_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";

function token() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  return params.get("token");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function cell(row, text, cls) {
  row.appendChild(el("td", text, cls));
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const ago = Math.max(0, Date.now() / 1000 - seconds);
  if (ago < 60) return Math.round(ago) + " s ago";
  if (ago < 3600) return Math.round(ago / 60) + " min ago";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function replaceRows(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function drawBatches(batches) {
  const rows = batches.map((b) => {
    const tr = el("tr");
    tr.dataset.batch = String(b.batch);
    const finished = b.counts.done + b.counts.failed;
    cell(tr, b.batch, "num");
    cell(tr, b.app + " v" + b.version);
    const td = el("td");
    const bar = el("progress");
    bar.max = b.jobs;
    bar.value = finished;
    td.appendChild(bar);
    const pct = b.jobs ? Math.floor((100 * finished) / b.jobs) : 100;
    td.appendChild(el("span", finished + "/" + b.jobs + " (" + pct + "%)", "pct"));
    tr.appendChild(td);
    cell(tr, b.counts.done, "num");
    cell(tr, b.counts.failed, "num");
    cell(tr, b.counts.leased, "num");
    cell(tr, b.counts.queued, "num");
    return tr;
  });
  replaceRows("#batches", rows);
  document.getElementById("no-batches").hidden = rows.length > 0;
}

function drawFailures(failures) {
  const rows = failures.map((f) => {
    const tr = el("tr");
    cell(tr, f.batch, "num");
    cell(tr, "#" + f.index, "num");
    cell(tr, f.reason, "reason");
    cell(tr, when(f.finished));
    return tr;
  });
  replaceRows("#failures", rows);
  document.getElementById("no-failures").hidden = rows.length > 0;
}

function drawAgents(agents) {
  const rows = agents.map((a) => {
    const tr = el("tr");
    tr.dataset.agent = a.id;
    cell(tr, a.name, "name");
    cell(tr, a.id.slice(0, 16), "id");
    cell(tr, a.connected ? "online" : "offline", a.connected ? "online" : "offline");
    cell(tr, when(a.last_seen));
    cell(tr, a.jobs_done, "num");
    cell(tr, a.cpu_seconds.toFixed(1), "num");
    return tr;
  });
  replaceRows("#agents", rows);
}

function drawGraph(throughput) {
  const counts = throughput.results;
  const slot = throughput.slot_seconds;
  const rates = counts.map((n) => n / slot);
  const width = 900, height = 160, left = 44, bottom = 18;
  const top = Math.max(1, ...rates);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "jobs per second, last 15 minutes");
  const plotW = width - left, plotH = height - bottom;
  const barW = plotW / rates.length;
  rates.forEach((r, i) => {
    const h = (r / top) * (plotH - 4);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("class", "bar");
    rect.setAttribute("x", String(left + i * barW));
    rect.setAttribute("y", String(plotH - h));
    rect.setAttribute("width", String(Math.max(1, barW - 1)));
    rect.setAttribute("height", String(h));
    svg.appendChild(rect);
  });
  const axis = document.createElementNS(SVG, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", String(left));
  axis.setAttribute("x2", String(width));
  axis.setAttribute("y1", String(plotH));
  axis.setAttribute("y2", String(plotH));
  svg.appendChild(axis);
  const label = (x, y, text, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", String(x));
    t.setAttribute("y", String(y));
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.appendChild(t);
  };
  label(left - 4, 12, top.toFixed(top < 10 ? 1 : 0) + "/s", "end");
  label(left - 4, plotH, "0", "end");
  label(left, height - 3, "-15 min", "start");
  label(width, height - 3, "now", "end");
  document.getElementById("graph").replaceChildren(svg);
  const lastMinute = counts.slice(-Math.max(1, Math.round(60 / slot)));
  const rate = lastMinute.reduce((a, b) => a + b, 0) / (lastMinute.length * slot);
  document.getElementById("rate-now").textContent = rate.toFixed(rate < 10 ? 1 : 0);
}

function draw(data) {
  document.getElementById("agents-online").textContent = String(data.agents_online);
  document.getElementById("agents-enrolled").textContent = String(data.agents_enrolled);
  drawGraph(data.throughput);
  drawBatches(data.batches);
  drawFailures(data.failures);
  drawAgents(data.agents);
  const state = document.getElementById("state");
  state.className = "state";
  state.textContent = "updated " + new Date(data.generated * 1000).toISOString().slice(11, 19) + " UTC";
}

async function poll() {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const state = document.getElementById("state");
  try {
    const response = await fetch("/api/v1/dashboard", { headers, cache: "no-store" });
    const body = await response.json();
    if (response.status === 401) {
      throw new Error("a read token is needed: open this page as /#token=TOKEN (" + body.message + ")");
    }
    if (!response.ok) throw new Error(body.message || response.statusText);
    draw(body);
  } catch (err) {
    state.className = "state error";
    state.textContent = "cannot load: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
