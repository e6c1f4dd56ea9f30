"""GET / (app/routes/page.py): the page and its assets, their content types, nothing from another host,
and every file of app/static shipped with the package. The page in a real browser: test_browser.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.routes.page import CSP, STATIC_DIR

from .conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".html", ".css", ".js"}
CONTENT_TYPES = {
    ".css": {"text/css"},
    ".js": {"text/javascript", "application/javascript"},  # either is a JavaScript MIME type for modules
    ".png": {"image/png"},
}
# Any absolute or protocol-relative URL: http://x, https://x, //x in an attribute, url() or string.
EXTERNAL = re.compile(r"""https?:|(?:["'(=]\s*)//[\w.-]""", re.IGNORECASE)


@pytest.fixture
async def page_client(weights_dir):
    """The app without its lifespan: the page needs no model."""
    app = create_app(make_settings(weights_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


async def test_page_and_its_assets_are_served_with_their_types(page_client) -> None:
    page = await page_client.get("/")
    assert page.status_code == 200
    assert media_type(page) == "text/html"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.text == (STATIC_DIR / "index.html").read_text()

    refs = [ref for ref in re.findall(r"""(?:src|href)="([^"]+)\"""", page.text) if not ref.startswith(("#", "data:"))]
    assert {"static/app.css", "static/app.js", "openapi.json", "docs"} <= set(refs)  # the API's schema and its docs
    for ref in refs:
        response = await page_client.get(f"/{ref}")
        assert response.status_code == 200, ref
        suffix = Path(ref).suffix
        if suffix in CONTENT_TYPES:
            assert media_type(response) in CONTENT_TYPES[suffix], (ref, response.headers["content-type"])

    script = (await page_client.get("/static/app.js")).text
    samples = re.findall(r'\{ name: "(\w+)", title:', script)
    assert len(samples) >= 3
    for name in samples:  # the bundled images the module offers
        response = await page_client.get(f"/static/samples/{name}.png")
        assert response.status_code == 200 and media_type(response) == "image/png", name
        assert len(response.content) < 8 * 1024


async def test_the_page_and_every_static_file_carry_the_csp_and_nosniff(page_client) -> None:
    paths = ["/", *(f"/static/{p.relative_to(STATIC_DIR).as_posix()}" for p in sorted(STATIC_DIR.rglob("*"))
                    if p.is_file() and p.name != "index.html")]
    assert {"/static/app.js", "/static/app.css", "/static/samples/tshirt.png"} <= set(paths)
    for path in paths:
        response = await page_client.get(path)
        assert response.status_code == 200, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["content-security-policy"] == CSP, path
    script = await page_client.get("/static/app.js")
    again = await page_client.get("/static/app.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.headers["x-content-type-options"] == "nosniff"
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["connect-src"] == "'self'"  # the page's scripts fetch from this server only
    assert directives["default-src"] == "'self'" and directives["img-src"] == "'self' data: blob:"


async def test_the_page_is_not_served_again_under_static(page_client) -> None:
    """At /static/index.html its relative links would break; the page has one address, / (with its CSP)."""
    response = await page_client.get("/static/index.html")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


async def test_a_missing_static_file_is_a_json_404(page_client) -> None:
    response = await page_client.get("/static/nothing-here.js")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_no_file_of_the_page_refers_to_another_host() -> None:
    files = [p for p in STATIC_DIR.rglob("*") if p.suffix in TEXT_SUFFIXES]
    assert {p.name for p in files} == {"index.html", "app.css", "app.js"}
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not EXTERNAL.search(line), f"{path.name}:{number} refers to another host: {line.strip()}"


def test_the_page_is_left_out_of_the_api_schema(weights_dir) -> None:
    paths = create_app(make_settings(weights_dir)).openapi()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_every_static_file_ships_in_the_package() -> None:
    """pyproject.toml's package-data globs (setuptools globs them relative to app/) cover app/static."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    app_dir = STATIC_DIR.parent
    shipped = {path for pattern in patterns for path in app_dir.glob(pattern)}
    files = {path for path in STATIC_DIR.rglob("*") if path.is_file()}
    assert files - shipped == set()
