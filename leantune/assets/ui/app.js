// leantune ui: the guide, the planner and the runs. Vanilla JS, no dependencies; charts are SVG drawn here.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const SVGNS = "http://www.w3.org/2000/svg";
const GiB = 2 ** 30, MiB = 2 ** 20;

function h(tag, attrs = {}, ...kids) {           // an element with attributes and children (text is escaped)
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v); else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat(Infinity)) if (kid !== null && kid !== undefined) el.append(kid.nodeType ? kid : String(kid));
  return el;
}
function s(tag, attrs = {}, text) {               // an SVG element
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}
const bytes = n => n == null ? "-" : n >= GiB ? (n / GiB).toFixed(1) + " GiB" : (n / MiB).toFixed(0) + " MiB";
const num = (x, d = 4) => x == null ? "-" : Number(x).toFixed(d);
async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  const err = body.error && (body.error.message || body.error);  // ours: a string; the OpenAI API's: {message}
  if (!r.ok) throw new Error(err || `${r.status} ${r.statusText}`);
  return body;
}

// ---- tabs (the URL hash picks one, so the back button and links work) ------------------------------------
const TABS = ["guide", "planner", "runs", "chat"];
function showTab() {
  const tab = TABS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "guide";
  for (const t of TABS) {
    $("#" + t).hidden = t !== tab;
    const a = $(`nav a[data-tab=${t}]`);
    if (t === tab) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (tab === "runs") loadRuns().then(() => { if (OPEN.length) openRuns(OPEN); });  // polling resumes on return
  if (tab === "chat") loadChat();
}
window.addEventListener("hashchange", showTab);

// ---- guide ----------------------------------------------------------------------------------------------
let GUIDE = null, FILTER = "all";
async function loadGuide() {
  GUIDE = await getJSON("/api/guide");
  const f = $("#filters");
  for (const [key, label] of [["all", "All"], ...Object.entries(GUIDE.categories)]) {
    f.append(h("button", { type: "button", "data-filter": key, "aria-pressed": String(key === "all"),
      onclick: () => setFilter(key) }, label));
  }
  const tbody = $("#compare tbody"), cards = $("#cards");
  for (const t of GUIDE.techniques) {
    tbody.append(h("tr", { "data-category": t.category, "data-id": t.id },
      h("th", { scope: "row" }, h("button", { type: "button", onclick: () => openCard(t.id, true) }, t.name)),
      h("td", {}, h("span", { class: "badge" }, GUIDE.categories[t.category])),
      h("td", {}, t.trainable), h("td", {}, t.memory),
      h("td", {}, h("span", { class: "stars", "aria-label": `${t.quality} of 5` }, "★".repeat(t.quality) + "☆".repeat(5 - t.quality))),
      h("td", { class: "opt" }, t.best_for)));
    cards.append(card(t));
  }
}
function card(t) {
  const bodyId = "body-" + t.id;
  const list = (tag, items) => h(tag, {}, items.map(x => h("li", {}, x)));
  const body = h("div", { class: "body", id: bodyId, hidden: true },
    h("div", { class: "wide" }, h("h4", {}, "How it works"), list("ol", t.how)),
    h("div", {}, h("h4", {}, "Use cases"), list("ul", t.use_cases)),
    h("div", {}, h("h4", {}, "Limitations"), list("ul", t.limitations)),
    h("div", { class: "wide" }, h("h4", {}, "In leantune"), h("pre", {}, h("code", {}, t.command))),
    t.measured ? h("p", { class: "wide measured" }, h("strong", {}, "Measured: "), t.measured[0], " (", t.measured[1], ")") : null,
    h("p", { class: "wide" }, "Paper: ", h("a", { href: t.paper[1], rel: "noreferrer" }, t.paper[0])));
  return h("article", { class: "card", id: "card-" + t.id, "data-category": t.category },
    h("h3", {}, h("button", { type: "button", "aria-expanded": "false", "aria-controls": bodyId,
      onclick: e => toggle(e.currentTarget) },
      t.name, h("span", { class: "badge" }, GUIDE.categories[t.category]), h("span", { class: "sum" }, t.summary))),
    body);
}
function toggle(btn, open) {
  const want = open ?? btn.getAttribute("aria-expanded") !== "true";
  btn.setAttribute("aria-expanded", String(want));
  document.getElementById(btn.getAttribute("aria-controls")).hidden = !want;
}
function openCard(id, focus) {
  const btn = $(`#card-${id} h3 button`);
  toggle(btn, true);
  if (focus) { btn.focus(); btn.scrollIntoView({ block: "start" }); }
}
function setFilter(key) {
  FILTER = key;
  for (const b of document.querySelectorAll("#filters button")) b.setAttribute("aria-pressed", String(b.dataset.filter === key));
  for (const el of document.querySelectorAll("#compare tbody tr, #cards .card"))
    el.hidden = key !== "all" && el.dataset.category !== key;
}

// ---- planner --------------------------------------------------------------------------------------------
const PARTS = [  // the pieces of a predicted peak, in stacking order
  ["weights", "weights", "var(--c1)"], ["trainable", "trainable", "var(--c3)"], ["optimizer", "optimizer state", "var(--c2)"],
  ["step", "step working set (activations, loss chunk, temporaries, or gradients: the larger phase)", "var(--c4)"],
  ["runtime", "runtime (CPU: the process)", "var(--c5)"]];
function parts(e) {
  const step = Math.max(0, e.peak - e.weights - e.trainable - e.optimizer - e.runtime);
  return { weights: e.weights, trainable: e.trainable, optimizer: e.optimizer, step, runtime: e.runtime };
}
async function loadGpus() {
  const gpus = await getJSON("/api/gpus");
  $("#gpu-list").replaceChildren(...gpus.map(g => h("option", { value: g.name })), h("option", { value: "24GB" }), h("option", { value: "80GB" }));
}
async function submitPlan(ev) {
  ev.preventDefault();
  const f = new FormData($("#plan-form"));
  const body = Object.fromEntries(f.entries());
  const err = $("#plan-error"), out = $("#plan-out"), btn = $("#plan-submit");
  err.hidden = true; btn.disabled = true; btn.textContent = "Planning…";
  try {
    renderPlan(await getJSON("/api/plan", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
  } catch (e) {
    err.textContent = e.message; err.hidden = false; out.replaceChildren();
  } finally { btn.disabled = false; btn.textContent = "Plan"; }
}
function renderPlan(p) {
  const out = $("#plan-out"), rec = p.recommendation, usable = p.device.usable_bytes;
  const m = p.model;
  out.replaceChildren(
    h("p", {}, `${m.name} (${m.model_type}, ${(m.params / 1e9).toFixed(2)}B parameters, ${m.layers} layers) on `,
      h("strong", {}, p.device.name), `: ${bytes(p.device.memory_bytes)}, ${bytes(usable)} usable; ${p.batch} × ${p.seq} tokens per micro-batch.`),
    h("p", { id: "plan-verdict", class: "verdict " + (rec ? "ok" : "bad") }, rec ? "Fits: " + p.reason : "Does not fit: " + p.reason),
    h("ul", { class: "legend", "aria-label": "legend" }, PARTS.map(([, label, c]) => h("li", {}, h("i", { style: `background:${c}` }), label)),
      h("li", {}, h("i", { style: "background:var(--bad)" }), "the GPU's usable memory")),
    planChart(p));
}
function planChart(p) {
  const rows = p.rows, usable = p.device.usable_bytes;
  // drawn at the width it is shown at, so its 11 px text stays 11 px from a phone to a wide screen
  const W = Math.max(340, Math.min(1000, $("#plan-out").clientWidth || 760));
  const left = Math.min(250, Math.round(W * 0.36)), right = 96, rowH = 20, top = 24;
  const fit = t => t.length * 6.2 > left - 8 ? t.slice(0, Math.floor((left - 8) / 6.2) - 1) + "…" : t;
  const H = top + rows.length * rowH + 10;
  const max = Math.max(usable, ...rows.map(r => r.peak)) * 1.02;
  const x = v => left + (W - left - right) * v / max;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", id: "plan-chart",
    "aria-label": `predicted peak memory of ${rows.length} configurations against ${bytes(usable)} usable` });
  rows.forEach((r, i) => {
    const y = top + i * rowH, label = r.setup.label + (r.setup.checkpointing ? " · ckpt" : "");
    const name = s("text", { x: left - 6, y: y + 13, "text-anchor": "end" }, fit(label));
    name.append(s("title", {}, label));
    svg.append(name);
    let at = 0;
    const pr = parts(r);
    for (const [key, name, color] of PARTS) {
      const v = pr[key]; if (v <= 0) continue;
      const rect = s("rect", { x: x(at), y: y + 3, width: Math.max(0.5, x(at + v) - x(at)), height: rowH - 6, fill: color,
        opacity: r.fits ? 1 : 0.45 });
      rect.append(s("title", {}, `${label}: ${name} ${bytes(v)}`));
      svg.append(rect); at += v;
    }
    svg.append(s("text", { x: x(r.peak) + 4, y: y + 13, class: r.fits ? "fits" : "oom", "data-row": i },
      `${bytes(r.peak)} ${r.fits ? "fits" : "OOM"}`));
  });
  svg.append(s("line", { x1: x(usable), x2: x(usable), y1: top - 6, y2: H - 4, stroke: "var(--bad)", "stroke-width": 2, "stroke-dasharray": "4 3", id: "gpu-line" }));
  svg.append(s("text", { x: Math.max(4, Math.min(x(usable) - 40, W - 150)), y: top - 10, fill: "var(--bad)" }, `${p.device.name}: ${bytes(usable)}`));
  return svg;
}

// ---- runs -----------------------------------------------------------------------------------------------
let RUNS = [], OPEN = [], POLL = null;
async function loadRuns() {
  let data;
  try { data = await getJSON("/api/runs"); } catch (e) { $("#runs-root").textContent = e.message; return; }
  RUNS = data.runs;
  $("#runs-root").textContent = data.note || `${RUNS.length} run${RUNS.length === 1 ? "" : "s"} under ${data.root}. Running runs refresh every 2 seconds.`;
  $("#runs-table tbody").replaceChildren(...RUNS.map(r => h("tr", { "data-id": r.id },
    h("th", { scope: "row" }, h("button", { type: "button", onclick: () => openRuns([r.id]) }, r.id)),
    h("td", { class: "status-" + r.status }, r.status), h("td", {}, r.method + (r.quant_bits ? ` (${r.quant_bits}-bit base)` : "")),
    h("td", {}, String(r.model || "-").split("/").slice(-2).join("/")),
    h("td", {}, r.total_steps ? `${r.steps} / ${r.total_steps}` : r.steps), h("td", {}, num(r.train_loss)), h("td", {}, num(r.eval_loss)))));
  for (const [sel, k] of [["#cmp-a", 0], ["#cmp-b", 1]]) {
    const el = $(sel), keep = el.value;
    el.replaceChildren(...RUNS.map(r => h("option", { value: r.id }, r.id)));
    el.value = RUNS.some(r => r.id === keep) ? keep : (RUNS[k] || RUNS[0] || {}).id || "";
  }
  if (!OPEN.length && RUNS.length) openRuns([RUNS[0].id]);
}
async function openRuns(ids) {
  OPEN = ids;
  clearTimeout(POLL);
  const details = await Promise.all(ids.map(id => getJSON("/api/runs/" + encodeURI(id)).catch(e => ({ id, error: e.message }))));
  const panels = $("#run-panels");
  panels.replaceChildren(...details.map(runPanel));
  if (details.length === 2 && !details.some(d => d.error)) {
    panels.prepend(h("div", { class: "panel", style: "grid-column:1/-1" }, h("h3", {}, "Training loss, both runs"),
      lossChart(details.map((d, i) => ({ name: d.id, points: d.train, color: i ? "var(--c2)" : "var(--c1)" })), "compare-chart")));
  }
  if (details.some(d => d.status === "running" || d.status === "starting"))
    POLL = setTimeout(() => { if (!$("#runs").hidden) { loadRuns(); openRuns(OPEN); } }, 2000);
}
function runPanel(d) {
  if (d.error) return h("div", { class: "panel error" }, d.error);
  const series = [{ name: "train loss", points: d.train, color: "var(--c1)" }];
  if (d.eval.length) series.push({ name: "eval loss", points: d.eval, color: "var(--c2)", dots: true });
  const facts = [["status", d.status], ["model", d.model], ["method", d.method + (d.quant_bits ? `, ${d.quant_bits}-bit base` : "")],
    ["batch", `${d.batch_size ?? "-"} × ${d.grad_accum ?? 1} accumulation, ${d.max_length ?? "-"} tokens`],
    ["steps", d.total_steps ? `${d.steps} / ${d.total_steps}` : d.steps], ["train loss", num(d.train_loss)], ["eval loss", num(d.eval_loss)],
    ["output", d.output ? `${d.id}/${d.output}` : "not yet"]];
  return h("article", { class: "panel run", "data-run": d.id },
    h("h3", {}, d.id),
    h("dl", {}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "-")])),
    h("h4", {}, "Loss"), d.train.length ? lossChart(series, "loss-" + d.id) : h("p", {}, "no steps logged yet"),
    memoryBlock(d), fitBlock(d.fit), dataBlock(d.data_report),
    h("h4", {}, "Checkpoints"), d.checkpoints.length ? h("ul", {}, d.checkpoints.map(c => h("li", {}, `${c.name} (${bytes(c.bytes)})`))) : h("p", {}, "none"));
}
function memoryBlock(d) {
  const m = d.memory;
  if (!m) return h("p", {}, "memory: measured after the first step");
  const rows = [["base weights", m.mem_base_weights_bytes, "var(--c1)"], ["trainable", m.mem_trainable_bytes, "var(--c3)"],
    ["gradients", m.mem_gradients_bytes, "var(--c6)"], ["optimizer state", m.mem_optimizer_state_bytes, "var(--c2)"],
    ["saved activations", m.mem_activations_bytes, "var(--c4)"]];
  const max = Math.max(m.mem_peak_bytes || 0, ...rows.map(r => r[1] || 0)) || 1;
  const W = chartWidth(), left = 130, rowH = 18, H = (rows.length + 1) * rowH + 4;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "memory breakdown", class: "memory" });
  [["peak", m.mem_peak_bytes, "var(--fg)"], ...rows].forEach(([name, v, c], i) => {
    const y = i * rowH + 2;
    svg.append(s("text", { x: left - 6, y: y + 12, "text-anchor": "end" }, name.length > 22 ? name.slice(0, 21) + "…" : name));
    svg.append(s("rect", { x: left, y: y + 2, width: Math.max(0.5, (W - left - 70) * (v || 0) / max), height: rowH - 5, fill: c }));
    svg.append(s("text", { x: left + (W - left - 70) * (v || 0) / max + 4, y: y + 12 }, bytes(v)));
  });
  return h("div", {}, h("h4", {}, "Memory, measured on the first step"), svg,
    h("p", { class: "note" }, `peak: ${m.mem_peak_source || "-"}; the parts are what the first step held, measured separately`));
}
function fitBlock(fit) {
  if (!fit) return null;
  const err = fit.measured_peak_bytes && fit.predicted_peak_bytes ? (100 * (fit.predicted_peak_bytes / fit.measured_peak_bytes - 1)).toFixed(1) + "%" : "-";
  return h("div", { class: "fit" }, h("h4", {}, "auto_fit"),
    h("p", {}, `${fit.choice}: predicted peak ${bytes(fit.predicted_peak_bytes)}, measured ${bytes(fit.measured_peak_bytes)} (error ${err}) of ${bytes(fit.budget_bytes)}`));
}
function dataBlock(r) {
  if (!r) return null;
  const scalars = Object.entries(r).filter(([, v]) => v !== null && typeof v !== "object").slice(0, 12);
  return h("details", {}, h("summary", {}, "Data report"),
    h("dl", {}, scalars.map(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v))])));
}
function chartWidth() {  // the width a panel's chart is shown at (panels sit side by side above ~960 px)
  const total = $("#run-panels").clientWidth || 480;
  return Math.max(300, Math.min(720, (OPEN.length > 1 && total > 960 ? total / 2 : total) - 40));
}
function lossChart(series, id) {
  const W = chartWidth(), H = Math.round(Math.min(260, W * 0.5)), L = 48, R = 12, T = 10, B = 28;
  const pts = series.flatMap(x => x.points);
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]).filter(Number.isFinite);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = v => L + (W - L - R) * (v - x0) / (x1 - x0), Y = v => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "loss-chart", "data-chart": id,
    "aria-label": series.map(x => `${x.name}: ${x.points.length} points, last ${num(x.points.at(-1)?.[1])}`).join("; ") });
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "var(--line)" }), s("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "var(--line)" }));
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4, sx = Math.round(x0 + (x1 - x0) * i / 4);
    svg.append(s("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end" }, v.toFixed(3)));
    svg.append(s("text", { x: X(sx), y: H - B + 14, "text-anchor": "middle" }, sx));
  }
  svg.append(s("text", { x: W - R, y: H - 2, "text-anchor": "end" }, "step"));
  series.forEach((x, i) => {
    if (!x.points.length) return;
    const d = x.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: x.color, "stroke-width": 1.8, class: "series" }));
    if (x.dots || x.points.length === 1) for (const p of x.points) svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: x.color }));
    svg.append(s("text", { x: W - R - 4, y: T + 12 + 14 * i, "text-anchor": "end", fill: x.color }, x.name));
  });
  return svg;
}

async function startRun(ev) {
  ev.preventDefault();
  const body = Object.fromEntries(new FormData($("#start-form")).entries()), msg = $("#start-msg");
  try {
    const r = await getJSON("/api/runs/start", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    msg.className = ""; msg.textContent = `started ${r.id} (pid ${r.pid}); it is listed once its model has loaded. Console: ${r.log}`;
    const wait = async (n) => { await loadRuns(); if (n > 0 && !RUNS.some(x => x.id === r.id)) setTimeout(() => wait(n - 1), 2000); else if (n > 0) openRuns([r.id]); };
    wait(150);
  } catch (e) { msg.className = "error"; msg.textContent = e.message; }
}

// ---- chat: /v1/* on this page is proxied to `leantune serve` (the key stays on the ui server) ------------
let CHAT = [];                                    // the conversation: [{role, content}]
async function loadChat(given) {
  const info = given || await getJSON("/api/chat");
  $("#chat-setup").hidden = !!info.server;
  $("#connect-form").hidden = !info.can_set;
  if (info.server) $("#connect-url").value = info.server;
  $("#chat-form").hidden = !info.server;
  if (!info.server) {
    $("#chat-server").textContent = "The Chat tab talks to a `leantune serve` server.";
    $("#chat-commands").textContent = info.commands.join("\n");
    document.body.setAttribute("data-chat", "none");
    return;
  }
  $("#chat-server").textContent = `Server: ${info.server} (through this page's /v1 proxy)`;
  try {
    const models = (await getJSON("/v1/models")).data.map(m => m.id);
    const sel = $("#chat-model"), keep = sel.value;
    sel.replaceChildren(...models.map(m => h("option", { value: m }, m)));
    if (models.includes(keep)) sel.value = keep;
    $("#chat-error").hidden = true;
    document.body.setAttribute("data-chat", "ready");
  } catch (e) { chatError(e.message); }
}
function chatError(msg) { const el = $("#chat-error"); el.textContent = msg; el.hidden = false; }
function chatBubble(role, text) {
  const li = h("li", { class: "msg " + role }, h("span", { class: "who" }, role === "user" ? "You" : $("#chat-model").value), h("div", { class: "text" }, text));
  $("#chat-log").append(li);
  return $(".text", li);
}
async function sendChat(ev) {
  ev.preventDefault();
  const input = $("#chat-input"), text = input.value.trim();
  if (!text) return;
  $("#chat-error").hidden = true;
  CHAT.push({ role: "user", content: text });
  chatBubble("user", text);
  input.value = "";
  const out = chatBubble("assistant", "");
  out.parentElement.setAttribute("aria-busy", "true");
  $("#chat-send").disabled = true;
  const body = { model: $("#chat-model").value, messages: CHAT, stream: true,
                 temperature: Number($("#chat-temp").value), max_tokens: Number($("#chat-max").value) };
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && (err.error.message || err.error)) || `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {                                      // server-sent events: "data: {json}" lines, then "data: [DONE]"
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      const lines = buf.split("\n");
      buf = lines.pop();
      for (const ln of lines) {
        if (!ln.startsWith("data:")) continue;
        const data = ln.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { reply += delta.content; out.textContent = reply; }
      }
    }
    CHAT.push({ role: "assistant", content: reply });
    out.parentElement.setAttribute("data-done", "true");
  } catch (e) {
    chatError(e.message);
    CHAT.pop();
    out.parentElement.remove();
  } finally {
    out.parentElement.removeAttribute("aria-busy");
    $("#chat-send").disabled = false;
    input.focus();
  }
}
async function connectChat(ev) {
  ev.preventDefault();
  const key = $("#connect-key");
  try {
    const info = await getJSON("/api/chat", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ server: $("#connect-url").value, api_key: key.value }) });
    key.value = "";                                 // the ui server holds it now; the page forgets it
    await loadChat(info);
    $("#chat-model").focus();
  } catch (e) { chatError(e.message); }
}
function clearChat() { CHAT = []; $("#chat-log").replaceChildren(); $("#chat-error").hidden = true; $("#chat-input").focus(); }

// ---- start ----------------------------------------------------------------------------------------------
$("#chat-form").addEventListener("submit", sendChat);
$("#chat-clear").addEventListener("click", clearChat);
$("#connect-form").addEventListener("submit", connectChat);
$("#chat-input").addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#chat-form").requestSubmit(); });
$("#plan-form").addEventListener("submit", submitPlan);
$("#start-form").addEventListener("submit", startRun);
$("#cmp-go").addEventListener("click", () => {
  const a = $("#cmp-a").value, b = $("#cmp-b").value;
  if (a && b) openRuns(a === b ? [a] : [a, b]);
});
showTab();
loadGuide().then(() => document.body.setAttribute("data-ready", "guide"));
loadGpus();
