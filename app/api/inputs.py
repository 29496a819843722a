"""GraphQL inputs, and their translation into the job layer's data."""

from __future__ import annotations

import enum

import strawberry

from app.inference.types import SamplingParams
from app.jobs.domain import ChatMessage, GenerationSpec
from app.jobs.domain import JobOptions as JobOptionsData


@strawberry.enum(description="Who speaks in a chat message.")
class ChatRole(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@strawberry.input
class ChatMessageInput:
    role: ChatRole
    content: str


@strawberry.input(description="Exactly one of `prompt` or `messages`.")
class GenerationInput:
    prompt: str | None = strawberry.field(
        default=None, description="Sent as one user message through the model's chat template (unless `raw`)."
    )
    messages: list[ChatMessageInput] | None = None
    max_tokens: int = 128
    temperature: float = strawberry.field(default=0.0, description="0 = greedy; up to 2.")
    top_p: float = 1.0
    seed: int | None = strawberry.field(default=None, description="Same seed and input give the same output.")
    stop: list[str] | None = None
    alternatives: int = strawberry.field(default=0, description="Top-k alternatives reported per token (0..10).")
    raw: bool = strawberry.field(default=False, description="Feed `prompt` verbatim, without the chat template.")

    def to_spec(self) -> GenerationSpec:
        return GenerationSpec(
            prompt=self.prompt,
            messages=tuple(ChatMessage(m.role.value, m.content) for m in self.messages)
            if self.messages is not None else None,
            sampling=SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                stop=tuple(self.stop or ()),
                alternatives=self.alternatives,
            ),
            raw=self.raw,
        )


@strawberry.input
class JobOptions:
    priority: int = 0
    idempotency_key: str | None = None
    webhook_url: str | None = None
    deadline_seconds: float | None = None

    @staticmethod
    def to_data(options: JobOptions | None) -> JobOptionsData:
        if options is None:
            return JobOptionsData()
        return JobOptionsData(priority=options.priority, idempotency_key=options.idempotency_key,
                              webhook_url=options.webhook_url, deadline_seconds=options.deadline_seconds)


@strawberry.input
class ClassificationInput:
    text: str
    labels: list[str]
    instruction: str | None = strawberry.field(
        default=None, description="System instruction; `{labels}` is replaced by the label list."
    )
