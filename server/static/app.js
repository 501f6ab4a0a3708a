// The deft playground: talks to the server's OpenAI-compatible API (no libraries, works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "deft.apiKey";
let baseModel = "";
let busy = false;

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function adapterRow(name) {
  const li = document.createElement("li");
  const id = `adapter-${name}`;
  li.innerHTML = `
    <input type="checkbox" id="${id}" class="adapter-use">
    <label for="${id}"></label>
    <label class="visually-hidden" for="${id}-weight"></label>
    <input type="range" id="${id}-weight" class="adapter-weight" min="-2" max="2" step="0.05" value="1">
    <output for="${id}-weight">1.00</output>`;
  li.dataset.name = name;
  li.querySelector(`label[for="${id}"]`).textContent = name;
  li.querySelector(`label[for="${id}-weight"]`).textContent = `Weight of ${name}`;
  const slider = li.querySelector(".adapter-weight");
  slider.addEventListener("input", () => {
    li.querySelector("output").textContent = Number(slider.value).toFixed(2);
  });
  return li;
}

let modelLoads = 0;  // the latest loadModels() call: an older reply (say, for a previous key) is dropped

async function loadModels() {
  const load = ++modelLoads;
  const response = await fetch("/v1/models", { headers: headers() });
  if (load !== modelLoads) return;
  if (!response.ok) {
    $("status").textContent = `Cannot list models: ${await errorText(response)}`;
    return;
  }
  const { data } = await response.json();
  if (load !== modelLoads) return;
  baseModel = data[0].id;
  $("model-name").textContent = baseModel;
  const list = $("adapter-list");
  const chosen = new Map(selectedAdapters().map((a) => [a.name, a.weight]));  // kept across reloads
  list.replaceChildren();
  for (const model of data.slice(1)) {
    const row = adapterRow(model.id.slice(baseModel.length + 1));
    if (chosen.has(row.dataset.name)) {
      row.querySelector(".adapter-use").checked = true;
      row.querySelector(".adapter-weight").value = chosen.get(row.dataset.name);
      row.querySelector("output").textContent = chosen.get(row.dataset.name).toFixed(2);
    }
    list.append(row);
  }
  $("adapters-empty").hidden = data.length > 1;
  list.dataset.loaded = String(load);  // which load the list shows (the browser test waits on it)
}

function selectedAdapters() {
  return [...document.querySelectorAll("#adapter-list li")]
    .filter((li) => li.querySelector(".adapter-use").checked)
    .map((li) => ({ name: li.dataset.name, weight: Number(li.querySelector(".adapter-weight").value) }));
}

function requestBody() {
  if ($("random-seed").checked) $("seed").value = Math.floor(Math.random() * 2 ** 32);
  const steps = Number($("steps").value);
  const body = {
    prompt: $("prompt").value,
    size: `${$("width").value}x${$("height").value}`,
    steps,
    guidance_scale: Number($("guidance").value),
    seed: Number($("seed").value),
    adapters: selectedAdapters(),
    stream: true,
    partial_images: Math.max(0, Math.min(steps - 1, 10)),
    response_format: "b64_json",
  };
  const negative = $("negative-prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  return body;
}

// Server-sent events from a fetch body: yields {event, data} as they arrive.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block);
      const data = /^data: (.*)$/m.exec(block);
      if (data) yield { event: event ? event[1] : "message", data: JSON.parse(data[1]) };
    }
  }
}

function showPreview(b64) {
  const preview = $("preview");
  preview.src = `data:image/png;base64,${b64}`;
  preview.hidden = false;
  preview.dataset.previews = String(Number(preview.dataset.previews) + 1);
  $("result").hidden = true;
}

function describe(body) {
  const adapters = body.adapters.map((a) => `${a.name}×${a.weight}`).join(", ") || "none";
  return `“${body.prompt}” · ${body.size} · ${body.steps} steps · guidance ${body.guidance_scale} · seed ${body.seed} · adapters: ${adapters}`;
}

function showResult(b64, body) {
  const url = `data:image/png;base64,${b64}`;
  const result = $("result");
  result.src = url;
  result.hidden = false;
  $("preview").hidden = true;
  $("result-params").textContent = describe(body);
  const download = $("download");
  download.href = url;
  download.download = `deft-${body.seed}.png`;
  download.hidden = false;
  addToGallery(url, body);
}

function addToGallery(url, body) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.title = describe(body);
  const img = document.createElement("img");
  img.src = url;
  img.alt = `Generated: ${body.prompt} (seed ${body.seed})`;
  button.append(img);
  button.addEventListener("click", () => {
    $("result").src = url;
    $("result").hidden = false;
    $("preview").hidden = true;
    $("result-params").textContent = describe(body);
    $("download").href = url;
    $("download").download = `deft-${body.seed}.png`;
  });
  li.append(button);
  $("gallery").prepend(li);
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  busy = true;
  $("generate").disabled = true;
  $("preview").dataset.previews = "0";
  const body = requestBody();
  $("status").textContent = "Generating…";
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const { event: kind, data } of serverEvents(response)) {
      if (kind === "error") throw new Error(data.error.message);
      if (kind === "image_generation.partial_image") {
        showPreview(data.b64_json);
        $("status").textContent = `Preview ${data.partial_image_index + 1}…`;
      } else if (kind === "image_generation.completed") {
        showResult(data.b64_json, body);
        $("status").textContent = "Done.";
      }
    }
  } catch (error) {
    $("status").textContent = `Failed: ${error.message}`;
  } finally {
    busy = false;
    $("generate").disabled = false;
  }
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();  // the fields before the file: the server streams the file as it arrives
  form.append("name", $("upload-name").value);
  form.append("format", $("upload-format").value);
  form.append("file", $("upload-file").files[0]);
  $("upload-status").textContent = "Uploading…";
  const response = await fetch("/v1/adapters", { method: "POST", headers: headers(), body: form });
  if (!response.ok) {
    $("upload-status").textContent = `Failed: ${await errorText(response)}`;
    return;
  }
  const adapter = await response.json();
  $("upload-status").textContent = `Registered ${adapter.name} (${adapter.kind}, rank ${adapter.ranks.join("/")}).`;
  await loadModels();
}

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  $("generate-form").addEventListener("submit", generate);
  $("upload-form").addEventListener("submit", upload);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
  });
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
