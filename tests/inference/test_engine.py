"""The continuous-batching engine, on the tiny random-weight model.

Every test runs three ways: the fast path in float32 and in bfloat16 (the default where the
CPU has native bf16; emulated, slower but the same arithmetic, elsewhere), and the Hugging
Face forward (INFERQL_FAST_PATH=off, the path of models the fast path does not know).

The tiny model's text is noise, but its token ids and logprobs are deterministic, which
is all these tests need. To make batching deterministic, requests are submitted while the
engine thread is parked inside `engine.call` (see `paused`): they are then all admitted in
the same step.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
import torch

from app.inference.engine import Engine, EngineOverloaded, EngineStopped
from app.inference.model import EngineOptions, load_model
from app.inference.requests import Outbox
from app.inference.types import Finished, FinishReason, SamplingParams, Started, TokenStep

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog and",
    "a",
    "Once upon a time in a land far away, there lived a",
]
LONG = SamplingParams(max_tokens=400)  # runs until cancelled (in these tests)


# int8 copies off: they serve 1-row steps only (auto), so a row's logprobs would depend on the
# batch it decodes in by design (test_int8.py covers them).
PATHS = {
    "fast-fp32": EngineOptions(dtype="float32", fp16_matrices="off", int8_small_batch="off"),
    "fast-fp16": EngineOptions(dtype="float32", fp16_matrices="on"),  # float16 matrices (fbgemm)
    # SDPA for the decode attention (auto's choice with AMX); the float32 paths run the two matmuls
    "fast-bf16": EngineOptions(dtype="bfloat16", decode_attention="sdpa", int8_small_batch="off"),
    "hf": EngineOptions(fast_path="off"),
}


@pytest.fixture(scope="module", params=list(PATHS))
def lm(request, tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", options=PATHS[request.param])


def logprob_tolerance(lm) -> float:
    """bfloat16 activations round differently with the batch's shape (other GEMM blocking)."""
    return 1e-4 if lm.dtype == torch.float32 else 3e-3


def patch_forward(monkeypatch, engine: Engine, wrap) -> None:
    """Route every forward pass of the engine (prefill chunks and decode steps, in order)
    through wrap(real, *args)."""
    backend = engine._backend
    for name in ("prefill", "decode"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _real=real: wrap(_real, *a))


@pytest_asyncio.fixture(loop_scope="session")
async def engine(lm):
    e = Engine(lm, max_batch_size=4)
    e.start()
    yield e
    await e.stop()


@dataclass
class Run:
    started: list[Started] = field(default_factory=list)
    steps: list[TokenStep] = field(default_factory=list)
    finished: Finished | None = None
    order: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    @property
    def logprobs(self) -> list[float]:
        return [s.logprob for s in self.steps]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)


async def collect(handle) -> Run:
    run = Run()
    async for out in handle:
        run.order.append(type(out).__name__)
        if isinstance(out, Started):
            run.started.append(out)
        elif isinstance(out, TokenStep):
            run.steps.append(out)
        else:
            run.finished = out
    return run


async def collect_cancelling_at(handle, index: int) -> Run:
    run = Run()
    async for out in handle:
        if isinstance(out, TokenStep):
            run.steps.append(out)
            if out.index == index:
                handle.cancel()
        elif isinstance(out, Finished):
            run.finished = out
    return run


@asynccontextmanager
async def paused(engine: Engine):
    """Park the engine thread inside a call, so that what is submitted meanwhile is admitted together."""
    entered, release = threading.Event(), threading.Event()

    def park() -> str:
        entered.set()
        release.wait(30)
        return "parked"

    fut = asyncio.ensure_future(engine.call(park))
    assert await asyncio.to_thread(entered.wait, 30)
    try:
        yield
    finally:
        release.set()
        assert await fut == "parked"


def ids_of(lm, text: str) -> list[int]:
    return lm.encode_raw(text)


async def run_one(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> Run:
    return await collect(engine.submit(prompt_ids, params))


def assert_well_formed(run: Run, params: SamplingParams) -> None:
    """Started, TokenSteps 0..n-1, Finished; LENGTH exactly when max_tokens was reached."""
    assert run.order[0] == "Started" and run.order[-1] == "Finished"
    assert run.order.count("Started") == 1 and run.order.count("Finished") == 1
    assert [s.index for s in run.steps] == list(range(len(run.steps)))
    assert len(run.steps) <= params.max_tokens
    assert all(s.logprob <= 0 for s in run.steps)
    if run.finished.reason is FinishReason.LENGTH:
        assert len(run.steps) == params.max_tokens
    else:
        assert run.finished.reason is FinishReason.STOP
        assert len(run.steps) < params.max_tokens


# ---- one request ---------------------------------------------------------------------------


async def test_single_request_event_sequence(engine, lm):
    prompt = ids_of(lm, PROMPTS[0])
    params = SamplingParams(max_tokens=12)
    freed = []
    engine.on_slot_free = lambda: freed.append(engine.running)
    run = await run_one(engine, prompt, params)
    assert_well_formed(run, params)
    assert run.started[0].prompt_tokens == len(prompt)
    assert run.started[0].batch_size == 1
    assert run.finished.error is None
    assert run.finished.peak_batch_size == 1
    assert run.started[0].at <= run.steps[0].at <= run.steps[-1].at <= run.finished.at
    assert run.text == lm.tokenizer.decode(run.ids, skip_special_tokens=True)
    stats = engine.stats
    assert stats.prefills == 1
    assert stats.tokens_generated == len(run.steps)
    # The first token comes from the prefill; an EOS (not emitted) costs a decode step too.
    assert stats.decode_steps == len(run.steps) - 1 + (run.finished.reason is FinishReason.STOP)
    assert stats.shared_decode_steps == 0
    assert freed == [0]  # the hook ran once, after the request left the batch


@pytest.mark.parametrize("interval_ms", [0, 60_000])
async def test_tokens_reach_the_loop_together_within_the_stream_interval(lm, interval_ms):
    """The loop is handed a request's start and first token at once, then (with an interval
    longer than the generation) the rest together with its end; every output in order.
    Without an interval (nor a message rate), one hand-off per decode step."""
    engine = Engine(lm, max_batch_size=2, stream_interval_ms=interval_ms, stream_messages_per_s=0)
    engine.start()
    handoffs: list[list[str]] = []
    deliver = engine._outbox._deliver

    def counting(batch):
        handoffs.append([type(out).__name__ for _, out in batch])
        deliver(batch)

    engine._outbox._deliver = counting
    try:
        params = SamplingParams(max_tokens=12)
        run = await run_one(engine, ids_of(lm, PROMPTS[1]), params)
    finally:
        await engine.stop()
    assert_well_formed(run, params)
    assert [name for batch in handoffs for name in batch] == run.order
    assert handoffs[0] == ["Started", "TokenStep"]
    if interval_ms:
        assert len(handoffs) == 2 and handoffs[1][-1] == "Finished"
    else:
        assert len(handoffs) == len(run.steps) + (run.finished.reason is FinishReason.STOP)


def test_the_stream_interval_stretches_with_the_requests_running(monkeypatch):
    """At 320 messages a second (this test's rate; the default is 160): every 50 ms up to 16
    running requests, every 200 ms at 64; a first token and an end go at once whatever the
    interval."""
    now = [100.0]
    monkeypatch.setattr("app.inference.requests.time.monotonic", lambda: now[0])
    handed: list[list[str]] = []
    outbox = Outbox(interval=0.05, messages_per_s=320)
    outbox.loop = SimpleNamespace(call_soon_threadsafe=lambda fn, batch: handed.append(
        [type(out).__name__ + (str(out.index) if isinstance(out, TokenStep) else "") for _, out in batch]))

    def step(dt: float, running: int, *outputs) -> None:
        now[0] += dt
        for out in outputs:
            outbox.emit(None, out)
        outbox.flush(running)

    def token(i: int) -> TokenStep:
        return TokenStep(i, i, "x", 0.0)

    step(0, 16, token(0))     # a first token: at once
    step(0.03, 16, token(1))  # 30 ms: held
    step(0.03, 16, token(2))  # 60 ms >= 50 ms (16 / 320 s)
    step(0.08, 64, token(3))  # 80 ms < 200 ms (64 / 320 s)
    step(0.08, 64, token(4))  # 160 ms: still held
    step(0.08, 64, token(5))  # 240 ms
    step(0.01, 64, token(6), Finished(FinishReason.LENGTH, 0.0))  # an end: at once
    assert handed == [["TokenStep0"], ["TokenStep1", "TokenStep2"], ["TokenStep3", "TokenStep4", "TokenStep5"],
                      ["TokenStep6", "Finished"]]


async def test_a_first_token_does_not_wait_for_the_stream_interval(lm):
    """B's prompt is fed in chunks while A decodes, so its start reaches the loop before its
    first token: that token still goes at once, not with an end (both run until cancelled
    once B's first token has arrived)."""
    engine = Engine(lm, max_batch_size=2, prefill_chunk=2, stream_interval_ms=60_000)
    engine.start()
    try:
        a = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
        a_outputs = aiter(a)
        assert isinstance(await anext(a_outputs), Started)  # A runs; B arrives while it decodes
        b = engine.submit(ids_of(lm, PROMPTS[3]), LONG)
        b_run = Run()
        async for out in b:
            if isinstance(out, TokenStep):
                if not b_run.steps:
                    a.cancel()
                    b.cancel()
                b_run.steps.append(out)
            elif isinstance(out, Finished):
                b_run.finished = out
        a_end = [out async for out in a_outputs][-1]
    finally:
        await engine.stop()
    assert b_run.steps[0].index == 0
    assert a_end.reason is FinishReason.CANCELLED and b_run.finished.reason is FinishReason.CANCELLED


async def test_max_tokens_one_needs_no_decode_step(engine, lm):
    run = await run_one(engine, ids_of(lm, PROMPTS[1]), SamplingParams(max_tokens=1))
    assert run.finished.reason is FinishReason.LENGTH
    assert len(run.steps) == 1
    assert engine.stats.decode_steps == 0


async def test_eos_finishes_with_stop(engine, lm, monkeypatch):
    """Declare a token the greedy run produces as EOS: the run ends STOP there, EOS not emitted."""
    prompt = ids_of(lm, PROMPTS[1])
    first = await run_one(engine, prompt, SamplingParams(max_tokens=30))
    # A token whose first appearance is late, so that EOS comes from a decode step.
    k = max(range(len(first.ids)), key=lambda i: first.ids.index(first.ids[i]))
    k = first.ids.index(first.ids[k])
    monkeypatch.setattr(lm, "eos_ids", frozenset({first.ids[k]}))
    params = SamplingParams(max_tokens=30)
    run = await run_one(engine, prompt, params)
    assert run.finished.reason is FinishReason.STOP
    assert run.ids == first.ids[:k]
    assert first.ids[k] not in run.ids
    assert_well_formed(run, params)


# ---- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
async def test_batched_equals_unbatched(engine, lm, mode):
    """Left-padded merged KV cache: a row's output does not depend on what shares its batch."""
    prompts = [ids_of(lm, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 4
    max_tokens = [40, 6, 11, 9]  # rows leave the batch at different steps
    if mode == "greedy":
        params = [SamplingParams(max_tokens=m) for m in max_tokens]
    else:
        params = [SamplingParams(max_tokens=m, temperature=1.0, seed=10 + i) for i, m in enumerate(max_tokens)]

    solo = [await run_one(engine, p, sp) for p, sp in zip(prompts, params)]

    async with paused(engine):
        handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    together = await asyncio.gather(*(collect(h) for h in handles))

    # Staggered: two rows run first, the other two join a running batch mid-stream.
    h0 = engine.submit(prompts[0], params[0])
    h3 = engine.submit(prompts[3], params[3])
    late: list = []
    async def first_then_join():
        run = Run()
        async for out in h0:
            if isinstance(out, TokenStep):
                run.steps.append(out)
                if out.index == 3:
                    late.extend([engine.submit(prompts[1], params[1]), engine.submit(prompts[2], params[2])])
            elif isinstance(out, Finished):
                run.finished = out
        return run
    r0, r3 = await asyncio.gather(first_then_join(), collect(h3))
    r1, r2 = await asyncio.gather(*(collect(h) for h in late))
    staggered = [r0, r1, r2, r3]

    for i in range(4):
        assert_well_formed(solo[i], params[i])
        assert solo[i].finished.peak_batch_size == 1
        for other in (together[i], staggered[i]):
            assert other.ids == solo[i].ids, i
            assert other.logprobs == pytest.approx(solo[i].logprobs, abs=logprob_tolerance(lm)), i
            assert other.finished.reason is solo[i].finished.reason
    assert all(r.finished.peak_batch_size == 4 for r in together)
    # The late rows joined row 0 while it was running (it had 36 tokens to go).
    assert staggered[1].finished.peak_batch_size >= 2
    assert staggered[2].finished.peak_batch_size >= 2


async def test_concurrent_requests_share_decode_steps(engine, lm):
    params = SamplingParams(max_tokens=8)
    async with paused(engine):
        handles = [engine.submit(ids_of(lm, p), params) for p in PROMPTS]
    runs = await asyncio.gather(*(collect(h) for h in handles))
    for run in runs:
        assert_well_formed(run, params)
        assert run.finished.peak_batch_size >= 2
        assert run.finished.peak_batch_size == 4
    assert sorted(r.started[0].batch_size for r in runs) == [1, 2, 3, 4]
    stats = engine.stats
    assert stats.shared_decode_steps > 0
    assert stats.max_batch_size == 4
    assert stats.prefills == 4
    assert stats.batch_size_histogram.get(4, 0) >= 1
    assert stats.tokens_generated == sum(len(r.steps) for r in runs)
    assert sum(stats.batch_size_histogram.values()) == stats.decode_steps


# ---- cancellation --------------------------------------------------------------------------


async def test_cancel_running_request_then_serve_next(engine, lm, monkeypatch):
    """A cancel takes effect at the next step boundary: at most the token in flight follows it."""
    entered, gate = threading.Event(), threading.Event()
    calls = {"n": 0}

    def gated(real, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill (token 0), decode (token 1), then hold the next step
            entered.set()
            gate.wait(30)
        return real(*args)

    patch_forward(monkeypatch, engine, gated)
    handle = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
    # Cancel while the step producing token 2 is running on the engine thread.
    assert await asyncio.to_thread(entered.wait, 30)
    handle.cancel()
    gate.set()
    run = await collect(handle)
    assert run.finished.reason is FinishReason.CANCELLED
    assert [s.index for s in run.steps] == [0, 1, 2]  # only the step already running when cancelled
    assert engine.running == 0
    monkeypatch.undo()

    params = SamplingParams(max_tokens=5)
    nxt = await run_one(engine, ids_of(lm, PROMPTS[1]), params)
    assert_well_formed(nxt, params)
    assert nxt.finished.reason is FinishReason.LENGTH


async def test_cancel_soon_after_start_ends_far_before_max_tokens(engine, lm):
    handle = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
    run = await collect_cancelling_at(handle, index=1)
    assert run.finished.reason is FinishReason.CANCELLED
    assert 2 <= len(run.steps) < LONG.max_tokens // 2


async def test_cancel_waiting_request_never_starts(engine, lm):
    async with paused(engine):
        long_handles = [engine.submit(ids_of(lm, p), LONG) for p in PROMPTS]  # fills max_batch_size=4
        queued = engine.submit(ids_of(lm, "queued"), SamplingParams(max_tokens=5))
        queued.cancel()
    run = await collect(queued)
    assert run.order == ["Finished"]
    assert run.finished.reason is FinishReason.CANCELLED
    assert engine.waiting == 0

    for h in long_handles:
        h.cancel()
    longs = await asyncio.gather(*(collect(h) for h in long_handles))
    assert all(r.finished.reason is FinishReason.CANCELLED for r in longs)
    assert all(len(r.steps) < LONG.max_tokens and r.started for r in longs)
    assert engine.stats.prefills == 4


async def test_cancel_with_deadline_reason(engine, lm):
    handle = engine.submit(ids_of(lm, PROMPTS[3]), LONG)
    run = Run()
    async for out in handle:
        if isinstance(out, Started):
            handle.cancel(FinishReason.DEADLINE)
        elif isinstance(out, TokenStep):
            run.steps.append(out)
        else:
            run.finished = out
    assert run.finished.reason is FinishReason.DEADLINE
    assert len(run.steps) < LONG.max_tokens


async def test_cancel_unknown_or_finished_request_is_harmless(engine, lm):
    params = SamplingParams(max_tokens=3)
    handle = engine.submit(ids_of(lm, PROMPTS[0]), params)
    run = await collect(handle)
    handle.cancel()
    engine.cancel("no-such-request")
    again = await run_one(engine, ids_of(lm, PROMPTS[0]), params)
    assert run.finished.reason is again.finished.reason is FinishReason.LENGTH
    assert again.ids == run.ids


# ---- sampling through the engine ------------------------------------------------------------


async def test_seeds_and_greedy_are_reproducible(engine, lm):
    prompt = ids_of(lm, PROMPTS[1])
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    a = await run_one(engine, prompt, sampled)
    b = await run_one(engine, prompt, sampled)
    c = await run_one(engine, prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=4321))
    assert a.ids == b.ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert a.ids != c.ids
    assert len(set(a.ids)) > 1  # really sampled, not the greedy repetition

    greedy = SamplingParams(max_tokens=10)
    g1 = await run_one(engine, prompt, greedy)
    g2 = await run_one(engine, prompt, greedy)
    assert g1.ids == g2.ids
    assert g1.ids != a.ids
    # Greedy picks the most likely token: its logprob is at least that of any sampled choice
    # at the first step (same context).
    assert g1.logprobs[0] >= a.logprobs[0]


async def test_alternatives(engine, lm):
    params = SamplingParams(max_tokens=6, alternatives=3)
    run = await run_one(engine, ids_of(lm, PROMPTS[3]), params)
    assert len(run.steps) == 6
    for step in run.steps:
        assert len(step.alternatives) == 3
        lps = [a.logprob for a in step.alternatives]
        assert lps == sorted(lps, reverse=True)
        assert step.alternatives[0].token_id == step.token_id
        assert step.alternatives[0].logprob == pytest.approx(step.logprob, abs=1e-6)
        assert len({a.token_id for a in step.alternatives}) == 3
        for alt in step.alternatives:
            assert alt.text == lm.tokenizer.decode([alt.token_id])
    plain = await run_one(engine, ids_of(lm, PROMPTS[3]), SamplingParams(max_tokens=6))
    assert plain.ids == run.ids
    assert all(s.alternatives == () for s in plain.steps)


async def test_alternatives_for_one_row_of_a_batch(engine, lm):
    with_alts = SamplingParams(max_tokens=4, alternatives=2)
    without = SamplingParams(max_tokens=4)
    async with paused(engine):
        ha = engine.submit(ids_of(lm, PROMPTS[0]), with_alts)
        hb = engine.submit(ids_of(lm, PROMPTS[1]), without)
    ra, rb = await asyncio.gather(collect(ha), collect(hb))
    assert all(len(s.alternatives) == 2 for s in ra.steps)
    assert all(s.alternatives == () for s in rb.steps)


async def test_stop_sequence_through_the_engine(engine, lm):
    prompt = ids_of(lm, PROMPTS[3])
    base = SamplingParams(max_tokens=20, temperature=1.0, seed=7)  # seeded: varied, reproducible text
    full = await run_one(engine, prompt, base)
    assert full.finished.reason is FinishReason.LENGTH
    stop = full.steps[2].text + full.steps[3].text
    assert stop.strip()
    cut = full.text.find(stop)
    assert 0 <= cut <= len(full.steps[0].text + full.steps[1].text)

    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7, stop=(stop,))
    run = await run_one(engine, prompt, params)
    assert run.finished.reason is FinishReason.STOP_SEQUENCE
    assert run.text == full.text[:cut]
    assert stop not in run.text
    # Same tokens as the free run, up to the token that completed the stop string; every
    # index is reported once, those inside the stop string with no text.
    assert run.ids == full.ids[: len(run.ids)]
    assert len(run.ids) <= 4
    assert [s.index for s in run.steps] == list(range(len(run.steps)))


async def test_stop_sequence_never_hit_releases_all_text(engine, lm):
    prompt = ids_of(lm, PROMPTS[3])
    base = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    full = await run_one(engine, prompt, base)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, stop=("\x00never\x00",))
    run = await run_one(engine, prompt, params)
    assert run.finished.reason is FinishReason.LENGTH
    assert run.text == full.text
    assert [s.text for s in run.steps] == [s.text for s in full.steps]


# ---- limits --------------------------------------------------------------------------------


async def test_overload_raises_when_queue_full(lm):
    engine = Engine(lm, max_batch_size=1, max_waiting=1)
    engine.start()
    try:
        params = SamplingParams(max_tokens=3)
        async with paused(engine):
            first = engine.submit(ids_of(lm, PROMPTS[0]), params)
            assert engine.waiting == 1
            assert not engine.has_capacity()
            with pytest.raises(EngineOverloaded):
                engine.submit(ids_of(lm, PROMPTS[1]), params)
            assert engine.waiting == 1
        run = await collect(first)
        assert run.finished.reason is FinishReason.LENGTH
        # Room again: the next request is accepted and served.
        again = await run_one(engine, ids_of(lm, PROMPTS[1]), params)
        assert again.finished.reason is FinishReason.LENGTH
    finally:
        await engine.stop()


async def test_overload_with_a_running_request(lm):
    engine = Engine(lm, max_batch_size=1, max_waiting=1)
    engine.start()
    try:
        running = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
        it = running.__aiter__()
        assert isinstance(await it.__anext__(), Started)
        waiting = engine.submit(ids_of(lm, PROMPTS[1]), SamplingParams(max_tokens=2))
        with pytest.raises(EngineOverloaded):
            engine.submit(ids_of(lm, PROMPTS[2]), SamplingParams(max_tokens=2))
        running.cancel()
        rest = [out async for out in it]
        assert rest[-1].reason is FinishReason.CANCELLED
        w = await collect(waiting)
        assert w.finished.reason is FinishReason.LENGTH and len(w.steps) == 2
    finally:
        await engine.stop()


async def test_context_length_ends_with_length(engine, lm):
    ctx = lm.info.context_length
    assert ctx == 512
    prompt = (ids_of(lm, " ".join(PROMPTS)) * 100)[: ctx - 6]
    params = SamplingParams(max_tokens=50)
    run = await run_one(engine, prompt, params)
    assert run.finished.reason is FinishReason.LENGTH
    assert len(run.steps) < params.max_tokens
    # Generation ran up to the context window and no token was fed past it.
    assert ctx <= len(prompt) + len(run.steps) <= ctx + 1


async def test_context_length_caps_prompt_plus_generated(engine, lm):
    ctx = lm.info.context_length
    prompt = (ids_of(lm, " ".join(PROMPTS)) * 100)[: ctx - 6]
    run = await run_one(engine, prompt, SamplingParams(max_tokens=50))
    assert run.finished.reason is FinishReason.LENGTH
    assert len(prompt) + len(run.steps) == ctx


# ---- engine.call, failures, stop -----------------------------------------------------------


async def test_call_returns_result_and_propagates_errors(engine, lm):
    assert await engine.call(lambda: 6 * 7) == 42
    assert await engine.call(lambda: threading.current_thread().name) == "inferql-engine"

    class Boom(Exception):
        pass

    def fail():
        raise Boom("nope")

    with pytest.raises(Boom, match="nope"):
        await engine.call(fail)
    params = SamplingParams(max_tokens=4)
    run = await run_one(engine, ids_of(lm, PROMPTS[0]), params)
    assert_well_formed(run, params)
    assert run.finished.reason is FinishReason.LENGTH
    assert await engine.call(lambda: "still here") == "still here"


async def test_call_between_steps_of_running_requests(engine, lm):
    handle = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
    it = handle.__aiter__()
    assert isinstance(await it.__anext__(), Started)
    # The call runs on the engine thread between two decode steps of the running request.
    assert await engine.call(lambda: (engine.running, engine.waiting)) == (1, 0)
    handle.cancel()
    rest = [out async for out in it]
    assert rest[-1].reason is FinishReason.CANCELLED
    assert await engine.call(lambda: engine.running) == 0


async def test_failed_prefill_fails_only_that_request(engine, lm):
    vocab = lm.model.config.vocab_size
    bad = await run_one(engine, [vocab + 10], SamplingParams(max_tokens=3))
    assert bad.finished.reason is FinishReason.ERROR
    assert bad.finished.error
    assert bad.steps == []
    params = SamplingParams(max_tokens=3)
    good = await run_one(engine, ids_of(lm, PROMPTS[0]), params)
    assert_well_formed(good, params)
    assert good.finished.reason is FinishReason.LENGTH


async def test_failed_decode_step_fails_running_requests_and_engine_recovers(engine, lm, monkeypatch):
    calls = {"n": 0}

    def flaky(real, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # after 2 prefills: the first shared decode step
            raise RuntimeError("device fell over")
        return real(*args)

    patch_forward(monkeypatch, engine, flaky)
    async with paused(engine):
        handles = [engine.submit(ids_of(lm, p), SamplingParams(max_tokens=5)) for p in PROMPTS[:2]]
    runs = await asyncio.gather(*(collect(h) for h in handles))
    for run in runs:
        assert run.finished.reason is FinishReason.ERROR
        assert "device fell over" in run.finished.error
        assert len(run.steps) == 1  # the prefill's token
    assert engine.running == 0
    params = SamplingParams(max_tokens=4)
    ok = await run_one(engine, ids_of(lm, PROMPTS[2]), params)
    assert_well_formed(ok, params)
    assert ok.finished.reason is FinishReason.LENGTH


async def test_failed_prefill_finishes_its_request(engine, lm, monkeypatch):
    def broken(real, *args):
        raise RuntimeError("out of memory")

    patch_forward(monkeypatch, engine, broken)
    handle = engine.submit(ids_of(lm, PROMPTS[0]), SamplingParams(max_tokens=3))
    # Two round trips through the engine thread: the second is answered in a later
    # iteration than the failed admission, so everything that step emitted is delivered.
    await engine.call(lambda: None)
    await engine.call(lambda: None)
    try:
        run = await asyncio.wait_for(collect(handle), timeout=0.5)
    except TimeoutError:
        pytest.fail("the request never finished")
    assert run.finished.reason is FinishReason.ERROR
    assert engine.running == 0


async def test_stop_fails_running_and_rejects_new_work(lm):
    engine = Engine(lm, max_batch_size=1, max_waiting=4)
    with pytest.raises(EngineStopped):
        engine.submit([1, 2], SamplingParams())  # never started
    engine.start()
    running = engine.submit(ids_of(lm, PROMPTS[0]), LONG)
    queued = engine.submit(ids_of(lm, PROMPTS[1]), LONG)
    it = running.__aiter__()
    assert isinstance(await it.__anext__(), Started)
    await engine.stop()
    rest = [out async for out in it]
    assert rest[-1].reason is FinishReason.ERROR
    assert "shutting down" in rest[-1].error
    q = await collect(queued)
    assert q.order == ["Finished"] and q.finished.reason is FinishReason.ERROR
    with pytest.raises(EngineStopped):
        engine.submit([1, 2], SamplingParams())
    with pytest.raises(EngineStopped):
        await engine.call(lambda: 1)


async def test_stop_settles_queued_calls(lm):
    engine = Engine(lm)
    engine.start()
    entered, release = threading.Event(), threading.Event()

    def park():
        entered.set()
        release.wait(30)

    parked = asyncio.ensure_future(engine.call(park))
    assert await asyncio.to_thread(entered.wait, 30)
    queued = asyncio.ensure_future(engine.call(lambda: "answered"))
    await asyncio.sleep(0)  # `queued` is now in the engine's call list
    stopping = asyncio.ensure_future(engine.stop())
    await asyncio.sleep(0)  # stop() has flagged the engine
    release.set()
    await stopping
    await parked
    await asyncio.sleep(0.05)  # let any settle callback the thread scheduled run
    try:
        assert queued.done(), "engine.call awaiting forever after stop()"
        # Either answered or failed with EngineStopped is fine; hanging is not.
        if queued.exception() is not None:
            assert isinstance(queued.exception(), EngineStopped)
    finally:
        queued.cancel()
