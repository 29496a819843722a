// Headless Chromium (Debian's package) driven by playwright-core, with every request that
// is not for the server aborted: GraphiQL and the playground must work offline.
// Usage: node browser.mjs <server url> <api key> <artifacts dir>
// Prints one JSON line with what it saw; screenshots go to the artifacts dir.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, key, artifacts] = process.argv.slice(2);
const origin = new URL(base).origin;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const out = { blocked: [], consoleErrors: [] };
const profile = mkdtempSync(join(tmpdir(), "inferql-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM, args: ARGS, headless: true, viewport: { width: 1280, height: 900 },
});
await context.route("**/*", (route) => {
  const url = route.request().url();
  if (url.startsWith(origin + "/") || url.startsWith("data:")) return route.continue();
  out.blocked.push(url);
  return route.abort();
});

const only = process.env.STEPS ? process.env.STEPS.split(",") : null;

async function step(name, fn) {
  if (only && !only.includes(name)) return;
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") out.consoleErrors.push(`${name}: ${m.text()}`); });
  page.on("pageerror", (e) => out.consoleErrors.push(`${name}: ${e.message}`));
  try {
    out[name] = await fn(page);
  } catch (error) {
    out[name] = { error: String(error.stack || error) };
  } finally {
    await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true }).catch(() => {});
    await page.close();
  }
}

// GraphiQL 4 keeps CodeMirror 5 editors: each wrapper element carries its editor.
const setEditor = (page, selector, text) => page.evaluate(([s, t]) => document.querySelector(s).CodeMirror.setValue(t), [selector, text]);
// The headers editor: the tool editor that holds the Authorization placeholder.
const HEADERS_EDITOR = () => [...document.querySelectorAll(".graphiql-editor-tool .CodeMirror")]
  .find((e) => e.CodeMirror.getValue().includes("Authorization"));
const response = (page) => page.evaluate(() => document.querySelector(".graphiql-response .CodeMirror").CodeMirror.getValue());

async function graphiqlRun(page, query, until) {
  await setEditor(page, ".graphiql-query-editor .CodeMirror", query);
  await page.waitForTimeout(500); // GraphiQL re-reads the operation name from the edited document
  await page.click(".graphiql-execute-button");
  await page.waitForFunction((text) => document.querySelector(".graphiql-response .CodeMirror")?.CodeMirror.getValue().includes(text),
    until, { timeout: 60000 });
  return JSON.parse(await response(page));
}

await step("graphiql", async (page) => {
  await page.goto(base + "/graphql", { waitUntil: "load" });
  await page.waitForSelector(".graphiql-query-editor .CodeMirror", { timeout: 30000 });
  await page.screenshot({ path: join(artifacts, "graphiql-welcome.png") });
  const welcome = await page.evaluate(() => document.querySelector(".graphiql-query-editor .CodeMirror").CodeMirror.getValue());
  const headersPlaceholder = await page.evaluate(`(${HEADERS_EDITOR})()?.CodeMirror.getValue()`);
  const playgroundLink = await page.getAttribute("#playground-link", "href");
  await page.evaluate(`(${HEADERS_EDITOR})().CodeMirror.setValue(${JSON.stringify(JSON.stringify({ Authorization: `Bearer ${key}` }))})`);
  const query = await graphiqlRun(page, "{ models { id version } }", "version");
  const subscription = await graphiqlRun(page,
    'subscription { generate(input: {prompt: "Say hi", maxTokens: 4}) { __typename ... on GenerationCompleted { result { text confidence { score } } } } }',
    "GenerationCompleted");
  return { welcome, headersPlaceholder, playgroundLink, query, subscription };
});

await step("playground", async (page) => {
  await page.goto(base + "/playground");
  await page.waitForSelector("body[data-ready=true]");
  await page.fill("#api-key", key);
  await page.fill("#prompt", "What is the capital of France?");
  await page.fill("#max-tokens", "12");
  await page.fill("#alternatives", "2");
  await page.click("#run");
  await page.waitForFunction(() => document.querySelector("#confidence").textContent !== "", null, { timeout: 60000 });
  await page.hover("span.token:nth-child(1)"); // its tooltip shows in the screenshot
  return page.evaluate(() => ({
    tokens: [...document.querySelectorAll("span.token")].map((s) => ({
      text: s.textContent, probability: Number(s.dataset.probability), background: getComputedStyle(s).backgroundColor,
      tip: s.dataset.tip,
    })),
    confidence: document.querySelector("#confidence").textContent,
    needsReview: document.querySelector("#needs-review").textContent,
    model: document.querySelector("#model-version").textContent,
    timing: document.querySelector("#timing").textContent,
    usage: document.querySelector("#usage").textContent,
    finishReason: document.querySelector("#finish-reason").textContent,
  }));
});

await step("cancel", async (page) => {
  await page.goto(base + "/playground");
  await page.waitForSelector("body[data-ready=true]");
  await page.fill("#api-key", key);
  await page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.");
  await page.fill("#max-tokens", "400");
  await page.click("#run");
  await page.waitForFunction(() => document.querySelectorAll("span.token").length >= 3, null, { timeout: 60000 });
  await page.click("#cancel");
  await page.waitForFunction(() => document.querySelector("#finish-reason").textContent !== "", null, { timeout: 30000 });
  const atCancel = await page.evaluate(() => document.querySelectorAll("span.token").length);
  await page.waitForTimeout(1000);
  return page.evaluate((n) => ({
    status: document.querySelector("#status").textContent,
    finishReason: document.querySelector("#finish-reason").textContent,
    tokensAtEnd: n,
    tokensLater: document.querySelectorAll("span.token").length,
    runEnabled: !document.querySelector("#run").disabled,
  }), atCancel);
});

await step("jobs", async (page) => {
  await page.goto(base + "/playground");
  await page.waitForSelector("body[data-ready=true]");
  await page.fill("#api-key", key);
  await page.click("#jobs-tab");
  await page.waitForSelector("#jobs tbody tr", { timeout: 30000 });
  const rows = await page.$$eval("#jobs tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
  // Re-attach to the answer the playground step finished (newest first: the first SUCCEEDED row).
  const succeeded = rows.findIndex((cells) => cells[1] === "SUCCEEDED");
  await page.click(`#jobs tbody tr:nth-child(${succeeded + 1}) button.reattach`);
  await page.waitForFunction(() => document.querySelector("#finish-reason").textContent !== "", null, { timeout: 30000 });
  const replayed = await page.evaluate(() => ({
    tokens: document.querySelectorAll("span.token").length,
    finishReason: document.querySelector("#finish-reason").textContent,
  }));
  return { rows, replayed };
});

await context.close();
rmSync(profile, { recursive: true, force: true });
console.log(JSON.stringify(out));
