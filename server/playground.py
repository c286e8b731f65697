"""The playground: a page at `GET /` where a person tries the server in a browser and sees speculation.

Static files shipped in the package (`server/static`: HTML, JS, CSS; no build step, nothing fetched
from elsewhere). The page streams from `/generate_stream` with `fetch` and shades each run of tokens by
the step that emitted it (`StreamResponse.step`), with live tok/s and tokens per step, and a switch for
`parameters.speculate` to compare. `POST /` stays TGI's client route.

The page and its files hold nothing secret, so they stay open when API keys are set (`server.auth`);
the page sends the key a person types with its own requests.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/static/"


def add_playground(app: FastAPI) -> None:
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="static")

    # not in the OpenAPI document: a page for people, not an operation for clients
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "playground.html")


def is_playground(scope: Scope) -> bool:
    """Whether an HTTP request reads the page or one of its files."""
    path = scope["path"]
    return scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith(STATIC_PREFIX))
