"""The browser pages: GraphiQL's assets and the playground, all served from app/api/static.

Nothing is loaded from elsewhere: GraphiQL, React and graphql-ws are vendored under
static/vendor (scripts/refresh-graphiql fetches them, with checksums and licenses).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


async def playground(_: Request) -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html")


def frontend_routes() -> list[BaseRoute]:
    """/static/... and /playground (served where GraphiQL is: not in production by default)."""
    return [
        Route("/playground", playground, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
