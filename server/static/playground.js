// The playground's one script: POST /generate_stream, read its Server-Sent Events with fetch and a
// ReadableStream, and show each step's run of tokens as one shaded span (the events' `step`), with
// live tok/s and tokens per step. No framework, no build step: what is here is what the browser runs.
"use strict";

const $ = (id) => document.getElementById(id);
const DARKEST_SHADE = 5; // runs of 5 tokens or more share the darkest shade

let controller = null; // aborts the request in flight (the Stop button)

function requestHeaders() {
  const headers = {"content-type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  return headers;
}

function parameters() {
  const p = {max_new_tokens: Number($("max-new-tokens").value), speculate: $("speculate").checked};
  if ($("do-sample").checked) {
    p.do_sample = true;
    p.temperature = Number($("temperature").value);
    p.top_p = Number($("top-p").value);
    if ($("seed").value !== "") p.seed = Number($("seed").value);
  }
  return p;
}

// The parsed `data:` of each event, as the body arrives.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// One generation's figures. The first token comes from the prompt's prefill, not from a decoding
// step, so the rates count from it: tok/s over the tokens after it, tokens per step over the steps
// after it (what speculation changes).
class Run {
  constructor(speculate) {
    this.speculate = speculate;
    this.tokens = 0;
    this.steps = 0;
    this.firstStepTokens = 0;
    this.firstAt = null;
    this.lastAt = null;
    this.step = null; // the step of the current span
    this.span = null;
  }

  add(event) {
    const now = performance.now();
    if (this.firstAt === null) this.firstAt = now;
    this.lastAt = now;
    if (event.step !== this.step || this.span === null) {
      this.step = event.step;
      this.steps += 1;
      this.span = document.createElement("span");
      this.span.className = `run ${this.steps % 2 ? "odd" : "even"}`;
      this.span.dataset.step = String(event.step);
      this.span.dataset.tokens = "0";
      $("answer").append(this.span);
    }
    this.tokens += 1;
    if (this.steps === 1) this.firstStepTokens += 1;
    const inRun = Number(this.span.dataset.tokens) + 1;
    this.span.dataset.tokens = String(inRun);
    this.span.dataset.shade = String(Math.min(inRun, DARKEST_SHADE));
    this.span.title = `step ${event.step}: ${inRun} token${inRun === 1 ? "" : "s"}`;
    if (!event.token.special) this.span.append(event.token.text);
  }

  get tokensPerSecond() {
    const seconds = (this.lastAt - this.firstAt) / 1000;
    return this.tokens > 1 && seconds > 0 ? (this.tokens - 1) / seconds : null;
  }

  get tokensPerStep() {
    return this.steps > 1 ? (this.tokens - this.firstStepTokens) / (this.steps - 1) : null;
  }
}

const shown = (value, digits) => (value === null ? "–" : value.toFixed(digits));

function showStats(run) {
  $("tokens").value = String(run.tokens);
  $("steps").value = String(run.steps);
  $("tok-per-s").value = shown(run.tokensPerSecond, 1);
  $("tokens-per-step").value = shown(run.tokensPerStep, 2);
}

function remember(run) {
  const row = document.createElement("tr");
  for (const cell of [run.speculate ? "on" : "off", String(run.tokens), String(run.steps),
                      shown(run.tokensPerSecond, 1), shown(run.tokensPerStep, 2)]) {
    row.insertCell().textContent = cell;
  }
  $("history").tBodies[0].prepend(row);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function generate(event) {
  event.preventDefault();
  $("answer").replaceChildren();
  $("error").hidden = true;
  $("generate").disabled = true;
  $("stop").disabled = false;
  document.body.dataset.state = "running";
  controller = new AbortController();
  const run = new Run($("speculate").checked);
  showStats(run);
  let state = "done";
  try {
    const response = await fetch("generate_stream", {
      method: "POST", headers: requestHeaders(), signal: controller.signal,
      body: JSON.stringify({inputs: $("prompt").value, parameters: parameters()}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({error: response.statusText}));
      throw new Error(`${response.status}: ${body.error}`);
    }
    for await (const data of serverSentEvents(response)) {
      if (data.error !== undefined) throw new Error(`${data.error_type}: ${data.error}`);
      run.add(data);
      showStats(run);
    }
  } catch (error) {
    state = error.name === "AbortError" ? "stopped" : "error";
    if (state === "error") showError(error.message);
  } finally {
    remember(run);
    $("generate").disabled = false;
    $("stop").disabled = true;
    document.body.dataset.state = state;
  }
}

// The served model, and whether it has heads to speculate with; quiet when a key is needed and not
// given yet (the page asks again when one is typed).
async function describeServer() {
  const response = await fetch("info", {headers: requestHeaders()}).catch(() => null);
  if (response === null || !response.ok) return;
  const info = await response.json();
  const speculation = info.speculation;
  $("model").textContent = speculation.enabled
    ? `${info.model_id} · ${speculation.num_heads} Medusa heads, tree '${speculation.tree}' ` +
      `(${speculation.tree_nodes} nodes)`
    : `${info.model_id} · no Medusa heads: every step gives one token`;
  $("speculate").disabled = !speculation.enabled;
  if (!speculation.enabled) $("speculate").checked = false;
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller?.abort());
$("api-key").addEventListener("change", describeServer);
describeServer();
