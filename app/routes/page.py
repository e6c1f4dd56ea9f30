"""The try-it page: GET / and its files under /static.

Plain HTML, CSS and one ES module (app/static/), no build step, nothing fetched from another
host: the page works offline and its Content-Security-Policy forbids anything but this server
(images also from data: and blob: URLs, which the page makes from API answers). The files ship
in the package through pyproject.toml's [tool.setuptools.package-data].
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CSP = "; ".join([
    "default-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self' data: blob:",  # reading back the images it shows (the browser test does)
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The page; its stylesheet, module and bundled images come from /static."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Content-Security-Policy": CSP})


def static_files() -> StaticFiles:
    """/static: app.css, app.js, samples/*.png (images to try), screenshots/*.png."""
    return StaticFiles(directory=STATIC_DIR)
