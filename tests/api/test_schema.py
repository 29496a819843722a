from pathlib import Path

from app.api.schema import schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schema.graphql"


def test_schema_file_matches_the_code():
    """Regenerate with: .venv/bin/inferql schema --out schema.graphql"""
    assert SCHEMA_FILE.read_text() == schema.as_str() + "\n"


def test_contract_names_exist():
    sdl = schema.as_str()
    for name in ["generate(input: GenerationInput!, options: JobOptions = null): GenerationEvent!",
                 "jobEvents(id: ID!, after: Int! = 0): GenerationEvent!",
                 "submitGeneration(input: GenerationInput!, options: JobOptions = null): Job!",
                 "cancelJob(id: ID!): Job!", "classify(input: ClassificationInput!): ClassificationResult!",
                 "job(id: ID!): Job", "models: [ModelInfo!]!",
                 "union GenerationEvent = JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted"
                 " | GenerationFailed | GenerationCancelled"]:
        assert name in sdl
