"""The streaming phases: `generate` subscriptions through the API against the engine in-process.

A phase runs a list of prompts through c closed-loop workers in one mode (API, direct, or
the peer's, see peer.py); `streaming_section` runs the warm-up and the measured rounds, the
modes of one concurrency back to back in a rotating order.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "Explain how a bicycle stays upright while it moves.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle for a ten-year-old.",
    "What are the main differences between a cat and a dog as pets?",
    "Give some advice to someone starting to learn the piano.",
    "Explain why the sky is blue.",
    "Describe a busy market on a Saturday morning.",
    "What should a beginner know before planting a vegetable garden?",
]

SUBSCRIPTION = """
subscription Bench($input: GenerationInput!) {
  generate(input: $input) {
    __typename
    ... on TokenGenerated { index text }
    ... on TokensGenerated { tokens { index text } }
    ... on GenerationCompleted { result { usage { completionTokens } } }
  }
}
"""


@dataclass
class Stream:
    t_submit: float            # subscribe message sent / engine.submit()
    t_first: float | None      # first token received
    t_done: float              # completion received
    tokens: int                # tokens received
    t_call: float | None = None  # API only: before the websocket connect (None: a connection reused)
    messages: int | None = None  # API only: token messages received (TokensGenerated carries several)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_submit) * 1000


@dataclass
class Phase:
    mode: str
    concurrency: int
    streams: list[Stream]
    max_batch: int
    loop_cpu_s: float | None = None  # API, a server started here: its event loop thread's CPU time in the phase
    own_cpu_s: float | None = None   # this process's event loop thread in the phase: the client (API), or
    #   the consumers of the engine's events (direct)
    summed_wall_s: float | None = None  # a merged phase (`merge`): its parts' wall times, summed

    @classmethod
    def merge(cls, parts: list[Phase]) -> Phase:
        """Several phases of one mode and concurrency as one: their streams, and as wall time
        the sum of theirs (the time between them, when the other mode ran, left out)."""
        if len(parts) == 1:
            return parts[0]

        def total(values: list[float | None]) -> float | None:
            return None if any(v is None for v in values) else sum(values)

        first = parts[0]
        return cls(first.mode, first.concurrency, [s for p in parts for s in p.streams],
                   max(p.max_batch for p in parts), total([p.loop_cpu_s for p in parts]),
                   total([p.own_cpu_s for p in parts]), sum(p.wall_s for p in parts))

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def wall_s(self) -> float:
        if self.summed_wall_s is not None:
            return self.summed_wall_s
        return max(s.t_done for s in self.streams) - min(s.t_submit for s in self.streams)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def note(self) -> str:
        """API: the token messages per token (below 1 when tokens that piled up went out
        together); the CPU per token of the event loops: the server's, and this process's."""
        if not self.tokens or self.mode not in ("API", "direct"):
            return ""
        note = ""
        if self.mode == "API":
            messages = sum(s.messages or 0 for s in self.streams)
            note = f", {messages / self.tokens:.2f} token messages per token"
        if self.loop_cpu_s is not None:  # each subscription's own work (auth, submit, records) included
            note += f", server event loop {self.loop_cpu_s / self.tokens * 1e6:.0f} us CPU per token"
        if self.own_cpu_s is not None:
            who = "client" if self.mode == "API" else "consumers"
            note += f", bench {who} {self.own_cpu_s / self.tokens * 1e6:.0f} us"
        return note


# ---- closed-loop driver -------------------------------------------------------------------


async def run_phase(concurrency: int, prompts: list, one) -> list[Stream]:
    """Run every prompt through `concurrency` workers; each worker runs one stream at a time."""
    work = iter(prompts)
    streams: list[Stream] = []

    async def worker() -> None:
        for item in work:  # a shared iterator: no await between next() calls, so no races
            streams.append(await one(item))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return streams


def phase_prompts(concurrency: int, requests: int) -> list[str]:
    n = max(concurrency, requests)
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# ---- the API side -------------------------------------------------------------------------


async def api_stream(client, prompt: str, max_tokens: int) -> Stream:
    """One `generate` subscription, through the lean client (wsclient.LeanSubscriptions) or
    `app.client.InferQLClient`. Its TTFT starts when the subscribe message goes out: the
    client's send hook notes that moment (the connect + connection_init before it is t_call)."""
    sent: dict[str, float] = {}

    def on_send(message: dict) -> None:
        if message.get("type") in ("subscribe", "start"):
            sent["subscribe"] = time.perf_counter()
        elif message.get("type") == "connection_init":
            sent["init"] = time.perf_counter()

    variables = {"input": {"prompt": prompt, "maxTokens": max_tokens, "temperature": 0}}
    t_call = time.perf_counter()
    seen = {"first": None, "done": None, "tokens": 0, "messages": 0, "completion_tokens": None}

    def on_data(data: dict) -> None:
        event = data["generate"]
        kind = event["__typename"]
        if kind in ("TokenGenerated", "TokensGenerated"):  # several tokens that piled up in one message
            seen["tokens"] += len(event["tokens"]) if kind == "TokensGenerated" else 1
            seen["messages"] += 1
            if seen["first"] is None:
                seen["first"] = time.perf_counter()
        elif kind == "GenerationCompleted":
            seen["done"] = time.perf_counter()
            seen["completion_tokens"] = event["result"]["usage"]["completionTokens"]
        elif kind in ("GenerationFailed", "GenerationCancelled"):
            raise RuntimeError(f"generation ended with {kind}")

    if hasattr(client, "run"):
        await client.run(SUBSCRIPTION, variables, on_data=on_data, on_send=on_send)
    else:
        async for data in client.subscribe(SUBSCRIPTION, variables, on_send=on_send):
            on_data(data)
    if seen["done"] is None:
        raise RuntimeError("the subscription ended without GenerationCompleted")
    tokens = seen["tokens"]
    if seen["completion_tokens"] is not None and seen["completion_tokens"] != tokens:
        print(f"  warning: received {tokens} tokens, the server counted {seen['completion_tokens']}", flush=True)
    # t_call only where this subscription opened its websocket (the lean client reuses an idle one)
    return Stream(t_submit=sent.get("subscribe", t_call), t_first=seen["first"], t_done=seen["done"], tokens=tokens,
                  t_call=t_call if "init" in sent else None, messages=seen["messages"])


_HIST = re.compile(r'^inferql_engine_batch_size_steps\{size="(\d+)"\}\s+([0-9.eE+]+)\s*$', re.M)


async def batch_histogram(http: httpx.AsyncClient, base_url: str) -> dict[int, float]:
    resp = await http.get(base_url + "/metrics")
    resp.raise_for_status()
    return {int(size): float(count) for size, count in _HIST.findall(resp.text)}


def main_thread_cpu_s(pid: int | None) -> float | None:
    """CPU time (user + system) of a process's main thread, from /proc; None where that
    cannot be read."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def api_phase(client, http, base_url: str, concurrency: int, prompts: list[str], max_tokens: int,
                    server_pid: int | None = None) -> Phase:
    """With the pid of a server started here, also the CPU its event loop (the main thread:
    GraphQL, websockets, the job bookkeeping) spent in the phase, between the scrapes of
    /metrics around it."""
    before = await batch_histogram(http, base_url)
    cpu0, own0 = main_thread_cpu_s(server_pid), main_thread_cpu_s(os.getpid())
    streams = await run_phase(concurrency, prompts, lambda p: api_stream(client, p, max_tokens))
    cpu1, own1 = main_thread_cpu_s(server_pid), main_thread_cpu_s(os.getpid())
    after = await batch_histogram(http, base_url)
    sizes = [size for size, count in after.items() if count > before.get(size, 0.0)]
    loop_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Phase("API", concurrency, streams, max(sizes, default=0), loop_cpu, _delta(own0, own1))


def _delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


# ---- the direct side ----------------------------------------------------------------------


async def direct_stream(engine, ids: list[int], max_tokens: int) -> Stream:
    from app.inference.types import Finished, SamplingParams, TokenStep

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t_submit = time.perf_counter()
    handle = engine.submit(ids, params)
    first = None
    tokens = 0
    async for out in handle:
        if isinstance(out, TokenStep):
            tokens += 1
            if first is None:
                first = time.perf_counter()
        elif isinstance(out, Finished):
            if out.error:
                raise RuntimeError(f"direct generation failed: {out.error}")
            break
    return Stream(t_submit=t_submit, t_first=first, t_done=time.perf_counter(), tokens=tokens)


class Direct:
    """The model loaded once in-process; an Engine runs only while direct phases run."""

    def __init__(self, lm, max_batch_size: int) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self._ids: dict[str, list[int]] = {}
        self.engine = None

    def ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids:
            self._ids[prompt] = self.lm.encode_chat([{"role": "user", "content": prompt}])
        return self._ids[prompt]

    async def start(self) -> None:
        from app.inference.engine import Engine

        self.engine = Engine(self.lm, max_batch_size=self.max_batch_size)
        self.engine.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def phase(self, concurrency: int, prompts: list[str], max_tokens: int) -> Phase:
        from app.inference.types import EngineStats

        self.engine.stats = EngineStats()
        items = [self.ids(p) for p in prompts]
        own0 = main_thread_cpu_s(os.getpid())
        streams = await run_phase(concurrency, items, lambda ids: direct_stream(self.engine, ids, max_tokens))
        own1 = main_thread_cpu_s(os.getpid())
        return Phase("direct", concurrency, streams, self.engine.stats.max_batch_size, None, _delta(own0, own1))


# ---- the section: warm-up, then rounds ----------------------------------------------------


def round_order(modes: list[str], step: int, pairs: int) -> list[str]:
    """The phases of one round at one concurrency, in order. The modes rotate by `step`; the
    API and direct phases run as one block of `pairs` of each, their order reversed in every
    other pair (A B B A for 2), so that a drift in the machine's speed over the block weighs
    on both alike."""
    rotated = modes[step % len(modes):] + modes[:step % len(modes)]
    a, b = [m for m in rotated if m in ("API", "direct")]
    block = [m for i in range(pairs) for m in ((a, b) if i % 2 == 0 else (b, a))]
    order: list[str] = []
    for mode in rotated:
        if mode == a:
            order += block
        elif mode not in ("API", "direct"):
            order.append(mode)
    return order


async def streaming_section(base_url: str, api_key: str | None, lm, peer, *, concurrency: list[int], rounds: int,
                            requests: int, max_tokens: int, max_batch: int, server_pid: int | None = None,
                            ws_client: str = "lean", pairs: int = 4,
                            ) -> tuple[dict[tuple[str, int], list[Phase]], list[float], list[str]]:
    """Every (mode, concurrency) phase of every round; returns them, the API's connect times
    (ms, the websocket connect + connection_init before each subscribe) and the modes.
    server_pid: the server's process, when started here, to read its event loop's CPU time.
    ws_client: the subscriptions' client, "lean" (wsclient.py) or "websockets" (app.client).
    pairs: API and direct phases per round and concurrency (`round_order`); a round's figure
    for each is over all of its phases (`Phase.merge`)."""
    from app.client import InferQLClient

    from .wsclient import LeanSubscriptions

    direct = Direct(lm, max_batch)
    modes = ["API", "direct"] + (["peer"] if peer else [])

    async with InferQLClient(base_url, api_key=api_key) as client, \
            httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as http:
        models = (await client.execute("{ models { id version dtype } }"))["models"]
        if not any(m["version"] == lm.info.version for m in models):
            print(f"warning: the server serves {models}, the direct engine {lm.info.id} {lm.info.version}")
        print(f"server: {', '.join(m['id'] + ' ' + m['dtype'] for m in models)}; max batch {max_batch}",
              flush=True)

        subscriber = LeanSubscriptions(base_url, api_key) if ws_client == "lean" else client
        print(f"API client: {'the lean websocket client' if ws_client == 'lean' else 'app.client (websockets)'}",
              flush=True)

        async def run_mode(mode: str, c: int, prompts: list[str], max_tokens: int) -> Phase:
            if mode == "API":
                try:
                    return await api_phase(subscriber, http, base_url, c, prompts, max_tokens, server_pid)
                finally:  # each phase's workers connect afresh (once each: the lean client reuses a socket)
                    if isinstance(subscriber, LeanSubscriptions):
                        await subscriber.close_idle()
            if mode == "peer":
                return await peer.phase(http, c, prompts, max_tokens)
            await direct.start()
            try:
                return await direct.phase(c, prompts, max_tokens)
            finally:
                await direct.stop()

        # Warm-up: one short phase per mode at the highest concurrency (first forward passes,
        # batched kernels, the server's DB and sockets), not measured.
        top = max(concurrency)
        warm = phase_prompts(top, top)
        for mode in modes:
            await run_mode(mode, top, warm, min(4, max_tokens))

        phases: dict[tuple[str, int], list[Phase]] = {}
        connect_ms: list[float] = []
        step = 0
        for r in range(rounds):
            for c in concurrency:
                # The modes of one concurrency run back to back, in an order that rotates,
                # so that their ratios see the same machine load.
                order = round_order(modes, step, pairs)
                step += 1
                prompts = phase_prompts(c, requests)
                parts: dict[str, list[Phase]] = {}
                for mode in order:
                    phase = await run_mode(mode, c, prompts, max_tokens)
                    if mode == "API":
                        connect_ms += [(s.t_submit - s.t_call) * 1000 for s in phase.streams if s.t_call]
                    parts.setdefault(mode, []).append(phase)
                    print(f"round {r + 1} {mode:<6} {c:>2} streams: {phase.tokens:>5} tokens"
                          f" in {phase.wall_s:6.2f}s = {phase.tok_s:7.1f} tok/s, max batch {phase.max_batch}{phase.note}",
                          flush=True)
                for mode, done in parts.items():
                    phases.setdefault((mode, c), []).append(Phase.merge(done))
    return phases, connect_ms, modes
