"""/docs and /redoc work offline: their pages reference this server only, and it serves every asset."""

import re
from html.parser import HTMLParser

import httpx
import pytest

from app.main import create_app

from .conftest import make_settings

ASSET_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}


class References(HTMLParser):
    """Every src= and href= of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def references(html: str) -> list[str]:
    parser = References()
    parser.feed(html)
    return parser.urls


@pytest.fixture
async def raw(weights_dir):
    """The app without its lifespan: the documentation needs no model."""
    app = create_app(make_settings(weights_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_a_documentation_page_references_only_this_server(raw, page):
    r = await raw.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", r.text)  # no CDN, no Google fonts, no other host
    assert "/openapi.json" in r.text
    urls = references(r.text)
    assert urls and all(url.startswith("/docs/assets/") for url in urls), urls
    for url in urls:
        asset = await raw.get(url)
        suffix = url[url.rindex("."):]
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert asset.headers["content-type"].split(";")[0] in ASSET_TYPES[suffix], (url, asset.headers["content-type"])


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_a_documentation_page_may_load_nothing_from_another_host(raw, page):
    """ReDoc's bundle draws its footer logo from cdn.redoc.ly whatever its options say: the policy stops it."""
    r = await raw.get(page)
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    for directive in ("default-src", "script-src", "style-src", "img-src", "connect-src", "font-src"):
        sources = policy[directive].split()
        assert all(s in ("'self'", "'unsafe-inline'", "data:") for s in sources), (directive, sources)
    assert policy["object-src"] == "'none'" and r.headers["x-content-type-options"] == "nosniff"
    redoc = (await raw.get("/docs/assets/redoc.standalone.js")).text
    assert "cdn.redoc.ly" in redoc or page != "/redoc"  # what the policy is there for (if the bundle ever drops it, so may this)
    asset = await raw.get("/docs/assets/swagger-ui.css")
    assert asset.headers["x-content-type-options"] == "nosniff"


async def test_swagger_ui_has_its_script_stylesheet_and_oauth2_redirect(raw):
    urls = references((await raw.get("/docs")).text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/docs/assets/favicon.png"} <= set(urls)
    r = await raw.get("/docs/oauth2-redirect")
    assert r.status_code == 200 and "oauth2" in r.text and not re.search(r"https?://", r.text)


async def test_the_bundled_swagger_ui_reads_openapi_3_1(raw):
    """FastAPI writes OpenAPI 3.1, which Swagger UI reads from version 5 on (4.x refuses it)."""
    assert (await raw.get("/openapi.json")).json()["openapi"].startswith("3.1")
    bundle = (await raw.get("/docs/assets/swagger-ui-bundle.js")).text
    assert "isOAS31" in bundle


async def test_the_documentation_follows_the_root_path(weights_dir):
    """Behind a proxy that serves the app under a prefix, the page asks for its files under it too."""
    app = create_app(make_settings(weights_dir))
    transport = httpx.ASGITransport(app=app, root_path="/genserve")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        html = (await client.get("/docs")).text
    assert "/genserve/openapi.json" in html
    assert all(url.startswith("/genserve/docs/assets/") for url in references(html))


async def test_the_documentation_is_not_in_the_schema(raw):
    paths = (await raw.get("/openapi.json")).json()["paths"]
    assert not {"/docs", "/redoc", "/docs/oauth2-redirect"} & set(paths)
