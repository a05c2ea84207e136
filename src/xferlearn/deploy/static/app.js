// The upload page: choose or drop an image, POST it to predict?explain=true, show the answer.
"use strict";

const $ = (id) => document.getElementById(id);
let maxUploadBytes = 20 * 2 ** 20;
let previewUrl = null;

function percent(p) { return (100 * p).toFixed(1) + "%"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function loadModelCard() {
  try {
    const [card, health] = await Promise.all([fetch("model").then((r) => r.json()),
                                              fetch("health").then((r) => r.json())]);
    maxUploadBytes = health.max_upload_bytes;
    $("max-size").textContent = (maxUploadBytes / 2 ** 20).toFixed(0) + " MB";
    const auc = card.metrics && typeof card.metrics.auc === "number" ? `, validation AUC ${card.metrics.auc.toFixed(3)}` : "";
    $("model-info").textContent = `Model ${card.model_id}: ${card.backbone} (${card.weights}), ` +
      `classes ${card.classes.join(", ")}${auc}.`;
  } catch (err) {
    $("model-info").textContent = "The model card could not be loaded.";
  }
}

function renderBars(result) {
  const list = $("probabilities");
  list.replaceChildren();
  for (const [name, p] of Object.entries(result.probabilities)) {
    const item = document.createElement("li");
    if (name === result.class) item.classList.add("predicted");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "meter");
    track.setAttribute("aria-label", `Probability of ${name}`);
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "1");
    track.setAttribute("aria-valuenow", p.toFixed(4));
    track.setAttribute("aria-valuetext", percent(p));
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = percent(p);
    track.append(fill);
    if (name === result.positive_class && result.threshold !== null) {
      const tick = document.createElement("div");
      tick.className = "tick";
      tick.style.left = percent(result.threshold);
      tick.title = `threshold ${result.threshold.toFixed(3)}`;
      track.append(tick);
    }
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(p);
    item.append(label, track, value);
    list.append(item);
  }
}

function renderResult(result) {
  $("predicted-class").textContent = result.class;
  renderBars(result);
  $("threshold-info").textContent = result.threshold === null
    ? "Decision: the most probable class."
    : `Decision threshold ${result.threshold.toFixed(3)} on ${result.positive_class} ` +
      `(the black tick; ${result.threshold_source}).`;
  if (result.heatmap_png_base64) {
    $("heatmap").src = "data:image/png;base64," + result.heatmap_png_base64;
    $("heatmap").hidden = false;
    $("heatmap-caption").textContent = `Grad-CAM heatmap for ${result.class}`;
  } else {
    $("heatmap").hidden = true;
    $("heatmap-caption").textContent = "No heatmap was returned.";
  }
  $("result").hidden = false;
}

async function classify(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  if (!file) return;
  if (file.size > maxUploadBytes) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB, over the ${(maxUploadBytes / 2 ** 20).toFixed(0)} MB limit.`);
    return;
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("status").textContent = `Classifying ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  let response, body;
  try {
    response = await fetch("predict?explain=true", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    showError(`The server could not be reached or sent no JSON (${err.message}).`);
    return;
  }
  if (!response.ok) {
    showError(`Could not classify ${file.name}: ${body.error || response.statusText}`);
    return;
  }
  $("status").textContent = `${file.name}: ${body.class}.`;
  renderResult(body);
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => classify(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) classify(file);
  });
  loadModelCard();
}

document.addEventListener("DOMContentLoaded", setUp);
