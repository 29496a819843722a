"""The resolver context: what every resolver reaches through `info.context`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strawberry.types import Info as StrawberryInfo

from app.inference.types import ModelInfo
from app.jobs.access import Access
from app.jobs.batches import Batches
from app.jobs.classification import Classifier
from app.jobs.domain import Caller
from app.jobs.review import Reviews
from app.jobs.service import JobService


@dataclass
class Context:
    """One per HTTP request, or one per websocket connection (shared by its operations)."""

    access: Access
    jobs: JobService
    batches: Batches
    reviews: Reviews
    classifier: Classifier
    model: ModelInfo
    request: Any                      # starlette Request or WebSocket
    response: Any = None
    caller: Caller | None = None      # None until authenticated (a websocket: at connection_init)
    max_subscriptions: int | None = None
    open_subscriptions: int = 0
    connection: Any = None            # a websocket's entry in the connection registry
    connection_params: dict | None = None  # set by strawberry: the connection_init payload


Info = StrawberryInfo[Context, None]
