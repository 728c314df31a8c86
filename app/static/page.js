// The page for people: calls the public API only (v1/models and v1/{image,text,multimodal}/classify).
// What comes from the server or from the person enters the page as text (textContent), never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "crossmodal.apiKey";
  const TASK_WORDS = { image: "image", text: "text", multimodal: "image + text" };
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("classify-form"), dropZone: $("drop-zone"), imageInput: $("image-input"), preview: $("preview"),
    dropText: $("drop-text"), clearImage: $("clear-image"), text: $("text-input"), select: $("model-select"),
    hint: $("task-hint"), classify: $("classify"), keyForm: $("key-form"), keyMessage: $("key-message"),
    keyInput: $("key-input"), error: $("error"), result: $("result"), topLabel: $("top-label"),
    topProbability: $("top-probability"), modelName: $("model-name"), calibration: $("model-calibration"),
    accuracy: $("model-accuracy"), bars: $("bars"),
  };

  let models = null; // the loaded models (GET v1/models), once known
  let image = null; // the chosen image File
  let previewUrl = null;
  let busy = false;
  let retry = null; // what to run again once the person has entered an API key
  const picked = {}; // task → the model name the person chose
  let sessionKey = storedKey(); // the API key, if the server asked for one

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
  }

  function storeKey(key) {
    sessionKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    } catch { /* storage refused (private mode): the key lives until the page reloads */ }
  }

  const FAILURES = {
    400: "The image could not be read",
    404: "That model is not available on the server",
    413: "The input is too large",
    415: "That file is not an image format the service reads",
    422: "The service could not accept this input",
    429: "Too many requests; wait a moment and try again",
    503: "The service is starting, shutting down or busy; try again in a moment",
    504: "The service took too long to answer; try again",
  };

  async function failureMessage(response) {
    let detail = "";
    try {
      const body = JSON.parse(await response.text());
      if (body && typeof body.detail === "string") detail = body.detail;
    } catch { /* not JSON: a plain 500 or a proxy's page */ }
    const plain = FAILURES[response.status] ||
      (response.status >= 500 ? "Something went wrong on the server" : `The request failed (HTTP ${response.status})`);
    return detail ? `${plain}: ${detail}` : `${plain}.`;
  }

  async function callApi(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (sessionKey) headers.set("X-API-Key", sessionKey);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch {
      throw new ApiError(0, "Could not reach the service. Is it running, and is this page served by it?");
    }
    if (!response.ok) throw new ApiError(response.status, await failureMessage(response));
    return response.json();
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  function askForKey(again) {
    retry = again;
    el.keyMessage.textContent = sessionKey
      ? "The API key was not accepted. Enter a valid key for this server."
      : "This server needs an API key to classify.";
    storeKey("");
    el.keyForm.hidden = false;
    el.keyInput.focus();
    refresh();
    showError("");
  }

  // ---- models -------------------------------------------------------------------------------------------

  async function loadModels() {
    try {
      const body = await callApi("v1/models");
      models = body.models;
      showError("");
    } catch (error) {
      if (error.status === 401) return askForKey(loadModels);
      showError(error.message);
      if (error.status === 503 || error.status === 0) setTimeout(loadModels, 2000);
    }
    refresh();
  }

  function currentTask() {
    const hasText = el.text.value.trim() !== "";
    if (image && hasText) return "multimodal";
    if (image) return "image";
    if (hasText) return "text";
    return null;
  }

  function option(text, value) {
    const item = document.createElement("option");
    item.textContent = text;
    if (value !== undefined) item.value = value;
    return item;
  }

  const INPUT_WORDS = { image: "an image", text: "a text", multimodal: "an image and a text" };

  function refresh() {
    const task = currentTask();
    const fitting = models === null || task === null ? [] : models.filter((m) => m.task === task)
      .sort((a, b) => (b.default - a.default) || a.name.localeCompare(b.name));
    const select = el.select;
    select.replaceChildren();
    if (models === null) {
      select.append(option(el.keyForm.hidden ? "loading models…" : "enter the API key to list the models"));
    } else if (task === null) {
      select.append(option("choose an image or type a text first"));
      el.hint.textContent = "Image only: image models. Text only: text models. Both: image + text models.";
    } else if (fitting.length === 0) {
      select.append(option(`no ${TASK_WORDS[task]} model is loaded`));
      el.hint.textContent = `This server has no ${TASK_WORDS[task]} model loaded.`;
    } else {
      for (const m of fitting) {
        select.append(option(`${m.name}${m.default ? " (default)" : ""} · ${m.classes.length} classes`, m.name));
      }
      if (fitting.some((m) => m.name === picked[task])) select.value = picked[task];
      el.hint.textContent = `For ${INPUT_WORDS[task]}: ${TASK_WORDS[task]} models.`;
    }
    select.disabled = busy || fitting.length === 0;
    el.classify.disabled = busy || fitting.length === 0;
  }

  // ---- the image ----------------------------------------------------------------------------------------

  function setImage(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    image = file || null;
    if (image) {
      previewUrl = URL.createObjectURL(image);
      el.preview.src = previewUrl;
      el.preview.alt = `preview of ${image.name}`;
      el.preview.hidden = false;
      el.dropText.textContent = `${image.name} · ${formatBytes(image.size)} — click or drop to change`;
    } else {
      el.imageInput.value = "";
      el.preview.removeAttribute("src");
      el.preview.hidden = true;
      el.dropText.replaceChildren(strong("Drop an image here"), document.createElement("br"),
        document.createTextNode("or click to choose one"));
    }
    el.clearImage.hidden = !image;
    refresh();
  }

  function strong(text) {
    const node = document.createElement("strong");
    node.textContent = text;
    return node;
  }

  function formatBytes(size) {
    if (size < 1024) return `${size} B`;
    if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} kB`;
    return `${(size / 1024 / 1024).toFixed(1)} MB`;
  }

  // ---- classify -----------------------------------------------------------------------------------------

  function request(task, model) {
    const query = `?model=${encodeURIComponent(model)}`;
    if (task === "text") {
      return [`v1/text/classify${query}`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: el.text.value }),
      }];
    }
    const form = new FormData();
    if (task === "image") {
      form.append("file", image, image.name);
      return [`v1/image/classify${query}`, { method: "POST", body: form }];
    }
    form.append("files", image, image.name);
    form.append("texts", el.text.value);
    return [`v1/multimodal/classify${query}`, { method: "POST", body: form }];
  }

  async function classify() {
    const task = currentTask();
    const model = el.select.value;
    if (!task || !model) return;
    busy = true;
    el.classify.textContent = "Classifying…";
    refresh();
    showError("");
    try {
      const body = await callApi(...request(task, model));
      render(body);
    } catch (error) {
      if (error.status === 401) askForKey(classify); else showError(error.message);
    } finally {
      busy = false;
      el.classify.textContent = "Classify";
      refresh();
    }
  }

  function formatPercent(probability) {
    const percent = probability * 100;
    if (percent > 0 && percent < 0.05) return "<0.1%";
    if (percent < 100 && percent >= 99.95) return ">99.9%"; // never round a doubt away to 100%
    return `${percent.toFixed(1)}%`;
  }

  function describeCalibration(info) {
    const calibration = (info && info.calibration) || {};
    const validation = (info && info.metrics && info.metrics.validation) || {};
    const parts = [];
    if (typeof calibration.temperature === "number") parts.push(`temperature ${calibration.temperature.toFixed(2)}`);
    if (calibration.top_label) parts.push("top-label map");
    const ece = typeof calibration.ece_after === "number" ? calibration.ece_after : validation.ece;
    if (typeof ece === "number") {
      let text = `ECE ${formatPercent(ece)}`;
      if (typeof calibration.ece_before === "number") text += ` (${formatPercent(calibration.ece_before)} before)`;
      parts.push(text);
    }
    return parts.length ? parts.join(" · ") : "not recorded";
  }

  function render(body) {
    const prediction = body.predictions[0];
    const info = (models || []).find((m) => m.name === body.model.name);
    el.topLabel.textContent = prediction.label;
    el.topProbability.textContent = formatPercent(prediction.probability);
    el.modelName.textContent = `${body.model.name} (version ${body.model.version}, ${TASK_WORDS[body.model.task] || body.model.task})`;
    el.calibration.textContent = describeCalibration(info);
    const metrics = (info && info.metrics) || {};
    const accuracy = metrics.validation && typeof metrics.validation.accuracy === "number"
      ? metrics.validation.accuracy : metrics.val_accuracy;
    el.accuracy.textContent = typeof accuracy === "number" ? formatPercent(accuracy) : "not recorded";

    const rows = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
    el.bars.replaceChildren(...rows.map(([label, probability]) => bar(label, probability, label === prediction.label)));
    el.result.hidden = false;
  }

  function bar(label, probability, top) {
    const row = document.createElement("li");
    row.className = top ? "bar-row top" : "bar-row";
    row.dataset.probability = String(probability);
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = label;
    name.title = label;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${Math.min(100, Math.max(0, probability * 100))}%`; // CSSOM: allowed by style-src 'self'
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = formatPercent(probability);
    row.append(name, track, value);
    return row;
  }

  // ---- wiring -------------------------------------------------------------------------------------------

  el.imageInput.addEventListener("change", () => setImage(el.imageInput.files[0]));
  el.clearImage.addEventListener("click", () => setImage(null));
  // A file the browser cannot show (TIFF, or not an image at all): no broken preview; the server has the last word.
  el.preview.addEventListener("error", () => { if (image) el.preview.hidden = true; });
  el.text.addEventListener("input", refresh);
  el.select.addEventListener("change", () => {
    const task = currentTask();
    if (task) picked[task] = el.select.value;
  });
  el.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !el.classify.disabled) {
      event.preventDefault();
      classify();
    }
  });
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    classify();
  });

  for (const name of ["dragenter", "dragover"]) {
    el.dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      el.dropZone.classList.add("dragging");
    });
  }
  el.dropZone.addEventListener("dragleave", () => el.dropZone.classList.remove("dragging"));
  el.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    el.dropZone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setImage(file);
  });
  // A file dropped beside the zone must not make the browser navigate away to it.
  for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());

  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) return;
    storeKey(key);
    el.keyInput.value = "";
    el.keyForm.hidden = true;
    refresh();
    const again = retry;
    retry = null;
    if (models === null) loadModels().then(() => { if (again === classify && models) classify(); });
    else if (again) again();
  });

  setImage(null);
  loadModels();
})();
