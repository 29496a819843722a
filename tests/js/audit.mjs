// The graphql-http audit suite (GraphQL over HTTP spec) against a live server.
// Usage: node audit.mjs <http url of /graphql> <api key>; prints one JSON line, exits 1 on any error or warning.
import { auditServer } from "graphql-http";

const [url, key] = process.argv.slice(2);

function withKey(input, init = {}) {
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${key}`);
  return fetch(input, { ...init, headers });
}

const results = await auditServer({ url, fetchFn: withKey });
const counts = { ok: 0, warn: 0, error: 0 };
const problems = [];
for (const result of results) {
  counts[result.status] += 1;
  if (result.status !== "ok") {
    problems.push({ status: result.status, name: result.name, reason: result.reason });
  }
}
console.log(JSON.stringify({ ...counts, problems }));
process.exit(problems.length ? 1 : 0);
