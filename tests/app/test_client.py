"""app/client.py: Client and AsyncClient against the real app, retries on a fake transport; app/cli.py, the CLI.

The sync Client talks to the app served by uvicorn in a background thread on a socket bound
here (port 0: no race for a free port); AsyncClient goes through httpx.ASGITransport inside
asgi_lifespan.LifespanManager. Retries are checked on httpx.MockTransport, with the waits recorded
instead of slept.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from asgi_lifespan import LifespanManager
from PIL import Image

import app.cli as cli_module
import app.client as client_module
from app.cli import main
from app.client import (MAX_RETRIES, MIN_RETRY_WAIT_S, APIError, AsyncClient, Client, Sample, UnexpectedResponse,
                        array_to_image, grid, retry_after_s, to_array, to_tensor)
from app.main import create_app

from .conftest import CLASS_NAMES, CODE_SHAPE, CODEBOOK_SIZE, LATENT_DIM, grid_size, image_bytes, live_server, make_settings, png_array

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def no_proxy_for_localhost():
    """The test server is on 127.0.0.1: an HTTP_PROXY in the environment must not take the requests
    elsewhere (httpx honours the proxy variables; the CLI and `python -m app.client` build their own clients)."""
    hosts = ",".join(h for h in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY"), os.environ.get("no_proxy")) if h)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", hosts)
        mp.setenv("no_proxy", hosts)
        yield


@pytest.fixture(scope="module")
def server_url(weights_dir):
    """The real app under uvicorn in a thread; its base URL."""
    with live_server(weights_dir) as url:
        yield url


@pytest.fixture(scope="module")
def api(server_url):
    with Client(server_url, timeout=60) as c:
        yield c


@pytest.fixture
def pngs(tmp_path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"in{i}.png"
        path.write_bytes(image_bytes("PNG", "L", (8, 8), seed=i))
        paths.append(path)
    return paths


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(img) for img in images]


def server_images(url: str, path: str, **params) -> list[np.ndarray]:
    """What the server itself answers to Accept: application/json, decoded."""
    r = httpx.get(url + path, params=params, headers={"Accept": "application/json"}, timeout=60)
    assert r.status_code == 200
    return [png_array(base64.b64decode(s)) for s in r.json()["images"]]


# --- Client against the real app --------------------------------------------------------------


def test_models_are_typed_entries(api):
    entries = {e.name: e for e in api.models()}
    assert sorted(entries) == ["vae", "vae_rgb", "vqvae"]
    assert entries["vae"].kind == "vae" and entries["vae"].image_shape == [1, 8, 8]
    assert entries["vae"].class_names == list(CLASS_NAMES)
    vq = entries["vqvae"]
    assert vq.codebook_size == CODEBOOK_SIZE and vq.default_prior == "gated"
    assert sorted(p.name for p in vq.priors) == ["gated", "pixelcnn", "pixelcnnpp"]


@pytest.mark.parametrize("model, n, mode", [("vae", 5, "L"), ("vae_rgb", 2, "RGB"), ("vqvae", 3, "L")])
def test_sample_gives_n_images_of_the_models_mode(api, model, n, mode):
    s = api.sample(model, n=n, seed=11)
    assert isinstance(s, Sample) and s.seed == 11 and len(s.images) == n
    assert all(img.mode == mode and img.size == (8, 8) for img in s.images)
    assert s.prior == ("gated" if model == "vqvae" else None)
    assert to_array(s.images).shape == ((n, 8, 8) if mode == "L" else (n, 8, 8, 3))


def test_sample_with_a_seed_is_the_servers_bytes_decoded(api, server_url):
    s = api.sample("vae", n=5, seed=7, temperature=0.8)
    expected = server_images(server_url, "/sample", model="vae", n=5, seed=7, temperature=0.8)
    assert len(expected) == 5 and all(np.array_equal(a, b) for a, b in zip(arrays(s.images), expected))
    # the grid helper lays them out as the server's PNG grid, pixel for pixel
    r = httpx.get(server_url + "/sample", params={"model": "vae", "n": 5, "seed": 7, "temperature": 0.8}, timeout=60)
    assert np.array_equal(np.asarray(grid(s.images)), png_array(r.content))
    assert grid(s.images).size == grid_size(5, nrow=3)
    other = api.sample("vae", n=5, seed=8, temperature=0.8)
    assert not np.array_equal(to_array(other.images), to_array(s.images))


def test_to_tensor_gives_the_models_layout_in_0_1(api):
    grey, rgb = api.sample("vae", n=3, seed=5), api.sample("vae_rgb", n=2, seed=5)
    x, y = to_tensor(grey.images), to_tensor(rgb.images)
    assert (x.dtype, tuple(x.shape), tuple(y.shape)) == (torch.float32, (3, 1, 8, 8), (2, 3, 8, 8))
    assert torch.equal(x[:, 0] * 255, torch.from_numpy(to_array(grey.images)).float())
    assert torch.equal(y * 255, torch.from_numpy(to_array(rgb.images)).float().permute(0, 3, 1, 2))
    assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_a_label_by_class_name_is_its_index_in_the_priors_class_names(api):
    # conftest: gated (the default prior) records CLASS_NAMES; label 2 is "T-shirt/top"
    by_name = api.sample("vqvae", n=3, seed=4, label="T-shirt/top")
    by_index = api.sample("vqvae", n=3, seed=4, label=2)
    other = api.sample("vqvae", n=3, seed=4, label=0)
    assert np.array_equal(to_array(by_name.images), to_array(by_index.images))
    assert np.array_equal(to_array(api.sample("vqvae", n=3, seed=4, prior="gated", label="circle").images),
                          to_array(other.images))
    # the server resolves names (any case) and answers what does not name a class with a 422 naming them
    assert np.array_equal(to_array(api.sample("vqvae", n=3, seed=4, label="t-shirt/TOP").images), to_array(by_index.images))
    errors = {
        ("gated", "boot"): (422, "label 'boot' is not a class of prior 'gated': use 0..2 or a class name: "
                                 "['circle', 'square', 'T-shirt/top']"),
        ("pixelcnnpp", "circle"): (422, "prior 'pixelcnnpp' is unconditional: omit 'label'"),
    }
    for (prior, label), (status, detail) in errors.items():
        with pytest.raises(APIError) as info:
            api.sample("vqvae", seed=1, prior=prior, label=label)
        assert (info.value.status_code, info.value.detail) == (status, detail)
    with pytest.raises(APIError) as info:
        api.sample("vae", seed=1, label="circle")
    assert info.value.detail == "model 'vae' is a VAE: 'prior' and 'label' apply to VQ-VAE priors only"


def test_sample_without_a_seed_returns_the_seed_that_reproduces_it(api):
    s = api.sample("vqvae", n=4, prior="gated", label=2)
    again = api.sample("vqvae", n=4, seed=s.seed, prior="gated", label=2)
    assert s.prior == again.prior == "gated"
    assert np.array_equal(to_array(s.images), to_array(again.images))


def test_every_kind_of_image_input_is_sent_as_the_same_pixels(api, pngs):
    pixels = png_array(pngs[0].read_bytes())  # (8, 8) uint8
    inputs = [pngs[0], str(pngs[0]), pngs[0].read_bytes(), Image.fromarray(pixels), pixels, pixels[:, :, None],
              pixels / 255.0]
    out = api.reconstruct("vae", inputs)
    assert len(out) == len(inputs) and all(img.mode == "L" and img.size == (8, 8) for img in out)
    first = np.asarray(out[0])
    assert all(np.array_equal(np.asarray(img), first) for img in out)


def test_float_arrays_become_round_255x_and_channels_pick_the_mode():
    img = array_to_image(np.array([[0.0, 0.003, 0.5, 1.0]]))  # 255 x: 0, 0.765, 127.5, 255
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 1, 128, 255]]
    assert array_to_image(np.zeros((2, 3, 3), np.uint8)).mode == "RGB"
    assert array_to_image(np.zeros((2, 3, 4), np.uint8)).mode == "RGBA"
    assert array_to_image(np.zeros((2, 3, 1), np.uint8)).size == (3, 2)


def test_bad_image_inputs_are_refused_before_sending(api):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        api.reconstruct("vae", [np.full((8, 8), 2.0)])
    with pytest.raises(ValueError, match="shape"):
        api.reconstruct("vae", [np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(TypeError, match="list"):
        api.reconstruct("vae", [[0, 1]])
    with pytest.raises(ValueError, match="at least one"):
        api.reconstruct("vae", [])


def test_reconstruct_rgb_and_vqvae(api, pngs):
    rgb = api.reconstruct("vae_rgb", pngs[:2])
    assert len(rgb) == 2 and all(img.mode == "RGB" and img.size == (8, 8) for img in rgb)
    vq = api.reconstruct("vqvae", pngs)
    assert len(vq) == 3 and all(img.mode == "L" for img in vq)


def test_encode_then_decode_gives_the_reconstructions(api, pngs):
    encodings = api.encode("vae", pngs)
    assert [e.file for e in encodings] == [p.name for p in pngs]
    assert all(e.mu.shape == e.logvar.shape == (LATENT_DIM,) and e.codes is None for e in encodings)
    decoded = api.decode("vae", z=np.stack([e.mu for e in encodings]))  # (3, D) array
    recon = api.reconstruct("vae", pngs)
    assert len(decoded) == 3 and all(np.array_equal(a, b) for a, b in zip(arrays(decoded), arrays(recon)))

    codes = api.encode("vqvae", pngs, include_z_e=True)
    assert all(e.codes.shape == CODE_SHAPE and e.codes.dtype == np.int64 and e.mu is None for e in codes)
    assert all(e.z_e.shape == (4, *CODE_SHAPE) for e in codes)  # embedding_dim 4
    assert api.encode("vqvae", pngs[:1])[0].z_e is None
    decoded = api.decode("vqvae", codes=[e.codes.tolist() for e in codes])  # nested lists work too
    recon = api.reconstruct("vqvae", pngs)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(decoded), arrays(recon)))
    with pytest.raises(ValueError, match="exactly one"):
        api.decode("vae")


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_interpolate_gives_steps_images_ending_in_the_reconstructions(api, pngs, method):
    strip = api.interpolate("vae", pngs[0], pngs[1], steps=5, method=method)
    assert len(strip) == 5 and all(img.mode == "L" and img.size == (8, 8) for img in strip)
    ends = api.reconstruct("vae", pngs[:2])
    assert np.array_equal(np.asarray(strip[0]), np.asarray(ends[0]))
    assert np.array_equal(np.asarray(strip[-1]), np.asarray(ends[1]))


def test_unknown_model_is_an_api_error_404(api, pngs):
    for call in (lambda: api.sample("nope", seed=1), lambda: api.reconstruct("nope", pngs[:1])):
        with pytest.raises(APIError) as info:
            call()
        err = info.value
        assert err.status_code == 404
        assert err.detail == "unknown model 'nope'; loaded models: ['vae', 'vae_rgb', 'vqvae']"
        assert err.request_id and str(err) == f"404: {err.detail}"


def test_invalid_parameters_are_an_api_error_422(api, pngs):
    with pytest.raises(APIError) as info:
        api.sample("vae", n=0)
    assert info.value.status_code == 422 and isinstance(info.value.detail, list)
    assert str(info.value) == "422: query.n: Input should be greater than or equal to 1"
    with pytest.raises(APIError) as info:
        api.sample("vae", label=1, seed=1)
    assert info.value.status_code == 422
    assert info.value.detail == "model 'vae' is a VAE: 'prior' and 'label' apply to VQ-VAE priors only"
    with pytest.raises(APIError) as info:
        api.interpolate("vae", pngs[0], pngs[1], steps=1)
    assert info.value.status_code == 422 and "greater than or equal to 2" in str(info.value)
    with pytest.raises(APIError) as info:
        api.decode("vqvae", codes=[[[0, CODEBOOK_SIZE], [0, 0]]])
    assert info.value.status_code == 422 and info.value.detail.startswith("codes[0][0][1] = 16 is out of range")


# --- AsyncClient through ASGITransport ----------------------------------------------------------


def test_score_gives_the_servers_numbers(api, pngs, server_url):
    scores = api.score("vqvae", pngs, prior="gated", label="square", codecs=("png", "webp"), include_map=True)
    with httpx.Client(base_url=server_url, timeout=60) as raw:
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p in pngs]
        body = raw.post("/score", params={"model": "vqvae", "prior": "gated", "label": "1", "codec": ["png", "webp"],
                                          "include_map": "true"}, files=files).json()
    assert [s.file for s in scores] == [p.name for p in pngs]
    for s, item in zip(scores, body["items"]):
        assert s.nats == item["nats"] and s.bits_per_dim == item["bits_per_dim"] and s.bound == body["bound"]
        assert s.codec_bits_per_dim == item["codec_bits_per_dim"] and set(s.complexity_score) == {"png", "webp"}
        assert s.map.shape == (8, 8) and np.array_equal(s.map, np.asarray(item["map"]))
    vae = api.score("vae_rgb", pngs[:1], k=4, seed=2)
    assert vae[0].map is None and "IWAE-4" in vae[0].bound and set(vae[0].codec_bits_per_dim) == {"png"}
    assert vae[0].heat_map is None and vae[0].ratio_score is None and vae[0].background_bits_per_dim is None
    # a heat map and the likelihood ratio against a background model
    [ratio] = api.score("vqvae", pngs[:1], prior="pixelcnnpp", heat_map=True, background="vqvae")
    with httpx.Client(base_url=server_url, timeout=60) as raw:
        item = raw.post("/score", params={"model": "vqvae", "prior": "pixelcnnpp", "map": "true", "background": "vqvae"},
                        files=[("file", (pngs[0].name, pngs[0].read_bytes(), "image/png"))]).json()["items"][0]
    assert ratio.ratio_score == item["ratio_score"] and ratio.background_bits_per_dim == item["background_bits_per_dim"]
    assert ratio.heat_map.mode == "RGB" and ratio.heat_map.size == (8, 8) and ratio.background_bound.startswith("vqvae: ")
    assert np.array_equal(np.asarray(ratio.heat_map), np.asarray(Image.open(io.BytesIO(base64.b64decode(item["map_png"])))))
    with pytest.raises(APIError) as err:
        api.score("vae", pngs)  # a Bernoulli VAE: not a probability of 8-bit images
    assert err.value.status_code == 422


def test_cli_score_prints_a_line_per_image(server_url, pngs, capsys, tmp_path):
    assert main(["--url", server_url, "score", "--model", "vqvae", "--codec", "png", "--codec", "webp",
                 *map(str, pngs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and lines[1].split("\t")[:2] == ["file", "bits/dim"] and len(lines) == 2 + len(pngs)
    assert [line.split("\t")[0] for line in lines[2:]] == [p.name for p in pngs]
    assert main(["--url", server_url, "score", "--model", "vqvae", "--json", str(pngs[0])]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["file"] == pngs[0].name and item["bits_per_dim"] > 0 and "ratio_score" not in item
    heat = tmp_path / "heat.png"
    assert main(["--url", server_url, "score", "--model", "vqvae", "--prior", "pixelcnnpp", "--background", "vqvae",
                 "--heat-maps", str(heat), *map(str, pngs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("# background vqvae: ") and "under prior gated" in lines[1]
    assert lines[2].split("\t")[-2:] == ["ratio", "verdict"]
    ratios = [float(line.split("\t")[-2]) for line in lines[3:]]
    expected = [s.ratio_score for s in Client(server_url).score("vqvae", pngs, prior="pixelcnnpp", background="vqvae")]
    assert ratios == pytest.approx(expected, abs=5e-5)
    assert len(pngs) == 3 and Image.open(heat).size == (22, 22)  # 2 per row, 8x8 maps 2 pixels apart


async def test_async_client_has_the_same_methods_and_answers(weights_dir, server_url, pngs):
    app = create_app(make_settings(weights_dir))
    async with LifespanManager(app) as manager:
        await app.state.starting
        transport = httpx.ASGITransport(app=manager.app)
        async with AsyncClient("http://test", transport=transport, timeout=60) as c:
            assert sorted(e.name for e in await c.models()) == ["vae", "vae_rgb", "vqvae"]
            s = await c.sample("vae", n=5, seed=7, temperature=0.8)
            expected = server_images(server_url, "/sample", model="vae", n=5, seed=7, temperature=0.8)
            assert s.seed == 7 and all(np.array_equal(a, b) for a, b in zip(arrays(s.images), expected))
            recon = await c.reconstruct("vae_rgb", pngs)
            assert len(recon) == 3 and all(img.mode == "RGB" for img in recon)
            encodings = await c.encode("vqvae", pngs[:2])
            assert [e.codes.shape for e in encodings] == [CODE_SHAPE, CODE_SHAPE]
            decoded = await c.decode("vqvae", codes=np.stack([e.codes for e in encodings]))
            assert len(decoded) == 2
            strip = await c.interpolate("vqvae", pngs[0], pngs[1], steps=4, method="lerp")
            assert len(strip) == 4 and all(img.size == (8, 8) for img in strip)
            scores = await c.score("vqvae", pngs[:2], prior="none")
            assert [sc.file for sc in scores] == [p.name for p in pngs[:2]] and "uniform codes" in scores[0].bound
            by_name = await c.sample("vqvae", n=2, seed=3, label="square")
            assert np.array_equal(to_array(by_name.images), to_array((await c.sample("vqvae", n=2, seed=3, label=1)).images))
            with pytest.raises(APIError) as info:
                await c.sample("vqvae", prior="nope", seed=1)
            assert info.value.status_code == 404 and "prior 'nope' is not available" in info.value.detail


async def test_the_tensor_answer_is_exactly_what_the_model_computed(weights_dir, pngs):
    """The client asks for application/x-safetensors: `.array` of every image answer is the float32
    tensor the service's batcher returned, bit for bit, and its PIL images are the PNG's pixels. A
    server that answers JSON only gives the same PIL images and no array."""
    from app.operations import Op, sample_inputs
    from app.responses import TENSOR_TYPE

    app = create_app(make_settings(weights_dir))
    async with LifespanManager(app) as manager:
        service = await app.state.starting
        transport = httpx.ASGITransport(app=manager.app)
        async with AsyncClient("http://test", transport=transport, timeout=60) as c:
            for model in ("vae", "vae_rgb"):
                entry = service.registry.get(model)
                (expected,) = await service.batcher(entry, Op.SAMPLE).submit(*sample_inputs(entry.model, 3, 9, 0.7))
                s = await c.sample(model, n=3, seed=9, temperature=0.7)
                assert s.images.array.dtype == np.float32 and torch.equal(torch.from_numpy(s.images.array), expected)
                png = await c._http.get("/sample", params={"model": model, "n": 3, "seed": 9, "temperature": 0.7})
                assert png.headers["content-type"] == "image/png"
                assert np.array_equal(np.asarray(grid(s.images)), png_array(png.content))
            recon = await c.reconstruct("vqvae", pngs)
            assert recon.array.shape == (3, 1, 8, 8) and np.array_equal(to_array(recon), np.round(recon.array[:, 0] * 255))
            raw = await c._http.post("/decode", json={"model": "vae", "z": [[0.0] * LATENT_DIM]},
                                     headers={"Accept": TENSOR_TYPE})
            assert raw.headers["content-type"] == TENSOR_TYPE and raw.content[:8] != b"\x89PNG\r\n\x1a\n"

    def json_only(request: httpx.Request) -> httpx.Response:  # a server without the tensor answer
        assert "application/x-safetensors" in request.headers["accept"]
        return httpx.Response(200, json={"images": [_png_b64()]}, headers={"X-Seed": "1"})

    with Client("http://test", transport=httpx.MockTransport(json_only)) as c:
        old = c.sample("vae", n=1, seed=1)
    assert old.images.array is None and len(old.images) == 1


# --- retries, on a fake transport ---------------------------------------------------------------


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class FakeServer:
    """Answers the first `busy` requests 503 (with Retry-After unless it is None), then 200."""

    def __init__(self, busy: int, retry_after: str | None = "2", status: int = 503) -> None:
        self.busy, self.retry_after, self.status = busy, retry_after, status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) <= self.busy:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return httpx.Response(self.status, json={"detail": "vae/sample: queue full"}, headers=headers)
        return httpx.Response(200, json={"images": [_png_b64()]}, headers={"X-Seed": "5"})


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits the clients would sleep, recorded instead."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", recorded.append)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    return recorded


def fake_client(server: FakeServer, **kw) -> Client:
    return Client("http://fake", transport=httpx.MockTransport(server), **kw)


def test_a_seeded_sample_is_retried_after_503_with_retry_after(waits):
    server = FakeServer(busy=2)
    with fake_client(server, retries=3) as c:
        s = c.sample("vae", n=1, seed=5)
    assert len(server.requests) == 3 and waits == [2.0, 2.0]
    assert s.seed == 5 and np.asarray(s.images[0]).tolist() == [[200] * 8] * 8


def test_uploads_and_decode_are_retried(waits, pngs):
    server = FakeServer(busy=1)
    with fake_client(server) as c:
        assert len(c.reconstruct("vae", pngs[:1])) == 1
        assert len(c.decode("vae", z=[[0.0] * LATENT_DIM])) == 1
    assert [r.url.path for r in server.requests] == ["/reconstruct", "/reconstruct", "/decode"]
    assert all(pngs[0].read_bytes() in r.content for r in server.requests[:2])  # the same file, sent again
    assert waits == [2.0]


def test_a_sample_without_a_seed_is_not_retried(waits):
    server = FakeServer(busy=1)
    with fake_client(server) as c, pytest.raises(APIError) as info:
        c.sample("vae", n=1)
    assert len(server.requests) == 1 and waits == []
    assert info.value.status_code == 503 and info.value.detail == "vae/sample: queue full"


@pytest.mark.parametrize("retry_after, status", [(None, 503), ("1", 500), ("1", 504), ("soon", 503)])
def test_only_a_503_with_a_valid_retry_after_is_retried(waits, retry_after, status):
    server = FakeServer(busy=1, retry_after=retry_after, status=status)
    with fake_client(server) as c, pytest.raises(APIError) as info:
        c.sample("vae", n=1, seed=1)
    assert len(server.requests) == 1 and waits == [] and info.value.status_code == status


def test_retries_stop_at_the_count_and_at_the_total_wait(waits):
    server = FakeServer(busy=10, retry_after="1")
    with fake_client(server, retries=2) as c, pytest.raises(APIError):
        c.sample("vae", n=1, seed=1)
    assert len(server.requests) == 3 and waits == [1.0, 1.0]

    waits.clear()
    server = FakeServer(busy=10, retry_after="10")
    with fake_client(server, retries=5, max_retry_wait=25) as c, pytest.raises(APIError) as info:
        c.models()
    assert len(server.requests) == 3 and waits == [10.0, 10.0]  # a third wait would make 30 s > 25 s
    assert info.value.status_code == 503


def test_retry_after_as_an_http_date():
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 27 <= retry_after_s(later) <= 30
    assert retry_after_s(format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True)) == 0.0
    assert retry_after_s("3") == 3.0 and retry_after_s("-1") is None and retry_after_s(None) is None


async def test_the_async_client_retries_the_same_calls(waits):
    server = FakeServer(busy=1)
    async with AsyncClient("http://fake", transport=httpx.MockTransport(server)) as c:
        assert (await c.sample("vae", n=1, seed=5)).seed == 5
        assert waits == [2.0] and len(server.requests) == 2
        server.requests.clear()
        with pytest.raises(APIError):
            await c.sample("vae", n=1)
    assert len(server.requests) == 1 and waits == [2.0]


def test_retry_after_is_ascii_digits_or_a_date():
    for value in ("\u00b2", "\u0663", "1.5", "+3", ""):  # "²" and Arabic-Indic 3 pass str.isdigit(), not float()
        assert retry_after_s(value) is None, value
    assert retry_after_s(" 12 ") == 12.0


def test_a_retry_after_of_zero_still_waits_a_little(waits):
    server = FakeServer(busy=3, retry_after="0")
    with fake_client(server, retries=5) as c:
        assert c.sample("vae", n=1, seed=5).seed == 5
    assert len(server.requests) == 4 and waits == [MIN_RETRY_WAIT_S] * 3


def test_retries_are_capped(waits):
    server = FakeServer(busy=10**6, retry_after="0")
    with fake_client(server, retries=MAX_RETRIES, max_retry_wait=10**6) as c, pytest.raises(APIError):
        c.models()
    assert len(server.requests) == MAX_RETRIES + 1 and sum(waits) == pytest.approx(MAX_RETRIES * MIN_RETRY_WAIT_S)
    for kw in ({"retries": MAX_RETRIES + 1}, {"retries": -1}, {"max_retry_wait": float("inf")}, {"max_retry_wait": -1}):
        with pytest.raises(ValueError, match="retries must be|max_retry_wait must be"):
            Client("http://fake", **kw)
        with pytest.raises(ValueError, match="retries must be|max_retry_wait must be"):
            AsyncClient("http://fake", **kw)


def answering(status: int = 200, body=None, headers=None, content: bytes | None = None) -> httpx.MockTransport:
    if content is not None:
        return httpx.MockTransport(lambda r: httpx.Response(status, content=content, headers=headers))
    return httpx.MockTransport(lambda r: httpx.Response(status, json=body, headers=headers))


@pytest.mark.parametrize("call, body, headers, reason", [
    (lambda c: c.models(), {"a": 1}, None, "a list of models expected, got dict"),
    (lambda c: c.models(), [{"name": "vae"}], None, "ValidationError"),
    (lambda c: c.sample("vae", n=1), {"images": [_png_b64()]}, None, "X-Seed header None"),
    (lambda c: c.sample("vae", n=1, seed=3), {"images": [_png_b64()]}, {"X-Seed": "soon"}, "X-Seed header 'soon'"),
    (lambda c: c.sample("vae", n=1, seed=3), {"pictures": []}, {"X-Seed": "3"}, "KeyError: 'images'"),
    (lambda c: c.sample("vae", n=1, seed=3), {"images": "abc"}, {"X-Seed": "3"}, "'images' must be a list"),
    (lambda c: c.sample("vae", n=1, seed=3), {"images": ["bm90IGEgcG5n"]}, {"X-Seed": "3"}, "UnidentifiedImageError"),
    (lambda c: c.encode("vae", [np.zeros((8, 8), np.uint8)]), {"items": 5}, None, "1 encoded item expected, got 5"),
    (lambda c: c.encode("vae", [np.zeros((8, 8), np.uint8)]), {"items": [{}]}, None, "KeyError: 'file'"),
    (lambda c: c.decode("vae", z=[[0.0]]), None, None, "JSONDecodeError"),  # an empty body
])
def test_an_answer_that_is_not_the_apis_is_an_unexpected_response(call, body, headers, reason):
    with Client("http://fake", transport=answering(body=body, headers=headers)) as c, \
            pytest.raises(UnexpectedResponse) as info:
        call(c)
    assert reason in str(info.value) and str(info.value).startswith("unexpected answer to ")
    assert info.value.status_code == 200 and "\n" not in str(info.value)


async def test_the_async_client_raises_the_same_unexpected_response():
    async with AsyncClient("http://fake", transport=answering(body={"a": 1})) as c:
        with pytest.raises(UnexpectedResponse, match=r"GET /models \(HTTP 200\): .*got dict"):
            await c.models()


def test_a_sample_without_x_seed_keeps_the_seed_asked_for():
    with Client("http://fake", transport=answering(body={"images": [_png_b64()]})) as c:
        assert c.sample("vae", n=1, seed=42).seed == 42


def test_httpx_options_reach_the_http_client():
    seen = []
    with Client("http://fake", transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json=[])),
                headers={"X-Request-ID": "abc"}) as c:
        assert c.models() == []
    assert seen[0].headers["x-request-id"] == "abc" and seen[0].url == "http://fake/models"


# --- the command line ---------------------------------------------------------------------------


def test_cli_sample_writes_the_servers_grid(server_url, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--url", server_url, "sample", "--model", "vae", "-n", "5", "--seed", "3", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (5 images), seed 3"
    r = httpx.get(server_url + "/sample", params={"model": "vae", "n": 5, "seed": 3}, timeout=60)
    assert np.array_equal(png_array(out.read_bytes()), png_array(r.content))

    assert main(["--url", server_url, "sample", "--model", "vqvae", "-n", "2", "--seed", "3", "--prior", "gated",
                 "--label", "1", "--temperature", "0.5", "--out-dir", str(tmp_path / "each")]) == 0
    assert "prior gated" in capsys.readouterr().out
    files = sorted((tmp_path / "each").iterdir())
    assert [f.name for f in files] == ["sample_000.png", "sample_001.png"]
    expected = server_images(server_url, "/sample", model="vqvae", n=2, seed=3, prior="gated", label=1, temperature=0.5)
    assert all(np.array_equal(png_array(f.read_bytes()), e) for f, e in zip(files, expected))


def test_cli_label_takes_a_class_name_or_an_index(server_url, tmp_path, capsys):
    url = ["--url", server_url]
    for label in ("square", "1"):
        assert main([*url, "sample", "--model", "vqvae", "-n", "2", "--seed", "9", "--label", label,
                     "-o", str(tmp_path / f"{label}.png")]) == 0
    assert (tmp_path / "square.png").read_bytes() == (tmp_path / "1.png").read_bytes()
    capsys.readouterr()
    assert main([*url, "sample", "--model", "vqvae", "--label", "Ankle boot", "-o", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err.startswith(
        "genserve: error 422: label 'Ankle boot' is not a class of prior 'gated': use 0..2 or a class name: ['circle'")


def test_cli_reconstruct_encode_decode_interpolate(server_url, tmp_path, pngs, capsys):
    url = ["--url", server_url]
    recon = tmp_path / "recon.png"
    assert main([*url, "reconstruct", "--model", "vae", *map(str, pngs), "-o", str(recon)]) == 0
    assert Image.open(recon).size == grid_size(3, nrow=2)

    enc = tmp_path / "enc.json"
    assert main([*url, "encode", "--model", "vae", *map(str, pngs), "-o", str(enc)]) == 0
    body = json.loads(enc.read_text())
    assert body["model"] == "vae" and body["kind"] == "vae" and len(body["items"]) == 3
    assert len(body["items"][0]["mu"]) == LATENT_DIM
    dec = tmp_path / "dec.png"
    assert main([*url, "decode", str(enc), "-o", str(dec)]) == 0
    assert np.array_equal(png_array(dec.read_bytes()), png_array(recon.read_bytes()))  # decode(mu) = reconstruct

    request = tmp_path / "codes.json"
    request.write_text(json.dumps({"codes": [[[0, 1], [2, 3]]]}))
    assert main([*url, "decode", str(request), "--model", "vqvae", "-o", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (8, 8)

    strip = tmp_path / "strip.png"
    assert main([*url, "interpolate", "--model", "vae", str(pngs[0]), str(pngs[1]), "--steps", "4", "--method", "lerp",
                 "-o", str(strip)]) == 0
    assert Image.open(strip).size == grid_size(4, nrow=4)  # one row

    capsys.readouterr()
    assert main([*url, "encode", "--model", "vqvae", str(pngs[0])]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "vqvae" and np.asarray(printed["items"][0]["codes"]).shape == CODE_SHAPE


def test_cli_models(server_url, capsys):
    assert main(["--url", server_url, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["vae", "vae_rgb", "vqvae"]
    assert lines[0] == "vae\tvae\t1x8x8\tunit-test"
    assert lines[2] == "vqvae\tvqvae\t1x8x8\tunit-test\tpriors: gated (default), pixelcnn, pixelcnnpp"
    assert main(["--url", server_url, "models", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["vae", "vae_rgb", "vqvae"]


@pytest.mark.parametrize(
    "args, line",
    [
        (["sample", "--model", "nope", "-o", "x.png"],
         "genserve: error 404: unknown model 'nope'; loaded models: ['vae', 'vae_rgb', 'vqvae']"),
        (["sample", "--model", "vae", "-n", "0", "-o", "x.png"],
         "genserve: error 422: query.n: Input should be greater than or equal to 1"),
        (["decode", "missing.json", "-o", "x.png"], "genserve: error: cannot read missing.json:"),
        (["reconstruct", "--model", "vae", "missing.png", "-o", "x.png"], "genserve: error: no such file: missing.png"),
    ],
)
def test_cli_errors_print_one_line_and_exit_1(server_url, tmp_path, monkeypatch, capsys, args, line):
    monkeypatch.chdir(tmp_path)
    assert main(["--url", server_url, *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(line) and captured.err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def one_error_line(capsys, start: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(start), captured.err
    return captured.err


@pytest.mark.parametrize("body, key", [
    ({"model": "vae", "items": [{"file": "x"}]}, "codes"),  # no "kind": VQ-VAE codes
    ({"model": "vae", "kind": "vae", "items": 5}, "mu"),
    ({"model": "vae", "kind": "vae", "items": [{}]}, "mu"),
])
def test_cli_decode_of_a_malformed_items_file_is_one_line(tmp_path, capsys, body, key):
    path = tmp_path / "items.json"
    path.write_text(json.dumps(body))
    assert main(["--url", "http://127.0.0.1:9", "decode", str(path), "-o", str(tmp_path / "x.png")]) == 1
    one_error_line(capsys, f"genserve: error: {path}: \"items\" must be a list of objects with {key!r}")


@pytest.mark.parametrize("url, reason", [
    ("http://[::1", "Invalid port"),
    ("localhost:8000", "as http://HOST:PORT"),
    ("ftp://host/", "as http://HOST:PORT"),
])
def test_cli_bad_url_is_one_line(capsys, url, reason):
    assert main(["--url", url, "models"]) == 1
    assert reason in one_error_line(capsys, f"genserve: error: invalid --url {url!r}: ")


@pytest.fixture
def fake_cli(monkeypatch):
    """main() against a MockTransport answering with `answer` (a function of the request)."""
    real = client_module.Client

    def use(answer) -> None:
        fake = lambda *a, **k: real(*a, transport=httpx.MockTransport(answer), **k)  # noqa: E731
        monkeypatch.setattr(client_module, "Client", fake)
    return use


def test_cli_unexpected_answers_are_one_line(fake_cli, waits, tmp_path, capsys):
    out = ["-o", str(tmp_path / "x.png")]
    fake_cli(lambda r: httpx.Response(200, json={"images": [_png_b64()]}))  # no X-Seed: not the genserve API
    assert main(["sample", "--model", "vae", *out]) == 1
    one_error_line(capsys, "genserve: error: unexpected answer to GET /sample (HTTP 200): ValueError: X-Seed header")
    fake_cli(lambda r: httpx.Response(200, json={"a": 1}))
    assert main(["models"]) == 1
    one_error_line(capsys, "genserve: error: unexpected answer to GET /models (HTTP 200): ValueError: a list")
    fake_cli(lambda r: httpx.Response(200, json=[{"name": "vae"}]))  # pydantic's message spans lines
    assert main(["models"]) == 1
    one_error_line(capsys, "genserve: error: unexpected answer to GET /models (HTTP 200): ValidationError:")
    fake_cli(lambda r: httpx.Response(502, text="<html>\n<body>\nBad gateway\n" + "x" * 5000 + "</body></html>"))
    assert main(["models"]) == 1
    assert len(one_error_line(capsys, "genserve: error 502: <html> <body> Bad gateway")) < 1100
    superscript_two = {"Retry-After": "\u00b2".encode("latin-1")}  # not a number of seconds: not retried
    fake_cli(lambda r: httpx.Response(503, json={"detail": "busy"}, headers=superscript_two))
    assert main(["models"]) == 1
    one_error_line(capsys, "genserve: error 503: busy")
    assert main(["--retries", "100000", "models"]) == 1
    one_error_line(capsys, f"genserve: error: retries must be between 0 and {MAX_RETRIES}")
    assert waits == []


def test_cli_unreachable_server_exits_1(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--url", f"http://127.0.0.1:{port}", "models"]) == 1
    assert capsys.readouterr().err.startswith(f"genserve: error: cannot reach http://127.0.0.1:{port}")


def test_cli_help_explains_every_option(capsys):
    parser = cli_module._parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert sorted(subparsers) == ["decode", "encode", "interpolate", "models", "reconstruct", "sample", "score"]
    for p in (parser, *subparsers.values()):
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.dest} has no help"
    for name in subparsers:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seed", "--temperature", "--prior", "--label", "--out-dir", "--steps", "--method", "--include-z-e",
                   "--codec"):
        assert option in text


def test_python_m_app_client_end_to_end(server_url, tmp_path):
    env = {**os.environ, "GENSERVE_URL": server_url, "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "app.client", *args], cwd=REPO, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    helped = run("--help")
    assert helped.returncode == 0
    assert all(w in helped.stdout for w in ("--url", "GENSERVE_URL", "--timeout", "--retries", "sample", "interpolate"))
    out = tmp_path / "grid.png"
    done = run("sample", "--model", "vae", "-n", "4", "--seed", "1", "-o", str(out))  # the URL from GENSERVE_URL
    assert done.returncode == 0 and Image.open(out).size == grid_size(4, nrow=2)
    failed = run("sample", "--model", "nope", "-o", str(out))
    assert failed.returncode == 1 and failed.stderr.startswith("genserve: error 404: unknown model 'nope'")


def test_pyproject_declares_the_genserve_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["genserve"] == "app.cli:main"
    module, _, name = scripts["genserve"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is main
