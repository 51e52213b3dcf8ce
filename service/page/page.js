// The page to try a model. It calls only the public API (/v1/models, /v1/models/{name},
// /v1/models/{name}/predict), exactly as any client would; when the server asks for an API
// key (401), it asks the user for one and sends it as a Bearer token.
"use strict";

const KEY_STORE = "xmc-api-key";
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let models = {}; // name -> /v1/models/{name}

class NeedKey extends Error {}

async function api(path, body) {
  const headers = {};
  if (apiKey) headers.Authorization = "Bearer " + apiKey;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    askKey(apiKey ? "That key was refused: try another." : "");
    throw new NeedKey("this server needs an API key");
  }
  if (!response.ok) {
    throw new Error(data.detail || `${response.status} ${response.statusText}`);
  }
  return data;
}

function askKey(message) {
  $("key-box").hidden = false;
  if (message) $("key-hint").textContent = message;
  $("api-key").focus();
}

function status(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

async function loadModels() {
  status("Loading the models…");
  const listing = await api("/v1/models");
  const select = $("model");
  select.replaceChildren();
  models = {};
  for (const m of listing.models) {
    if (m.state !== "ready") continue;
    const option = element("option", "", m.name);
    option.value = m.name;
    select.append(option);
  }
  if (!select.options.length) {
    status("No model is ready on this server.", true);
    return;
  }
  if (listing.default) select.value = listing.default;
  $("key-box").hidden = true;
  await showModel();
  status("");
}

async function showModel() {
  const name = $("model").value;
  const info = models[name] || (models[name] = await api(`/v1/models/${encodeURIComponent(name)}`));
  const parts = [`${info.n_labels} labels`, `version ${info.version}`];
  const auto = $("threshold-mode").querySelector('option[value="auto"]');
  auto.disabled = !info.threshold;
  if (info.threshold) {
    const t = info.threshold;
    parts.push(`tuned threshold ${t.value.toFixed(3)} (micro-F1 ${t.micro_f1.toFixed(3)})`);
  } else if ($("threshold-mode").value === "auto") {
    $("threshold-mode").value = "";
  }
  if (info.calibrated) parts.push("calibrated scores");
  const config = info.config || {};
  if (config.filter || config.threshold != null) parts.push("configured defaults apply");
  $("model-info").textContent = parts.join(" · ");
  if (info.params && info.params.top_k) $("top-k").value = info.params.top_k;
}

function entries(id) {
  return $(id).value.split(",").map((s) => s.trim()).filter((s) => s);
}

function request() {
  const body = {
    text: $("text").value,
    top_k: Number($("top-k").value) || undefined,
    explain: $("explain").checked,
  };
  const include = entries("include");
  const exclude = entries("exclude");
  if (include.length || exclude.length) {
    body.filter = {};
    if (include.length) body.filter.include = include;
    if (exclude.length) body.filter.exclude = exclude;
  }
  const mode = $("threshold-mode").value;
  if (mode === "auto") body.threshold = "auto";
  if (mode === "number") body.threshold = Number($("threshold").value);
  return body;
}

function labelRow(item, cut) {
  const row = element("li", "label");
  row.append(element("span", "name", item.label));
  const bar = element("div", "bar");
  const fill = element("span", "fill");
  fill.style.width = `${Math.max(0, Math.min(1, item.score)) * 100}%`;
  bar.append(fill);
  if (cut > 0) {
    const line = element("span", "cut");
    line.style.left = `${cut * 100}%`;
    line.title = `threshold ${cut.toFixed(3)}`;
    bar.append(line);
  }
  row.append(bar, element("span", "score", item.score.toFixed(3)));
  if (item.explanation) {
    const why = element("ul", "why");
    for (const term of item.explanation) {
      const chip = element("li", "");
      chip.append(element("span", "term", term.term), " ",
                  element("span", "contrib", `+${term.contribution.toFixed(3)}`));
      why.append(chip);
    }
    if (!item.explanation.length) why.append(element("li", "empty", "no term pushed it up"));
    row.append(why);
  }
  return row;
}

function render(answer) {
  const out = $("results");
  out.replaceChildren();
  const head = element("div", "result-head");
  head.append(element("span", "", `model ${answer.model.name} (${answer.model.version})`));
  if (answer.threshold > 0) {
    const legend = element("span", "threshold-legend");
    legend.append(element("span", "legend-cut"), `threshold ${answer.threshold.toFixed(3)}`);
    head.append(legend);
  }
  if (answer.cached) head.append(element("span", "", "from the cache"));
  out.append(head);
  if (!answer.labels.length) {
    out.append(element("p", "empty", "No label passed the filter and the threshold."));
    return;
  }
  const list = element("ol", "labels");
  for (const item of answer.labels) list.append(labelRow(item, answer.threshold));
  out.append(list);
}

async function predict(event) {
  event.preventDefault();
  const button = $("submit");
  button.disabled = true;
  status("Asking the model…");
  try {
    const name = encodeURIComponent($("model").value);
    render(await api(`/v1/models/${name}/predict`, request()));
    status("");
  } catch (error) {
    status(error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function useKey(event) {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  try {
    await loadModels();
  } catch (error) {
    status(error.message, true);
  }
}

function start() {
  $("predict-form").addEventListener("submit", predict);
  $("key-form").addEventListener("submit", useKey);
  $("model").addEventListener("change", () => showModel().catch((e) => status(e.message, true)));
  $("threshold-mode").addEventListener("change", () => {
    $("threshold").hidden = $("threshold-mode").value !== "number";
  });
  loadModels().catch((error) => status(error.message, true));
}

start();
