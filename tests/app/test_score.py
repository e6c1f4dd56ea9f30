"""POST /score (issue 25): the likelihood of uploads, as the offline evaluation computes it."""

import asyncio
import math

import numpy as np
import pytest
import torch

from models.complexity import codec_bits_per_dim
from training.data import ImageData
from training.evaluate import nll_bound

from .conftest import image_bytes

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]


@pytest.fixture
def client(module_app):
    return module_app[1]


@pytest.fixture
def service(module_app):
    return module_app[0].state.service


def uploads(count: int, mode: str = "RGB", seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", image_bytes(mode=mode, seed=seed + i), "image/png")) for i in range(count)]


def pixels(blobs) -> torch.Tensor:
    """What the service scores: the uploads at the model's resolution, on the grid k / 255 (the test images are its size)."""
    from PIL import Image
    import io

    arrays = [np.asarray(Image.open(io.BytesIO(b[1][1]))) for b in blobs]
    x = torch.tensor(np.stack(arrays)).float() / 255
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x[:, None]


async def score(client, model: str, blobs, **params):
    return await client.post("/score", params={"model": model, **params}, files=blobs)


async def test_a_vae_scores_the_iwae_bound_the_model_card_computes(client, service):
    blobs = uploads(3)
    r = await score(client, "vae_rgb", blobs, k=6, seed=4, include_map="true", codec=["png", "webp"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "vae_rgb" and body["kind"] == "vae" and body["prior"] is None and "IWAE-6" in body["bound"]
    model, x = service.registry.entries["vae_rgb"].model, pixels(blobs)
    expected = -model.iwae_bound_from(x, model.draw_score_noise(3, 6, torch.Generator().manual_seed(4)))
    got = torch.tensor([item["nats"] for item in body["items"]], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-6)
    dims = x[0].numel()
    codecs = {c: codec_bits_per_dim(x, c) for c in ("png", "webp")}
    for i, item in enumerate(body["items"]):
        assert item["file"] == f"{i}.png"
        assert item["bits_per_dim"] == pytest.approx(item["nats"] / (dims * math.log(2)), rel=1e-12)
        for c in ("png", "webp"):
            assert item["codec_bits_per_dim"][c] == pytest.approx(codecs[c][i].item(), rel=1e-12)
            assert item["complexity_score"][c] == pytest.approx(item["bits_per_dim"] - codecs[c][i].item(), rel=1e-9)
        heat = torch.tensor(item["map"])
        assert heat.shape == (8, 8)
    with torch.no_grad():
        assert torch.allclose(torch.tensor([it["map"] for it in body["items"]]).float(), model.nll_map(x), rtol=1e-6)
    # the offline evaluation (one batch, the same seed, all k samples decoded together) agrees
    offline = nll_bound(model, ImageData("uploads", (x * 255).round().to(torch.uint8), torch.zeros(3, dtype=torch.long), 1),
                        k=6, batch_size=3, chunk=6, seed=4)
    assert offline["nll_nats"] == pytest.approx(got.mean().item(), rel=1e-6)


@pytest.mark.parametrize("prior, label", [(None, None), ("none", None), ("pixelcnn", None), ("gated", None), ("gated", "2"),
                                          ("pixelcnnpp", None)])
async def test_a_vqvae_scores_its_bound_under_each_prior_given_or_marginalising_the_label(client, service, prior, label):
    blobs = uploads(2, mode="L")
    params = {k: v for k, v in {"prior": prior, "label": label, "include_map": "true"}.items() if v is not None}
    r = await score(client, "vqvae", blobs, **params)
    assert r.status_code == 200, r.text
    body = r.json()
    entry = service.registry.entries["vqvae"]
    chosen = None if prior == "none" else (entry.priors[prior] if prior else entry.default_prior)
    assert body["prior"] == (chosen.api_name if chosen else None)
    x = pixels(blobs)
    labels = torch.full((2,), int(label) if label else -1)
    nats, heat = entry.model.nll_labelled(chosen.model if chosen else None, x, labels)
    got = torch.tensor([item["nats"] for item in body["items"]], dtype=torch.float64)
    assert torch.allclose(got, nats, rtol=1e-9)
    assert torch.allclose(torch.tensor([item["map"] for item in body["items"]], dtype=torch.float64), heat, rtol=1e-6)
    assert ("given label 2" in body["bound"]) == (label is not None)


async def test_scores_do_not_depend_on_what_else_is_scored(client):
    blobs = uploads(2)
    alone = (await score(client, "vae_rgb", blobs, k=5, seed=1)).content
    crowd = await asyncio.gather(*[score(client, "vae_rgb", uploads(3, seed=10 + j), k=3 + j, seed=j) for j in range(4)],
                                 score(client, "vae_rgb", blobs, k=5, seed=1))
    assert all(r.status_code == 200 for r in crowd)
    assert crowd[-1].content == alone
    q = (await score(client, "vqvae", uploads(2, mode="L"), prior="gated")).content
    crowd = await asyncio.gather(*[score(client, "vqvae", uploads(3, mode="L", seed=20 + j), prior="gated", label=str(j % 3))
                                   for j in range(4)], score(client, "vqvae", uploads(2, mode="L"), prior="gated"))
    assert crowd[-1].content == q


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def expected_heat(pixel_nats: torch.Tensor, channels: int) -> np.ndarray:
    """The heat map's bytes, computed here from the colour anchors: bits per subpixel on 0..8."""
    from app.imaging import HEAT_COLOURS

    t = (pixel_nats.double() / (channels * math.log(2)) / 8).clamp(0, 1) * 4  # (n, H, W)
    lo = t.floor().long().clamp(max=3)
    rgb = HEAT_COLOURS.double()[lo] * (1 - (t - lo))[..., None] + HEAT_COLOURS.double()[lo + 1] * (t - lo)[..., None]
    return torch.round(rgb.float().clamp(0, 1) * 255).to(torch.uint8).numpy()  # (n, H, W, 3)


async def test_map_true_gives_a_heat_map_png_per_image_on_a_fixed_scale(client, service):
    blobs = uploads(2, mode="L")
    r = await score(client, "vqvae", blobs, prior="gated", map="true", include_map="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "8 (pale yellow)" in body["map_scale"] and "sums to `nats`" in body["map_meaning"]
    values = torch.tensor([item["map"] for item in body["items"]], dtype=torch.float64)  # (2, 8, 8) nats per pixel
    import base64

    heat = np.stack([decode_png(base64.b64decode(item["map_png"])) for item in body["items"]])
    assert heat.shape == (2, 8, 8, 3)
    assert np.array_equal(heat, expected_heat(values, 1))
    # without map=true there is none, and the numbers alone come with include_map
    plain = (await score(client, "vqvae", blobs, prior="gated")).json()
    assert all("map_png" not in item and "map" not in item for item in plain["items"]) and "map_scale" not in plain


def test_the_heat_colours_run_from_black_to_pale_yellow_and_clip():
    from app.imaging import heat_map

    values = torch.tensor([[[-1.0, 0.0, 4.0, 8.0, 100.0, float("nan")]]])
    rgb = heat_map(values, 8.0)[0, :, 0].T  # (6, 3)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[5]) and rgb[0].sum() < 0.02  # below 0 and NaN: black
    assert torch.equal(rgb[3], rgb[4]) and rgb[3].min() > 0.6  # 8 and above: pale yellow
    assert (rgb[1:4].sum(1).diff() > 0).all()  # brighter as the cost rises
    with pytest.raises(ValueError, match="vmax"):
        heat_map(values, 0.0)


async def test_accept_image_png_answers_the_heat_maps_as_one_grid(client, service):
    blobs = uploads(3)
    values = torch.tensor([item["map"] for item in (await score(client, "vae_rgb", blobs, k=2, include_map="true")).json()["items"]])
    r = await client.post("/score", params={"model": "vae_rgb", "k": 2}, files=blobs, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["vary"] == "Accept"
    assert "posterior mean" in r.headers["x-genserve-map"]
    # only the maps are computed: no importance samples, so k is neither used nor bounded
    big = await client.post("/score", params={"model": "vae_rgb", "k": 5000}, files=blobs, headers={"Accept": "image/png"})
    assert big.status_code == 200 and big.content == r.content
    refused = await client.post("/score", params={"model": "vae_rgb", "background": "vae_rgb"}, files=blobs,
                                headers={"Accept": "image/png"})
    assert refused.status_code == 422 and "drop 'background'" in refused.json()["detail"]
    grid = decode_png(r.content)
    assert grid.shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 2 per row, 2 pixels of padding
    heat = expected_heat(values, 3)
    for i in range(3):
        top, left = 2 + (i // 2) * 10, 2 + (i % 2) * 10
        assert np.array_equal(grid[top:top + 8, left:left + 8], heat[i])
    # */* (curl's default) and no Accept header keep the JSON answer
    for accept in ("*/*", "application/json, image/png", None):
        r = await client.post("/score", params={"model": "vae_rgb", "k": 2}, files=blobs,
                              headers={"Accept": accept} if accept else {})
        assert r.headers["content-type"] == "application/json" and r.headers["vary"] == "Accept", accept


async def test_a_background_model_gives_the_likelihood_ratio(client, service):
    blobs = uploads(2, mode="L")
    r = await score(client, "vqvae", blobs, prior="pixelcnnpp", background="vqvae")
    assert r.status_code == 200, r.text
    body = r.json()
    entry = service.registry.entries["vqvae"]
    x = pixels(blobs)
    dims = x[0].numel() * math.log(2)
    nats, _ = entry.model.nll_labelled(entry.priors["pixelcnnpp"].model, x, torch.full((2,), -1))
    back, _ = entry.model.nll_labelled(entry.default_prior.model, x, torch.full((2,), -1))  # the default prior: gated
    assert entry.default_prior.api_name == "gated" and body["background"] == "vqvae"
    assert "under prior pixelcnnpp" in body["bound"] and "under prior gated" in body["background_bound"]
    for i, item in enumerate(body["items"]):
        assert item["bits_per_dim"] == pytest.approx(nats[i].item() / dims, rel=1e-9)
        assert item["background_bits_per_dim"] == pytest.approx(back[i].item() / dims, rel=1e-9)
        assert item["ratio_score"] == pytest.approx((nats[i] - back[i]).item() / dims, rel=1e-9, abs=1e-12)
    assert any(abs(item["ratio_score"]) > 1e-3 for item in body["items"])
    # a VAE against itself, with the same k and seed: a ratio of exactly 1
    same = (await score(client, "vae_rgb", uploads(2), k=3, seed=2, background="vae_rgb")).json()
    assert all(item["ratio_score"] == 0.0 for item in same["items"])
    assert "ratio_score" not in (await score(client, "vae_rgb", uploads(2), k=3)).json()["items"][0]


@pytest.mark.parametrize("model, params, status, detail", [
    ("vae", {}, 422, "not a probability of 8-bit images"),
    ("nope", {}, 404, "unknown model"),
    ("vae_rgb", {"k": 0}, 422, ""),
    ("vae_rgb", {"k": 1001}, 422, "GENSERVE_MAX_SCORE_SAMPLES"),
    ("vae_rgb", {"k": 1000}, 422, "GENSERVE_MAX_SCORE_ROWS"),
    ("vae_rgb", {"prior": "gated"}, 422, "VQ-VAE priors only"),
    ("vae_rgb", {"seed": -1}, 422, ""),
    ("vae_rgb", {"codec": "jpeg"}, 422, ""),
    ("vqvae", {"prior": "nope"}, 404, "not available"),
    ("vqvae", {"prior": "pixelcnn", "label": "1"}, 422, "class-conditional"),
    ("vqvae", {"prior": "none", "label": "1"}, 422, "class-conditional"),
    ("vqvae", {"prior": "gated", "label": "7"}, 422, "out of range"),
    ("vae_rgb", {"background": "nope"}, 404, "background: unknown model"),
    ("vae_rgb", {"background": "vae"}, 422, "background: model 'vae' cannot score"),
    ("vae_rgb", {"background": "vqvae"}, 422, "same image shape"),
    ("vqvae", {"background": "vae_rgb"}, 422, "same image shape"),
    ("vae_rgb", {"k": 500, "background": "vae_rgb"}, 422, "under two VAEs"),
    ("vqvae", {"k": 1001}, 200, ""),
])
async def test_every_bad_request_is_a_clear_4xx(client, model, params, status, detail):
    r = await score(client, model, uploads(5, mode="L"), **params)
    assert r.status_code == status, r.text
    if status != 200:  # a VQ-VAE takes no importance samples: k is not bounded for it
        assert detail in r.json()["detail"] if isinstance(r.json()["detail"], str) else True


async def test_a_request_without_files_is_refused(client):
    r = await client.post("/score", params={"model": "vae_rgb"}, files=[("other", ("a.png", b"x", "image/png"))])
    assert 400 <= r.status_code < 500


async def test_scores_are_computed_in_full_precision_whatever_the_autocast(serve):
    """GENSERVE_PRECISION=bf16 autocasts every pass on CUDA, but a likelihood in bf16 would move its
    bits/dim: the score batchers never autocast."""
    async with serve(checked=False, precision="bf16") as (app, _client):
        batchers = app.state.service.batchers
        scores = {key: b for key, b in batchers.items() if key.op in ("score", "score_map")}
        assert {key.model for key in scores} == {"vae_rgb", "vqvae"}
        assert all(b.autocast_dtype is None for b in scores.values())
        assert all(b.autocast_dtype == torch.bfloat16 for key, b in batchers.items() if key not in scores)
