"""Prometheus metrics: the engine's own counters, read at scrape time; the API's requests
and subscriptions; the job layer's (app/jobs/metrics.py); the queue's depth, read at scrape
time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from app.jobs import metrics as job_metrics

if TYPE_CHECKING:  # the engine module pulls torch, which the schema export does not need
    from app.inference.engine import Engine

from .limits import STATS


class EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self):
        s = self._engine.stats
        yield CounterMetricFamily("inferql_engine_decode_steps", "Decode forward passes", value=s.decode_steps)
        yield CounterMetricFamily(
            "inferql_engine_shared_decode_steps", "Decode passes that served more than one request",
            value=s.shared_decode_steps,
        )
        yield CounterMetricFamily("inferql_engine_prefills", "Prompt prefill passes", value=s.prefills)
        yield CounterMetricFamily("inferql_engine_tokens", "Tokens generated", value=s.tokens_generated)
        yield GaugeMetricFamily("inferql_engine_max_batch_size", "Largest batch decoded so far", value=s.max_batch_size)
        yield GaugeMetricFamily("inferql_engine_running", "Requests in the running batch", value=self._engine.running)
        yield GaugeMetricFamily("inferql_engine_waiting", "Requests waiting for a batch slot", value=self._engine.waiting)
        steps = GaugeMetricFamily("inferql_engine_batch_size_steps", "Decode steps per batch size", labels=["size"])
        for size, count in sorted(s.batch_size_histogram.items()):
            steps.add_metric([str(size)], count)
        yield steps


class DocumentCollector:
    """What the document limit checks did: their work is linear in the documents' size."""

    def collect(self):
        yield CounterMetricFamily("inferql_documents_checked", "Operations checked against the document limits",
                                  value=STATS.documents)
        yield CounterMetricFamily("inferql_documents_refused", "Operations refused for crossing a document limit",
                                  value=STATS.refused)
        yield CounterMetricFamily(
            "inferql_document_selections_visited", "Selections the document limit checks visited",
            value=STATS.selections_visited,
        )


# operation: query | mutation | subscription | unknown (not parsed: no key, bad JSON, syntax error).
# code: OK, or the `extensions.code` of the operation's first error (BAD_USER_INPUT, NOT_FOUND, ...).
REQUESTS = Counter("inferql_graphql_requests", "GraphQL operations, by operation type and outcome code",
                   ["operation", "code"], registry=None)
OPERATION_SECONDS = Histogram(
    "inferql_graphql_operation_seconds", "Time to answer a query or mutation (parse to result)", ["operation"],
    registry=None, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SUBSCRIPTIONS_OPEN = Gauge("inferql_subscriptions_open", "Subscriptions streaming now, by field", ["field"],
                           registry=None)
QUEUE_DEPTH = Gauge("inferql_queue_depth", "Jobs waiting in the queue (read at scrape time)", registry=None)

for _field in ("generate", "jobEvents"):
    SUBSCRIPTIONS_OPEN.labels(_field)

API_METRICS = (REQUESTS, OPERATION_SECONDS, SUBSCRIPTIONS_OPEN, QUEUE_DEPTH, *job_metrics.ALL)


def register_api_metrics(registry: CollectorRegistry) -> None:
    for metric in API_METRICS:
        registry.register(metric)


def metrics_endpoint(registry: CollectorRegistry):
    async def metrics(request: Request) -> Response:
        services = getattr(request.app.state, "services", None)
        if services is not None:
            QUEUE_DEPTH.set(await services.queue.depth())
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return metrics
