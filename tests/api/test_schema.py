from pathlib import Path

from app.api.schema import schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schema.graphql"


def test_schema_file_matches_the_code():
    """Regenerate with: .venv/bin/inferql schema --out schema.graphql"""
    assert SCHEMA_FILE.read_text() == schema.as_str() + "\n"


def signatures() -> str:
    """Every root field as `name(arg: Type = default, ...): Type`, one a line: the SDL without
    the descriptions, which split a field's arguments over several lines."""
    from graphql.utilities.print_schema import print_input_value

    lines = []
    for root in (schema._schema.query_type, schema._schema.mutation_type, schema._schema.subscription_type):
        for name, field in root.fields.items():
            args = ", ".join(print_input_value(a, arg) for a, arg in field.args.items())
            lines.append(f"{name}({args}): {field.type}" if args else f"{name}: {field.type}")
    return "\n".join(lines)


def test_contract_names_exist():
    sdl = schema.as_str() + "\n" + signatures()
    for name in ["generate(input: GenerationInput!, options: JobOptions = null): GenerationEvent!",
                 "jobEvents(id: ID!, after: Int! = 0): GenerationEvent!",
                 "submitGeneration(input: GenerationInput!, options: JobOptions = null): Job!",
                 "cancelJob(id: ID!): Job!", "classify(input: ClassificationInput!): ClassificationResult!",
                 "job(id: ID!): Job", "models: [ModelInfo!]!",
                 "union GenerationEvent = JobQueued | GenerationStarted | TokenGenerated | GenerationCompleted"
                 " | GenerationFailed | GenerationCancelled"]:
        assert name in sdl


def test_every_type_field_argument_and_enum_value_has_a_description():
    """UIs (GraphiQL's docs, codegen comments) show these; introspection types are excluded."""
    from graphql import (GraphQLEnumType, GraphQLInputObjectType, GraphQLInterfaceType, GraphQLObjectType,
                         GraphQLScalarType, GraphQLUnionType)

    builtin_scalars = {"String", "Int", "Float", "Boolean", "ID"}
    missing = []
    for name, gtype in schema._schema.type_map.items():
        if name.startswith("__") or name in builtin_scalars:
            continue
        if not (gtype.description or "").strip():
            missing.append(name)
        if isinstance(gtype, (GraphQLObjectType, GraphQLInterfaceType, GraphQLInputObjectType)):
            for fname, field in gtype.fields.items():
                if not (field.description or "").strip():
                    missing.append(f"{name}.{fname}")
                for aname, arg in getattr(field, "args", {}).items():
                    if not (arg.description or "").strip():
                        missing.append(f"{name}.{fname}({aname})")
        elif isinstance(gtype, GraphQLEnumType):
            missing += [f"{name}.{v}" for v, value in gtype.values.items() if not (value.description or "").strip()]
        else:
            assert isinstance(gtype, (GraphQLScalarType, GraphQLUnionType)), name
    assert missing == []
