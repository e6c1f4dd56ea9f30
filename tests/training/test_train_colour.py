"""The colour pipeline of issue 11 end to end on a tiny RGB folder in CIFAR-10's layout, made here:
a logistic VQ-VAE (with the auxiliary mean MSE), a class-conditional prior over its codes and a
colour conv VAE train, record the folder's class names, beat 8 bits/dim, and land in the card
with the JPEG note that image-folder likelihoods carry."""

import math

import pytest
from PIL import Image

from models.io import load_model
from training.__main__ import main

from .test_data_split_folder import make_folder, private_cache  # noqa: F401  (the autouse cache fixture)

TINY = ["--quiet", "--threads", "1", "--batch-size", "8", "--val-size", "6", "--lr", "3e-3"]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "tiny-cifar"
    make_folder(root, counts={"train": dict.fromkeys(("dog", "bird", "cat"), 10), "test": dict.fromkeys(("dog", "bird", "cat"), 3)})
    return root


def test_colour_models_train_from_a_folder_and_reach_the_card(folder, tmp_path):
    weights = tmp_path / "weights"
    vq = weights / "vq.safetensors"
    assert main(["vqvae", "--data", str(folder), "--epochs", "8", "--hidden-channels", "8", "--res-channels", "4",
                 "--n-res-blocks", "1", "--codebook-size", "8", "--embedding-dim", "4", "--mean-mse-weight", "5",
                 "--name", "vq", "--out", str(vq), "--run-dir", str(tmp_path / "run-vq"), *TINY]) == 0
    assert main(["prior", "--vqvae", str(vq), "--data", str(folder), "--arch", "gated", "--epochs", "1",
                 "--hidden-channels", "8", "--n-layers", "2", "--name", "vq_gated",
                 "--out", str(weights / "vq_gated.safetensors"), "--run-dir", str(tmp_path / "run-gated"), *TINY]) == 0
    assert main(["vae", "--data", str(folder), "--arch", "conv", "--conv-channels", "4", "8", "--fc-dim", "16",
                 "--latent-dim", "4", "--mean-mse-weight", "5", "--epochs", "8", "--iwae-k", "4", "--name", "vae_rgb",
                 "--out", str(weights / "vae_rgb.safetensors"), "--run-dir", str(tmp_path / "run-vae"), *TINY]) == 0
    classes = ("bird", "cat", "dog")  # sorted folder names
    for name in ("vq", "vq_gated", "vae_rgb"):
        model, info = load_model(weights / f"{name}.safetensors")
        assert info.dataset == "tiny-cifar" and info.class_names == classes
        bits = info.metrics["test_uniform_prior_bits_per_dim" if name == "vq" else "test_bits_per_dim"]
        assert info.image_shape == (3, 8, 8) and 0 < bits < 8.0  # better than uniform over the 256 levels
    vq_model, vq_info = load_model(vq)
    assert vq_model.config.mean_mse_weight == 5.0 and vq_model.code_shape == (2, 2)
    assert math.isclose(vq_info.metrics["test_psnr_db"], 10 * math.log10(1 / vq_info.metrics["test_mse"]))
    with Image.open(tmp_path / "run-vq" / "reconstructions.gif") as gif:
        assert gif.n_frames == 8 and gif.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))

    assert main(["card", "--weights", str(weights)]) == 0
    card = (weights / "README.md").read_text()
    table = card.split("every model in one table")[1].split("###")[0]
    assert table.count("| tiny-cifar (*) |") == 4  # VQ-VAE (uniform), prior (given, marginal), VAE
    assert "(*) an image folder: bits/dim of those image files as stored. The shipped CIFAR-10 files" in table
    assert "samples (rows: bird, cat, dog)" in card
    with Image.open(weights / "samples" / "vq_gated.png") as grid:
        assert grid.mode == "RGB" and grid.size == (8 * 10 + 2, 3 * 10 + 2)
