"""The API's interactive documentation, served without a CDN: /docs (Swagger UI), /redoc (ReDoc).

FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net (and ReDoc's fonts from Google),
so they stay blank where the server has no Internet, or its users none. These are the same pages,
built by FastAPI's documented functions (fastapi.openapi.docs), with their scripts, stylesheet and
icon served from here, under /docs/assets: the files of the fastapi-offline package (MIT; Swagger UI
5, which reads the OpenAPI 3.1 that FastAPI writes, and ReDoc's standalone bundle). Only its files
are used, not its FastAPI factory. create_app builds FastAPI with docs_url=None and redoc_url=None
and includes this router instead. Swagger UI's online validator is switched off (validatorUrl: null).

Both pages also carry a Content-Security-Policy that lets them load nothing from another host
(CSP): ReDoc's bundle draws its footer's logo from cdn.redoc.ly whatever its options say, and the
policy is what stops that (the image's onerror hides it). Their assets are sent with nosniff.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"  # favicon.png, swagger-ui*, redoc.standalone.js
ASSETS_PATH = "/docs/assets"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"  # FastAPI's default swagger_ui_oauth2_redirect_url

# The pages' inline bootstrap scripts and styles need 'unsafe-inline'; ReDoc renders in a blob: worker.
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'self'",
    "frame-ancestors 'none'",
])
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The path prefix the app is served under (uvicorn's --root-path, a proxy's), for the pages' URLs."""
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return _offline(get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
        swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
    ))


@router.get(OAUTH2_REDIRECT_PATH)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 callback, as FastAPI serves it (no route here needs OAuth2; kept for parity)."""
    return _offline(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return _offline(get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    ))


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(HEADERS)
    return page


class _Assets(StaticFiles):
    """StaticFiles with nosniff on every file."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def assets() -> StaticFiles:
    """/docs/assets: the pages' scripts, stylesheet and icon (mounted by create_app)."""
    return _Assets(directory=ASSETS_DIR)
