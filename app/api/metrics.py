"""Prometheus metrics: the engine's own counters, read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

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


def metrics_endpoint(registry: CollectorRegistry):
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return metrics
