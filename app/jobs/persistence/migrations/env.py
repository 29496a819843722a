"""Alembic environment: runs on the connection handed over by app.jobs.persistence.migrate."""

from alembic import context
from sqlmodel import SQLModel

from app.jobs.persistence import tables  # noqa: F401  (registers the tables)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `inferql db upgrade` (app.jobs.persistence.migrate)")

# render_as_batch: SQLite can only ALTER a table by copying it; Alembic's batch mode does that.
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
