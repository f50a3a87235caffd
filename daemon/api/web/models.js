// knitwatch web page: the models view - per camera the model in use, "Learn this fabric" (record, train,
// validate, install) with its progress, "Roll back"; the model library's versions with their validation
// figures and "Use this model". Plain JavaScript, no build step; the same token and operator name as the
// rest of the page: app.js's el() and api() (loaded before this file). Talks to /api/models and /api/learn.
"use strict";

(() => {
  const EVERY_MS = 3000;
  const q = (sel, root = document) => root.querySelector(sel);
  const operator = () => localStorage.getItem("knitwatch.operator") || "web page";
  let known = "";

  const num = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  function say(text, bad = false) {
    const note = q("#models-note");
    note.textContent = text;
    note.classList.toggle("bad", bad);
  }

  // ---------------------------------------------------------------- per camera: model in use, learn form
  function cameraCard(cam) {
    const form = el("form", { class: "learn-form", autocomplete: "off" },
      el("label", {}, "Article ", el("input", { name: "article", required: true, maxlength: "64",
        pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}", placeholder: "e.g. pique-30-1", title: "letters, digits, . _ -" })),
      el("label", {}, el("input", { name: "amount", type: "number", min: "1", step: "1", value: "300", required: true }),
        el("select", { name: "unit" }, el("option", { value: "frames", text: "frames" }),
          el("option", { value: "minutes", text: "minutes" }))),
      el("label", { class: "check" }, el("input", { name: "use", type: "checkbox", checked: true }), " use it when done"),
      el("button", { class: "btn btn-primary learn-start", type: "submit", text: "Learn this fabric" }),
      el("button", { class: "btn learn-cancel", type: "button", text: "Cancel", hidden: true,
        onclick: () => cancelLearn(cam) }));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); startLearn(cam, form); });
    return el("div", { class: "model-cam", "data-model-camera": cam },
      el("div", { class: "model-now" },
        el("strong", { text: cam }), " uses ",
        el("span", { class: "model-in-use", text: "…" }),
        el("span", { class: "model-since muted small" }),
        el("span", { class: "spacer" }),
        el("button", { class: "btn model-rollback", type: "button", text: "Roll back", onclick: () => rollback(cam) })),
      form,
      el("div", { class: "learn-progress muted small", "aria-live": "polite" }));
  }

  function learnText(job) {
    const rec = job.recording || {};
    const want = job.request.frames ? ` of ${job.request.frames}` : job.request.minutes ? ` (${job.request.minutes} min)` : "";
    const revs = `${rec.revolutions ?? 0}${rec.min_revolutions ? `/${rec.min_revolutions}` : ""} revolutions`;
    const flagged = rec.skipped_flagged ? `, ${rec.skipped_flagged} flagged left out` : "";
    switch (job.state) {
      case "starting": return `Learning ${job.article}: starting…`;
      case "recording": return `Learning ${job.article}: recording ${rec.frames ?? 0}${want} frames, ${revs}${flagged}`;
      case "training": return `Learning ${job.article}: training${job.progress !== null ? ` ${Math.round(job.progress * 100)} %` : "…"} (${rec.frames ?? 0} frames, ${revs})`;
      case "validating": return `Learning ${job.article}: validating on held-back revolutions…`;
      case "done": {
        const f = job.figures || {};
        let fs = f.false_stops_per_hour !== undefined ? `, ${num(f.false_stops_per_hour, 2)} false stops per hour` : "";
        if (f.simulator_recall !== undefined && f.simulator_recall !== null) fs += `, recall ${num(f.simulator_recall, 3)}`;
        return `Learned ${job.article}: ${job.model} installed${fs}${job.use ? ", in use" : " — use it below"}`;
      }
      case "refused": return `Not installed: ${job.reason}`;
      case "failed": return `Learning ${job.article} failed: ${job.error}`;
      case "cancelled": return `Learning ${job.article} cancelled`;
      default: return job.state;
    }
  }

  function renderCameras(info, jobs) {
    const box = q("#models-cameras");
    const ids = Object.keys(info.cameras);
    if (ids.join(",") !== known) {
      known = ids.join(",");
      box.replaceChildren(...ids.map(cameraCard));
      const sel = q("#models-camera");
      sel.replaceChildren(...ids.map((c) => el("option", { value: c, text: c })));
      sel.closest("label").hidden = ids.length < 2;
    }
    for (const cam of ids) {
      const c = info.cameras[cam];
      const card = q(`.model-cam[data-model-camera="${CSS.escape(cam)}"]`, box);
      q(".model-in-use", card).textContent = (c.configured ? `the configured checkpoint (${c.checkpoint || "not set"})` : c.model)
        + (c.switching ? ` (switching from ${c.running}…)` : "");
      q(".model-since", card).textContent = c.since ? ` since ${new Date(c.since).toLocaleString()}${c.by ? ` (${c.by})` : ""}` : "";
      q(".model-rollback", card).disabled = c.configured;
      q(".model-rollback", card).title = c.configured ? "no earlier model" :
        `back to ${c.history.length ? c.history[c.history.length - 1] : "the configured checkpoint"}`;
      const job = jobs[cam];
      const running = Boolean(job && job.running);
      q(".learn-start", card).disabled = running;
      q(".learn-cancel", card).hidden = !running;
      const line = q(".learn-progress", card);
      line.textContent = job ? learnText(job) : "";
      line.dataset.state = job ? job.state : "";
    }
  }

  // ---------------------------------------------------------------- the library
  function renderLibrary(info) {
    const rows = [];
    for (const a of info.articles) {
      for (const v of a.versions) {
        rows.push(el("tr", { "data-model": v.id },
          el("td", { text: v.id }), el("td", { text: v.created ? new Date(v.created).toLocaleString() : "–" }),
          el("td", { text: v.kind || "–" }), el("td", { text: num(v.false_stops_per_hour, 2) }),
          el("td", { text: num(v.recall, 3) }), el("td", { text: v.used_by.join(", ") || "–" }),
          el("td", {}, el("button", { class: "btn model-use", type: "button", text: "Use this model",
            onclick: () => useModel(v.id) }))));
      }
    }
    const table = q("#models-library");
    if (!rows.length) {
      table.replaceChildren(el("tbody", {}, el("tr", {}, el("td", { class: "muted",
        text: "No models in the library yet: learn one above." }))));
      return;
    }
    table.replaceChildren(
      el("thead", {}, el("tr", {}, ["model", "created", "kind", "false stops / h", "recall", "used by", ""]
        .map((h) => el("th", { text: h })))),
      el("tbody", {}, rows));
  }

  async function refresh() {
    if (!q("#models")) return;
    let info;
    let jobs = {};
    try {
      info = await api("/api/models");
      const list = await api("/api/learn");
      for (const j of list.jobs) jobs[j.camera] = j;
    } catch (e) {
      say(`Models: ${e.message}`, true);
      return;
    }
    renderCameras(info, jobs);
    renderLibrary(info);
    if (info.problems && info.problems.length) say(info.problems.join("; "), true);
  }

  // ---------------------------------------------------------------- actions
  async function useModel(model) {
    const camera = q("#models-camera").value;
    try {
      const r = await api("/api/models/use", { method: "POST", json: { camera, model, by: operator() } });
      say(`${camera} now uses ${r.model}: ${r.note}.`);
    } catch (e) {
      say(`Not switched: ${e.message}`, true);
    }
    refresh();
  }

  async function rollback(camera) {
    try {
      const r = await api("/api/models/rollback", { method: "POST", json: { camera, by: operator() } });
      say(`${camera} rolled back to ${r.configured ? "the configured checkpoint" : r.model}.`);
    } catch (e) {
      say(`No rollback: ${e.message}`, true);
    }
    refresh();
  }

  async function startLearn(camera, form) {
    const data = new FormData(form);
    const body = { camera, article: String(data.get("article") || "").trim(), use: form.elements.use.checked,
      by: operator() };
    const amount = Number(data.get("amount"));
    if (data.get("unit") === "minutes") body.minutes = amount; else body.frames = Math.round(amount);
    try {
      await api("/api/learn", { method: "POST", json: body });
      say(`${camera}: learning ${body.article} started.`);
    } catch (e) {
      say(`Not started: ${e.message}`, true);
    }
    refresh();
  }

  async function cancelLearn(camera) {
    if (!window.confirm(`Cancel learning on ${camera}?`)) return;
    try {
      await api(`/api/learn/${encodeURIComponent(camera)}`, { method: "DELETE" });
    } catch (e) {
      say(`Not cancelled: ${e.message}`, true);
    }
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    refresh();
    setInterval(refresh, EVERY_MS);
  });
})();
