"""Colour models behind the service (issue 11), with small RGB weights made here, shaped as the
shipped CIFAR-10 files are: a 3x8x8 VQ-VAE with a discretized logistic likelihood whose code grid
is 2x2, a class-conditional Gated PixelCNN over its codes, and a factorized colour conv VAE. Every
file records the data set's name and its class names, as `python -m training` writes them."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models.io import save_model
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE, VQVAEConfig

from .conftest import cell, grid_size, live_server, png_array

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASET = "cifar10 (image folder)"
K = 16


@pytest.fixture(scope="module")
def colour_weights(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("colour_weights")
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(in_channels=3, image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1,
                           codebook_size=K, embedding_dim=4, init="uniform", likelihood="logistic", num_mixtures=2)).eval()
    with torch.no_grad():  # spread the codebook so different images get different codes
        vq.quantizer.embedding.copy_(torch.randn(K, 4) * 0.3)
    save_model(d / "vq_rgb.safetensors", vq, name="vq_rgb", dataset=DATASET, command="pytest", class_names=CLASSES,
               metrics={"test_psnr_db": 22.5, "test_uniform_prior_bits_per_dim": 5.0})
    gated = GatedPixelCNN(GatedPixelCNNConfig(codebook_size=K, code_shape=(2, 2), hidden_channels=8, n_layers=2,
                                              first_kernel_size=3, num_classes=len(CLASSES))).eval()
    with torch.no_grad():  # strong label biases, so that the label visibly moves the inverse-CDF draws
        for module in gated.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.mul_(20)
    save_model(d / "vq_rgb_gated.safetensors", gated, name="vq_rgb_gated", dataset=DATASET, command="pytest",
               class_names=CLASSES, extra={"vqvae": "vq_rgb", "codebook_sha256": vq.codebook_digest()},
               image_shape=vq.image_shape,
               metrics={"test_bits_per_code": 3.0, "test_bits_per_dim": 4.5, "test_marginal_bits_per_dim": 4.6})
    vae = VAE(VAEConfig(arch="conv", in_channels=3, image_size=8, latent_dim=4, channels=(4, 8), fc_dim=16,
                        likelihood="logistic", num_mixtures=2)).eval()
    save_model(d / "vae_rgb.safetensors", vae, name="vae_rgb", dataset=DATASET, command="pytest", class_names=CLASSES,
               metrics={"iwae_k": 10, "test_bits_per_dim": 5.5, "test_nll_nats": 800.0})
    return d


@pytest.fixture(scope="module")
def client(colour_weights):
    """One real server (uvicorn in a thread) for the module: starting the app is most of each test's cost."""
    with live_server(colour_weights) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def colour_image(seed: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def upload(*blobs: bytes, field: str = "file"):
    return [(field, (f"img{i}.png", blob)) for i, blob in enumerate(blobs)]


def test_models_lists_the_colour_models_with_data_set_and_class_names(client):
    models = {m["name"]: m for m in (client.get("/models")).json()}
    assert set(models) == {"vq_rgb", "vae_rgb"}
    for m in models.values():
        assert m["image_shape"] == [3, 8, 8] and m["dataset"] == DATASET and m["class_names"] == list(CLASSES)
    [prior] = models["vq_rgb"]["priors"]
    assert (prior["name"], prior["num_classes"], prior["class_names"], prior["dataset"]) == (
        "gated", 10, list(CLASSES), DATASET)
    assert (prior["test_bits_per_dim"], prior["test_marginal_bits_per_dim"]) == (4.5, 4.6)


@pytest.mark.parametrize("model", ["vq_rgb", "vae_rgb"])
def test_colour_uploads_reconstruct_in_colour_and_grey_is_replicated_to_rgb(client, model):
    """The documented rule: a grey (L) upload to a 3-channel model becomes RGB with R = G = B = L, so it
    reconstructs exactly as the RGB image with that grey in all three bands does."""
    rgb = colour_image(1, (20, 12))
    r = client.post("/reconstruct", params={"model": model}, files=upload(png(rgb)))
    assert r.status_code == 200, r.text
    assert png_array(r.content).shape == (8, 8, 3)
    grey = rgb.convert("L")
    as_rgb = Image.merge("RGB", (grey, grey, grey))
    from_grey = client.post("/reconstruct", params={"model": model}, files=upload(png(grey)))
    from_rgb = client.post("/reconstruct", params={"model": model}, files=upload(png(as_rgb)))
    assert from_grey.status_code == 200 and from_grey.content == from_rgb.content
    # the colour reached the model: the encoder's output differs (a tiny VQ-VAE may still pick the same codes)
    key, params = ("z_e", {"include_z_e": True}) if model == "vq_rgb" else ("mu", {})

    def encoding(blob: bytes) -> list:
        r = client.post("/encode", params={"model": model, **params}, files=upload(blob))
        return r.json()["items"][0][key]

    assert encoding(png(rgb)) != encoding(png(grey)) == encoding(png(as_rgb))


def test_sample_with_a_class_label_by_index_or_name(client):
    def grid(label):
        r = client.get("/sample", params={"model": "vq_rgb", "prior": "gated", "label": label, "n": 4, "seed": 7})
        assert r.status_code == 200, r.text
        return r

    cat = grid(3)
    assert png_array(cat.content).shape == (*grid_size(4, nrow=2)[::-1], 3)
    assert (grid("cat")).content == cat.content == (grid("CAT")).content
    assert (grid("ship")).content != cat.content
    bad = client.get("/sample", params={"model": "vq_rgb", "label": "lion"})
    assert bad.status_code == 422 and "'cat'" in bad.json()["detail"] and "0..9" in bad.json()["detail"]
    vae = client.get("/sample", params={"model": "vae_rgb", "n": 3, "seed": 1})
    assert vae.status_code == 200 and png_array(vae.content).shape == (*grid_size(3, nrow=2)[::-1], 3)


def test_encode_decode_is_the_reconstruction_for_colour_models(client):
    blobs = [png(colour_image(i)) for i in range(3)]
    for model, key, field in (("vq_rgb", "codes", "codes"), ("vae_rgb", "mu", "z")):
        items = (client.post("/encode", params={"model": model}, files=upload(*blobs))).json()["items"]
        if key == "codes":
            assert np.array([i["codes"] for i in items]).shape == (3, 2, 2)
        decoded = client.post("/decode", json={"model": model, field: [i[key] for i in items]})
        recon = client.post("/reconstruct", params={"model": model}, files=upload(*blobs))
        assert decoded.status_code == 200 and decoded.content == recon.content
        assert png_array(decoded.content).shape == (*grid_size(3, nrow=2)[::-1], 3)


@pytest.mark.parametrize("model", ["vq_rgb", "vae_rgb"])
def test_colour_interpolation_ends_are_the_reconstructions(client, model):
    a, b = png(colour_image(1, (32, 32))), png(colour_image(2).convert("L"))
    r = client.post("/interpolate", params={"model": model, "steps": 5},
                          files=[("a", ("a.png", a)), ("b", ("b.png", b))])
    assert r.status_code == 200, r.text
    strip = png_array(r.content)
    assert strip.shape == (12, 5 * 10 + 2, 3)
    for i, blob in ((0, a), (4, b)):
        rec = png_array((client.post("/reconstruct", params={"model": model}, files=upload(blob))).content)
        assert np.array_equal(cell(strip, i, nrow=5), rec)
