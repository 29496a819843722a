"""create_worker_app(settings): `inferql worker`, the engine and the claim loop with no
GraphQL API; HTTP only for /metrics, /readyz and /healthz (INFERQL_WORKER_PORT)."""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.metrics import QUEUE_DEPTH, EngineCollector, metrics_endpoint
from app.jobs import metrics as job_metrics
from app.settings import Settings
from app.wiring import start_services

log = logging.getLogger("inferql")


class WorkerCollector:
    def __init__(self, worker) -> None:
        self._worker = worker

    def collect(self):
        yield CounterMetricFamily("inferql_worker_jobs_started", "Jobs this worker took off the queue and started",
                                  value=self._worker.jobs_started)


def create_worker_app(settings: Settings | None = None) -> Starlette:
    settings = (settings or Settings()).model_copy(update={"role": "worker"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        import sys

        sys.setswitchinterval(settings.gil_switch_interval)
        services = await start_services(settings)
        registry = CollectorRegistry()
        registry.register(EngineCollector(services.engine))
        registry.register(WorkerCollector(services.worker))
        for metric in (*job_metrics.ALL, QUEUE_DEPTH):  # the jobs this worker ran; the shared queue's depth
            registry.register(metric)
        app.state.services, app.state.registry = services, registry
        log.info("InferQL worker %s ready (metrics on port %s)", services.worker.worker_id, settings.worker_port)
        try:
            yield
        finally:
            await services.stop()

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        services = getattr(request.app.state, "services", None)
        ok = services is not None and await services.db.ping()
        body = {"status": "ready" if ok else "not ready",
                "worker": services.worker.worker_id if services else None}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request):
        return await metrics_endpoint(request.app.state.registry)(request)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)],
                     lifespan=lifespan)
