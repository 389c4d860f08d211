// The page's only logic: send the chosen images to POST /predict (multipart field `image`, once per
// image, top_k=5) and show each answer, or the API's error message, as the API states it.
"use strict";

const TOP_K = 5;
const form = document.getElementById("upload");
const input = document.getElementById("images");
const dropzone = document.getElementById("dropzone");
const statusLine = document.getElementById("status");
const requestError = document.getElementById("request-error");
const results = document.getElementById("results");
const template = document.getElementById("result-template");
const modelLine = document.getElementById("model");

const percent = (p) => `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;

async function showModel() {
  try {
    const response = await fetch("model", { headers: { Accept: "application/json" } });
    const card = await response.json();
    if (!response.ok) {
      modelLine.textContent = `Model: ${card.error ? card.error.message : `HTTP ${response.status}`}`;
      return;
    }
    const evaluation = card.evaluation || {};
    const accuracy = typeof evaluation.accuracy === "number" ? `, ${percent(evaluation.accuracy)} test accuracy` : "";
    modelLine.textContent = `Model: version ${card.version}${accuracy}` +
      (card.training ? ` (configuration ${card.training.config}, trained ${card.training.date})` : "");
  } catch (error) {
    modelLine.textContent = "Model: unknown (the gateway did not answer)";
  }
}

function resultCard(file) {
  const item = template.content.firstElementChild.cloneNode(true);
  const img = item.querySelector("img");
  const url = URL.createObjectURL(file);
  img.alt = `Uploaded image ${file.name}`;
  img.addEventListener("load", () => URL.revokeObjectURL(url));
  img.addEventListener("error", () => {  // not a picture this browser can show, e.g. a text file
    img.classList.add("broken");
    img.parentElement.classList.add("no-preview");
    URL.revokeObjectURL(url);
  });
  img.src = url;
  item.querySelector(".filename").textContent = file.name;
  item.querySelector(".outcome").textContent = "Classifying…";
  return item;
}

function showPredictions(item, answer) {
  const outcome = item.querySelector(".outcome");
  const list = item.querySelector(".predictions");
  const [top] = answer.predictions;
  outcome.replaceChildren();
  const label = document.createElement("span");
  label.className = "top-label";
  label.textContent = top.label;
  outcome.append(label, ` (${percent(top.probability)}, model version ${answer.model_version})`);
  if (answer.in_distribution === false) {  // the version's own out-of-distribution threshold
    const warning = document.createElement("p");
    warning.className = "out-of-distribution";
    warning.textContent = "This does not look like any of the ten classes";
    outcome.before(warning);
  }
  list.setAttribute("aria-label", `Top ${answer.predictions.length} classes for ${item.querySelector(".filename").textContent}`);
  for (const { label: name, probability } of answer.predictions) {
    const row = document.createElement("li");
    row.className = "prediction";
    const nameCell = document.createElement("span");
    nameCell.className = "class-name";
    nameCell.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "percent";
    value.textContent = percent(probability);
    row.append(nameCell, bar, value);
    list.append(row);
  }
}

function showError(item, error) {
  item.classList.add("failed");
  const outcome = item.querySelector(".outcome");
  outcome.replaceChildren();
  const message = document.createElement("span");
  message.className = "error-message";
  message.textContent = error.message;
  const code = document.createElement("span");
  code.className = "error-code";
  code.textContent = ` (${error.code})`;
  outcome.append(message, code);
}

async function readAnswer(response) {
  // Every gateway answer is JSON; something in between (a proxy) may answer otherwise.
  try {
    return await response.json();
  } catch {
    return { success: false, error: { code: `http_${response.status}`, message: `the server answered HTTP ${response.status} ${response.statusText}`.trim() } };
  }
}

async function classify(files) {
  files = Array.from(files);
  if (!files.length) return;
  requestError.hidden = true;
  requestError.textContent = "";
  const cards = files.map(resultCard);
  results.replaceChildren(...cards);
  statusLine.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`;

  const body = new FormData();
  for (const file of files) body.append("image", file, file.name);
  let answer, response;
  try {
    response = await fetch(`predict?top_k=${TOP_K}`, { method: "POST", body, headers: { Accept: "application/json" } });
    answer = await readAnswer(response);
  } catch (error) {
    answer = { success: false, error: { code: "network_error", message: "the gateway could not be reached; check the connection and try again" } };
  }

  if (answer.error) {  // the whole request failed: every image shares its error
    const retry = response && response.headers.get("Retry-After");
    requestError.textContent = `Not classified: ${answer.error.message}` + (retry ? ` (retry in ${retry} s)` : "");
    requestError.hidden = false;
    cards.forEach((card) => showError(card, answer.error));
  } else {
    const answers = answer.results || [answer];
    answers.forEach((one, index) => (one.success ? showPredictions(cards[index], one) : showError(cards[index], one.error)));
  }
  const done = cards.filter((card) => !card.classList.contains("failed")).length;
  statusLine.textContent = `${done} of ${files.length} image${files.length > 1 ? "s" : ""} classified.`;
  input.value = "";  // choosing the same file again classifies it again
}

form.addEventListener("submit", (event) => { event.preventDefault(); classify(input.files); });
input.addEventListener("change", () => classify(input.files));

for (const name of ["dragenter", "dragover"]) {
  dropzone.addEventListener(name, (event) => { event.preventDefault(); dropzone.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  dropzone.addEventListener(name, () => dropzone.classList.remove("dragging"));
}
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  classify(event.dataTransfer.files);
});
// Dropped anywhere else, the browser would open the file and leave the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

showModel();
