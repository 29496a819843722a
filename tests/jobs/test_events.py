"""numbered: the EventBus's copy of an event with its seq, as dataclasses.replace makes it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from app.jobs.domain import JobError, TokenRecord
from app.jobs.events import GenerationFailed, JobQueued, TokenGenerated, numbered

AT = datetime(2026, 1, 2, tzinfo=UTC)
TOKEN = TokenRecord(3, 42, " hi", -0.25, (), 1767312000.0)


@pytest.mark.parametrize("item", [
    JobQueued("j1", AT, position=2),
    TokenGenerated("j1", AT, TOKEN),
    GenerationFailed("j1", AT, JobError("INTERNAL", "boom")),
    TOKEN,
])
def test_numbered_is_dataclasses_replace(item):
    copy = numbered(item, 7)
    assert copy == dataclasses.replace(item, seq=7)
    assert type(copy) is type(item) and copy.seq == 7 and item.seq == 0  # the original keeps its seq
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.seq = 8
