"""InferQL benchmark: the GraphQL `generate` subscription against the engine called directly.

The entry point is scripts/bench.py (`python scripts/bench.py --help`). The modules:

  cli       flags, the run's order (machine, servers, streams, fidelity, report, jobs)
  server    the bench's server: the tests' harness (tests/harness.py) with lifted limits
  machine   the machine's own limits: read bandwidth, GEMM rate; the engine's bytes/FLOPs per token
  streams   the streaming phases: API (websockets) vs the engine in-process, warm-up and rounds
  peer      `transformers serve --continuous-batching` as a third streaming mode (--peer)
  fidelity  the fast path against a float32 eager reference over 20 fixed prompts (1-row and 20-row steps)
  stall     --stall: the decode stall a 2k-token prompt causes to running streams, whole vs chunked
  jobs      submission and poll latency while the engine is busy; what auth + rate limiting add
  report    summaries, targets, the PASS/MISS table

In one run it drives N concurrent `generate` subscriptions over real websockets against a
running server (its own `inferql serve` subprocess unless --url is given) and, in
alternating phases, the same engine in-process on the same prompts. It prints aggregate
tokens/s, time to first token (TTFT) p50/p95, the ratios between them and a PASS/MISS line
per target. Timings never fail the run: it exits 0 whatever the figures are, and non-zero
only when the benchmark itself cannot run (no server, a failed stream).

Fairness on a small, shared machine:
  * the server and the in-process engine never compute at the same time: for each round
    and each concurrency the API and direct phases run back to back, --pairs of each in
    the order A B B A (which mode is A rotates), so a ratio compares phases under the same
    machine load and a drift over the block weighs on both alike; a round's tok/s of a
    mode is its phases' tokens over their summed wall times;
    the in-process engine is started right before its phase and stopped right after it,
    and the server's engine thread sleeps on a condition variable while idle;
  * both modes get the same prompts in the same order, greedy (temperature 0), no stop
    strings, the same maxTokens; the direct side gets pre-tokenized prompts (the server
    tokenizes in its request path, so that cost is counted against the API);
  * tokens are counted as received (a greedy answer may end early on end-of-sequence);
  * one warm-up generation per mode and concurrency precedes the measured rounds;
  * figures are medians over rounds (tok/s) or percentiles over every stream of every
    round (TTFT). Absolute numbers follow the machine's load; the ratios are the point.

With --peer it also starts `transformers serve MODEL --continuous-batching` (the optional
`bench` extra: pip install -e '.[bench]') on a free port and runs the same prompts through
its OpenAI streaming chat completions, as a third mode in the same alternation.

It also prints the machine's own limits (read bandwidth, GEMM rate, measured here first),
what fraction of them the engine reaches, and the fast path's fidelity: over 20 fixed
prompts, greedy agreement and mean |d logprob| against a float32 eager reference, the prompts
decoded one at a time and as one batch (the steps of many concurrent streams).

Definitions:
  aggregate tok/s = tokens received by all streams of a phase / wall time from the first
                    submit to the last completion. A phase at concurrency c runs
                    max(c, --requests) generations through c closed-loop workers.
  TTFT            = API: from sending the `subscribe` message to the first TokenGenerated
                    (the websocket connect + connection_init before it is shown apart; the
                    moment is taken by the client's send hook, InferQLClient(on_send=...));
                    direct: from engine.submit() to the first TokenStep.

The package runs with the repository root on sys.path (scripts/bench.py puts it there): it
imports `app` and the tests' server harness, `tests.harness`.
"""
