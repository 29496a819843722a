"""All wiring in one place: builds every part of a running InferQL once, and stops it.

The stateful parts of a job (queue, event bus, quota store, canceller) are chosen here,
by the topology (README "Scaling out"):

- embedded (the default): one process, everything in its memory, any database;
- shared: a PostgreSQL database and INFERQL_REDIS_URL. The queue is the database's
  `jobs` table (claims with leases), events, cancel messages and rate windows are in
  Redis, and a process runs as `all`, `api` (no weights) or `worker` (no HTTP API).

Every other module receives what it uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from app.inference.engine import Engine
from app.inference.model import EngineOptions, LoadedModel, load_for_counting, load_model
from app.inference.types import ModelInfo
from app.inference.weights import pull_default_model
from app.jobs.access import Access
from app.jobs.classification import Classifier
from app.jobs.persistence.db import Database, private_dir
from app.jobs.events import EventBus, MemoryEventBus
from app.jobs.keys import FIRST_KEY_FILE, Defaults, KeyNameTaken, KeyStore
from app.jobs.persistence.migrate import upgrade
from app.jobs.queue import JobQueue, MemoryJobQueue
from app.jobs.quotas import MemoryQuotaStore, QuotaStore
from app.jobs.reaper import Reaper
from app.jobs.recorder import JobRecorder
from app.jobs.recovery import recover
from app.jobs.review import Reviews
from app.jobs.scoring import LocalScorer, Scorer, serve_scoring
from app.jobs.admission import Admission, encode_prompt
from app.jobs.batches import Batches
from app.jobs.service import Canceller, JobService
from app.jobs.persistence.reports import ReportStore
from app.jobs.persistence.store import JobStore
from app.jobs.validation import Limits
from app.jobs.webhook_secrets import load_or_create_secret
from app.jobs.webhooks import WebhookDispatcher
from app.jobs.worker import Worker
from app.jobs.persistence.writer import Writer
from app.settings import Settings

log = logging.getLogger("inferql")


class ConfigError(Exception):
    """A topology that cannot work; the message says what to change."""


def is_shared(settings: Settings) -> bool:
    """Shared topology: several processes over one PostgreSQL database and Redis."""
    return settings.redis_url is not None


def check_topology(settings: Settings) -> None:
    """Fails fast, before anything loads, on a combination that cannot work."""
    postgres = settings.database_url.startswith("postgres")
    if settings.redis_url is not None and not postgres:
        raise ConfigError("INFERQL_REDIS_URL is for several processes sharing one database, which must be "
                          "PostgreSQL (INFERQL_DATABASE_URL=postgresql://...); with SQLite leave it unset")
    if settings.role != "all" and settings.redis_url is None:
        what = "an API-only replica" if settings.role == "api" else "a separate worker"
        raise ConfigError(f"{what} needs the shared topology: a PostgreSQL INFERQL_DATABASE_URL and "
                          "INFERQL_REDIS_URL, shared with the other processes")
    if settings.redis_url is not None:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach Redis at INFERQL_REDIS_URL ({type(exc).__name__}: {exc})") from None
        finally:
            client.close()


def process_name(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def resolve_model_path(settings: Settings) -> Path:
    """The folder to serve: INFERQL_MODEL_PATH, or the default model (fetched on first use)."""
    if settings.model_path is not None:
        return settings.model_path
    return pull_default_model(settings.cache_dir)


def key_defaults(settings: Settings) -> Defaults:
    return Defaults(settings.default_rpm, settings.default_tpm, settings.default_concurrency,
                    settings.default_max_priority)


@dataclass
class Parts:
    """The stateful parts of a job, in process or shared."""

    queue: JobQueue
    bus: EventBus
    quotas: QuotaStore
    canceller: Canceller | None = None  # None: the local Worker
    webhook_wakeups: object | None = None  # a RedisChannel: webhook messages stored by any process
    remote_scorer: Scorer | None = None    # classify without an engine here: a worker's
    closers: list = field(default_factory=list)


def memory_parts(settings: Settings) -> Parts:
    return Parts(MemoryJobQueue(settings.max_queued_jobs), MemoryEventBus(), MemoryQuotaStore(settings.rate_window_seconds))


async def make_parts(settings: Settings) -> Parts:
    if not is_shared(settings):
        return memory_parts(settings)
    from app.jobs.pg_queue import PostgresJobQueue
    from app.jobs.redis_signals import RedisCanceller, RedisChannel
    from app.jobs.scoring import RedisScorer
    from app.jobs.redis_events import RedisEventBus
    from app.jobs.redis_quotas import RedisQuotaStore

    url, prefix = settings.redis_url, settings.redis_prefix
    queue = PostgresJobQueue(settings.database_url, settings.max_queued_jobs, worker_id=process_name(settings),
                             lease_seconds=settings.lease_seconds)
    await queue.start()
    bus = RedisEventBus(url, prefix=prefix)
    quotas = RedisQuotaStore(url, prefix=prefix, window_seconds=settings.rate_window_seconds)
    canceller = RedisCanceller(url, prefix=prefix)
    wakeups = RedisChannel(url, f"{prefix}webhooks")
    scorer = RedisScorer(url, prefix=prefix)
    return Parts(queue, bus, quotas, canceller, wakeups, scorer,
                 closers=[canceller.aclose, wakeups.aclose, scorer.aclose, bus.aclose, quotas.aclose, queue.close])


@dataclass
class Services:
    """What the API layer calls, and what the process runs. A worker-only process has the
    API's services too (unused); an API-only one has no engine and no worker."""

    access: Access
    jobs: JobService
    batches: Batches
    reviews: Reviews
    classifier: Classifier
    model: ModelInfo
    db: Database
    engine: Engine | None
    keys: KeyStore
    queue: JobQueue
    recorder: JobRecorder
    worker: Worker | None
    webhooks: WebhookDispatcher
    reaper: Reaper | None = None
    closers: list = field(default_factory=list)
    background: list[asyncio.Task] = field(default_factory=list)

    async def stop(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.reaper is not None:
            await self.reaper.stop()
        if self.worker is not None:
            await self.worker.stop()
        await self.webhooks.stop()
        if self.engine is not None:
            await self.engine.stop()
        for close in self.closers:
            await close()
        await self.db.dispose()


async def start_services(settings: Settings) -> Services:
    check_topology(settings)
    path = resolve_model_path(settings)
    options = EngineOptions.from_settings(settings)
    db = Database(settings.database_url)
    await upgrade(db.engine)  # under a lock: replicas starting together on a fresh database
    keys = KeyStore(db, key_defaults(settings), cache_seconds=settings.key_cache_seconds)
    if settings.role != "worker":
        if settings.auth == "on":
            await bootstrap_key(keys, settings.data_dir)
        else:
            log.warning("INFERQL_AUTH=off: every caller is an anonymous admin without limits")
    engine = None
    if settings.role == "api":
        lm = load_for_counting(path, options)
    else:
        lm = load_model(path, device=settings.device, threads=settings.torch_threads, options=options)
        engine = Engine(lm, max_batch_size=settings.max_batch_size)
        engine.start()
    parts = await make_parts(settings)
    services = build_services(settings, db=db, lm=lm, engine=engine, keys=keys, parts=parts)
    if services.worker is not None:
        services.worker.start()
        if parts.canceller is not None:
            await parts.canceller.listen(services.worker.cancel)
            # API-only replicas' classifications, beside the job queue.
            services.background.append(asyncio.create_task(serve_scoring(
                settings.redis_url, LocalScorer(engine, lm), prefix=settings.redis_prefix), name="scoring"))
    if is_shared(settings):
        # What dead processes left; never a job whose lease is live (another process runs it).
        services.reaper = Reaper(parts.queue, services.recorder, lambda spec: encode_prompt(lm, spec),
                                 max_attempts=settings.max_attempts,
                                 interval=max(settings.lease_seconds / 3, 0.2))
        await services.reaper.run_once()
        services.reaper.start()
    else:
        await recover(services.recorder, services.queue, lambda spec: encode_prompt(lm, spec),
                      settings.max_attempts)
    if settings.role != "worker":  # API processes deliver webhooks; a worker's are announced to them
        if parts.webhook_wakeups is not None:
            await parts.webhook_wakeups.listen(lambda _: services.webhooks.wake())
        services.webhooks.start()
    return services


def build_services(settings: Settings, *, db: Database, lm: LoadedModel, engine: Engine | None,
                   keys: KeyStore, parts: Parts | None = None) -> Services:
    """parts: the in-process ones when None (tests build services around their own engine)."""
    parts = parts or memory_parts(settings)
    writer = Writer(db)  # one per process: it groups the writes of the store and the webhooks
    store = JobStore(db, writer)
    reports = ReportStore(db, writer)
    webhooks = WebhookDispatcher(
        db,
        settings.webhook_secret or load_or_create_secret(settings.data_dir),
        settings.retry_delays,
        timeout=settings.webhook_timeout,
        writer=writer,
        allow_private=settings.webhook_allow_private,
    )
    limits = Limits(
        max_prompt_chars=settings.max_prompt_chars,
        max_new_tokens=min(settings.max_new_tokens, lm.info.context_length),
        context_length=lm.info.context_length,
        allow_private_webhooks=settings.webhook_allow_private,
    )
    queue, bus, quotas = parts.queue, parts.bus, parts.quotas
    wake = webhooks.wake if parts.webhook_wakeups is None else parts.webhook_wakeups.notify
    recorder = JobRecorder(store=store, queue=queue, bus=bus, quotas=quotas, model=lm.info,
                           review_threshold=settings.review_threshold, on_webhook_queued=wake)
    worker = Worker(queue, engine, recorder) if engine is not None else None
    canceller = parts.canceller or worker
    if canceller is None:
        raise ConfigError("a process without an engine needs a shared canceller (INFERQL_REDIS_URL)")
    admission = Admission(queue=queue, quotas=quotas, lm=lm, limits=limits)
    jobs = JobService(store=store, queue=queue, bus=bus, quotas=quotas, recorder=recorder, canceller=canceller,
                      admission=admission)
    return Services(
        access=Access(keys=keys, quotas=quotas, queue=queue),
        jobs=jobs,
        batches=Batches(store=store, queue=queue, recorder=recorder, admission=admission, jobs=jobs),
        reviews=Reviews(store=store, reports=reports, keys=keys, max_text_chars=settings.max_prompt_chars),
        classifier=Classifier(reports=reports, scorer=LocalScorer(engine, lm) if engine else parts.remote_scorer,
                              lm=lm, queue=queue, quotas=quotas, limits=limits,
                              review_threshold=settings.review_threshold,
                              max_waiting=settings.max_queued_classifications),
        model=lm.info, db=db, engine=engine, keys=keys, queue=queue, recorder=recorder, worker=worker,
        webhooks=webhooks, closers=list(parts.closers),
    )


async def bootstrap_key(keys: KeyStore, data_dir: Path) -> None:
    """The very first start with auth on: create a `local` admin key and hand it over once.

    Only when no key was ever made: revoking every key must not mint a new admin key at
    the next start. On a terminal the key is printed; otherwise (a container, a service
    manager collecting logs) it goes to a file readable by this user only, and the log
    names the file, never the key.
    """
    if await keys.list():
        return
    try:
        key = await keys.create("local", admin=True)
    except KeyNameTaken:  # another replica, starting at the same moment on the same database, made it
        log.info("the first admin key was made by another replica starting at the same time")
        return
    if sys.stdout.isatty():
        print(
            "\n" + "=" * 72 +
            "\nInferQL created an admin API key for local use. It is shown only this once:\n"
            f"\n    {key}\n"
            "\nIn GraphiQL open 'Headers' and paste:"
            f'\n    {{"Authorization": "Bearer {key}"}}'
            "\nMore keys: inferql keys create --name NAME   (list / revoke: inferql keys ...)\n"
            + "=" * 72 + "\n",
            flush=True,
        )
        return
    path = private_dir(data_dir) / FIRST_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.warning("InferQL created an admin API key named 'local'; it is in %s (readable by this user only). "
                "Move it somewhere safe and delete the file.", path.resolve())
