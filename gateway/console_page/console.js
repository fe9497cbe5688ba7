// pdgate ops console: polls GET /admin/console/state about once a second and draws it.
// Plain JavaScript, no framework, no build step. Everything the gateway sends is put in the page
// as text (textContent), never as markup.
"use strict";

const STATE_URL = "/admin/console/state";
const TOKEN_KEY = "pdgate.console.adminKey";
// how often the page asks: ?interval_ms=N in the page's URL (200 ms to a minute), else every second
const POLL_MS = pollInterval(new URLSearchParams(window.location.search).get("interval_ms"));
const SVG_NS = "http://www.w3.org/2000/svg";

let timer = null;
let lastUpdate = 0;

// ------------------------------------------------------------------ helpers
function pollInterval(asked) {
  const ms = Number(asked);
  return asked && Number.isFinite(ms) ? Math.min(60000, Math.max(200, ms)) : 1000;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fill(container, ...children) {
  container.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || ""), text });
}

// badges side by side, a space between them (as text too: copied or read aloud, they stay words)
function badges(...items) {
  const present = items.filter((b) => b !== null && b !== undefined);
  return el("span", {}, ...present.flatMap((b, i) => (i ? [" ", b] : [b])));
}

function pct(value, digits) {
  if (value === null || value === undefined) return "–";
  return (value * 100).toFixed(digits === undefined ? 0 : digits) + " %";
}

function num(value, digits) {
  if (value === null || value === undefined) return "–";
  return digits ? Number(value).toFixed(digits) : String(value);
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 120) return seconds.toFixed(0) + " s";
  if (seconds < 7200) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

// ------------------------------------------------------------------ status and auth
function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

function askForKey(message) {
  const form = document.getElementById("auth");
  document.getElementById("auth-message").textContent = message;
  form.hidden = false;
  document.getElementById("token").focus();
  setStatus("auth", "admin key needed");
}

function onKeySubmitted(event) {
  event.preventDefault();
  const input = document.getElementById("token");
  const key = input.value.trim();
  if (!key) return;
  sessionStorage.setItem(TOKEN_KEY, key);
  input.value = "";
  document.getElementById("auth").hidden = true;
  setStatus("connecting", "connecting…");
  poll();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return { message: body.error.message, code: body.error.code };
  } catch (err) {
    return { message: "HTTP " + response.status, code: null };
  }
}

// ------------------------------------------------------------------ polling
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms === undefined ? POLL_MS : ms);
}

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(TOKEN_KEY);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  let response;
  try {
    response = await fetch(STATE_URL, { headers, cache: "no-store" });
  } catch (err) {
    setStatus("error", "gateway unreachable");
    schedule(2 * POLL_MS);
    return;
  }
  if (response.status === 401) {
    const error = await errorMessage(response);
    if (error.code === "invalid_api_key") {
      sessionStorage.removeItem(TOKEN_KEY);
      askForKey(key ? "That key was refused: enter the admin key again." : "This gateway's admin API needs its key (admin.api_key).");
      return; // polling resumes when a key is entered
    }
    setStatus("error", error.message);
    schedule(5 * POLL_MS);
    return;
  }
  if (!response.ok) {
    const error = await errorMessage(response);
    setStatus("error", error.message);
    schedule(response.status === 403 ? 5 * POLL_MS : 2 * POLL_MS);
    return;
  }
  let state;
  try {
    state = await response.json();
  } catch (err) {
    setStatus("error", "the gateway's answer was not JSON");
    schedule(2 * POLL_MS);
    return;
  }
  render(state);
  lastUpdate = Date.now();
  setStatus("live", "live · " + clock(state.time));
  schedule();
}

// a tab left in the background may stop its timers: say when what is shown is old
setInterval(() => {
  if (lastUpdate && Date.now() - lastUpdate > 5 * POLL_MS && document.getElementById("status").dataset.state === "live") {
    setStatus("stale", "stale · no update for " + Math.round((Date.now() - lastUpdate) / 1000) + " s");
  }
}, POLL_MS);

// ------------------------------------------------------------------ rendering
function render(state) {
  const meta = ["pdgate " + state.version];
  if (state.replica) meta.push("replica " + state.replica);
  if (state.uptime_s !== null && state.uptime_s !== undefined) meta.push("up " + duration(state.uptime_s));
  document.getElementById("meta").textContent = meta.join(" · ");
  renderSummary(state);
  renderInstances(state.instances);
  renderHistory(state.requests);
  renderQueue(state.queue);
  renderEvents(state.events);
  renderPlan(state.plan);
}

// Kubernetes discovery, when it is on: the pods it serves, and what is wrong if anything is
function discoveryCard(discovery) {
  if (!discovery || !discovery.enabled) return [];
  const problems = Object.keys(discovery.problems || {}).length;
  let note = discovery.synced ? (problems ? problems + " pod(s) cannot join" : "watching " + discovery.pods + " pod(s)") : "not listed yet";
  if (discovery.last_error) note = "API: " + discovery.last_error;
  return [card("discovery", "Pods discovered", String((discovery.managed || []).length), note)];
}

function card(name, label, value, note) {
  return el("div", { class: "card", "data-card": name },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", text: value }),
    el("div", { class: "note", text: note || "" }));
}

function renderSummary(state) {
  const instances = state.instances;
  const healthy = instances.filter((i) => i.healthy).length;
  const draining = instances.filter((i) => i.draining).length;
  const total = state.requests.total;
  const buckets = state.requests.buckets;
  const last = buckets.length > 1 ? buckets[buckets.length - 2] : buckets[buckets.length - 1];
  const minutes = Math.round(state.requests.span_s / 60);
  fill(document.getElementById("summary"),
    card("instances", "Instances healthy", healthy + " / " + instances.length, draining ? draining + " draining" : "none draining"),
    card("queue", "Waiting at the gateway", String(state.queue.total), "at most " + state.queue.max_per_model + " per model"),
    card("attainment", "SLO attainment (" + minutes + " min)", pct(total.attainment, 1), total.met + " of " + total.judged + " streamed within SLO"),
    card("goodput", "Goodput (last " + state.requests.bucket_s + " s)", num(last.goodput_rps, 2) + " req/s", "window: " + num(total.goodput_rps, 2) + " req/s"),
    card("finished", "Finished (" + minutes + " min)", String(total.finished), total.rejected + " rejected by admission"),
    ...discoveryCard(state.discovery));
}

function renderInstances(instances) {
  const body = document.querySelector("#instances tbody");
  if (!instances.length) {
    fill(body, el("tr", {}, el("td", { colspan: 10, class: "empty", text: "No instances." })));
    return;
  }
  fill(body, ...instances.map(instanceRow));
}

function instanceRow(inst) {
  const load = inst.load || {};
  const role = inst.role === "flex"
    ? badges(badge("flex", "role-flex"), badge("serving " + inst.serving, "role-" + inst.serving))
    : badge(inst.role, "role-" + inst.role);
  const status = badges(
    inst.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad"),
    inst.circuit && inst.circuit !== "closed" ? badge("circuit " + inst.circuit, "warn") : null,
    inst.draining ? badge("draining", "warn") : null);
  if (inst.last_error && !inst.healthy) status.title = inst.last_error;
  const engine = load.running === null || load.running === undefined ? "–" : load.running + " / " + load.waiting;
  const kv = load.kv_usage;
  const kvCell = kv === null || kv === undefined
    ? el("span", { class: "sub", text: "no recent scrape" })
    : el("span", {}, kvBar(kv), pct(kv));
  const prefix = inst.prefix_tokens || { queried: 0, hit: 0 };
  const streams = inst.streams || { total: 0, moving: 0 };
  const classes = [inst.draining ? "draining" : "", inst.healthy ? "" : "unhealthy"].join(" ").trim();
  return el("tr", { "data-instance": inst.id, class: classes || null },
    el("td", { "data-field": "id" }, el("div", { text: inst.id }), el("div", { class: "sub", text: inst.url || "" })),
    el("td", { "data-field": "model", text: inst.model }),
    el("td", { "data-field": "role" }, role),
    el("td", { "data-field": "kind", text: inst.kind }),
    el("td", { "data-field": "status" }, status),
    el("td", { "data-field": "engine", class: "num", text: engine }),
    el("td", { "data-field": "inflight", class: "num", text: (load.prefill_inflight || 0) + " / " + (load.decode_inflight || 0) }),
    el("td", { "data-field": "kv" }, kvCell),
    el("td", { "data-field": "prefix", class: "num", title: prefix.hit + " of " + prefix.queried + " prompt tokens", text: pct(inst.prefix_hit_rate) }),
    el("td", { "data-field": "streams", class: "num", text: streams.total + (streams.moving ? " (" + streams.moving + " moving)" : "") }));
}

function kvBar(usage) {
  const bar = el("span", { class: "bar" + (usage >= 0.95 ? " full" : usage >= 0.8 ? " high" : "") }, el("span"));
  bar.firstChild.style.width = Math.max(0, Math.min(100, usage * 100)).toFixed(1) + "%";
  return bar;
}

function renderHistory(history) {
  const minutes = Math.round(history.span_s / 60);
  document.getElementById("slo-window").textContent = "last " + minutes + " min, " + history.bucket_s + "-s buckets";
  const buckets = history.buckets;
  const width = 600, height = 130, left = 34, right = 34, top = 8, bottom = 18;
  const plotW = width - left - right, plotH = height - top - bottom;
  const peak = Math.max(0.5, ...buckets.map((b) => b.goodput_rps));
  const step = plotW / Math.max(1, buckets.length);
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "SLO attainment and goodput" });
  chart.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left + plotW, y2: top }));
  chart.append(svg("text", { class: "label", x: 2, y: top + 8 }, num(peak, peak < 10 ? 1 : 0) + "/s"));
  chart.append(svg("text", { class: "label", x: 2, y: top + plotH }, "0"));
  chart.append(svg("text", { class: "label", x: left + plotW + 4, y: top + 8 }, "100%"));
  chart.append(svg("text", { class: "label", x: left + plotW + 4, y: top + plotH }, "0%"));
  chart.append(svg("text", { class: "label", x: left, y: height - 4 }, "−" + minutes + " min"));
  chart.append(svg("text", { class: "label", x: left + plotW - 20, y: height - 4 }, "now"));
  const points = [];
  buckets.forEach((b, i) => {
    const x = left + i * step;
    const h = (b.goodput_rps / peak) * plotH;
    const bar = svg("rect", { class: "goodput", x: x + 1, y: top + plotH - h, width: Math.max(1, step - 2), height: h });
    bar.append(svg("title", {}, clock(b.start) + ": " + b.finished + " finished, " + b.met + "/" + b.judged + " within SLO, " + b.rejected + " rejected"));
    chart.append(bar);
    if (b.attainment !== null) points.push([x + step / 2, top + (1 - b.attainment) * plotH]);
  });
  if (points.length > 1) chart.append(svg("polyline", { class: "attainment", points: points.map((p) => p.join(",")).join(" ") }));
  for (const [x, y] of points) chart.append(svg("circle", { class: "point", cx: x, cy: y, r: 2.5 }));
  fill(document.getElementById("slo-chart"), chart);
}

function renderQueue(queue) {
  const container = document.getElementById("queue");
  if (!queue.models.length) {
    fill(container, el("p", { class: "empty", text: "Nothing has waited yet: every request was placed at once." }));
    return;
  }
  const rows = queue.models.map((m) => el("tr", { "data-model": m.model },
    el("td", { text: m.model }),
    el("td", { class: "num", "data-field": "length", text: m.length }),
    el("td", { class: "num", text: m.length ? m.oldest_wait_s.toFixed(2) + " s" : "–" }),
    el("td", { text: m.by_priority.map((p) => "p" + p.priority + ": " + p.length).join(", ") || "–" }),
    el("td", { text: m.by_tenant.map((t) => (t.tenant || "(none)") + ": " + t.length).join(", ") || "–" })));
  fill(container,
    el("table", {},
      el("thead", {}, el("tr", {}, ...["Model", "Waiting", "Oldest", "By priority", "By tenant"].map((h, i) => el("th", { class: i === 1 || i === 2 ? "num" : null, text: h })))),
      el("tbody", {}, ...rows)),
    el("p", { class: "sub", text: queue.total + " waiting in all; at most " + queue.max_per_model + " per model (admission.max_queue)" }));
}

function renderEvents(events) {
  const list = document.getElementById("events");
  if (!events.length) {
    fill(list, el("li", { class: "empty", text: "No migrations or role changes yet." }));
    return;
  }
  fill(list, ...events.map((e) => el("li", { "data-kind": e.kind, class: e.ok ? null : "failed" },
    el("time", { text: clock(e.time) }), " ",
    badge(e.kind === "role" ? "role change" : "migration", "kind-" + e.kind), " ",
    el("span", { class: "detail", text: e.detail }), " ",
    el("span", { class: "reason", text: "(" + e.reason + ")" }))));
}

function renderPlan(plan) {
  const container = document.getElementById("plan");
  if (!plan.enabled) {
    fill(container, el("p", { class: "empty", text: "The role balancer is off (role_balancer.enabled)." }));
  } else if (!plan.data.length) {
    fill(container, el("p", { class: "empty", text: "No plan yet: the balancer plans once it has measured the demand on models with flex instances." }));
  } else {
    fill(container, el("table", {},
      el("thead", {}, el("tr", {}, ...["Model", "Planned P / D", "Prefill now", "Utilisation P / D", "Forecast", "Move"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...plan.data.flatMap((p) => [
        el("tr", { "data-model": p.model },
          el("td", { text: p.model }),
          el("td", { "data-field": "split", text: p.prefill + " / " + p.decode }),
          el("td", { text: p.current_prefill }),
          el("td", { text: pct(p.prefill_utilisation) + " / " + pct(p.decode_utilisation) }),
          el("td", { text: num(p.forecast.prefill_work_s_per_s, 2) + " prefill s/s · " + num(p.forecast.decode_streams, 1) + " streams" }),
          el("td", { text: p.move ? p.move.instance + " → " + p.move.role : "none" })),
        el("tr", { class: "reason-row" }, el("td", { colspan: 6, class: "sub", text: p.reason })),
      ]))));
  }
  const scaling = plan.scaling || { enabled: false, data: [] };
  const target = document.getElementById("scaling");
  document.getElementById("scaling-title").hidden = !scaling.enabled;
  if (!scaling.enabled) {
    fill(target, el("p", { class: "empty", text: "The scaling plan is off (scaling.enabled)." }));
  } else if (!scaling.data.length) {
    fill(target, el("p", { class: "empty", text: "No scaling plan yet (actuator: " + scaling.actuator + ")." }));
  } else {
    fill(target, el("table", {},
      el("thead", {}, el("tr", {}, ...["Model", "Wanted P / D / both", "Running", "Reason"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...scaling.data.map((s) => el("tr", { "data-model": s.model },
        el("td", { text: s.model }),
        el("td", { text: s.instances.prefill + " / " + s.instances.decode + " / " + s.instances.both }),
        el("td", { text: Object.entries(s.current).map(([k, v]) => k + " " + v).join(", ") }),
        el("td", { class: "sub", text: s.reason }))))));
  }
}

// ------------------------------------------------------------------ start
document.getElementById("auth").addEventListener("submit", onKeySubmitted);
poll();
