"""GET /sample: grids, seeds, priors, labels, and every invalid parameter."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from .conftest import cell, grid_size, image_bytes, png_array

# One app for the module's questions (tests that need other settings start their own with `serve`): the
# async tests run in the module's event loop, that of `module_app` (the mark's warning on sync tests is moot)
pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]


@pytest.fixture
def client(module_app):
    return module_app[1]


async def sample(client, **params):
    return await client.get("/sample", params=params)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
async def test_vae_sample_is_one_grid_of_n(client, n):
    r = await sample(client, model="vae", n=n, seed=3)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "L" and img.size == grid_size(n, nrow=int(np.ceil(np.sqrt(n))))


async def test_rgb_vae_gives_rgb(client):
    r = await sample(client, model="vae_rgb", n=4, seed=0)
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.size == (22, 22)


async def test_same_seed_same_bytes_other_seed_other_bytes(client):
    first = (await sample(client, model="vae", n=4, seed=7)).content
    assert (await sample(client, model="vae", n=4, seed=7)).content == first
    assert (await sample(client, model="vae", n=4, seed=8)).content != first
    assert (await sample(client, model="vae", n=4, seed=7, temperature=0.5)).content != first
    for prior in ("pixelcnn", "gated", "pixelcnnpp"):
        a = await sample(client, model="vqvae", n=6, seed=1, prior=prior)
        b = await sample(client, model="vqvae", n=6, seed=1, prior=prior)
        assert a.status_code == 200 and a.content == b.content and a.headers["x-prior"] == prior


async def test_without_a_seed_the_echoed_seed_reproduces_the_answer(client):
    r = await sample(client, model="vae", n=4)
    seed = int(r.headers["x-seed"])
    assert (await sample(client, model="vae", n=4, seed=seed)).content == r.content


async def test_vqvae_uses_the_best_prior_by_default(client):
    r = await sample(client, model="vqvae", n=4, seed=2)
    assert r.status_code == 200 and r.headers["x-prior"] == "gated"
    assert r.content == (await sample(client, model="vqvae", n=4, seed=2, prior="gated")).content


async def test_labels_condition_the_gated_prior(client):
    for label in range(3):
        r = await sample(client, model="vqvae", n=4, seed=2, prior="gated", label=label)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (22, 22)


async def test_a_label_is_its_index_or_its_class_name_in_any_case(client):
    def params(label):
        return dict(model="vqvae", n=4, seed=2, prior="gated", label=label)

    by_index = await sample(client, **params(2))
    for name in ("T-shirt/top", "t-shirt/TOP", " T-shirt/top ", "+2"):
        r = await sample(client, **params(name))
        assert r.status_code == 200 and r.content == by_index.content, name
    assert (await sample(client, **params("circle"))).content == (await sample(client, **params(0))).content
    assert (await sample(client, **params(0))).content != by_index.content  # the label reaches the prior


async def test_accept_json_gives_one_base64_png_per_image(client):
    r = await client.get("/sample", params={"model": "vae", "n": 3, "seed": 5}, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    images = r.json()["images"]
    assert len(images) == 3
    arrays = [png_array(base64.b64decode(s)) for s in images]
    assert all(a.shape == (8, 8) for a in arrays)
    grid = png_array((await sample(client, model="vae", n=3, seed=5)).content)
    assert np.array_equal(grid[2:10, 12:20], arrays[1])
    png = await client.get("/sample", params={"model": "vae", "n": 3, "seed": 5},
                           headers={"Accept": "image/png, application/json;q=0.5"})
    assert png.headers["content-type"] == "image/png"


@pytest.mark.parametrize("accept, media", [
    (None, "image/png"), ("*/*", "image/png"), ("image/*", "image/png"), ("application/json", "application/json"),
    ("application/*", "application/json"),  # a tie between JSON and the tensor goes to JSON
    ("application/x-safetensors", "application/x-safetensors"),
    ("application/x-safetensors, application/json;q=0.5", "application/x-safetensors"),
    ("application/x-safetensors;q=0.2, image/png;q=0.4", "image/png"),
    ("application/x-safetensors;q=0, application/json;q=0", "image/png"),  # nothing acceptable: the PNG
    ("text/html", "image/png"),
])
async def test_accept_picks_png_json_or_the_tensor(client, accept, media):
    """The answer's media type by q-value, then specificity; a tensor answer holds the float32 images
    whose 8-bit rounding is the PNG's pixels."""
    from safetensors.numpy import load

    params = {"model": "vae_rgb", "n": 2, "seed": 4}
    r = await client.get("/sample", params=params, headers={"Accept": accept} if accept else {})
    assert r.status_code == 200 and r.headers["content-type"] == media
    if media == "application/x-safetensors":
        images = load(r.content)["images"]
        assert images.dtype == np.float32 and images.shape == (2, 3, 8, 8)
        png = png_array((await sample(client, **params)).content)
        assert np.array_equal(png[2:10, 2:10], np.round(images[0].transpose(1, 2, 0) * 255))


@pytest.mark.parametrize(
    "params, detail",
    [
        ({"model": "vae", "n": 0}, "greater than or equal to 1"),
        ({"model": "vae", "n": 257}, "n must be between 1 and 256, got 257"),
        ({"model": "vae", "temperature": 0}, "greater than or equal to 0.001"),
        ({"model": "vae", "temperature": -1}, "greater than or equal to 0.001"),
        ({"model": "vqvae", "temperature": 1e-50}, "greater than or equal to 0.001"),  # 0 in float32
        ({"model": "vqvae", "temperature": 9e-4}, "greater than or equal to 0.001"),
        ({"model": "vae", "temperature": 11}, "less than or equal to 10"),
        ({"model": "vae", "temperature": "nan"}, "temperature"),
        ({"model": "vae", "seed": -1}, "greater than or equal to 0"),
        ({"model": "vae", "n": "many"}, "valid integer"),
        ({"model": "vae", "prior": "gated"}, "is a VAE"),
        ({"model": "vqvae", "prior": "gated", "label": 3}, "label 3 is out of range for prior 'gated': use 0..2"),
        ({"model": "vqvae", "prior": "gated", "label": -1}, "label -1 is out of range for prior 'gated': use 0..2"),
        ({"model": "vqvae", "prior": "gated", "label": "dog"},
         "label 'dog' is not a class of prior 'gated': use 0..2 or a class name: ['circle', 'square', 'T-shirt/top']"),
        ({"model": "vqvae", "prior": "gated", "label": "x" * 101}, "at most 100 characters"),
        ({"model": "vqvae", "prior": "pixelcnn", "label": 0}, "prior 'pixelcnn' is unconditional: omit 'label'"),
    ],
)
async def test_invalid_parameters_are_422(client, params, detail):
    r = await sample(client, **params)
    assert r.status_code == 422
    assert detail in str(r.json()["detail"])


async def test_missing_model_parameter_is_422(client):
    assert (await client.get("/sample")).status_code == 422


async def test_unknown_prior_is_404(client):
    r = await sample(client, model="vqvae", prior="transformer")
    assert r.status_code == 404
    assert r.json()["detail"] == "prior 'transformer' is not available for 'vqvae'; available: ['gated', 'pixelcnn', 'pixelcnnpp']"


async def test_an_autoregressive_vae_serves_samples_of_its_model_by_the_documented_recipe(client, weights_dir):
    """/sample of an AR VAE: z = randn(n, D) * T, then uniforms = rand(n, U, H, W) from the same
    generator, every pixel drawn at temperature T. The answer equals the model's own generate(),
    its pixels are 8-bit levels, and batch-mates (other requests at once) do not change it."""
    import asyncio

    import torch

    from models.io import load_model

    model, _ = load_model(weights_dir / "vae_rgb.safetensors")
    for seed, temperature in ((4, 1.0), (5, 0.6)):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(3, model.config.latent_dim, generator=g) * temperature
        uniforms = torch.rand(model.uniform_shape(3), generator=g)
        with torch.no_grad():
            expected = model.generate(z, uniforms=uniforms, temperature=torch.full((3,), temperature))
        expected = (expected * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
        answers = await asyncio.gather(*[sample(client, model="vae_rgb", n=3, seed=seed, temperature=temperature)
                                         for _ in range(3)], sample(client, model="vae_rgb", n=5, seed=99))
        assert len({r.content for r in answers[:3]}) == 1
        grid = png_array(answers[0].content)
        for i in range(3):
            np.testing.assert_array_equal(cell(grid, i, nrow=2), expected[i])


async def test_an_autoregressive_vae_reconstructs_with_its_fixed_seed(client, weights_dir):
    import torch

    from models.io import load_model

    model, _ = load_model(weights_dir / "vae_rgb.safetensors")
    data = image_bytes(mode="RGB", seed=3)
    first = await client.post("/reconstruct", params={"model": "vae_rgb"}, files=[("file", ("a.png", data))])
    again = await client.post("/reconstruct", params={"model": "vae_rgb"}, files=[("file", ("a.png", data))])
    assert first.status_code == 200 and first.content == again.content
    x = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (model.reconstruct(x) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(png_array(first.content), expected)


@pytest.mark.parametrize("names, label, expected", [
    (("Cat", "cat", "dog"), "cat", 1),        # the exact name wins over a case-insensitive one
    (("Cat", "cat", "dog"), "Cat", 0),
    (("Cat", "cat", "dog"), "CAT", "matches classes [0, 1] of prior 'p' when case is ignored"),
    (("Cat", "cat", "dog"), " DOG ", 2),      # unique when case is ignored; spaces ignored
    ((" cat", "dog", "bird"), "cat", 0),      # a name's own surrounding spaces too
    (("1", "10", "11", "2"), "10", "label 10 is out of range"),  # an integer is always an index, never a name
    (("1", "10", "11", "2"), "1", 1),
    (("a", "b", "c", "d"), "-0", 0),
    (("a", "b", "c", "d"), "", "label '' is not a class of prior 'p': use 0..3 or a class name: ['a', 'b', 'c', 'd']"),
    (("a", "b", "c", "d"), "٣", "label '٣' is not a class"),  # Arabic-Indic three is not an index
    ((), "cat", "label 'cat' is not a class of prior 'p': use 0..3 (its file names no classes)"),
])
def test_resolve_label_rules(names, label, expected):
    from types import SimpleNamespace

    from fastapi import HTTPException

    from app.routes.generate import resolve_label

    prior = SimpleNamespace(api_name="p", num_classes=4, class_names=names)
    if isinstance(expected, int):
        assert resolve_label(prior, label) == expected
    else:
        with pytest.raises(HTTPException) as err:
            resolve_label(prior, label)
        assert err.value.status_code == 422 and expected in err.value.detail
