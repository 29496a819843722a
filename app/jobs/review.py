"""Reviews: the review queue of low-confidence answers, reviews, usage and webhook deliveries."""

from __future__ import annotations

from datetime import UTC, datetime

from .domain import Caller, Job, JobStatus, Page, ReviewVerdict, WebhookAttempt
from .errors import Forbidden, InvalidInput, NotFound
from .keys import KeyStore
from .persistence.reports import ReportStore, UsageSummary
from .persistence.store import JobStore
from .validation import check_page, valid_cursor


def require_admin(caller: Caller, what: str) -> None:
    if not caller.admin:
        raise Forbidden(f"{what} needs an admin key")


class Reviews:
    def __init__(self, *, store: JobStore, reports: ReportStore, keys: KeyStore | None, max_text_chars: int) -> None:
        self._store = store
        self._reports = reports
        self._keys = keys
        self._max_text_chars = max_text_chars

    async def review_queue(self, caller: Caller, first: int = 20, after: str | None = None) -> Page:
        require_admin(caller, "the review queue")
        check_page(first)
        with valid_cursor():
            return await self._store.list_jobs(owner=None, all_owners=True, first=first, after=after,
                                               review_queue=True)

    async def submit_review(self, job_id: str, verdict: ReviewVerdict, corrected_text: str | None,
                            caller: Caller) -> Job:
        require_admin(caller, "reviewing")
        job = await self._store.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        if job.status is not JobStatus.SUCCEEDED or job.result is None:
            raise InvalidInput(f"only a SUCCEEDED job can be reviewed; this one is {job.status.value}", field="jobId")
        if (verdict is ReviewVerdict.CORRECTED) != bool(corrected_text and corrected_text.strip()):
            raise InvalidInput("`correctedText` is required with CORRECTED and only with it", field="correctedText")
        if corrected_text and len(corrected_text) > self._max_text_chars:
            raise InvalidInput(f"`correctedText` is over {self._max_text_chars} characters", field="correctedText")
        await self._store.submit_review(job_id, verdict, caller.name, corrected_text, datetime.now(UTC))
        return await self._store.get(job_id)

    async def webhook_deliveries(self, subject_id: str) -> list[WebhookAttempt]:
        """Callers reach this only through a job or batch they can already see."""
        return await self._reports.webhook_attempts(subject_id)

    async def usage(self, caller: Caller, start: datetime, end: datetime) -> list[tuple[UsageSummary, str | None]]:
        """Usage rows with the name of the key each belongs to."""
        start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))  # naive = UTC
        if end <= start:
            raise InvalidInput("`to` must be after `from`", field="to")
        rows = await self._reports.usage(start, end, owner=caller.owner, all_owners=caller.admin)
        names = {k.id: k.name for k in await self._keys.list()} if self._keys else {}
        return [(row, names.get(row.owner)) for row in rows]
