// The console's script: upload progress, parameter checks as you type, the live run page and
// the streamed playground. Plain JavaScript, served by the console itself; every page also
// works as a plain form without it.
"use strict";

// ----- select pickers submit themselves -------------------------------------------------
function autosubmit() {
  for (const form of document.querySelectorAll("form[data-autosubmit]")) {
    const select = form.querySelector("select");
    if (select) select.addEventListener("change", () => form.requestSubmit());
  }
}

// ----- upload with progress ---------------------------------------------------------------
function uploads() {
  for (const form of document.querySelectorAll("form[data-upload]")) {
    const input = form.querySelector("input[type=file]");
    const drop = form.querySelector("[data-drop]");
    const bar = form.querySelector("[data-progress]");
    const error = form.querySelector("[data-upload-error]");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (e.dataTransfer && e.dataTransfer.files.length) {
        input.files = e.dataTransfer.files;
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const file = input.files && input.files[0];
      error.textContent = "";
      if (!file) { error.textContent = "Choose a file to upload."; input.focus(); return; }
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("X-File-Name", encodeURIComponent(file.name));
      const skip = form.querySelector("[name=skip_duplicates]");
      xhr.setRequestHeader("X-Skip-Duplicates", skip && skip.checked ? "true" : "false");
      bar.hidden = false;
      bar.value = 0;
      xhr.upload.addEventListener("progress", (p) => {
        if (p.lengthComputable) bar.value = Math.round((100 * p.loaded) / p.total);
      });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
        if (xhr.status === 200 && body.redirect) { bar.value = 100; location.assign(body.redirect); return; }
        if (xhr.status === 401 && body.login) { location.assign(body.login); return; }
        bar.hidden = true;
        error.textContent = body.error || `Upload failed (HTTP ${xhr.status}).`;
      });
      xhr.addEventListener("error", () => { bar.hidden = true; error.textContent = "Upload failed: the console is not reachable."; });
      xhr.send(file);
    });
  }
}

// ----- template parameters, checked as they are typed ----------------------------------
// The same rules as services/console/forms.py: type, bounds, choices, required.
function problem(spec, input) {
  if (spec.kind === "bool" || spec.kind === "choice") return "";
  const text = input.value.trim();
  if (spec.kind === "int" || spec.kind === "float") {
    if (!text) return spec.nullable ? "" : (spec.kind === "int" ? "enter a whole number" : "enter a number");
    const n = Number(text);
    if (!Number.isFinite(n)) return `'${text}' is not a ${spec.kind === "int" ? "whole " : ""}number`;
    if (spec.kind === "int" && !Number.isInteger(n)) return `'${text}' is not a whole number`;
    if (spec.min !== null && n < spec.min) return `must be at least ${spec.min}`;
    if (spec.max !== null && n > spec.max) return `must be at most ${spec.max}`;
    return "";
  }
  if (spec.kind === "list") {
    if (!spec.choices.length) return "";
    const bad = text.split(/[,\n]/).map((s) => s.trim()).filter((s) => s && !spec.choices.includes(s));
    return bad.length ? `${bad.join(", ")}: not among ${spec.choices.join(", ")}` : "";
  }
  if (spec.kind === "string" && !spec.nullable && !text) return "is required";
  return "";
}

function showError(field, input, message) {
  const out = field.querySelector("[data-error]");
  if (!out) return;
  out.textContent = message;
  if (message) {
    out.setAttribute("role", "alert");
    input.setAttribute("aria-invalid", "true");
  } else {
    out.removeAttribute("role");
    input.removeAttribute("aria-invalid");
  }
}

function parameterForms() {
  for (const form of document.querySelectorAll("form[data-params]")) {
    const fields = [...form.querySelectorAll("[data-param]")];
    const check = (field) => {
      const spec = JSON.parse(field.dataset.param);
      const input = field.querySelector("input, select");
      const message = problem(spec, input);
      showError(field, input, message);
      return message ? input : null;
    };
    for (const field of fields) {
      const input = field.querySelector("input, select");
      input.addEventListener("input", () => check(field));
      input.addEventListener("change", () => check(field));
    }
    form.addEventListener("submit", (e) => {
      const bad = fields.map(check).filter(Boolean);
      const summary = form.querySelector("[data-summary]");
      if (bad.length) {
        e.preventDefault();
        for (const input of bad) {
          const group = input.closest("details");
          if (group) group.open = true;
        }
        summary.textContent = `${bad.length} field${bad.length > 1 ? "s need" : " needs"} fixing before training starts.`;
        bad[0].focus();
      } else {
        summary.textContent = "";
      }
    });
  }
}

// ----- the live run page ------------------------------------------------------------------
// `m:ss`, or `h:mm:ss` from an hour on (as the server writes it).
function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const two = (n) => String(n).padStart(2, "0");
  if (s >= 3600) return `${Math.floor(s / 3600)}:${two(Math.floor((s % 3600) / 60))}:${two(s % 60)}`;
  return `${Math.floor(s / 60)}:${two(s % 60)}`;
}

const SVG = "http://www.w3.org/2000/svg";

function drawChart(svg, series) {
  const w = 320, h = 160, pad = { l: 44, r: 8, t: 8, b: 20 };
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const points = series.flatMap((s) => s.points);
  if (!points.length) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", w / 2); t.setAttribute("y", h / 2); t.setAttribute("text-anchor", "middle");
    t.setAttribute("class", "empty");
    t.textContent = "waiting for the first step…";
    svg.appendChild(t);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.1; y0 = y0 - Math.abs(y0 || 1) * 0.1; }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const sy = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  const axis = document.createElementNS(SVG, "path");
  axis.setAttribute("d", `M${pad.l},${pad.t}V${h - pad.b}H${w - pad.r}`);
  axis.setAttribute("class", "axis");
  svg.appendChild(axis);
  const label = (x, y, text, anchor) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.appendChild(t);
  };
  const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : +v.toPrecision(3));
  label(pad.l - 4, pad.t + 8, fmt(y1), "end");
  label(pad.l - 4, h - pad.b, fmt(y0), "end");
  label(pad.l, h - 4, `step ${x0}`, "start");
  label(w - pad.r, h - 4, `${x1}`, "end");
  for (const s of series) {
    if (!s.points.length) continue;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("class", `line ${s.cls}`);
    svg.appendChild(line);
    for (const p of s.points.length <= 60 ? s.points : []) {
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("cx", sx(p[0]).toFixed(1)); dot.setAttribute("cy", sy(p[1]).toFixed(1));
      dot.setAttribute("r", 2); dot.setAttribute("class", `dot ${s.cls}`);
      svg.appendChild(dot);
    }
  }
  svg.dataset.points = String(points.length);
}

function runPage() {
  const root = document.querySelector("[data-run]");
  if (!root) return;
  const $ = (sel) => root.querySelector(sel);
  const charts = { loss: $("[data-chart=loss]"), lr: $("[data-chart=lr]"), tps: $("[data-chart=tps]") };
  const table = $("[data-points]"), logList = $("[data-log]"), connection = $("[data-connection]");
  const data = { train: [], eval: [], lr: [], tps: [] };
  let last = 0;  // the last sequence shown: events at or below it are never shown twice
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawChart(charts.loss, [{ points: data.train, cls: "train" }, { points: data.eval, cls: "eval" }]);
      drawChart(charts.lr, [{ points: data.lr, cls: "lr" }]);
      drawChart(charts.tps, [{ points: data.tps, cls: "tps" }]);
    });
  };
  redraw();
  const setState = (state, code, message) => {
    const el = $("[data-state]");
    el.textContent = state;
    el.className = `state state-${state.toLowerCase()}`;
    if (code !== undefined) $("[data-code]").textContent = code;
    if (message !== undefined) $("[data-message]").textContent = message;
    if (state === "TRAINED") for (const t of root.querySelectorAll("[data-try]")) t.hidden = false;
    if (["TRAINED", "FAILED", "CANCELLED"].includes(state)) { const c = $("[data-cancel]"); if (c) c.hidden = true; }
  };
  const cell = (row, text) => { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); };
  const show = (ev) => {
    if (ev.kind === "progress") {
      if (ev.train_loss !== null) data.train.push([ev.step, ev.train_loss]);
      if (ev.eval_loss !== null) data.eval.push([ev.step, ev.eval_loss]);
      data.lr.push([ev.step, ev.learning_rate]);
      if (ev.tokens_per_second) data.tps.push([ev.step, ev.tokens_per_second]);
      const row = document.createElement("tr");
      row.dataset.sequence = ev.sequence;
      for (const v of [ev.sequence, ev.step, ev.train_loss, ev.eval_loss, ev.learning_rate, ev.tokens_per_second]) cell(row, v === null ? "" : String(v));
      table.appendChild(row);
      $("[data-step]").textContent = `${ev.step}/${ev.total_steps || "?"}`;
      if (ev.total_steps) $("[data-bar]").value = Math.round((100 * ev.step) / ev.total_steps);
      if (ev.eta_seconds !== null) $("[data-eta]").textContent = clock(ev.eta_seconds);
      redraw();
    } else if (ev.kind === "state") {
      setState(ev.state, ev.status_code, ev.message);
      if (ev.state === "TRAINED") $("[data-bar]").value = 100;
    } else if (ev.kind === "log") {
      const li = document.createElement("li");
      li.className = `level-${ev.level.toLowerCase()}`;
      li.textContent = `${ev.level} ${ev.message}`;
      // Follows the newest line unless the reader scrolled up; the page itself stays put.
      const following = logList.scrollTop + logList.clientHeight >= logList.scrollHeight - 4;
      logList.appendChild(li);
      if (following) logList.scrollTop = logList.scrollHeight;
    }
  };
  // EventSource reconnects by itself after a drop, sending the last id it saw as
  // Last-Event-ID; the console resumes the watch right after it.
  const source = new EventSource(root.dataset.events);
  root.dataset.connected = "false";
  source.addEventListener("open", () => { connection.textContent = "Live"; root.dataset.connected = "true"; });
  source.addEventListener("message", (m) => {
    const ev = JSON.parse(m.data);
    if (ev.sequence <= last) return;
    last = ev.sequence;
    root.dataset.lastSequence = String(last);
    show(ev);
  });
  source.addEventListener("end", (m) => {
    const end = JSON.parse(m.data);
    setState(end.state, end.status_code);
    if (end.state === "TRAINED") $("[data-bar]").value = 100;
    connection.textContent = "The run has ended.";
    root.dataset.ended = "true";
    source.close();
  });
  source.addEventListener("failure", (m) => {
    connection.textContent = JSON.parse(m.data).message;
    source.close();
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      if (root.dataset.ended !== "true") connection.textContent = "Disconnected; reload the page to reconnect.";
    } else {
      connection.textContent = "Reconnecting…";
      root.dataset.connected = "false";
    }
  });
}

// ----- the playground: two streamed answers side by side ------------------------------------
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function playground() {
  const form = document.querySelector("form[data-playground]");
  if (!form) return;
  const panes = {};
  for (const pane of document.querySelectorAll("[data-side]")) panes[pane.dataset.side] = pane;
  const failure = form.querySelector("[data-failure]");
  const button = form.querySelector("button[type=submit]");
  const fieldError = (name, message) => {
    const input = form.querySelector(`[name=${name}]`);
    const out = form.querySelector(`#${name}-error`);
    if (!input || !out) return false;
    out.textContent = message;
    if (message) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
    return true;
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    failure.textContent = "";
    for (const out of form.querySelectorAll("[data-error]")) fieldError(out.id.replace(/-error$/, ""), "");
    for (const pane of Object.values(panes)) {
      pane.querySelector("[data-text]").textContent = "";
      pane.querySelector("[data-meta]").textContent = "generating…";
      pane.dataset.done = "false";
    }
    button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "text/event-stream" },
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        if (response.status === 401 && body.login) { location.assign(body.login); return; }
        for (const [name, message] of Object.entries(body.fields || {})) fieldError(name, message);
        failure.textContent = body.error || `Failed (HTTP ${response.status}).`;
        for (const pane of Object.values(panes)) pane.querySelector("[data-meta]").textContent = "";
        return;
      }
      await readEvents(response, (name, ev) => {
        const pane = panes[ev.side];
        if (name === "message" && pane) {
          pane.querySelector("[data-text]").textContent += ev.delta;
          if (ev.finish_reason) {
            pane.querySelector("[data-meta]").textContent = `${ev.completion_tokens} tokens, finished: ${ev.finish_reason}`;
            pane.dataset.done = "true";
          }
        } else if (name === "failure" && pane) {
          let placed = false;
          for (const [field, message] of Object.entries(ev.fields || {})) placed = fieldError(field, message) || placed;
          pane.querySelector("[data-meta]").textContent = ev.message;
          pane.dataset.done = "true";
          if (!placed) failure.textContent = ev.message;
        }
      });
    } catch (err) {
      failure.textContent = `The answer stopped: ${err}`;
    } finally {
      button.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  autosubmit();
  uploads();
  parameterForms();
  runPage();
  playground();
});
