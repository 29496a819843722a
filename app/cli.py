"""The `inferql` command: serve, fetch the model, print the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.logs import configure as configure_logging
from app.settings import Settings

app = typer.Typer(help="InferQL: a GraphQL API for AI inference.", no_args_is_help=True)
model_app = typer.Typer(help="The model's weights.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
jobs_app = typer.Typer(help="Stored jobs.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhook signing.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(webhooks_app, name="webhooks")


def _settings_or_exit(**overrides) -> Settings:
    """Settings with the topology checked: a misconfiguration stops here, with its message."""
    from app.wiring import ConfigError, check_topology

    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format)
    try:
        check_topology(settings)
    except ConfigError as exc:
        typer.echo(f"inferql: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Overrides INFERQL_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides INFERQL_PORT.")] = None,
    api_only: Annotated[bool, typer.Option(
        "--api-only", help="Run the API without the model's weights (INFERQL_ROLE=api); "
                           "`inferql worker` processes run the jobs.")] = False,
) -> None:
    """Start the GraphQL server (GraphiQL at /graphql)."""
    import uvicorn

    from app.main import create_app

    settings = _settings_or_exit(host=host, port=port, role="api" if api_only else None)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through the handler configure_logging set up
        ws_max_size=settings.max_body_bytes,  # websocket frames: the same cap as HTTP bodies
        ws_per_message_deflate=settings.ws_compression,
    )


@app.command()
def worker(
    port: Annotated[int | None, typer.Option(help="Overrides INFERQL_WORKER_PORT (/metrics, /readyz).")] = None,
) -> None:
    """Run the engine and claim jobs from the shared queue (no GraphQL API). Needs a
    PostgreSQL INFERQL_DATABASE_URL and INFERQL_REDIS_URL, shared with the API replicas."""
    import uvicorn

    from app.worker_app import create_worker_app

    settings = _settings_or_exit(worker_port=port, role="worker")
    uvicorn.run(create_worker_app(settings), host=settings.host, port=settings.worker_port,
                log_level=settings.log_level, log_config=None)


@model_app.command("pull")
def model_pull(
    force: Annotated[bool, typer.Option(help="Fetch and convert again.")] = False,
    verify: Annotated[bool, typer.Option(help="Load the model even when it was already there.")] = False,
) -> None:
    """Fetch the default model into the cache (idempotent); a fresh copy is loaded once to check it."""
    from app.inference.weights import default_model_dir, is_complete, pull_default_model, read_marker

    settings = Settings()
    fresh = force or not is_complete(default_model_dir(settings.cache_dir))
    path = pull_default_model(settings.cache_dir, force=force)
    if fresh or verify:
        from app.inference.model import load_model

        info = load_model(path, device="cpu").info
        typer.echo(f"{info.id} version {info.version} ({info.parameters:,} parameters) loads; ready in {path}")
    else:
        marker = read_marker(path)
        typer.echo(f"{marker.get('name')} version {marker.get('version')} already in {path}")


@model_app.command("path")
def model_path() -> None:
    """Print the folder the server would load."""
    from app.inference.weights import default_model_dir

    settings = Settings()
    typer.echo(settings.model_path or default_model_dir(settings.cache_dir))


@app.command()
def schema(out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
           possible_types: Annotated[bool, typer.Option(
               help="Print the unions' and interfaces' possible types (JSON, for Apollo Client's cache).")] = False,
           ) -> None:
    """Print the GraphQL SDL the code exports."""
    from app.api.schema import schema as gql_schema

    sdl = gql_schema.as_str() + "\n"
    if possible_types:
        import json

        from app.api.possible_types import possible_types as of

        sdl = json.dumps(of(gql_schema._schema), indent=2) + "\n"
    if out:
        out.write_text(sdl)
    else:
        typer.echo(sdl, nl=False)


async def _with_db(fn):
    from app.jobs.persistence.db import Database
    from app.jobs.persistence.migrate import upgrade

    db = Database(Settings().database_url)
    try:
        await upgrade(db.engine)
        return await fn(db)
    finally:
        await db.dispose()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations (the server also does this on start)."""
    import asyncio

    from app.jobs.persistence.migrate import current

    revision = asyncio.run(_with_db(lambda db: current(db.engine)))
    typer.echo(f"database at revision {revision}")


@jobs_app.command("purge")
def jobs_purge(
    days: Annotated[float | None, typer.Option(help="Overrides INFERQL_RETENTION_DAYS.")] = None,
) -> None:
    """Delete finished jobs older than the retention period."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from app.jobs.persistence.store import JobStore

    keep = timedelta(days=days if days is not None else Settings().retention_days)

    async def purge(db):
        return await JobStore(db).purge_finished_before(datetime.now(UTC) - keep)

    typer.echo(f"purged {asyncio.run(_with_db(purge))} finished jobs older than {keep}")


def _keys(db):
    from app.jobs.keys import Defaults, KeyStore

    s = Settings()
    return KeyStore(db, Defaults(s.default_rpm, s.default_tpm, s.default_concurrency, s.default_max_priority))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A unique name for the key.")],
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute (default: INFERQL_DEFAULT_RPM).")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute (default: INFERQL_DEFAULT_TPM).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Generations queued or running at once.")] = None,
    max_priority: Annotated[int | None, typer.Option(
        min=-100, max=100, help="The highest job priority the key may ask for (default: INFERQL_DEFAULT_MAX_PRIORITY; "
                                "admin keys: 100).")] = None,
    admin: Annotated[bool, typer.Option(help="Sees every key's jobs and runs the review queue.")] = False,
) -> None:
    """Create a key. It is printed once, as the last line; only its hash is stored."""
    import asyncio

    from app.jobs.keys import KeyNameTaken

    async def create(db):
        return await _keys(db).create(name, admin=admin, rpm=rpm, tpm=tpm, concurrency=concurrency,
                                      max_priority=max_priority)

    try:
        key = asyncio.run(_with_db(create))
    except KeyNameTaken as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"created key {name!r}{' (admin)' if admin else ''}; store it now, it is not shown again:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (names, prefixes, limits); never the keys themselves."""
    import asyncio

    async def listing(db):
        return await _keys(db).list()

    for k in asyncio.run(_with_db(listing)):
        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
        limits = (f"rpm={k.rpm or 'default'} tpm={k.tpm or 'default'} concurrency={k.concurrency or 'default'} "
                  f"max-priority={'default' if k.max_priority is None else k.max_priority}")
        typer.echo(f"{k.name:20} {k.prefix}…  {'admin ' if k.admin else ''}{limits}  {state}")


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Revoke a key by name; it stops working within INFERQL_KEY_CACHE_SECONDS (1 s)."""
    import asyncio

    async def revoke(db):
        return await _keys(db).revoke(name)

    if not asyncio.run(_with_db(revoke)):
        typer.echo(f"no active key named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {name!r}")


@webhooks_app.command("secret")
def webhooks_secret(
    key: Annotated[str | None, typer.Option(help="The name of an API key: print the secret that signs its "
                                                 "webhooks (created now if it has none yet).")] = None,
) -> None:
    """Print a webhook signing secret (give it to the receiver). Each API key signs its jobs'
    webhooks with its own secret (--key NAME); without --key, the server-wide secret that signs
    webhooks of jobs made with auth off."""
    if key is not None:
        import asyncio

        async def secret(db):
            return await _keys(db).webhook_secret(key)

        value = asyncio.run(_with_db(secret))
        if value is None:
            typer.echo(f"no key named {key!r}", err=True)
            raise typer.Exit(1)
        typer.echo(value)
        return
    from app.jobs.webhook_secrets import load_or_create_secret

    settings = Settings()
    if settings.webhook_secret is not None:
        typer.echo(settings.webhook_secret.get_secret_value())
    else:
        typer.echo(load_or_create_secret(settings.data_dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
