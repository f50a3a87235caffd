// knitwatch web page: the rolls view - the current roll's counts and grade, a new roll, the rolls and
// each roll's report (defects with their places, points, pictures). Plain JavaScript, no build step;
// the same token and operator name as the rest of the page (localStorage).
"use strict";

(() => {
  const EVERY_MS = 5000;
  const q = (sel) => document.querySelector(sel);
  const token = () => localStorage.getItem("knitwatch.token") || "";

  function node(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  async function call(path, opts = {}) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.json);
    }
    const r = await fetch(path, { ...opts, headers, cache: "no-store" });
    let body = null;
    try { body = await r.json(); } catch (_) { /* empty */ }
    if (!r.ok) throw new Error(body && body.detail ? String(body.detail) : `HTTP ${r.status}`);
    return body;
  }

  async function picture(img, url) {
    if (!token()) { img.src = url; return; }
    const r = await fetch(url, { headers: { Authorization: `Bearer ${token()}` } });
    if (r.ok) img.src = URL.createObjectURL(await r.blob());
  }

  const show = (v, digits) => (v === null || v === undefined ? "–" : digits === undefined ? String(v) : Number(v).toFixed(digits));

  function gradeBox(grade) {
    return node("span", { class: `grade g-${grade || "none"}`, text: grade || "–",
      title: grade ? "points grade (4-point system)" : "no grade: see the report" });
  }

  function countsText(rep, capped = "") {
    const c = rep.counts;
    const sev = Object.entries(c.by_severity).map(([k, v]) => `${k} ${v}`).join(", ") || "no defects";
    const p = rep.points;
    return `${c.defects} defect(s): ${sev} · points ${show(p.total)}${capped} · ${show(p.per_100_m2, 1)} per 100 m² · length ${show(rep.length_m, 1)} m`;
  }

  async function refresh() {
    const box = q("#roll-current");
    if (!box) return;
    let rep = null;
    try {
      rep = await call("/api/rolls/current/report");
    } catch (e) {
      box.replaceChildren(node("span", { class: "muted", text: `Rolls: ${e.message}` }));
    }
    if (rep) {
      const r = rep.roll;
      box.replaceChildren(
        node("h2", { text: `Roll ${r.id}` }),
        gradeBox(rep.points.grade),
        node("span", { class: "counts", id: "roll-counts", text: countsText(rep) }),
        node("span", { class: "muted small", text: `since ${new Date(r.started).toLocaleString()} (${r.reason})` }),
      );
      box.querySelector(".grade").id = "roll-grade";
      box.dataset.rollId = r.id;
    }
    try {
      const list = await call("/api/rolls?limit=20");
      const rows = list.items.map((r) => node("tr", { "data-roll-id": r.id },
        node("td", { text: r.id }), node("td", { text: new Date(r.started).toLocaleString() }),
        node("td", { text: r.ended ? new Date(r.ended).toLocaleString() : "open" }),
        node("td", { text: r.reason }), node("td", { text: r.events }), node("td", { text: r.note || "" }),
        node("td", {}, node("a", { href: `#roll-${r.id}`, class: "roll-report-link", text: "report",
          onclick: (ev) => { ev.preventDefault(); openReport(r.id); } }))));
      q("#roll-list").replaceChildren(
        node("thead", {}, node("tr", {}, ["roll", "started", "ended", "reason", "defects", "note", ""].map((h) => node("th", { text: h })))),
        node("tbody", {}, rows));
    } catch (_) { /* shown above */ }
  }

  async function openReport(id) {
    const dlg = q("#roll-view");
    const body = q("#roll-body");
    q("#roll-title").textContent = `Roll ${id}`;
    body.replaceChildren(node("span", { class: "muted", text: "loading…" }));
    if (!dlg.open) dlg.showModal();
    let rep;
    try {
      rep = await call(`/api/rolls/${encodeURIComponent(id)}/report`);
    } catch (e) {
      body.replaceChildren(node("span", { text: e.message }));
      return;
    }
    const p = rep.points;
    const rows = rep.defects.map((d) => {
      const img = node("img", { alt: `defect ${d.event_id}`, loading: "lazy" });
      if (d.urls && d.urls.thumb) picture(img, d.urls.thumb);
      return node("tr", { "data-event-id": d.event_id },
        node("td", { text: d.event_id }), node("td", { text: d.camera }), node("td", { text: new Date(d.time).toLocaleString() }),
        node("td", { text: d.severity + (d.false_positive ? " (false alarm)" : "") }), node("td", { text: show(d.revolution) }),
        node("td", { text: show(d.angle_deg, 1) }), node("td", { text: show(d.metres_from_start, 2) }),
        node("td", { text: show(d.length_mm, 0) }), node("td", { text: show(d.points) }), node("td", {}, img));
    });
    const capped = p.before_yard_cap !== null && p.before_yard_cap !== p.total ? ` (${p.before_yard_cap} before the 4-per-yard cap)` : "";
    body.replaceChildren(...[
      node("div", { class: "roll-current" }, gradeBox(p.grade),
        node("span", { id: "report-summary", text: `${countsText(rep, capped)} · ${show(p.per_100_yd2, 1)} per 100 yd²` })),
      rep.problems.length ? node("ul", { class: "problems" }, rep.problems.map((t) => node("li", { text: t }))) : null,
      node("table", { class: "roll-table", id: "report-defects" },
        node("thead", {}, node("tr", {}, ["event", "camera", "time", "severity", "rev", "angle °", "m from start",
          "length mm", "points", "picture"].map((h) => node("th", { text: h })))),
        node("tbody", {}, rows)),
      node("p", { class: "muted small", text: p.rule })].filter((c) => c !== null));
  }

  async function newRoll() {
    const note = window.prompt("Start a new roll now? The open roll ends. Note (article, lot):", "");
    if (note === null) return;
    const by = localStorage.getItem("knitwatch.operator") || "web page";
    try {
      const res = await call("/api/rolls?wait=3", { method: "POST", json: { by, note } });
      q("#roll-current").dataset.started = res.roll_id;
    } catch (e) {
      window.alert(`No new roll: ${e.message}`);
    }
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const btn = q("#roll-new");
    if (btn) btn.addEventListener("click", newRoll);
    const cur = q("#roll-report-current");
    if (cur) cur.addEventListener("click", () => { const id = q("#roll-current").dataset.rollId; if (id) openReport(id); });
    const close = q("#roll-view [data-close]");
    if (close) close.addEventListener("click", () => q("#roll-view").close());
    refresh();
    setInterval(refresh, EVERY_MS);
  });
})();
