"""What the job layer counts, as prometheus-client metrics.

They are created unregistered; the API's /metrics registers them in its registry. They
count what happens in this process (a worker process counts the jobs it ran).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from .domain import GenerationResult, JobStatus

JOBS_SUBMITTED = Counter("inferql_jobs_submitted", "Jobs accepted (queued)", registry=None)
JOBS_FINISHED = Counter("inferql_jobs_finished", "Jobs ended, by final status", ["status"], registry=None)
WEBHOOK_ATTEMPTS = Counter("inferql_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"],
                           registry=None)
TIME_TO_FIRST_TOKEN = Histogram(
    "inferql_time_to_first_token_seconds", "From a job's acceptance to its first token", registry=None,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TIME_PER_TOKEN = Histogram(
    "inferql_time_per_token_seconds", "A job's generation time divided by its tokens", registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

ALL = (JOBS_SUBMITTED, JOBS_FINISHED, WEBHOOK_ATTEMPTS, TIME_TO_FIRST_TOKEN, TIME_PER_TOKEN)

for _status in JobStatus:  # every status shows from the start, at 0
    if _status.terminal:
        JOBS_FINISHED.labels(_status.value)


def job_ended(status: JobStatus, result: GenerationResult | None) -> None:
    JOBS_FINISHED.labels(status.value).inc()
    if result is None:
        return
    t = result.timing
    if t.time_to_first_token_ms is not None:
        TIME_TO_FIRST_TOKEN.observe(t.time_to_first_token_ms / 1000)
    if result.usage.completion_tokens:
        TIME_PER_TOKEN.observe(t.generation_ms / 1000 / result.usage.completion_tokens)
