"""The try-it page: GET / and its files under /static.

Plain HTML, CSS and one ES module (app/static/), no build step, nothing fetched from another
host: the page works offline and its Content-Security-Policy forbids anything but this server
(images also from data: and blob: URLs, which the page makes from API answers; its scripts
fetch from this server only). The page is served at / only: /static/index.html is a 404, so
the page never loads from a second address. Every response here says X-Content-Type-Options:
nosniff, so a browser runs or styles a file only by its declared type. The files ship in the
package through pyproject.toml's [tool.setuptools.package-data].
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CSP = "; ".join([
    "default-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
PAGE = "index.html"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The page; its stylesheet, module and bundled images come from /static."""
    return FileResponse(STATIC_DIR / PAGE, media_type="text/html", headers=HEADERS)


class _StaticFiles(StaticFiles):
    """StaticFiles without the page (it lives at /), with HEADERS on every file (a 304 included)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path == PAGE:  # `path` is normalised: ./index.html and samples/../index.html arrive as index.html
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def static_files() -> StaticFiles:
    """/static: app.css, app.js, samples/*.png (images to try), screenshots/*.png."""
    return _StaticFiles(directory=STATIC_DIR)
