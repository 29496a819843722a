"""GraphQL inputs, and their translation into the job layer's data."""

from __future__ import annotations

import enum

import strawberry

from app.inference.types import SamplingParams
from app.jobs.domain import ChatMessage, GenerationSpec
from app.jobs.domain import JobOptions as JobOptionsData
from app.jobs.errors import InvalidInput

from .types.scalars import Long


@strawberry.enum(description="Who speaks in a chat message.")
class ChatRole(enum.Enum):
    SYSTEM = strawberry.enum_value("system", description="Instructions that frame the conversation.")
    USER = strawberry.enum_value("user", description="The person asking.")
    ASSISTANT = strawberry.enum_value("assistant", description="The model's earlier answers.")


@strawberry.input(description="One message of a chat.")
class ChatMessageInput:
    role: ChatRole = strawberry.field(description="Who speaks.")
    content: str = strawberry.field(description="What they say.")


@strawberry.input(description="What to generate: exactly one of `prompt` or `messages`, and how to sample.")
class GenerationInput:
    prompt: str | None = strawberry.field(
        default=None, description="Sent as one user message through the model's chat template (unless `raw`)."
    )
    messages: list[ChatMessageInput] | None = strawberry.field(
        default=None, description="A chat (1 to 256 messages), sent through the model's chat template.")
    max_tokens: int = strawberry.field(
        default=128, description="The most tokens to generate (1 to the server's maximum and the context length).")
    temperature: float = strawberry.field(default=0.0, description="0 = greedy; up to 2.")
    top_p: float = strawberry.field(
        default=1.0, description="Nucleus sampling: sample from the smallest set of tokens whose probabilities "
                                 "add up to topP, in (0, 1]. 1 = every token.")
    seed: int | None = strawberry.field(
        default=None,
        description="Same seed and input give the same output. A GraphQL Int, so 0 to 2^31 - 1; for the full "
                    "range 0 to 2^63 - 1 use `seedLong` instead (not both).")
    seed_long: Long | None = strawberry.field(
        default=None, description="The seed as a Long (0 to 2^63 - 1), as an integer or a decimal string; "
                                  "instead of `seed`.")
    stop: list[str] | None = strawberry.field(
        default=None, description="Up to 8 strings (1 to 100 characters each); generation stops when one "
                                  "appears, and it is cut from the text (finishReason STOP_SEQUENCE).")
    alternatives: int = strawberry.field(default=0, description="Top-k alternatives reported per token (0..10).")
    raw: bool = strawberry.field(default=False, description="Feed `prompt` verbatim, without the chat template.")

    def to_spec(self) -> GenerationSpec:
        if self.seed is not None and self.seed_long is not None:
            raise InvalidInput("give `seed` or `seedLong`, not both", field="seedLong")
        seed = self.seed_long if self.seed_long is not None else self.seed
        return GenerationSpec(
            prompt=self.prompt,
            messages=tuple(ChatMessage(m.role.value, m.content) for m in self.messages)
            if self.messages is not None else None,
            sampling=SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=seed,
                stop=tuple(self.stop or ()),
                alternatives=self.alternatives,
            ),
            raw=self.raw,
        )


@strawberry.input(description="How a job is run and reported, besides what it generates.")
class JobOptions:
    priority: int = strawberry.field(
        default=0, description="-100 to 100 (capped by the key's maximum); higher runs first.")
    idempotency_key: str | None = strawberry.field(
        default=None, description="1 to 200 characters: the same key from the same API key returns the job it "
                                  "made first instead of a new one.")
    webhook_url: str | None = strawberry.field(
        default=None, description="An http(s) URL called (signed per Standard Webhooks) when the job ends.")
    deadline_seconds: float | None = strawberry.field(
        default=None, description="In (0, 86400]: a job not finished by then ends EXPIRED (a running one keeps "
                                  "its partial result, finishReason DEADLINE).")

    @staticmethod
    def to_data(options: JobOptions | None) -> JobOptionsData:
        if options is None:
            return JobOptionsData()
        return JobOptionsData(priority=options.priority, idempotency_key=options.idempotency_key,
                              webhook_url=options.webhook_url, deadline_seconds=options.deadline_seconds)


@strawberry.input(description="A zero-shot classification: which label is the model's answer to `text`.")
class ClassificationInput:
    text: str = strawberry.field(description="What to classify.")
    labels: list[str] = strawberry.field(description="2 to 50 distinct labels, 1 to 200 characters each.")
    instruction: str | None = strawberry.field(
        default=None, description="System instruction; `{labels}` is replaced by the label list."
    )
