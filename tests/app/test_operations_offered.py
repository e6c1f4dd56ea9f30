"""What each model offers (GET /models' `operations`), and how a route refuses what it does not.

Beside the test models: "vae_context", a tiny conv VAE with an autoregressive decoder trained with
use_latent=False (as the shipped weights/vae_context.safetensors: its decoder ignores z, so it only
samples), and "vqvae_bare", a VQ-VAE no prior names (it does everything but sample).
"""

import shutil
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from app.registry import OPERATIONS, Registry
from models.io import save_model
from models.vae import VAE, VAEConfig

from .conftest import LATENT_DIM, image_bytes, png_array, started, tiny_vqvae

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]

ALL = ["reconstruct", "encode", "decode", "interpolate", "sample", "score"]
NO_SCORE = ALL[:-1]  # a model whose likelihood is not a probability of 8-bit images (Bernoulli) cannot score
NO_LATENT = ("it has no latent (its decoder ignores z: it was trained with use_latent=False, as a context-only "
             "baseline); it offers: sample, score")


def context_vae() -> VAE:
    return VAE(VAEConfig(arch="conv", in_channels=1, image_size=8, latent_dim=LATENT_DIM, channels=(4, 8), fc_dim=16,
                         decoder="autoregressive", ar_channels=4, ar_kernel=3, ar_layers=1, likelihood="logistic",
                         num_mixtures=2, use_latent=False))


@pytest.fixture(scope="module")
def offered_weights(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("offered")
    for f in weights_dir.glob("*.safetensors"):
        shutil.copy(f, d)
    torch.manual_seed(0)
    save_model(d / "vae_context.safetensors", context_vae(), name="vae_context", dataset="unit-test", command="pytest")
    save_model(d / "vqvae_bare.safetensors", tiny_vqvae(), name="vqvae_bare", dataset="unit-test", command="pytest")
    return d


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(offered_weights: Path):
    async with started(offered_weights) as (_app, client):
        yield client


def test_a_model_says_whether_it_has_a_latent():
    assert VAE(VAEConfig(image_size=8, latent_dim=2, hidden_dims=(4,))).has_latent
    assert not context_vae().has_latent
    assert tiny_vqvae().has_latent


async def test_models_lists_each_models_operations(client):
    models = {m["name"]: m["operations"] for m in (await client.get("/models")).json()}
    assert models == {
        "vae": NO_SCORE, "vae_rgb": ALL, "vqvae": ALL,  # a factorized Bernoulli VAE, an autoregressive one, a VQ-VAE with priors
        "vae_context": ["sample", "score"],
        "vqvae_bare": ["reconstruct", "encode", "decode", "interpolate", "score"],
    }
    assert list(OPERATIONS) == ALL
    shapes = {m["name"]: m["latent_shape"] for m in (await client.get("/models")).json()}
    assert shapes["vae_context"] is None and shapes["vae"] == [4]  # no latent to speak of: null


async def test_the_schema_names_the_operations_the_page_reads(client):
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["ModelEntry"]
    assert "operations" in schema["required"]
    assert schema["properties"]["operations"]["items"]["enum"] == ALL


async def test_batchers_are_built_only_for_what_a_model_offers(client):
    config = (await client.get("/config")).json()
    by_model: dict[str, set[str]] = {}
    for key in config["pass_sizes"]:
        model, op = key.split(":", 1)
        by_model.setdefault(model, set()).add(op)
    assert by_model["vae_context"] == {"sample", "score", "score_map"}
    assert by_model["vqvae_bare"] == {"reconstruct", "encode", "decode", "decode_nearest", "score"}
    assert by_model["vae"] == {"reconstruct", "encode", "decode", "sample"}
    assert set(config["pass_size_sources"]) == set(config["pass_sizes"])  # and no check ran for another


async def test_a_model_without_a_latent_refuses_every_latent_route_with_422(client):
    image = image_bytes()
    answers = {
        "reconstruct": await client.post("/reconstruct", params={"model": "vae_context"}, files=[("file", ("a.png", image))]),
        "encode": await client.post("/encode", params={"model": "vae_context"}, files=[("file", ("a.png", image))]),
        "interpolate": await client.post("/interpolate", params={"model": "vae_context"},
                                         files=[("a", ("a.png", image)), ("b", ("b.png", image_bytes(seed=1)))]),
        "decode": await client.post("/decode", json={"model": "vae_context", "z": [[0.0] * LATENT_DIM]}),
    }
    for op, r in answers.items():
        assert r.status_code == 422, (op, r.text)
        assert r.json() == {"detail": f"model 'vae_context' cannot {op}: {NO_LATENT}"}


async def test_the_refusal_comes_before_the_upload_is_read(client):
    """A model that can never encode is refused whatever was uploaded (here, not an image)."""
    r = await client.post("/encode", params={"model": "vae_context", "include_z_e": "true"},
                          files=[("file", ("a.png", b"not an image"))])
    assert r.status_code == 422 and r.json()["detail"].startswith("model 'vae_context' cannot encode: it has no latent")


async def test_a_model_without_a_latent_samples(client):
    params = {"model": "vae_context", "n": 4, "seed": 3}
    first, again = await client.get("/sample", params=params), await client.get("/sample", params=params)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == again.content and png_array(first.content).shape == (22, 22)  # a 2x2 grid of 8x8


async def test_a_vqvae_without_a_prior_refuses_sample_with_404_and_does_the_rest(client):
    r = await client.get("/sample", params={"model": "vqvae_bare"})
    assert r.status_code == 404
    assert r.json()["detail"] == (
        "model 'vqvae_bare' cannot sample: no prior is loaded for it (a prior's weight file names its VQ-VAE; "
        "see GET /models/problems); it offers: reconstruct, encode, decode, interpolate, score"
    )
    r = await client.post("/interpolate", params={"model": "vqvae_bare", "steps": 3},
                          files=[("a", ("a.png", image_bytes())), ("b", ("b.png", image_bytes(seed=1)))])
    assert r.status_code == 200 and png_array(r.content).shape == (12, 32)
    r = await client.post("/decode", json={"model": "vqvae_bare", "codes": [[[0, 1], [2, 3]]]})
    assert r.status_code == 200


async def test_models_with_a_latent_still_answer_every_route(client):
    image = image_bytes()
    assert (await client.post("/reconstruct", params={"model": "vae"}, files=[("file", ("a.png", image))])).status_code == 200
    assert (await client.post("/encode", params={"model": "vae_rgb"}, files=[("file", ("a.png", image))])).status_code == 200
    assert (await client.post("/decode", json={"model": "vae", "z": [[0.0] * LATENT_DIM]})).status_code == 200
    assert (await client.get("/sample", params={"model": "vqvae", "n": 1, "seed": 0})).status_code == 200


def test_the_shipped_context_only_vae_only_samples(tmp_path: Path):
    shipped = Path(__file__).resolve().parents[2] / "weights" / "vae_context.safetensors"
    if not shipped.is_file():
        pytest.skip("weights/vae_context.safetensors is not in this checkout")
    (tmp_path / shipped.name).symlink_to(shipped)
    [entry] = Registry.load(tmp_path, torch.device("cpu")).entries.values()
    assert entry.operations == ["sample", "score"] and entry.lacks("decode") == "latent" and entry.lacks("sample") is None
