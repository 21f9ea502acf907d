// The aimesh page: submits tasks through the gateway's public HTTP API and follows each one over Server-Sent
// Events. Untrusted text (task output, error details) only ever reaches the page through textContent.
"use strict";

(() => {
  const TASKS_URL = "/v1/tasks";
  const STATUS_PREFIX = "TASK_STATUS_";
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"]);
  const KEY_STORAGE = "aimesh.apiKey";
  const DEFAULT_PARAMETERS = {
    generate: "max_tokens=32",
    summarize: "sentences=2",
    sleep: "delay_ms=500",
    sentiment: "",
    embed: "",
  };
  const SHOWN_FLOATS = 8;

  const tasks = new Map(); // task id -> the record of a task submitted from this tab
  let selectedId = null;
  let pendingSubmit = null; // {body, key}: a submit whose outcome is unknown, retried under the same key

  const $ = (id) => document.getElementById(id);

  // --- small helpers -------------------------------------------------------------------------------------------
  function apiKey() {
    return $("api-key").value.trim();
  }

  function authHeaders(extra = {}) {
    const key = apiKey();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  function newIdempotencyKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    // randomUUID needs a secure context; a page opened over plain HTTP on another host still has this.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function statusName(status) {
    return String(status || "UNSPECIFIED").replace(STATUS_PREFIX, "");
  }

  function sinceSent(record) {
    return Math.round(performance.now() - record.sentAt);
  }

  function ms(value) {
    return value === null ? "–" : `${value} ms`;
  }

  function durationMs(duration) {
    // proto3 JSON writes a Duration as seconds with an "s" suffix, e.g. "0.012500s".
    return duration ? Math.round(parseFloat(duration) * 1000) : null;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  /** Parameters as the API takes them: "a=1, b=2" -> {a: "1", b: "2"}; throws a problem for a malformed pair. */
  function parseParameters(text) {
    const parameters = {};
    const violations = [];
    for (const pair of text.split(",").map((p) => p.trim()).filter(Boolean)) {
      const at = pair.indexOf("=");
      if (at <= 0) {
        violations.push({ field: "parameters", description: `"${pair}" is not name=value` });
        continue;
      }
      parameters[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
    }
    if (violations.length) {
      throw { title: "Malformed parameters", detail: "Nothing was sent.", violations };
    }
    return parameters;
  }

  // --- problems (RFC 9457) -------------------------------------------------------------------------------------
  async function readProblem(response) {
    const type = response.headers.get("Content-Type") || "";
    const text = await response.text();
    if (type.includes("json")) {
      try {
        return { status: response.status, ...JSON.parse(text) };
      } catch (e) {
        // not JSON after all: shown as text below
      }
    }
    return { status: response.status, title: response.statusText || "Request failed", detail: text };
  }

  function parseProblem(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return { title: "Stream error", detail: text };
    }
  }

  function networkProblem(error) {
    return { title: "The gateway could not be reached", detail: String(error && error.message ? error.message : error) };
  }

  function violationText(violation) {
    if (violation === null || typeof violation !== "object") return String(violation);
    const what = violation.description || violation.message || violation.reason || JSON.stringify(violation);
    return violation.field ? `${violation.field}: ${what}` : what;
  }

  function showProblem(container, problem) {
    container.replaceChildren();
    const heading = problem.status ? `${problem.status} ${problem.title || ""}` : problem.title || "Error";
    container.append(element("strong", heading.trim(), "problem-title"));
    if (problem.detail) container.append(element("p", problem.detail, "problem-detail"));
    if (Array.isArray(problem.violations) && problem.violations.length) {
      const list = element("ul", undefined, "violations");
      list.setAttribute("data-testid", "violations");
      for (const violation of problem.violations) list.append(element("li", violationText(violation)));
      container.append(list);
    }
    container.hidden = false;
  }

  function clearProblem(container) {
    container.replaceChildren();
    container.hidden = true;
  }

  // --- output ----------------------------------------------------------------------------------------------------
  function tensorText(tensor) {
    if (tensor.stringData && tensor.stringData.length) return tensor.stringData.join(" ");
    const values = tensor.floatData || tensor.intData || [];
    const shown = values.slice(0, SHOWN_FLOATS).map((v) => (typeof v === "number" ? v.toFixed(3) : String(v)));
    const more = values.length > SHOWN_FLOATS ? `, … (${values.length} values)` : "";
    return `[${shown.join(", ")}${more}]`;
  }

  function outputText(result) {
    const tensors = (result && result.output && result.output.tensors) || [];
    if (tensors.length === 1 && tensors[0].stringData) return tensorText(tensors[0]);
    return tensors.map((t) => `${t.name}: ${tensorText(t)}`).join("\n");
  }

  function serverTimings(result) {
    const t = result && result.timings;
    if (!t) return "";
    const parts = [["queue", t.queueWait], ["inference", t.inference], ["total", t.total]]
      .filter(([, d]) => d)
      .map(([name, d]) => `${name} ${durationMs(d)} ms`);
    return parts.length ? ` (worker: ${parts.join(", ")})` : "";
  }

  // --- one task's updates ----------------------------------------------------------------------------------------
  function applyState(record, state) {
    const sequence = Number(state.sequence || 0);
    if (sequence && sequence <= record.lastSequence) return; // the gateway resumes without repeats; be sure anyway
    record.lastSequence = Math.max(record.lastSequence, sequence);
    if (record.firstUpdateMs === null) record.firstUpdateMs = sinceSent(record);
    const status = statusName(state.status);
    const result = state.result || {};
    if (status !== record.status) {
      record.history.push({ status, sequence, at: sinceSent(record), worker: result.workerId || "" });
    }
    if (result.partial) {
      record.streamed += outputText(result);
      record.tokenUpdates += 1;
    }
    record.status = status;
    if (TERMINAL.has(status)) finish(record, result);
    render(record);
  }

  /** A state from a GET or DELETE answer: only a terminal one is applied, since the stream may not have delivered
   * the partial outputs numbered below it yet, and applying it would skip them. */
  function applyIfEnded(record, state) {
    if (state && TERMINAL.has(statusName(state.status))) applyState(record, state);
  }

  function finish(record, result) {
    record.endMs = sinceSent(record);
    record.output = outputText(result) || record.streamed;
    record.serverTimings = serverTimings(result);
    if (result.error && (result.error.message || result.error.code)) {
      record.problem = { title: String(result.error.code || "Task error"), detail: result.error.message || "" };
    }
    stopWatching(record);
  }

  function eventsUrl(record) {
    const url = new URL(record.links.events || `${TASKS_URL}/${record.id}/events`, location.href);
    // EventSource cannot send headers, so the key travels as a query parameter (the gateway accepts both).
    const key = apiKey();
    if (key) url.searchParams.set("access_token", key);
    return url.toString();
  }

  function watch(record) {
    const source = new EventSource(eventsUrl(record));
    record.source = source;
    source.addEventListener("update", (event) => {
      applyState(record, JSON.parse(event.data).state);
    });
    // One listener hears both the gateway's `event: error` (a problem in its data) and EventSource's own
    // connection errors, which it retries by itself with Last-Event-ID unless the answer was not a stream.
    source.addEventListener("error", (event) => {
      if (event.data) {
        record.problem = parseProblem(event.data);
        stopWatching(record);
        render(record);
      } else if (source.readyState === EventSource.CLOSED) {
        stopWatching(record);
        explainClosedStream(record);
      }
    });
  }

  async function explainClosedStream(record) {
    // EventSource hides a refused stream's answer; the same request as a GET shows the problem.
    try {
      const response = await fetch(`${TASKS_URL}/${encodeURIComponent(record.id)}`, { headers: authHeaders() });
      if (response.ok) {
        const body = await response.json();
        applyIfEnded(record, body.state);
        if (!TERMINAL.has(record.status)) record.problem = { title: "The event stream closed" };
      } else {
        record.problem = await readProblem(response);
      }
    } catch (error) {
      record.problem = networkProblem(error);
    }
    render(record);
  }

  function stopWatching(record) {
    if (record.source) record.source.close(); // else the browser would reconnect after the terminal update
    record.source = null;
  }

  // --- submit and cancel -----------------------------------------------------------------------------------------
  async function submit(event) {
    event.preventDefault();
    const error = $("error");
    clearProblem(error);
    const model = $("model").value;
    let request;
    try {
      request = { modelName: model, input: { text: $("text").value }, parameters: parseParameters($("parameters").value) };
    } catch (problem) {
      showProblem(error, problem);
      return;
    }
    const body = JSON.stringify(request);
    const key = pendingSubmit && pendingSubmit.body === body ? pendingSubmit.key : newIdempotencyKey();
    pendingSubmit = { body, key };
    const sentAt = performance.now();
    $("submit").disabled = true;
    try {
      const response = await fetch(TASKS_URL, {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", "Idempotency-Key": key }),
        body,
      });
      if (response.status !== 429 && response.status < 500) pendingSubmit = null; // a definite answer
      if (response.status !== 202) {
        showProblem(error, await readProblem(response));
        return;
      }
      accepted(await response.json(), model, sentAt);
    } catch (e) {
      showProblem(error, networkProblem(e)); // outcome unknown: the next identical submit reuses the key
    } finally {
      $("submit").disabled = false;
    }
  }

  function accepted(reply, model, sentAt) {
    const existing = tasks.get(reply.taskId);
    if (existing) {
      select(existing.id); // a duplicate submit answers the first task's id
      return;
    }
    const record = {
      id: reply.taskId,
      model,
      links: reply.links || {},
      sentAt,
      acceptedMs: Math.round(performance.now() - sentAt),
      firstUpdateMs: null,
      endMs: null,
      status: "ACCEPTED", // until the first update: the 202 said Kafka holds the task
      lastSequence: 0,
      streamed: "",
      tokenUpdates: 0,
      output: "",
      serverTimings: "",
      history: [],
      problem: null,
      source: null,
      cancelRequested: false,
    };
    tasks.set(record.id, record);
    select(record.id);
    watch(record);
  }

  async function cancel() {
    const record = tasks.get(selectedId);
    if (!record) return;
    record.cancelRequested = true; // asked once: the CANCELLED update follows on the stream
    $("cancel").disabled = true;
    try {
      const url = new URL(record.links.cancel || `${TASKS_URL}/${record.id}`, location.href);
      const response = await fetch(url, { method: "DELETE", headers: authHeaders() });
      if (!response.ok) {
        record.cancelRequested = false;
        record.problem = await readProblem(response);
      } else {
        const body = await response.json().catch(() => ({}));
        applyIfEnded(record, body.state);
      }
    } catch (error) {
      record.cancelRequested = false;
      record.problem = networkProblem(error);
    }
    render(record);
  }

  // --- rendering ------------------------------------------------------------------------------------------------
  function select(id) {
    selectedId = id;
    render(tasks.get(id));
  }

  function render(record) {
    renderRow(record);
    if (record.id === selectedId) renderSelected(record);
  }

  function renderSelected(record) {
    $("task").hidden = false;
    $("task-id").textContent = record.id;
    $("task-model").textContent = record.model;
    const status = $("task-status");
    status.textContent = record.status;
    status.dataset.status = record.status;
    $("timing-accepted").textContent = ms(record.acceptedMs);
    $("timing-first-update").textContent = ms(record.firstUpdateMs);
    $("timing-end").textContent = ms(record.endMs) + (record.endMs === null ? "" : record.serverTimings);
    $("token-count").textContent = String(record.tokenUpdates);
    $("task-output").textContent = TERMINAL.has(record.status) ? record.output : record.streamed;
    const history = $("task-history");
    history.replaceChildren(
      ...record.history.map((h) => element("li", `${h.status} +${h.at} ms${h.worker ? ` on ${h.worker}` : ""}`)),
    );
    if (record.problem) showProblem($("task-error"), record.problem);
    else clearProblem($("task-error"));
    $("cancel").disabled = record.cancelRequested || TERMINAL.has(record.status);
  }

  function renderRow(record) {
    let row = document.querySelector(`tr[data-task-id="${CSS.escape(record.id)}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.taskId = record.id;
      row.setAttribute("data-testid", "task-row");
      const show = element("button", record.id.slice(0, 8), "link");
      show.type = "button";
      show.setAttribute("aria-label", `Show task ${record.id}`);
      show.addEventListener("click", () => select(record.id));
      const first = document.createElement("td");
      first.append(show);
      row.append(first, element("td", record.model), element("td", "", "status"), element("td"));
      $("task-rows").prepend(row);
      $("task-list").hidden = false;
      $("tasks-empty").hidden = true;
    }
    row.dataset.status = record.status;
    row.cells[2].textContent = record.status;
    row.cells[2].dataset.status = record.status;
    row.cells[3].textContent = ms(record.endMs);
  }

  // --- wiring -----------------------------------------------------------------------------------------------------
  function init() {
    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value));
    $("model").addEventListener("change", () => {
      $("parameters").value = DEFAULT_PARAMETERS[$("model").value] ?? "";
    });
    $("submit-form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    document.body.dataset.ready = "true"; // the browser test waits for this
  }

  init();
})();
