"""Where classify's forward passes run: on this process's engine, or on a worker's.

`LocalScorer` runs them on the engine thread here. On an API-only replica (no engine) a
`RedisScorer` hands the request to the workers through a Redis list and waits for the
answer on a key of its own; every worker serves that list beside its job queue
(`serve_scoring`). Classifications are synchronous (the caller waits), so they are not
jobs: nothing of them is stored but their usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Protocol

import redis.asyncio as aredis

from app.inference.classify import LabelScore, Scored, score_labels
from app.inference.engine import Engine
from app.inference.model import LoadedModel
from app.inference.types import ModelInfo

from .errors import Overloaded
from .redis_client import redis_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    scored: Scored
    started: float     # epoch seconds: when the model started on it
    model: ModelInfo   # the model that scored it (a worker's, from an API-only replica)


class Scorer(Protocol):
    async def score(self, text: str, labels: list[str], instruction: str | None) -> Scoring: ...


class LocalScorer:
    def __init__(self, engine: Engine, lm: LoadedModel) -> None:
        self._engine, self._lm = engine, lm

    async def score(self, text: str, labels: list[str], instruction: str | None) -> Scoring:
        started: list[float] = []

        def run() -> Scored:
            started.append(time.time())
            return score_labels(self._lm, text, labels, instruction)

        scored = await self._engine.call(run)
        return Scoring(scored, started[0], self._lm.info)


def _to_json(s: Scoring) -> str:
    return json.dumps({"scores": [asdict(x) for x in s.scored.scores], "prompt_tokens": s.scored.prompt_tokens,
                       "started": s.started, "model": asdict(s.model)})


def _from_json(text: bytes) -> Scoring:
    body = json.loads(text)
    if "error" in body:
        raise RuntimeError(f"the worker failed to classify: {body['error']}")
    scored = Scored(tuple(LabelScore(**x) for x in body["scores"]), body["prompt_tokens"])
    return Scoring(scored, body["started"], ModelInfo(**body["model"]))


class RedisScorer:
    """The API side: one request on `<prefix>classify:requests`, the answer on a reply key."""

    def __init__(self, url: str, *, prefix: str = "inferql:", timeout: float = 60.0) -> None:
        self._redis = redis_client(url, longest_wait=timeout)
        self._requests = f"{prefix}classify:requests"
        self._prefix = prefix
        self.timeout = timeout

    async def score(self, text: str, labels: list[str], instruction: str | None) -> Scoring:
        reply = f"{self._prefix}classify:reply:{uuid.uuid4().hex}"
        deadline = time.time() + self.timeout
        await self._redis.lpush(self._requests, json.dumps(
            {"text": text, "labels": labels, "instruction": instruction, "reply": reply, "deadline": deadline}))
        answer = await self._redis.blpop([reply], timeout=self.timeout)
        if answer is None:
            raise Overloaded("no worker answered the classification in time; retry shortly", retryAfterMs=1000)
        return _from_json(answer[1])

    async def aclose(self) -> None:
        await self._redis.aclose()


async def serve_scoring(url: str, scorer: LocalScorer, *, prefix: str = "inferql:", parallel: int = 4) -> None:
    """The worker side, until cancelled: takes requests off the list (up to `parallel` at
    once) and answers each on its reply key. A request past its deadline (its caller gave
    up) is dropped unanswered."""
    client = redis_client(url, longest_wait=5.0)
    requests = f"{prefix}classify:requests"
    slots = asyncio.Semaphore(parallel)
    tasks: set[asyncio.Task] = set()

    async def answer(request: dict) -> None:
        try:
            try:
                body = _to_json(await scorer.score(request["text"], request["labels"], request["instruction"]))
            except Exception as exc:
                log.exception("classification failed")
                body = json.dumps({"error": type(exc).__name__})
            async with client.pipeline(transaction=False) as pipe:
                pipe.rpush(request["reply"], body)
                pipe.expire(request["reply"], 60)
                await pipe.execute()
        finally:
            slots.release()

    try:
        while True:
            await slots.acquire()
            try:
                item = await client.blpop([requests], timeout=5)
            except aredis.RedisError:
                slots.release()
                log.warning("classification list unreachable; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if item is None:
                slots.release()
                continue
            try:
                request = json.loads(item[1])
                late = request["deadline"] < time.time()
            except (ValueError, KeyError, TypeError):
                log.warning("dropping a malformed classification request")
                late = True
            if late:
                slots.release()
                continue
            task = asyncio.create_task(answer(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await client.aclose()
