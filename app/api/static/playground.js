// The InferQL playground: one generation at a time over graphql-transport-ws (the vendored
// graphql-ws client), each token coloured by its probability. Plain ES module, no build step.
import { createClient } from "/static/vendor/graphql-ws/client.js";

const $ = (selector) => document.querySelector(selector);
const httpUrl = location.origin + "/graphql";
const wsUrl = httpUrl.replace(/^http/, "ws");

const RESULT = `
  text finishReason needsReview
  confidence { score minProbability }
  model { id version }
  usage { promptTokens completionTokens totalTokens }
  timing { queuedMs timeToFirstTokenMs generationMs totalMs tokensPerSecond }`;

const EVENT = `
  __typename
  ... on JobEvent { jobId seq }
  ... on JobQueued { position }
  ... on GenerationStarted { promptTokens model { id version } }
  ... on TokenGenerated { index text probability alternatives { text probability } }
  ... on GenerationCompleted { result { ${RESULT} } }
  ... on GenerationCancelled { result { ${RESULT} } }
  ... on GenerationFailed { error { code message } }`;

const GENERATE = `subscription Generate($input: GenerationInput!) { generate(input: $input) { ${EVENT} } }`;
const JOB_EVENTS = `subscription JobEvents($id: ID!, $after: Int!) { jobEvents(id: $id, after: $after) { ${EVENT} } }`;
const CANCEL = `mutation Cancel($id: ID!) { cancelJob(id: $id) { id status } }`;
const JOBS = `query Jobs { jobs(first: 20) { nodes { id status createdAt result { text confidence { score } } } } }`;

let running = null; // { client, jobId, dispose }

function key() {
  return $("#api-key").value.trim();
}

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

// Probability 0 -> red, 0.5 -> yellow, 1 -> green.
function colour(probability) {
  return `hsl(${Math.round(120 * probability)} 75% 80%)`;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function addToken(event) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = event.text;
  span.dataset.probability = String(event.probability);
  span.dataset.index = String(event.index);
  span.style.background = colour(event.probability);
  const alternatives = (event.alternatives || []).map((a) => `${JSON.stringify(a.text)} ${percent(a.probability)}`);
  // Shown on hover by playground.css (a tooltip that also appears in screenshots).
  span.dataset.tip = `${JSON.stringify(event.text)}: ${percent(event.probability)}` +
    (alternatives.length ? `\nalternatives:\n${alternatives.join("\n")}` : "");
  span.setAttribute("aria-label", span.dataset.tip);
  $("#output").append(span);
}

function showResult(result, jobId) {
  $("#result").hidden = false;
  $("#confidence").textContent = result.confidence.score.toFixed(4);
  $("#confidence").dataset.score = String(result.confidence.score);
  $("#needs-review").textContent = String(result.needsReview);
  $("#finish-reason").textContent = result.finishReason;
  $("#model-version").textContent = `${result.model.id} ${result.model.version}`;
  const t = result.timing;
  $("#timing").textContent = `total ${t.totalMs.toFixed(0)} ms, queued ${t.queuedMs.toFixed(0)} ms` +
    (t.timeToFirstTokenMs != null ? `, first token ${t.timeToFirstTokenMs.toFixed(0)} ms` : "") +
    (t.tokensPerSecond != null ? `, ${t.tokensPerSecond.toFixed(1)} tokens/s` : "");
  const u = result.usage;
  $("#usage").textContent = `${u.promptTokens} prompt + ${u.completionTokens} completion = ${u.totalTokens} tokens`;
  $("#job-id").textContent = jobId || "";
}

function onEvent(event) {
  if (running && event.jobId) running.jobId = event.jobId;
  switch (event.__typename) {
    case "JobQueued":
      setStatus(`queued (position ${event.position})`);
      break;
    case "GenerationStarted":
      setStatus(`generating with ${event.model.id} ${event.model.version} (${event.promptTokens} prompt tokens)`);
      break;
    case "TokenGenerated":
      addToken(event);
      break;
    case "GenerationCompleted":
      setStatus("done");
      showResult(event.result, event.jobId);
      break;
    case "GenerationCancelled":
      setStatus("cancelled");
      showResult(event.result, event.jobId);
      break;
    case "GenerationFailed":
      setStatus(`failed: ${event.error.code}: ${event.error.message}`, true);
      break;
  }
}

function finish() {
  if (running) running.client.dispose();
  running = null;
  $("#run").disabled = false;
  $("#cancel").disabled = true;
}

function stream(query, variables) {
  if (running) finish();
  $("#output").replaceChildren();
  $("#result").hidden = true;
  $("#confidence").textContent = "";
  const client = createClient({
    url: wsUrl,
    connectionParams: { Authorization: `Bearer ${key()}` },
    retryAttempts: 0,
  });
  running = { client, jobId: variables.id || null };
  $("#run").disabled = true;
  $("#cancel").disabled = false;
  setStatus("connecting…");
  client.subscribe({ query, variables }, {
    next: (message) => {
      if (message.errors) {
        const e = message.errors[0];
        setStatus(`${e.extensions?.code || "ERROR"}: ${e.message}`, true);
      } else {
        onEvent(Object.values(message.data)[0]);
      }
    },
    error: (error) => {
      const reason = error?.reason || error?.message || (Array.isArray(error) ? error[0]?.message : String(error));
      setStatus(`connection failed: ${reason || "closed"} (is the API key right?)`, true);
      finish();
    },
    complete: finish,
  });
}

async function http(query, variables = {}) {
  const response = await fetch(httpUrl, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "application/graphql-response+json, application/json",
      Authorization: `Bearer ${key()}`,
    },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(`${body.errors[0].extensions?.code}: ${body.errors[0].message}`);
  return body.data;
}

function run(event) {
  event.preventDefault();
  if (!key()) {
    setStatus("paste your API key first", true);
    return;
  }
  localStorage.setItem("inferql.apiKey", key());
  const input = {
    prompt: $("#prompt").value,
    temperature: Number($("#temperature").value),
    maxTokens: Number($("#max-tokens").value),
    alternatives: Number($("#alternatives").value),
  };
  stream(GENERATE, { input });
}

async function cancel() {
  if (!running) return;
  $("#cancel").disabled = true;
  if (!running.jobId) {
    finish(); // nothing started yet: leaving the subscription cancels the job
    setStatus("cancelled");
    return;
  }
  setStatus("cancelling…");
  try {
    await http(CANCEL, { id: running.jobId }); // the stream then ends with GenerationCancelled
  } catch (error) {
    setStatus(String(error.message || error), true);
  }
}

async function loadJobs() {
  const body = $("#jobs tbody");
  body.replaceChildren();
  try {
    const data = await http(JOBS);
    for (const job of data.jobs.nodes) {
      const row = document.createElement("tr");
      row.dataset.jobId = job.id;
      const cells = [new Date(job.createdAt).toLocaleString(), job.status, job.id,
        job.result ? `${job.result.text.slice(0, 60)} (${job.result.confidence.score.toFixed(2)})` : ""];
      cells.forEach((text, i) => {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (i === 2) cell.className = "id";
        row.append(cell);
      });
      const action = document.createElement("td");
      const button = document.createElement("button");
      button.textContent = "re-attach";
      button.className = "reattach";
      button.addEventListener("click", () => {
        showTab("generate-panel");
        stream(JOB_EVENTS, { id: job.id, after: 0 });
      });
      action.append(button);
      row.append(action);
      body.append(row);
    }
  } catch (error) {
    setStatus(String(error.message || error), true);
  }
}

function showTab(panelId) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.panel === panelId);
    $(`#${tab.dataset.panel}`).hidden = tab.dataset.panel !== panelId;
  }
  if (panelId === "jobs-panel") loadJobs();
}

$("#api-key").value = localStorage.getItem("inferql.apiKey") || "";
$("#form").addEventListener("submit", run);
$("#cancel").addEventListener("click", cancel);
$("#refresh-jobs").addEventListener("click", loadJobs);
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showTab(tab.dataset.panel));
}
document.body.dataset.ready = "true";
