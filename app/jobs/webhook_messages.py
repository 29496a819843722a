"""The JSON a webhook carries: {"type", "timestamp", "data"} as the Standard Webhooks spec suggests."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from .domain import Batch, Job, Usage
from .persistence.tables import WebhookRow


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _usage_json(usage: Usage) -> dict[str, int]:
    return {"promptTokens": usage.prompt_tokens, "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens}


def job_json(job: Job) -> dict[str, Any]:
    result = job.result
    return {
        "id": job.id,
        "status": job.status.value,
        "priority": job.priority,
        "batchId": job.batch_id,
        "createdAt": _iso(job.created_at),
        "startedAt": _iso(job.started_at),
        "finishedAt": _iso(job.finished_at),
        "error": {"code": job.error.code, "message": job.error.message} if job.error else None,
        "result": None if result is None else {
            "text": result.text,
            "finishReason": result.finish_reason.value,
            "needsReview": result.needs_review,
            "confidence": {
                "score": result.confidence.score,
                "meanLogprob": result.confidence.mean_logprob,
                "minProbability": result.confidence.min_probability,
                "perplexity": result.confidence.perplexity,
            },
            "model": {"id": result.model.id, "version": result.model.version},
            "usage": _usage_json(result.usage),
            "timing": {
                "queuedMs": result.timing.queued_ms,
                "timeToFirstTokenMs": result.timing.time_to_first_token_ms,
                "generationMs": result.timing.generation_ms,
                "totalMs": result.timing.total_ms,
            },
        },
    }


def batch_json(batch: Batch) -> dict[str, Any]:
    c = batch.counts
    return {
        "id": batch.id,
        "status": batch.status.value,
        "size": batch.size,
        "createdAt": _iso(batch.created_at),
        "finishedAt": _iso(batch.finished_at),
        "counts": {"queued": c.queued, "running": c.running, "succeeded": c.succeeded, "failed": c.failed,
                   "cancelled": c.cancelled, "expired": c.expired, "total": c.total},
        "usage": _usage_json(batch.usage),
    }


def _message(subject_type: str, subject_id: str, owner: str | None, event_type: str, url: str, data: dict,
             now: datetime) -> WebhookRow:
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    return WebhookRow(
        id=f"msg_{uuid.uuid4().hex}",
        subject_type=subject_type,
        subject_id=subject_id,
        owner=owner,  # its key's secret signs it
        event_type=event_type,
        url=url,
        payload_json=json.dumps(payload, separators=(",", ":")),
        state="PENDING",
        next_attempt_at=now,
        created_at=now,
    )


def job_message(job: Job, url: str, now: datetime) -> WebhookRow:
    return _message("job", job.id, job.owner, f"job.{job.status.value.lower()}", url, {"job": job_json(job)}, now)


def batch_message(batch: Batch, url: str, now: datetime) -> WebhookRow:
    return _message("batch", batch.id, batch.owner, "batch.completed", url, {"batch": batch_json(batch)}, now)
