"""One malformed weight file never stops the service nor breaks GET /models: it is refused at load, by name."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

import app.registry
from app.registry import Registry
from models.io import FORMAT_VERSION, config_to_json, load_model, state_tensors, tensors_digest
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from models.vae import VAE, VAEConfig

from .conftest import CODE_SHAPE, CODEBOOK_SIZE, write_weights

PRIOR = dict(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8, n_layers=1, first_kernel_size=3)


def write_crafted(path, model, image_shape, **metadata) -> None:
    """A weight file as save_model writes it, with a correct digest, but `metadata` values as given."""
    tensors = state_tensors(model)
    meta = {"format_version": FORMAT_VERSION, "kind": model.KIND, "name": path.stem, "config": config_to_json(model.config),
            "image_shape": str(list(image_shape)), "dataset": "unit-test", "command": "pytest", "metrics": "{}",
            "extra": "{}", "class_names": "[]", "sha256": tensors_digest(tensors)}
    save_file(tensors, str(path), metadata={**meta, **metadata})


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("good"))


def good_weights(good_files, d, names=("vae", "vqvae", "pixelcnn")):
    for name in names:
        shutil.copy(good_files / f"{name}.safetensors", d / f"{name}.safetensors")
    return d


async def test_malformed_metadata_is_refused_at_load_and_the_rest_is_served(good_files, tmp_path, serve):
    good_weights(good_files, tmp_path)
    vq, _ = load_model(tmp_path / "vqvae.safetensors")
    extra = f'{{"codebook_sha256": "{vq.codebook_digest()}", "vqvae": "vqvae"}}'
    write_crafted(tmp_path / "bad_extra.safetensors", PixelCNN(PixelCNNConfig(**PRIOR)), vq.image_shape, extra="[]")
    write_crafted(tmp_path / "bad_metrics.safetensors", VAE(VAEConfig(image_size=8, latent_dim=4, hidden_dims=(16,))),
                  (1, 8, 8), metrics="[1.5, 2.5]")
    # valid JSON of the right types, but a prior's test_bits_per_dim must be a number (app.schemas.PriorInfo)
    write_crafted(tmp_path / "bad_description.safetensors", GatedPixelCNN(GatedPixelCNNConfig(**PRIOR)), vq.image_shape,
                  extra=extra, metrics='{"test_bits_per_code": 2.0, "test_bits_per_dim": "low"}')
    async with serve(weights_dir=tmp_path) as (_app, client):
        ready = await client.get("/ready")
        models = await client.get("/models")
        problems = (await client.get("/models/problems")).json()
    assert ready.status_code == 200 and models.status_code == 200
    served = {m["name"]: m for m in models.json()}
    assert sorted(served) == ["vae", "vqvae"]
    assert [p["name"] for p in served["vqvae"]["priors"]] == ["pixelcnn"]
    reasons = {p["file"]: p["reason"] for p in problems}
    assert sorted(reasons) == ["bad_description.safetensors", "bad_extra.safetensors", "bad_metrics.safetensors"]
    assert "bad_extra.safetensors: metadata key 'extra' must be a JSON object, got []" in reasons["bad_extra.safetensors"]
    assert "metadata key 'metrics' must be a JSON object, got [1.5, 2.5]" in reasons["bad_metrics.safetensors"]
    assert reasons["bad_description.safetensors"].startswith("its GET /models description is invalid: test_bits_per_dim")
    assert "'low'" in reasons["bad_description.safetensors"]
    # the refused prior named its VQ-VAE, so it is listed there too
    assert [r["file"] for r in served["vqvae"]["rejected_priors"]] == ["bad_description.safetensors"]


def test_an_error_while_pairing_a_prior_rejects_that_prior_only(good_files, tmp_path, monkeypatch, caplog):
    """Whatever a step of pairing raises (here a stand-in bug) becomes a Problem of that file."""
    good_weights(good_files, tmp_path, names=("vae", "vqvae", "pixelcnn", "gated"))

    def broken(info, num_classes, vq_info):
        if info.name == "gated":
            raise AttributeError("'list' object has no attribute 'get'")
        return info.class_names, None

    monkeypatch.setattr(app.registry, "_prior_class_names", broken)
    registry = Registry.load(tmp_path, torch.device("cpu"))
    assert sorted(registry.entries) == ["vae", "vqvae"] and list(registry.entries["vqvae"].priors) == ["pixelcnn"]
    [problem] = registry.problems
    assert problem.file == "gated.safetensors"
    assert problem.reason == "cannot be used: AttributeError: 'list' object has no attribute 'get'"
    assert "unexpected error on weight file" in caplog.text  # with its traceback, for whoever fixes the bug
    assert len(registry.describe()) == 2


async def test_a_model_whose_warm_up_fails_is_dropped_and_the_rest_is_served(good_files, tmp_path, serve):
    # Loads (a valid config) but cannot run: the autoregressive decoder's reconstruct_seed overflows a
    # torch seed, so its start-up pass raises. Before, that stopped the whole start-up.
    good_weights(good_files, tmp_path, names=("vae",))
    bad = VAE(VAEConfig(arch="conv", image_size=8, latent_dim=4, channels=(4, 8), fc_dim=16, decoder="autoregressive",
                        ar_channels=4, ar_kernel=3, ar_layers=1, likelihood="logistic", num_mixtures=2,
                        reconstruct_seed=2**70))
    write_crafted(tmp_path / "bad_seed.safetensors", bad, (1, 8, 8))
    async with serve(weights_dir=tmp_path) as (app, client):
        ready = await client.get("/ready")
        served = [m["name"] for m in (await client.get("/models")).json()]
        problems = (await client.get("/models/problems")).json()
        sample = await client.get("/sample", params={"model": "bad_seed", "n": 1})
        batchers = {key.model for key in app.state.service.batchers}
    assert ready.status_code == 200 and served == ["vae"] and batchers == {"vae"}
    assert [p["file"] for p in problems] == ["bad_seed.safetensors"] and "warming it up failed" in problems[0]["reason"]
    assert sample.status_code == 404
