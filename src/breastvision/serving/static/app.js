// The page's only script: model card on load, upload → /api/predict → bars and overlays.
// Text from the server goes in through textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(4);
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) return value.map(formatValue).join(", ");
  // Lineage entries such as weights per part read "cnn = densenet121….safetensors; vit = …".
  if (typeof value === "object") return Object.entries(value).map(([k, v]) => `${k} = ${formatValue(v)}`).join("; ");
  return String(value);
}

let currentCard = null;  // the model card, for the operating points a result's decisions refer to

function renderDecisions(decisions) {
  const list = $("decisions");
  list.replaceChildren();
  const points = (currentCard && currentCard.operating_points) || {};
  const positive = points.positive_class || "positive";
  for (const [name, isPositive] of Object.entries(decisions || {})) {
    const threshold = (points.thresholds || {})[name];
    const rule = threshold === undefined ? "" : ` (P(${positive}) ≥ ${threshold.toFixed(3)})`;
    list.append(el("li", { "data-operating-point": name, "data-positive": String(isPositive) },
      `at ${name}${rule}: ${isPositive ? positive : `not ${positive}`}`));
  }
  list.hidden = list.children.length === 0;
}

// Nested metrics {"val": {"accuracy": 0.9}} become rows "val.accuracy | 0.9000".
function flatten(object, prefix = "", rows = []) {
  for (const [key, value] of Object.entries(object || {})) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, name, rows);
    else rows.push([name, value]);
  }
  return rows;
}

function fillTable(table, rows, empty) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) rows = [[empty, ""]];
  for (const cells of rows) {
    const tr = el("tr");
    for (const cell of cells) tr.append(el("td", {}, formatValue(cell)));
    body.append(tr);
  }
}

function renderCard(card) {
  currentCard = card;
  const pre = card.preprocessing || {};
  const source = card.source || {};
  $("model-title").textContent = `${card.architecture} · ${card.class_names.join(" / ")}`;
  const facts = [
    ["architecture", card.architecture],
    ["classes", card.class_names.join(", ")],
    ["input", `${pre.input_size}×${pre.input_size}` + (pre.resize ? ` (resize ${pre.resize}, centre crop)` : "")],
    ["normalisation", `mean ${JSON.stringify(pre.mean)}, std ${JSON.stringify(pre.std)}`],
    ["stain normaliser", pre.stain ? (pre.stain.method || "fitted") : "none"],
    ["test-time views", card.tta ? `${card.tta.set} (${card.tta.views.join(", ")})` : "—"],
    ["model file", source.file],
    ["sha256", source.sha256 ? source.sha256.slice(0, 16) + "…" : "—"],
    ["runs on", source.backend],
  ];
  if (!source.explainable) {  // an ONNX export has no gradients for Grad-CAM
    $("explain").checked = false;
    $("explain").disabled = true;
    $("explain").parentElement.title = "heat-maps need the .safetensors model file";
  }
  const dl = $("card-facts");
  dl.replaceChildren();
  for (const [term, value] of facts) dl.append(el("dt", {}, term), el("dd", {}, formatValue(value)));
  const lineage = (card.lineage || []).map((step) => {
    const { stage, ...rest } = step;
    return [stage || "", Object.entries(rest).map(([k, v]) => `${k}: ${formatValue(v)}`).join("; ")];
  });
  fillTable($("card-lineage"), lineage, "no lineage recorded");
  fillTable($("card-metrics"), flatten(card.metrics), "no metrics recorded");
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function renderResult(result) {
  // The headline is the server's decision: the most probable class, or the call at the operating
  // point the server was started with (serve --operating-point), which is named beside it.
  const decision = result.decision || result.predicted_class;
  $("predicted-class").textContent = decision;
  const rule = result.decision_rule && result.decision_rule !== "argmax" ? `at ${result.decision_rule}, ` : "";
  $("timing").textContent = `(${rule}${result.elapsed_ms} ms${result.tta ? `, TTA ${result.tta}` : ""})`;
  const bars = $("probabilities");
  bars.replaceChildren();
  for (const name of result.class_names) {
    const p = result.probabilities[name];
    const row = el("div", { class: "bar-row", "data-class": name, "data-probability": String(p) });
    if (name === decision) row.classList.add("top");
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    const track = el("div", { class: "bar-track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
      "aria-valuenow": String(p), "aria-label": name });
    track.append(fill);
    row.append(el("span", { class: "bar-label" }, name), track, el("span", { class: "bar-value" }, `${(100 * p).toFixed(1)} %`));
    bars.append(row);
  }
  renderDecisions(result.decisions);
  // A model file with a scope flags an upload far from its training images instead of trusting its label.
  const scope = $("scope-notice");
  scope.hidden = result.out_of_scope !== true;
  scope.dataset.scopeScore = result.scope_score === undefined ? "" : String(result.scope_score);
  if (result.image && result.image.preview) {
    // A DICOM upload: the browser cannot show the file, so the server sends the decoded frame.
    $("preview").src = `data:image/png;base64,${result.image.preview}`;
    $("preview").hidden = false;
  }
  const overlays = $("overlays");
  overlays.replaceChildren();
  const explanation = result.explanation;
  if (explanation) {
    for (const [name, png] of Object.entries(explanation.overlays)) {
      const figure = el("figure", { class: "overlay", id: `overlay-${name}` });
      figure.append(el("img", { src: `data:image/png;base64,${png}`, alt: `${name} heat-map` }),
        el("figcaption", {}, `${name === "gradcam" ? "Grad-CAM" : `${explanation.method}, ${name}`}` +
          ` · evidence for "${explanation.target_class}"`));
      overlays.append(figure);
    }
  }
  $("result-empty").hidden = true;
  $("result-body").hidden = false;
}

async function predict(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const result = $("result");
  result.dataset.state = "busy";
  $("predict-button").disabled = true;
  showError("");
  const form = new FormData();
  form.append("file", file);
  form.append("explain", $("explain").checked ? "true" : "false");
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: `server answered ${response.status}` }));
    if (!response.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    renderResult(body);
    result.dataset.state = "done";
  } catch (err) {
    showError(err.message);
    result.dataset.state = "error";
  } finally {
    $("predict-button").disabled = false;
  }
}

function chooseFile(file) {
  if (!file) return;
  $("drop-text").textContent = file.name;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  // DICOM is shown once the server has decoded it (renderResult).
  preview.hidden = /\.(dcm|dicom)$/i.test(file.name);
  $("predict-button").disabled = false;
}

function init() {
  fetch("/api/model").then((r) => r.json()).then(renderCard)
    .catch((err) => showError(`cannot load the model card: ${err.message}`));
  $("upload-form").addEventListener("submit", predict);
  $("file").addEventListener("change", () => chooseFile($("file").files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      $("file").files = e.dataTransfer.files;
      chooseFile(e.dataTransfer.files[0]);
    }
  });
}

document.addEventListener("DOMContentLoaded", init);
