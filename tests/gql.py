"""GraphQL documents shared by the API and end-to-end tests."""

RESULT_FIELDS = """
  text finishReason needsReview
  confidence { score meanLogprob minProbability perplexity }
  tokens { index text tokenId logprob probability seq }
  model { id version parameters dtype device contextLength source }
  usage { promptTokens completionTokens totalTokens }
  timing { queuedMs timeToFirstTokenMs generationMs totalMs tokensPerSecond }
"""

EVENT_FIELDS = f"""
  __typename
  ... on JobEvent {{ jobId seq at }}
  ... on JobQueued {{ position }}
  ... on GenerationStarted {{ promptTokens model {{ id version }} }}
  ... on TokenGenerated {{ index text tokenId logprob probability
                          alternatives {{ text tokenId logprob probability }} }}
  ... on GenerationCompleted {{ result {{ {RESULT_FIELDS} }} }}
  ... on GenerationCancelled {{ result {{ {RESULT_FIELDS} }} }}
  ... on GenerationFailed {{ error {{ code message }} }}
"""

GENERATE = f"""
subscription Generate($input: GenerationInput!, $options: JobOptions) {{
  generate(input: $input, options: $options) {{ {EVENT_FIELDS} }}
}}
"""

JOB_EVENTS = f"""
subscription Events($id: ID!, $after: Int!) {{
  jobEvents(id: $id, after: $after) {{ {EVENT_FIELDS} }}
}}
"""

JOB = f"""
query Job($id: ID!) {{
  job(id: $id) {{ id status priority createdAt startedAt finishedAt queuePosition
                 result {{ {RESULT_FIELDS} }} error {{ code message }} }}
}}
"""

SUBMIT = """
mutation Submit($input: GenerationInput!, $options: JobOptions) {
  submitGeneration(input: $input, options: $options) { id status queuePosition createdAt }
}
"""

CANCEL = """
mutation Cancel($id: ID!) { cancelJob(id: $id) { id status result { text finishReason usage { completionTokens } } } }
"""

CLASSIFY = """
mutation Classify($input: ClassificationInput!) {
  classify(input: $input) {
    label confidence needsReview
    scores { label probability logprob }
    model { id version } usage { promptTokens completionTokens totalTokens }
    timing { queuedMs generationMs totalMs }
  }
}
"""


async def collect(client, query, variables, protocol=None, stop_after_tokens=None):
    """All events of one subscription (or the first ones, leaving after N tokens)."""
    kwargs = {"protocol": protocol} if protocol else {}
    events, tokens = [], 0
    async for data in client.subscribe(query, variables, **kwargs):
        event = next(iter(data.values()))
        events.append(event)
        if event["__typename"] == "TokenGenerated":
            tokens += 1
            if stop_after_tokens is not None and tokens >= stop_after_tokens:
                break
    return events
