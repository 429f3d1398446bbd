// The kernel-service inspector: lists sessions, shows a session's history, runs code.
// Vanilla JS, no build step. Everything an execution printed is model-written: text goes
// into the page as text only (textContent, never innerHTML), images as data: URLs in <img>
// (an SVG in an <img> runs no script), and HTML outputs in iframes sandboxed without
// allow-scripts, so nothing in them runs; the page's Content-Security-Policy, which they
// inherit, lets them load nothing from elsewhere.
"use strict";

(() => {
  const KEY_STORAGE = "kernel-service-api-key";
  const POLL_MS = 4000;
  const IMAGE_MIMES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
  const ANSI = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07/g;

  const state = {
    selected: null, // the session id shown
    entries: new Map(), // seq → the entry shown, of the selected session
    running: false, // an execution from this page is in flight
    unauthorized: false, // the last call was refused: no polling until a key is given
    sessions: [],
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
    }
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: "no-store" });
    } catch (error) {
      throw new ApiError(0, "unreachable", `Cannot reach the service: ${error.message}`);
    }
    if (response.status === 401) {
      state.unauthorized = true;
      showMessage(
        apiKey()
          ? "401 Unauthorized: the service refused this API key. Enter one of its keys above."
          : "401 Unauthorized: this service needs an API key. Enter one of its keys above.",
      );
      $("api-key").focus();
      throw new ApiError(401, "unauthorized", "unauthorized");
    }
    if (!response.ok) throw await errorOf(response);
    state.unauthorized = false;
    return response;
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: the status says it all
    }
    let detail = response.statusText || `HTTP ${response.status}`;
    if (body && body.detail !== undefined) {
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
    return new ApiError(response.status, body && body.code, `${response.status}: ${detail}`);
  }

  function showMessage(text, kind = "error") {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
    box.hidden = false;
  }

  function clearMessage() {
    $("message").hidden = true;
  }

  function report(error) {
    if (error.status !== 401) showMessage(error.message);
  }

  // ------------------------------------------------------------------ sessions

  async function loadSessions() {
    const response = await api("/sessions");
    const { sessions } = await response.json();
    sessions.sort((a, b) => b.last_activity.localeCompare(a.last_activity));
    state.sessions = sessions;
    const list = $("sessions");
    list.replaceChildren(
      ...sessions.map((session) => {
        const button = el(
          "button",
          { type: "button", "data-session": session.session_id, title: session.session_id },
          el("span", { class: "session-id", text: session.session_id }),
          el("span", {
            class: "session-meta",
            text: `${session.status} · ${plural(session.execution_count, "run")} · ${time(session.last_activity)}`,
          }),
        );
        if (session.session_id === state.selected) button.setAttribute("aria-current", "true");
        button.addEventListener("click", () => selectSession(session.session_id));
        return el("li", {}, button);
      }),
    );
    $("no-sessions").hidden = sessions.length > 0;
    showSessionHeader();
  }

  function showSessionHeader() {
    const id = state.selected;
    const info = state.sessions.find((s) => s.session_id === id);
    $("session-title").textContent = id || "No session selected";
    const badge = $("session-status");
    badge.hidden = !info;
    if (info) {
      badge.textContent = info.status;
      badge.className = `badge status-${info.status}`;
      badge.title = info.notice || "";
    }
    $("download-notebook").hidden = !id;
    $("delete-session").hidden = !id;
    $("run-target").textContent = id ? `Run in session ${id}` : "Run in a new session";
  }

  async function selectSession(id) {
    state.selected = id;
    state.entries.clear();
    $("history").replaceChildren();
    for (const button of document.querySelectorAll("#sessions button")) {
      button.setAttribute("aria-current", String(button.dataset.session === id));
    }
    showSessionHeader();
    if (id) await loadHistory();
  }

  async function createSession() {
    const response = await api("/sessions", { method: "POST" });
    const session = await response.json();
    await loadSessions();
    await selectSession(session.session_id);
    $("code").focus();
  }

  async function deleteSession() {
    const id = state.selected;
    if (!id || !confirm(`Delete session ${id}? Its kernel, variables and files are gone.`)) return;
    await api(`/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
    await selectSession(null);
    await loadSessions();
  }

  async function downloadNotebook() {
    const id = state.selected;
    if (!id) return;
    const response = await api(`/sessions/${encodeURIComponent(id)}/notebook`);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `${id}.ipynb` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ------------------------------------------------------------------ history

  // Entries after this seq are asked for: from the first one still running, else the last.
  function since() {
    let last = 0;
    for (const [seq, entry] of state.entries) {
      if (entry.status === "running") return seq - 1;
      last = Math.max(last, seq);
    }
    return last;
  }

  async function loadHistory() {
    const id = state.selected;
    if (!id) return;
    let response;
    try {
      response = await api(`/sessions/${encodeURIComponent(id)}/history?since=${since()}`);
    } catch (error) {
      if (error.status === 404 && state.selected === id) {
        showMessage(`Session ${id} no longer exists (deleted, or culled when idle).`);
        await selectSession(null);
        await loadSessions();
        return;
      }
      throw error;
    }
    const history = await response.json();
    if (state.selected !== id) return; // another session was picked meanwhile
    const list = $("history");
    for (const entry of history.executions) {
      state.entries.set(entry.seq, entry);
      const cell = renderEntry(entry);
      const shown = document.getElementById(`exec-${entry.seq}`);
      if (shown) shown.replaceWith(cell);
      else list.insertBefore(cell, list.querySelector(".cell.live"));
    }
  }

  function renderEntry(entry) {
    const outputs = el("div", { class: "outputs" });
    const cell = el(
      "li",
      { class: "cell", id: `exec-${entry.seq}`, "data-status": entry.status },
      cellHeader(entry.execution_count, entry.status, entry.started_at, entry.duration_ms),
      el("pre", { class: "code", text: entry.code }),
      outputs,
    );
    if (entry.outputs) renderOutputs(outputs, entry.outputs);
    // a timeout or a kernel death: the service's words, after any traceback of the kernel
    const error = entry.error;
    const shown = (o) => o.output_type === "error" && o.ename === error.ename && o.evalue === error.evalue;
    if (error && !(entry.outputs || []).some(shown)) {
      outputs.append(errorBlock(error));
    }
    const notes = {
      running: "running…",
      cancelled: "cancelled: its client left, or the session ended while it ran",
      failed: "failed: the service could not run it",
      lost: "lost: cut short by a restart of the service",
    };
    if (entry.result_dropped) {
      outputs.append(
        el("p", { class: "note", text: "output not kept: dropped to keep the history within its size" }),
      );
    } else if (notes[entry.status]) {
      outputs.append(el("p", { class: "note", text: notes[entry.status] }));
    }
    if (entry.state_lost) {
      outputs.append(el("p", { class: "note", text: "the kernel was restarted: earlier variables are gone" }));
    }
    return cell;
  }

  function cellHeader(count, status, startedAt, durationMs) {
    const header = el(
      "div",
      { class: "cell-header" },
      el("span", { class: "prompt", text: `In [${count ?? " "}]:` }),
      el("span", { class: `badge status-${status}`, text: status }),
    );
    if (startedAt) header.append(el("span", { text: time(startedAt) }));
    if (durationMs !== null && durationMs !== undefined) {
      header.append(el("span", { text: duration(durationMs) }));
    }
    return header;
  }

  // ------------------------------------------------------------------ outputs

  function renderOutputs(container, outputs) {
    for (const output of outputs) appendOutput(container, output);
  }

  function appendOutput(container, output) {
    switch (output.output_type) {
      case "stream": {
        // consecutive chunks of one stream are one block, as a terminal would show them
        const last = container.lastElementChild;
        const text = output.text.replace(ANSI, "");
        if (last && last.classList.contains("stream") && last.dataset.name === output.name) {
          last.textContent += text;
        } else {
          container.append(el("pre", { class: `stream ${output.name}`, "data-name": output.name, text }));
        }
        break;
      }
      case "display_data":
      case "execute_result": {
        const block = el("div", { class: output.output_type });
        if (output.output_type === "execute_result") {
          block.append(el("div", { class: "out-prompt", text: `Out[${output.execution_count ?? " "}]:` }));
        }
        block.append(renderBundle(output.data || {}, output.metadata || {}));
        container.append(block);
        break;
      }
      case "error":
        container.append(errorBlock(output));
        break;
      case "truncated":
        container.append(
          el("p", {
            class: "note",
            text: `[... output truncated: ${output.omitted_chars.toLocaleString()} characters and ${output.omitted_outputs} outputs omitted ...]`,
          }),
        );
        break;
      default:
        container.append(el("pre", { text: JSON.stringify(output, null, 2) }));
    }
  }

  function errorBlock(error) {
    const lines = (error.traceback || []).map((line) => line.replace(ANSI, ""));
    const text = lines.length ? lines.join("\n") : `${error.ename}: ${error.evalue}`;
    return el("pre", { class: "error", text });
  }

  // The richest representation this page can show safely.
  function renderBundle(data, metadata) {
    for (const mime of IMAGE_MIMES) {
      if (typeof data[mime] === "string") {
        return image(`data:${mime};base64,${data[mime].replace(/\s/g, "")}`, metadata[mime]);
      }
    }
    const svg = data["image/svg+xml"];
    if (typeof svg === "string" || Array.isArray(svg)) {
      const text = Array.isArray(svg) ? svg.join("") : svg;
      return image(`data:image/svg+xml;charset=utf-8,${encodeURIComponent(text)}`, metadata["image/svg+xml"]);
    }
    const html = data["text/html"];
    if (typeof html === "string" || Array.isArray(html)) {
      return htmlFrame(Array.isArray(html) ? html.join("") : html);
    }
    for (const mime of ["text/markdown", "text/latex", "text/plain"]) {
      const value = data[mime];
      if (typeof value === "string" || Array.isArray(value)) {
        return el("pre", { text: (Array.isArray(value) ? value.join("") : value).replace(ANSI, "") });
      }
    }
    const json = Object.keys(data).find((mime) => /^application\/(.*\+)?json$/.test(mime));
    if (json) return el("pre", { text: JSON.stringify(data[json], null, 2) });
    return el("p", { class: "note", text: `[${Object.keys(data).join(", ") || "empty output"}]` });
  }

  function image(src, meta) {
    const img = el("img", { src, alt: "image output" });
    if (meta && Number.isFinite(meta.width)) img.width = meta.width;
    if (meta && Number.isFinite(meta.height)) img.height = meta.height;
    return img;
  }

  // HTML an execution displayed (a pandas table, say): in an iframe sandboxed without
  // allow-scripts, so no script in it runs, and no forms, popups or top navigation.
  // allow-same-origin (without scripts, it gives the content nothing to run with) lets
  // this page read the document's height to size the frame.
  function htmlFrame(html) {
    const frame = el("iframe", { sandbox: "allow-same-origin", title: "HTML output", referrerpolicy: "no-referrer" });
    frame.srcdoc =
      '<!doctype html><meta charset="utf-8"><style>body{margin:4px;font:13px system-ui,sans-serif}' +
      "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}" +
      `</style>${html}`;
    frame.addEventListener("load", () => {
      const doc = frame.contentDocument;
      if (doc && doc.documentElement) {
        frame.style.height = `${Math.min(doc.documentElement.scrollHeight + 4, 600)}px`;
      }
    });
    return frame;
  }

  // ------------------------------------------------------------------ running code

  async function run(code) {
    if (state.running || !code.trim()) return;
    state.running = true;
    const target = state.selected;
    const outputs = el("div", { class: "outputs" });
    const header = cellHeader(null, "running", new Date().toISOString(), null);
    const live = el("li", { class: "cell live" }, header, el("pre", { class: "code", text: code }), outputs);
    $("history").append(live);
    live.scrollIntoView({ block: "nearest" });
    $("run").disabled = true;
    $("run-status").textContent = "running…";
    let result = null;
    try {
      const response = await api("/execute", {
        method: "POST",
        // Streaming is asked for by the Accept header: a service without it answers JSON.
        headers: { "Content-Type": "application/json", Accept: "text/event-stream, application/json" },
        body: JSON.stringify({ code, session_id: target }),
      });
      const type = response.headers.get("content-type") || "";
      if (type.startsWith("text/event-stream")) {
        await readEvents(response, (name, data) => {
          if (name === "output") {
            appendOutput(outputs, JSON.parse(data));
          } else if (name === "result") {
            result = JSON.parse(data);
          } else if (name === "error") {
            const error = JSON.parse(data);
            throw new ApiError(error.status || 0, error.code, `${error.code}: ${error.detail}`);
          }
        });
        if (!result) throw new ApiError(0, "stream_ended", "The stream ended before the result.");
      } else {
        result = await response.json();
      }
      clearMessage();
      outputs.replaceChildren();
      renderOutputs(outputs, result.outputs);
      header.replaceWith(cellHeader(result.execution_count, result.status, null, result.duration_ms));
      $("run-status").textContent =
        `${result.status} in ${duration(result.duration_ms)}` + (result.state_lost ? " (the kernel was restarted)" : "");
    } catch (error) {
      $("run-status").textContent = "";
      outputs.append(el("pre", { class: "error", text: error.message }));
      report(error);
      state.running = false;
      $("run").disabled = false;
      return;
    }
    state.running = false;
    $("run").disabled = false;
    // The history is the record: the cell as stored replaces this one.
    if (target === null) {
      await selectSession(result.session_id);
    } else if (state.selected === target) {
      await loadHistory();
    }
    live.remove();
    await loadSessions();
  }

  // Server-Sent Events from a fetch() body (EventSource cannot POST): `onEvent(name, data)`
  // for each event; comment lines (keep-alives) are skipped.
  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent(name || "message", data.join("\n"));
        name = "";
        data = [];
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        for (;;) {
          const end = buffer.search(/\r\n|\r|\n/);
          // a lone \r at the end may be half of a \r\n: wait for the next chunk
          if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break;
          const width = buffer.startsWith("\r\n", end) ? 2 : 1;
          line(buffer.slice(0, end));
          buffer = buffer.slice(end + width);
        }
      }
    } catch (error) {
      await reader.cancel().catch(() => {});
      throw error;
    }
  }

  // ------------------------------------------------------------------ helpers

  function time(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function duration(ms) {
    return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  async function refresh() {
    await loadSessions();
    if (state.selected) await loadHistory();
  }

  function start() {
    $("api-key").value = apiKey();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      state.unauthorized = false;
      clearMessage();
      refresh().catch(report);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("api-key").value = "";
      selectSession(null);
      refresh().catch(report);
    });
    $("new-session").addEventListener("click", () => createSession().catch(report));
    $("refresh").addEventListener("click", () => {
      clearMessage();
      refresh().catch(report);
    });
    $("delete-session").addEventListener("click", () => deleteSession().catch(report));
    $("download-notebook").addEventListener("click", () => downloadNotebook().catch(report));
    $("run-form").addEventListener("submit", (event) => {
      event.preventDefault();
      run($("code").value).catch(report);
    });
    $("code").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        run($("code").value).catch(report);
      }
    });
    // Executions from elsewhere (an agent) show up as they happen.
    setInterval(() => {
      if (document.hidden || state.running || state.unauthorized) return;
      refresh().catch(() => {});
    }, POLL_MS);
    refresh().catch(report);
  }

  start();
})();
