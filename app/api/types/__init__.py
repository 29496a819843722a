"""GraphQL types of the public contract, by area, each built from the job layer's data
with a `.of(...)` classmethod."""
