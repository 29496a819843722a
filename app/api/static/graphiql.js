// GraphiQL for InferQL: queries and mutations over HTTP, subscriptions over a websocket
// (graphql-transport-ws). The headers typed in the Headers tab go with both: as HTTP headers,
// and as the websocket's connection_init payload, which is where InferQL reads the key.
import { createClient } from "/static/vendor/graphql-ws/client.js";

const httpUrl = location.origin + location.pathname;
const wsUrl = httpUrl.replace(/^http/, "ws");

const WELCOME = `# Welcome to InferQL's GraphiQL.
#
# 1. Open "Headers" below and replace <your key> with your API key
#    (the server printed one on its first start; \`inferql keys create\` makes more).
# 2. Press the run button (or Ctrl-Enter): tokens stream in as they are generated,
#    each with its probability; the last event carries the answer's confidence,
#    model version, timing and usage.
#
# The playground shows the same stream with each token coloured by its probability:
# ${location.origin}/playground

subscription Generate {
  generate(input: { prompt: "What is the capital of France?", maxTokens: 16, alternatives: 2 }) {
    __typename
    ... on JobEvent { jobId seq }
    ... on JobQueued { position }
    ... on GenerationStarted { promptTokens model { id version } }
    ... on TokenGenerated { index text probability alternatives { text probability } }
    ... on GenerationCompleted {
      result {
        text finishReason needsReview
        confidence { score minProbability }
        model { id version }
        usage { promptTokens completionTokens totalTokens }
        timing { totalMs tokensPerSecond }
      }
    }
    ... on GenerationFailed { error { code message } }
  }
}
`;

const HEADERS = `{
  "Authorization": "Bearer <your key>"
}`;

function isSubscription(query, operationName) {
  let document;
  try {
    document = GraphiQL.GraphQL.parse(query);
  } catch {
    return false; // the server reports the syntax error
  }
  const operations = document.definitions.filter((d) => d.kind === "OperationDefinition");
  const chosen = operationName ? operations.find((d) => d.name?.value === operationName) : operations[0];
  return chosen?.operation === "subscription";
}

async function* subscribe(params, headers) {
  const client = createClient({ url: wsUrl, connectionParams: headers, lazy: true, retryAttempts: 0 });
  try {
    yield* client.iterate(params);
  } catch (error) {
    // A closed socket (a refused key: 4403) or a failed connection: say so in the response pane.
    const message = error && "code" in error
      ? `websocket closed: ${error.code} ${error.reason || ""}`.trim()
      : String(error?.message || error);
    yield { errors: [{ message }] };
  } finally {
    await client.dispose();
  }
}

async function fetcher(params, opts = {}) {
  const headers = opts.headers || {};
  if (isSubscription(params.query, params.operationName)) {
    return subscribe(params, headers);
  }
  const response = await fetch(httpUrl, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/graphql-response+json, application/json", ...headers },
    body: JSON.stringify(params),
  });
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { errors: [{ message: `HTTP ${response.status}: ${text}` }] }; // a plain-text refusal (400, 413...)
  }
}

const logo = React.createElement(
  GraphiQL.Logo,
  null,
  React.createElement("span", { className: "inferql-logo" }, "InferQL",
    React.createElement("a", { href: "/playground", id: "playground-link" }, "playground")),
);

ReactDOM.createRoot(document.getElementById("graphiql")).render(
  React.createElement(
    GraphiQL,
    {
      fetcher,
      defaultQuery: WELCOME,
      defaultHeaders: HEADERS,
      defaultEditorToolsVisibility: "headers",
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: true,
      inputValueDeprecation: true,
      plugins: [GraphiQLPluginExplorer.explorerPlugin()],
    },
    logo,
  ),
);
