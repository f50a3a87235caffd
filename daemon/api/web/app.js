// knitwatch web page: camera status, alarm latch with acknowledge, defect gallery, event view.
// Plain JavaScript, no build step. Talks only to this server's /api (Bearer token when one is set).
"use strict";

const PAGE = 24;
const STATUS_EVERY_MS = 2000;
const GALLERY_EVERY_MS = 5000;

const state = {
  token: localStorage.getItem("knitwatch.token") || "",
  operator: localStorage.getItem("knitwatch.operator") || "",
  offset: 0,
  total: 0,
  stats: null,
  galleryKey: "",
  event: null,
  kind: "overlay",
  camerasKnown: "",
};
const blobCache = new Map(); // url -> object URL (only used with a token)

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

class HttpError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const headers = { Accept: "application/json", ...(opts.headers || {}) };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, { ...opts, headers, cache: "no-store" });
  if (r.status === 401) {
    openSettings("This daemon needs an API token.");
    throw new HttpError(401, "API token needed");
  }
  let body = null;
  try { body = await r.json(); } catch (_) { /* empty body */ }
  if (!r.ok) throw new HttpError(r.status, body && body.detail ? String(body.detail) : `HTTP ${r.status}`);
  return body;
}

async function setImage(img, url) {
  if (!state.token) {
    if (img.getAttribute("src") !== url) img.src = url;
    return;
  }
  let obj = blobCache.get(url);
  if (!obj) {
    const r = await fetch(url, { headers: { Authorization: `Bearer ${state.token}` } });
    if (!r.ok) return;
    obj = URL.createObjectURL(await r.blob());
    blobCache.set(url, obj);
    if (blobCache.size > 400) {
      const [oldUrl, oldObj] = blobCache.entries().next().value;
      URL.revokeObjectURL(oldObj);
      blobCache.delete(oldUrl);
    }
  }
  img.src = obj;
}

// ------------------------------------------------------------------ formatting
function fmtTime(ns) {
  if (ns === null || ns === undefined) return "-";
  const d = new Date(ns / 1e6);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  return sameDay ? time : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function fmtAgo(ns) {
  const s = Math.max(0, (Date.now() - ns / 1e6) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function fmtNum(v, digits = 1) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function toast(msg, ms = 4000) {
  const t = $("#toast");
  t.textContent = msg;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, ms);
}

function actionBadge(action, severity) {
  const cls = action === "stop" ? "stop" : action === "alarm" ? "alarm" : "";
  return el("span", { class: `badge ${cls}`, text: severity ? `${severity} · ${action}` : action });
}

// ------------------------------------------------------------------ status (cameras, health, alarm)
async function refreshStatus() {
  let st;
  try {
    st = await api("/api/stats");
  } catch (e) {
    const h = $("#health");
    h.className = "pill pill-stop";
    h.dataset.state = "offline";
    h.textContent = e.status === 401 ? "token needed" : "daemon not reachable";
    return;
  }
  state.stats = st;
  renderHealth(st);
  renderAlarm(st);
  renderCameras(st);
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString([], { hourCycle: "h23" })}`;
}

function renderHealth(st) {
  const h = $("#health");
  let cls = "pill-ok", text = "inspecting", s = "healthy";
  if (!st.ready) { cls = "pill-warn"; text = "starting"; s = "starting"; }
  else if (!st.healthy) { cls = "pill-stop"; text = "not healthy"; s = "unhealthy"; }
  else if ((st.degraded || []).length) { cls = "pill-warn"; text = "degraded"; s = "degraded"; }
  h.className = `pill ${cls}`;
  h.dataset.state = s;
  h.textContent = text;
  h.title = (st.degraded || []).join("\n");
}

function renderAlarm(st) {
  const a = st.alarm || {};
  const box = $("#alarm");
  box.hidden = !a.latched;
  box.dataset.latched = a.latched ? "true" : "false";
  if (!a.latched) return;
  const stopCams = a.stop || [];
  const alarmCams = (a.alarm || []).filter((c) => !stopCams.includes(c));
  box.classList.toggle("alarm-only", stopCams.length === 0);
  $("#alarm-title").textContent = stopCams.length ? "Machine stopped" : "Defect alarm";
  const cams = [...stopCams, ...alarmCams];
  const parts = cams.map((c) => {
    const ev = (st.cameras[c] || {}).last_event;
    return ev ? `${c}: ${ev.severity} defect, event #${ev.id} at ${fmtTime(ev.t_wall_ns)}` : c;
  });
  $("#alarm-detail").textContent = `${parts.join(" · ")}. Check the fabric, then acknowledge to reset.`;
}

function renderCameras(st) {
  const box = $("#cameras");
  const cams = st.cameras || {};
  const ids = Object.keys(cams);
  if (ids.join(",") !== state.camerasKnown) {
    state.camerasKnown = ids.join(",");
    const sel = $("#f-camera");
    const cur = sel.value;
    sel.replaceChildren(el("option", { value: "", text: "all" }), ...ids.map((c) => el("option", { value: c, text: c })));
    sel.value = ids.includes(cur) ? cur : "";
  }
  const cards = ids.map((id) => {
    const c = cams[id];
    const latched = c.latched || {};
    const lat = c.latency_ms || {};
    let cls = "cam", badge;
    if (latched.stop) { cls += " stop"; badge = el("span", { class: "badge stop", text: "stopped" }); }
    else if (latched.alarm) { cls += " alarm"; badge = el("span", { class: "badge alarm", text: "alarm" }); }
    else if (c.fps === undefined || c.fps === null) { cls += " idle"; badge = el("span", { class: "badge", text: "no data" }); }
    else badge = el("span", { class: "badge ok", text: "running" });
    const cov = c.coverage;
    const last = c.last_event;
    let lastBox;
    if (last) {
      const img = el("img", { alt: `last defect on ${id}`, title: `event #${last.id}`, onclick: () => openEvent(last.id) });
      if (last.urls && last.urls.thumb) setImage(img, last.urls.thumb);
      lastBox = el("div", { class: "cam-last" }, img, el("span", { text: `last defect ${fmtAgo(last.t_wall_ns)}` }));
    } else {
      lastBox = el("div", { class: "cam-last" }, el("div", { class: "none", text: "no defects" }), el("span", { text: " " }));
    }
    return el("article", { class: cls, dataset: { camera: id, latched: latched.stop || latched.alarm ? "true" : "false" } },
      el("div", { class: "cam-head" }, el("span", { class: "cam-name", text: id }), badge),
      el("div", { class: "metrics" },
        el("div", { class: "metric" }, el("b", { text: fmtNum(c.fps, 1) }), el("span", { text: "fps" })),
        el("div", { class: `metric${cov !== null && cov !== undefined && cov < 0.95 ? " low" : ""}` },
          el("b", { text: cov === null || cov === undefined ? "–" : `${(100 * cov).toFixed(cov >= 0.999 ? 0 : 1)}%` }),
          el("span", { text: "coverage" })),
        el("div", { class: "metric" }, el("b", { text: lat.p50 !== undefined ? `${Math.round(lat.p50)}` : "–" }),
          el("span", { text: "latency ms" })),
        el("div", { class: "metric" }, el("b", { text: String(c.events ?? (last ? "–" : 0)) }), el("span", { text: "events" })),
      ),
      lastBox);
  });
  box.replaceChildren(...cards);
}

// ------------------------------------------------------------------ gallery
function galleryQuery() {
  const q = new URLSearchParams({ limit: String(PAGE), offset: String(state.offset) });
  const cam = $("#f-camera").value, since = $("#f-since").value, action = $("#f-action").value;
  const status = $("#f-status").value;
  if (cam) q.set("camera", cam);
  if (since) q.set("since", since);
  if (action) q.set("action", action);
  if (status === "unacked") q.set("acknowledged", "false");
  if (status === "kept") q.set("keep", "true");
  if (status === "fp") q.set("false_positive", "true");
  return q;
}

async function refreshGallery(force = false) {
  let res;
  try {
    res = await api(`/api/events?${galleryQuery()}`);
  } catch (e) {
    if (e.status !== 401) toast(`Cannot load defects: ${e.message}`);
    return;
  }
  state.total = res.total;
  const key = JSON.stringify(res.items.map((e) => [e.id, e.keep, e.false_positive, e.acknowledged, e.urls.thumb]))
    + res.total + state.offset;
  if (!force && key === state.galleryKey) return;
  state.galleryKey = key;
  const cards = res.items.map((e) => {
    const latched = (e.action === "stop" || e.action === "alarm") && !e.acknowledged;
    const img = el("img", { class: "thumb", alt: `defect ${e.id}`, loading: "lazy" });
    if (e.urls.thumb) setImage(img, e.urls.thumb);
    const flags = [];
    if (latched) flags.push(el("span", { class: "badge stop", text: "latched" }));
    else if (e.acknowledged) flags.push(el("span", { class: "badge ok", text: "acked" }));
    if (e.keep) flags.push(el("span", { class: "badge keep", text: "kept" }));
    if (e.false_positive) flags.push(el("span", { class: "badge fp", text: "false alarm" }));
    return el("button", { type: "button", class: `card${latched ? " latched" : ""}`, dataset: { eventId: String(e.id) },
      onclick: () => openEvent(e.id) },
      img,
      el("div", { class: "meta" },
        el("div", { class: "line1" }, el("span", { class: "id", text: `#${e.id}` }), actionBadge(e.action, e.severity),
          el("span", { class: "spacer" }), ...flags),
        el("div", { class: "line2" }, el("span", { text: e.camera }), el("span", { text: fmtTime(e.t_wall_ns) }),
          el("span", { text: `score ${fmtNum(e.image_score, 2)}` }), el("span", { text: `${e.max_area_px} px` }))));
  });
  $("#gallery").replaceChildren(...cards);
  $("#empty").hidden = res.items.length > 0;
  $("#count").textContent = res.total ? `(${res.total})` : "";
  const from = res.total ? state.offset + 1 : 0, to = state.offset + res.items.length;
  $("#page").textContent = res.total > PAGE ? `${from}–${to} of ${res.total}` : "";
  $("#newer").disabled = state.offset === 0;
  $("#older").disabled = to >= res.total;
}

// ------------------------------------------------------------------ event view
async function openEvent(id) {
  let e;
  try {
    e = await api(`/api/events/${encodeURIComponent(id)}`);
  } catch (err) {
    toast(`Cannot open event ${id}: ${err.message}`);
    return;
  }
  state.event = e;
  const dlg = $("#event-view");
  renderEvent();
  showKind(e.urls.overlay ? "overlay" : "frame");
  if (!dlg.open) dlg.showModal();
}

function renderEvent() {
  const e = state.event;
  const rec = e.record || {};
  const latched = (e.action === "stop" || e.action === "alarm") && !e.acknowledged;
  $("#ev-title").textContent = `Event #${e.id} · ${e.camera}`;
  $("#ev-badges").replaceChildren(...[actionBadge(e.action, e.severity),
    latched ? el("span", { class: "badge stop", text: "latched" }) : null,
    e.keep ? el("span", { class: "badge keep", text: "kept" }) : null,
    e.false_positive ? el("span", { class: "badge fp", text: "false alarm" }) : null].filter(Boolean));
  const th = rec.thresholds || {};
  const lat = rec.latency_ms || {};
  const rows = [
    ["Time", `${fmtTime(e.t_wall_ns)} (${fmtAgo(e.t_wall_ns)})`],
    ["Camera", `${e.camera}, frame ${e.seq}`],
    ["Severity", `${e.severity} → ${e.action}`],
    ["Score", `${fmtNum(e.image_score, 3)} (threshold ${th.image !== undefined ? fmtNum(th.image, 3) : "?"})`],
    ["Regions", `${rec.n_regions ?? "?"}, largest ${e.max_area_px} px`],
    ["Decision", lat.capture_to_decision !== undefined ? `${fmtNum(lat.capture_to_decision, 0)} ms after capture` : "–"],
    ["Action", e.action_state],
    ["Acknowledged", e.acknowledged ? fmtTime(e.acked_ns) : (latched ? "no – latched" : "–")],
    ["Model", rec.model ? `${rec.model.kind || ""} ${rec.model.id || ""}` : "–"],
  ];
  if (e.false_positive) rows.push(["False alarm", `${e.fp_by || "?"}${e.fp_note ? `: ${e.fp_note}` : ""}`]);
  $("#ev-details").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  const keep = $("#ev-keep");
  keep.textContent = e.keep ? "Kept ✓" : "Keep";
  keep.classList.toggle("on", e.keep);
  const fp = $("#ev-fp");
  fp.textContent = e.false_positive ? "False alarm ✓" : "False alarm";
  fp.classList.toggle("on", e.false_positive);
  $("#ev-ack").hidden = !latched;
  const dl = $("#ev-download");
  dl.hidden = !e.urls.frame || !!state.token;
  if (e.urls.frame) dl.href = e.urls.frame;
}

function showKind(kind) {
  state.kind = kind;
  for (const b of document.querySelectorAll(".tabs button")) {
    b.classList.toggle("active", b.dataset.kind === kind);
    b.disabled = !state.event.urls[b.dataset.kind];
  }
  const url = state.event.urls[kind];
  const img = $("#ev-img");
  if (url) setImage(img, url);
  else img.removeAttribute("src");
}

async function toggleKeep() {
  const e = state.event;
  try {
    await api(`/api/events/${e.id}/keep`, { method: "POST", json: { keep: !e.keep } });
  } catch (err) { toast(err.message); return; }
  e.keep = !e.keep;
  renderEvent();
  toast(e.keep ? `Event #${e.id} is kept (retention never deletes it)` : `Event #${e.id} is no longer kept`);
  refreshGallery(true);
}

async function toggleFalsePositive() {
  const e = state.event;
  const value = !e.false_positive;
  try {
    await api(`/api/events/${e.id}/false-positive`, { method: "POST",
      json: { value, by: state.operator || "web page", note: "" } });
  } catch (err) { toast(err.message); return; }
  e.false_positive = value;
  e.fp_by = state.operator || "web page";
  renderEvent();
  toast(value ? `Event #${e.id} marked as a false alarm (collected for retraining)` : `Event #${e.id} unmarked`);
  refreshGallery(true);
}

async function acknowledge(camera = null) {
  const buttons = [$("#ack-btn"), $("#ev-ack")];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const r = await api("/api/alarm/ack?wait=5", { method: "POST",
      json: { by: state.operator || "web page", camera, note: "" } });
    if (r.cleared) toast("Acknowledged: the latch is reset and the PLC's stop output is cleared.");
    else if (r.applied) toast("Acknowledged: latch reset; waiting for the PLC to confirm the output.");
    else toast("Acknowledge recorded; the daemon applies it as soon as it runs.");
  } catch (err) {
    toast(`Acknowledge failed: ${err.message}`);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
  await refreshStatus();
  await refreshGallery(true);
  if (state.event && $("#event-view").open) openEvent(state.event.id);
}

// ------------------------------------------------------------------ settings
function openSettings(msg) {
  const dlg = $("#settings");
  if (dlg.open) return;
  $("#s-operator").value = state.operator;
  $("#s-token").value = state.token;
  if (msg) toast(msg);
  dlg.showModal();
}

function saveSettings() {
  if ($("#settings").returnValue !== "save") return;
  state.operator = $("#s-operator").value.trim();
  state.token = $("#s-token").value.trim();
  localStorage.setItem("knitwatch.operator", state.operator);
  if (state.token) localStorage.setItem("knitwatch.token", state.token);
  else localStorage.removeItem("knitwatch.token");
  blobCache.clear();
  state.galleryKey = "";
  refreshStatus();
  refreshGallery(true);
}

// ------------------------------------------------------------------ wiring
function init() {
  $("#ack-btn").addEventListener("click", () => acknowledge(null));
  $("#ev-ack").addEventListener("click", () => acknowledge(state.event ? state.event.camera : null));
  $("#ev-keep").addEventListener("click", toggleKeep);
  $("#ev-fp").addEventListener("click", toggleFalsePositive);
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => showKind(b.dataset.kind));
  $("#event-view").addEventListener("click", (ev) => {
    if (ev.target === ev.currentTarget || ev.target.closest("[data-close]")) $("#event-view").close();
  });
  $("#settings-btn").addEventListener("click", () => openSettings());
  $("#settings").addEventListener("close", saveSettings);
  $("#filters").addEventListener("change", () => { state.offset = 0; refreshGallery(true); });
  $("#newer").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); refreshGallery(true); });
  $("#older").addEventListener("click", () => { state.offset += PAGE; refreshGallery(true); });
  document.addEventListener("keydown", (ev) => {
    if (!$("#event-view").open || !state.event) return;
    const kinds = ["overlay", "frame", "mask"];
    if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
      const i = kinds.indexOf(state.kind) + (ev.key === "ArrowRight" ? 1 : -1);
      const k = kinds[(i + kinds.length) % kinds.length];
      if (state.event.urls[k]) showKind(k);
    }
  });
  refreshStatus();
  refreshGallery(true);
  setInterval(refreshStatus, STATUS_EVERY_MS);
  setInterval(() => {
    if (state.offset === 0 && !$("#event-view").open && !document.hidden) refreshGallery();
  }, GALLERY_EVERY_MS);
}

document.addEventListener("DOMContentLoaded", init);
