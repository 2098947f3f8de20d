// The pyforge playground: lists the served models (GET /v1/models), streams a chat
// (POST /v1/chat/completions with stream: true, read as server-sent events) and shows
// each answer's speed and how much of its prompt the server found cached.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "pyforge.apiKey";     // localStorage: the API key, for servers started with --api-key
const history = [];                     // the conversation so far: {role, content}, the system prompt apart
let controller = null;                  // the AbortController of the request in flight (null: none)

function headers() {
  const key = $("api-key").value.trim();
  return key ? {"Content-Type": "application/json", "Authorization": "Bearer " + key}
             : {"Content-Type": "application/json"};
}

// An OpenAI error body ({"error": {"message", "type", "param", "code"}}) as one readable line.
function describeError(status, body) {
  const error = (body && body.error) || {};
  const what = [error.code || error.type, error.message].filter(Boolean).join(": ") || "no details";
  return `Error ${status ?? "in the stream"}: ${what}` + (error.param ? ` (field: ${error.param})` : "");
}

async function responseError(response) {
  const body = await response.json().catch(() => ({error: {message: response.statusText}}));
  return new Error(describeError(response.status, body));
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) throw await responseError(response);
    const select = $("model"), previous = select.value;
    const {data} = await response.json();
    select.replaceChildren(...data.map((model) => new Option(model.id, model.id)));
    if (data.some((model) => model.id === previous)) select.value = previous;
    showError("");
  } catch (e) {
    showError(`Could not list the models. ${e.message}`);
  }
}

function addMessage(role, text) {
  const item = document.createElement("div");
  item.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(who, content);
  $("log").append(item);
  item.scrollIntoView({block: "end"});
  return content;
}

// The body of a chat request for `messages`; throws when the JSON schema field is not JSON.
function chatRequest(messages) {
  const system = $("system").value.trim();
  const body = {
    model: $("model").value || undefined,
    messages: system ? [{role: "system", content: system}, ...messages] : messages,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
    stream_options: {include_usage: true},
  };
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (e) { throw new Error(`The JSON schema is not JSON: ${e.message}`); }
    body.response_format = {type: "json_schema", json_schema: {name: "playground", schema: parsed}};
  }
  return body;
}

// The JSON payloads of a server-sent event stream, in order, up to `data: [DONE]`
// (comments such as `: keep-alive` and `event:` lines are skipped).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setBusy(busy) {
  $("log").ariaBusy = busy ? "true" : null;   // screen readers read an answer once it is whole
  $("send").disabled = busy;
  $("clear").disabled = busy;         // stop first: a chat cleared mid-answer would get the answer back
  $("stop").disabled = !busy;
}

// Tokens/s over the whole answer (request sent to last token), then the time to the first
// token and the prompt tokens the server took from its prefix cache.
function showStats(usage, started, firstToken, ended) {
  if (!usage) return;
  const seconds = (ended - started) / 1000;
  const rate = usage.completion_tokens / seconds;
  const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
  $("stats").textContent = [
    `${usage.completion_tokens} tokens in ${seconds.toFixed(2)} s: ${rate.toFixed(1)} tokens/s`,
    firstToken === null ? null : `first token after ${Math.round(firstToken - started)} ms`,
    `${cached} of ${usage.prompt_tokens} prompt tokens cached`,
  ].filter(Boolean).join(" · ");
}

async function send() {
  const input = $("input"), text = input.value;
  if (!text.trim() || controller) return;
  const turn = {role: "user", content: text};
  let body;
  try { body = chatRequest([...history, turn]); } catch (e) { showError(e.message); return; }
  showError("");
  $("stats").textContent = "";
  input.value = "";
  const shown = [addMessage("user", text).parentElement];
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstToken = null, usage = null, answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw await responseError(response);
    const view = addMessage("assistant", "");
    shown.push(view.parentElement);
    for await (const event of events(response)) {
      if (event.error) throw new Error(describeError(null, event));
      if (event.usage) usage = event.usage;
      const piece = event.choices && event.choices[0] && event.choices[0].delta.content;
      if (piece) {
        firstToken ??= performance.now();
        answer += piece;
        view.textContent = answer;
        view.scrollIntoView({block: "end"});
      }
    }
    history.push(turn, {role: "assistant", content: answer});
    showStats(usage, started, firstToken, performance.now());
  } catch (e) {
    const stopped = e.name === "AbortError";
    if (stopped && answer) {              // the answer so far stays in the conversation
      history.push(turn, {role: "assistant", content: answer});
    } else {                              // nothing answered: the message goes back to the input
      shown.forEach((element) => element.remove());
      if (!input.value) input.value = text;
    }
    if (stopped) $("stats").textContent = "Stopped."; else showError(e.message);
  } finally {
    controller = null;
    setBusy(false);
    input.focus();
  }
}

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
    $("stats").textContent = "";
    showError("");
  });
  loadModels();
}

start();
