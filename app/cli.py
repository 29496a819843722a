"""The `inferql` command: serve, fetch the model, print the schema."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from app.settings import Settings

app = typer.Typer(help="InferQL: a GraphQL API for AI inference.", no_args_is_help=True)
model_app = typer.Typer(help="The model's weights.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Overrides INFERQL_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides INFERQL_PORT.")] = None,
) -> None:
    """Start the GraphQL server (GraphiQL at /graphql)."""
    import uvicorn

    from app.main import create_app

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=1 << 20,  # a prompt is capped far below 1 MiB; a bigger frame is hostile
    )


@model_app.command("pull")
def model_pull(force: Annotated[bool, typer.Option(help="Fetch and convert again.")] = False) -> None:
    """Fetch the default model into the cache (idempotent) and check that it loads."""
    from app.inference.model import load_model
    from app.inference.weights import pull_default_model

    settings = Settings()
    path = pull_default_model(settings.cache_dir, force=force)
    info = load_model(path, device="cpu").info
    typer.echo(f"{info.id} version {info.version} ({info.parameters:,} parameters) ready in {path}")


@model_app.command("path")
def model_path() -> None:
    """Print the folder the server would load."""
    from app.inference.weights import default_model_dir

    settings = Settings()
    typer.echo(settings.model_path or default_model_dir(settings.cache_dir))


@app.command()
def schema(out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None) -> None:
    """Print the GraphQL SDL the code exports."""
    from app.api.schema import schema as gql_schema

    sdl = gql_schema.as_str() + "\n"
    if out:
        out.write_text(sdl)
    else:
        typer.echo(sdl, nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
