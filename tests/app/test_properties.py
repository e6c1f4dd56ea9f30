"""Property tests: no endpoint answers a 5xx to random input, and every error is JSON {"detail": ...}.

One app serves all examples of a test: it runs in a background thread's event loop and each
example sends its request there (hypothesis drives plain functions, not coroutines).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings, strategies as st

from app.main import create_app

from .conftest import image_bytes, make_settings

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODELS = st.sampled_from(["vae", "vae_rgb", "vqvae", "gated", "", "nope"])


class LiveApp:
    def __init__(self, app) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self.started.wait(60) and self.error is None, self.error

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        try:
            async with LifespanManager(self.app) as manager:
                await self.app.state.starting
                transport = httpx.ASGITransport(app=manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                    self.client = client
                    self.started.set()
                    await self.stop.wait()
        except BaseException as err:  # surface startup failures to the test
            self.error = err
            self.started.set()

    def request(self, method: str, url: str, **kw) -> httpx.Response:
        return asyncio.run_coroutine_threadsafe(self.client.request(method, url, **kw), self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def live(weights_dir):
    server = LiveApp(create_app(make_settings(weights_dir, max_n=8, max_files=3, max_upload_bytes=50_000, max_pixels=300 * 300)))
    yield server
    server.close()


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert "detail" in r.json()


def mutate(data: bytes, positions: list[int], value: int) -> bytes:
    out = bytearray(data)
    for p in positions:
        if out:
            out[p % len(out)] = value
    return bytes(out)


uploads = st.one_of(
    st.binary(max_size=3000),
    st.builds(mutate, st.sampled_from([image_bytes(f, m, s) for f, m, s in
                                       [("PNG", "RGB", (9, 9)), ("JPEG", "L", (30, 20)), ("GIF", "P", (8, 8)),
                                        ("WEBP", "RGBA", (12, 12)), ("BMP", "RGB", (8, 8))]]),
              st.lists(st.integers(0, 10**6), max_size=4), st.integers(0, 255)),
)
loose_ints = st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 300), st.text(max_size=5))
loose_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))


@PROPERTY_SETTINGS
@given(endpoint=st.sampled_from(["/reconstruct", "/encode", "/interpolate"]), model=MODELS,
       blobs=st.lists(uploads, min_size=0, max_size=4), field=st.sampled_from(["file", "a", "b", "other"]),
       steps=loose_ints, method=st.sampled_from(["lerp", "slerp", "x"]), include_z_e=st.sampled_from(["true", "0", "maybe"]))
def test_uploads_never_give_5xx(live, endpoint, model, blobs, field, steps, method, include_z_e):
    files = [(field if endpoint != "/interpolate" else "ab"[i % 2], (f"f{i}", b)) for i, b in enumerate(blobs)]
    params = {"model": model, "steps": steps, "method": method, "include_z_e": include_z_e}
    check(live.request("POST", endpoint, params=params, files=files or None, data=None if files else {"x": "1"}))


@PROPERTY_SETTINGS
@given(model=MODELS, n=loose_ints, seed=loose_ints, temperature=loose_floats,
       prior=st.sampled_from([None, "pixelcnn", "gated", "pixelcnnpp", "nope"]), label=st.one_of(st.none(), loose_ints, st.text(max_size=8)))
def test_sample_never_gives_5xx(live, model, n, seed, temperature, prior, label):
    params = {k: v for k, v in dict(model=model, n=n, seed=seed, temperature=temperature, prior=prior, label=label).items()
              if v is not None}
    check(live.request("GET", "/sample", params=params))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=30,
)
near_valid = st.fixed_dictionaries(
    {"model": MODELS},
    optional={
        "z": st.lists(st.lists(st.one_of(st.floats(), st.integers(-5, 5)), max_size=6), max_size=10),
        "codes": st.lists(st.lists(st.lists(st.integers(-2, 20), max_size=3), max_size=3), max_size=10),
    },
)


@PROPERTY_SETTINGS
@given(body=st.one_of(near_valid, json_values), raw=st.one_of(st.none(), st.binary(max_size=50)))
def test_decode_never_gives_5xx(live, body, raw):
    content = raw if raw is not None else json.dumps(body).encode()  # json.dumps writes NaN and Infinity
    check(live.request("POST", "/decode", content=content, headers={"content-type": "application/json"}))
