"""All wiring in one place: builds every part of a running InferQL once, and stops it.

The in-process parts (queue, event bus, quota store, the worker as canceller) are chosen
here; every other module receives what it uses.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from app.inference.engine import Engine
from app.inference.model import EngineOptions, LoadedModel, load_model
from app.inference.types import ModelInfo
from app.inference.weights import pull_default_model
from app.jobs.access import Access
from app.jobs.classification import Classifier
from app.jobs.persistence.db import Database, private_dir
from app.jobs.events import MemoryEventBus
from app.jobs.keys import FIRST_KEY_FILE, Defaults, KeyStore
from app.jobs.persistence.migrate import upgrade
from app.jobs.queue import JobQueue, MemoryJobQueue
from app.jobs.quotas import MemoryQuotaStore
from app.jobs.recorder import JobRecorder
from app.jobs.recovery import recover
from app.jobs.review import Reviews
from app.jobs.admission import Admission, encode_prompt
from app.jobs.batches import Batches
from app.jobs.service import JobService
from app.jobs.persistence.reports import ReportStore
from app.jobs.persistence.store import JobStore
from app.jobs.validation import Limits
from app.jobs.webhook_secrets import load_or_create_secret
from app.jobs.webhooks import WebhookDispatcher
from app.jobs.worker import Worker
from app.jobs.persistence.writer import Writer
from app.settings import Settings

log = logging.getLogger("inferql")

def resolve_model_path(settings: Settings) -> Path:
    """The folder to serve: INFERQL_MODEL_PATH, or the default model (fetched on first use)."""
    if settings.model_path is not None:
        return settings.model_path
    return pull_default_model(settings.cache_dir)


def key_defaults(settings: Settings) -> Defaults:
    return Defaults(settings.default_rpm, settings.default_tpm, settings.default_concurrency,
                    settings.default_max_priority)


@dataclass
class Services:
    """What the API layer calls, and what the process runs."""

    access: Access
    jobs: JobService
    batches: Batches
    reviews: Reviews
    classifier: Classifier
    model: ModelInfo
    db: Database
    engine: Engine
    keys: KeyStore
    queue: JobQueue
    recorder: JobRecorder
    worker: Worker
    webhooks: WebhookDispatcher

    async def stop(self) -> None:
        await self.worker.stop()
        await self.webhooks.stop()
        await self.engine.stop()
        await self.db.dispose()


async def start_services(settings: Settings) -> Services:
    lm = load_model(resolve_model_path(settings), device=settings.device, threads=settings.torch_threads,
                    options=EngineOptions.from_settings(settings))
    db = Database(settings.database_url)
    await upgrade(db.engine)
    keys = KeyStore(db, key_defaults(settings), cache_seconds=settings.key_cache_seconds)
    if settings.auth == "on":
        await bootstrap_key(keys, settings.data_dir)
    else:
        log.warning("INFERQL_AUTH=off: every caller is an anonymous admin without limits")
    engine = Engine(lm, max_batch_size=settings.max_batch_size)
    engine.start()
    services = build_services(settings, db=db, lm=lm, engine=engine, keys=keys)
    services.worker.start()
    await recover(services.recorder, services.queue, lambda spec: encode_prompt(lm, spec),
                  settings.max_attempts)
    services.webhooks.start()
    return services


def build_services(settings: Settings, *, db: Database, lm: LoadedModel, engine: Engine,
                   keys: KeyStore) -> Services:
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
    queue = MemoryJobQueue(settings.max_queued_jobs)
    bus = MemoryEventBus()
    quotas = MemoryQuotaStore(settings.rate_window_seconds)
    recorder = JobRecorder(store=store, queue=queue, bus=bus, quotas=quotas, model=lm.info,
                           review_threshold=settings.review_threshold, on_webhook_queued=webhooks.wake)
    worker = Worker(queue, engine, recorder)
    admission = Admission(queue=queue, quotas=quotas, lm=lm, limits=limits)
    jobs = JobService(store=store, queue=queue, bus=bus, quotas=quotas, recorder=recorder, canceller=worker,
                      admission=admission)
    return Services(
        access=Access(keys=keys, quotas=quotas, queue=queue),
        jobs=jobs,
        batches=Batches(store=store, queue=queue, recorder=recorder, admission=admission, jobs=jobs),
        reviews=Reviews(store=store, reports=reports, keys=keys, max_text_chars=settings.max_prompt_chars),
        classifier=Classifier(reports=reports, engine=engine, lm=lm, queue=queue, quotas=quotas, limits=limits,
                              review_threshold=settings.review_threshold,
                              max_waiting=settings.max_queued_classifications),
        model=lm.info, db=db, engine=engine, keys=keys, queue=queue, recorder=recorder, worker=worker,
        webhooks=webhooks,
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
    key = await keys.create("local", admin=True)
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
