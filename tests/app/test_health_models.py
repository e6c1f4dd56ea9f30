"""/health, /ready, /config, /metrics, /models and the registry's pairing rules."""

import shutil

import httpx
import torch

from app.main import create_app
from app.registry import Registry
from models.io import load_model, save_model
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig

from .conftest import CLASS_NAMES, CODEBOOK_SIZE, CODE_SHAPE, make_settings, save_prior, tiny_vqvae


async def test_health_and_ready_after_startup(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    r = await client.get("/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready", "models": 3}


async def test_ready_is_503_before_startup_and_after_shutdown(serve, weights_dir):
    app = create_app(make_settings(weights_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as raw:
        assert (await raw.get("/health")).status_code == 200
        r = await raw.get("/ready")
        assert r.status_code == 503 and r.json() == {"detail": "starting"} and r.headers["retry-after"] == "1"
        r = await raw.get("/models")
        assert r.status_code == 503 and "not ready" in r.json()["detail"]
    async with serve() as (app, client):
        assert (await client.get("/ready")).status_code == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as raw:
        r = await raw.get("/ready")  # the lifespan has shut down
        assert r.status_code == 503 and r.json() == {"detail": "shutting down"}
        r = await raw.get("/sample", params={"model": "vae"})
        assert r.status_code == 503


async def test_config_shows_the_settings_in_effect(serve):
    async with serve(max_n=12) as (_app, client):
        cfg = (await client.get("/config")).json()
    assert cfg["max_n"] == 12 and cfg["device"] == "cpu" and cfg["resolved_device"] == "cpu"
    assert {"max_batch_size", "max_wait_ms", "max_queue", "request_timeout_s", "precision", "max_upload_bytes",
            "max_pixels", "max_files", "torch_threads", "pad_batches"} <= set(cfg)


async def test_models_lists_each_model_and_the_priors_of_the_vqvae(client):
    models = {m["name"]: m for m in (await client.get("/models")).json()}
    assert set(models) == {"vae", "vae_rgb", "vqvae"}
    vae = models["vae"]
    assert vae["kind"] == "vae" and vae["image_shape"] == [1, 8, 8] and vae["latent_shape"] == [4]
    assert vae["device"] == "cpu" and vae["dataset"] == "unit-test" and vae["metrics"] == {"test_neg_elbo": 40.0}
    assert "priors" not in vae and "code_shape" not in vae
    assert (vae["arch"], vae["decoder"]) == ("mlp", "factorized")
    rgb = models["vae_rgb"]
    assert rgb["image_shape"] == [3, 8, 8] and (rgb["arch"], rgb["decoder"]) == ("conv", "autoregressive")
    assert models["vqvae"].get("decoder") is None
    assert {name: m["likelihood"] for name, m in models.items()} == {"vae": "bernoulli", "vae_rgb": "logistic", "vqvae": "logistic"}
    vq = models["vqvae"]
    assert vq["code_shape"] == list(CODE_SHAPE) and vq["codebook_size"] == CODEBOOK_SIZE and vq["latent_shape"] == [4, 2, 2]
    priors = {p["name"]: p for p in vq["priors"]}
    assert {n: (p["kind"], p["test_bits_per_code"], p["num_classes"]) for n, p in priors.items()} == {
        "pixelcnn": ("pixelcnn", 3.0, 0),
        "gated": ("gated_pixelcnn", 2.0, 3),
        "pixelcnnpp": ("pixelcnnpp", 2.5, 0),
    }
    assert {n: (p["test_bits_per_dim"], p["test_marginal_bits_per_dim"]) for n, p in priors.items()} == {
        "pixelcnn": (None, None), "gated": (3.25, 3.4), "pixelcnnpp": (3.5, None)}
    assert vq["default_prior"] == "gated" and priors["gated"]["default"] and not priors["pixelcnn"]["default"]
    assert vq["rejected_priors"] == []
    assert (await client.get("/models/problems")).json() == []
    # a label's name: each file's own class names; the VQ-VAE's file has none, so it shows its priors'
    assert {name: m["class_names"] for name, m in models.items()} == {
        "vae": list(CLASS_NAMES), "vae_rgb": [], "vqvae": list(CLASS_NAMES)}
    assert {n: p["class_names"] for n, p in priors.items()} == {
        "pixelcnn": list(CLASS_NAMES), "gated": list(CLASS_NAMES), "pixelcnnpp": []}


async def test_class_names_of_a_vqvae_and_a_conditional_prior_with_the_wrong_count(tmp_path, serve):
    torch.manual_seed(0)
    vq = tiny_vqvae()
    save_model(tmp_path / "vqvae.safetensors", vq, name="vqvae", dataset="unit-test", command="pytest",
               class_names=("a", "b"))
    cfg = dict(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8, n_layers=1, first_kernel_size=3)
    save_prior(tmp_path / "pixelcnn.safetensors", PixelCNN(PixelCNNConfig(**cfg)), vq, class_names=CLASS_NAMES)
    save_prior(tmp_path / "gated.safetensors", GatedPixelCNN(GatedPixelCNNConfig(**cfg, num_classes=3)), vq,
               class_names=CLASS_NAMES[:2])
    async with serve(weights_dir=tmp_path) as (_app, client):
        [entry] = (await client.get("/models")).json()
    assert entry["class_names"] == ["a", "b"]  # the VQ-VAE's own file wins over its priors'
    assert [(p["name"], p["class_names"], p["class_names_conflict"]) for p in entry["priors"]] == [
        ("pixelcnn", list(CLASS_NAMES), None)]  # unconditional: its names label nothing, so no conflict
    assert entry["rejected_priors"] == [
        {"file": "gated.safetensors", "reason": "it records 2 class names for its 3 classes"}]


def test_a_vqvae_without_names_shows_its_priors_only_when_they_agree(tmp_path):
    vq = tiny_vqvae()
    save_model(tmp_path / "vqvae.safetensors", vq, name="vqvae", dataset="unit-test", command="pytest")
    cfg = dict(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8, n_layers=1)
    save_prior(tmp_path / "a.safetensors", PixelCNN(PixelCNNConfig(**cfg)), vq, class_names=("x", "y"))
    save_prior(tmp_path / "b.safetensors", GatedPixelCNN(GatedPixelCNNConfig(**cfg)), vq, class_names=("y", "x"))
    registry = Registry.load(tmp_path, torch.device("cpu"))
    [entry] = registry.describe()
    assert entry["class_names"] == [] and [p["class_names"] for p in entry["priors"]] == [["x", "y"], ["y", "x"]]
    (tmp_path / "b.safetensors").unlink()
    [entry] = Registry.load(tmp_path, torch.device("cpu")).describe()
    assert entry["class_names"] == ["x", "y"]


def conditional_prior_names(tmp_path, vq_names, prior_names, num_classes=3) -> dict:
    """GET /models' entry of a class-conditional prior `gated` whose VQ-VAE records `vq_names`."""
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    vq = tiny_vqvae()
    save_model(tmp_path / "vqvae.safetensors", vq, name="vqvae", dataset="unit-test", command="pytest",
               class_names=vq_names)
    cfg = GatedPixelCNNConfig(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8, n_layers=1,
                              num_classes=num_classes)
    save_prior(tmp_path / "gated.safetensors", GatedPixelCNN(cfg), vq, class_names=prior_names)
    [entry] = Registry.load(tmp_path, torch.device("cpu")).describe()
    [prior] = entry["priors"]
    return {"vqvae": entry["class_names"], "prior": prior["class_names"], "conflict": prior["class_names_conflict"]}


def test_a_conditional_priors_labels_are_named_by_its_own_file_else_its_vqvaes(tmp_path, caplog):
    # its own names, whatever the VQ-VAE records; a disagreement is reported, not hidden
    assert conditional_prior_names(tmp_path, ("a", "b", "c"), ("x", "y", "z")) == {
        "vqvae": ["a", "b", "c"], "prior": ["x", "y", "z"],
        "conflict": "its VQ-VAE 'vqvae' records other class names (['a', 'b', 'c']); "
                    "this prior's labels are named by its own"}
    assert "records other class names" in caplog.text
    assert conditional_prior_names(tmp_path, ("a", "b"), ("x", "y", "z"))["conflict"].startswith(
        "its VQ-VAE 'vqvae' records other class names (['a', 'b'])")
    assert conditional_prior_names(tmp_path, CLASS_NAMES, CLASS_NAMES) == {
        "vqvae": list(CLASS_NAMES), "prior": list(CLASS_NAMES), "conflict": None}
    # none of its own: the VQ-VAE's, only when it records one per class
    assert conditional_prior_names(tmp_path, ("a", "b", "c"), ()) == {
        "vqvae": ["a", "b", "c"], "prior": ["a", "b", "c"], "conflict": None}
    assert conditional_prior_names(tmp_path, ("a", "b"), ()) == {
        "vqvae": ["a", "b"], "prior": [],
        "conflict": "its VQ-VAE 'vqvae' records 2 class names for this prior's 3 classes; its labels have no names"}
    # a VQ-VAE without names shows its conditional prior's
    assert conditional_prior_names(tmp_path, (), ("x", "y", "z")) == {
        "vqvae": ["x", "y", "z"], "prior": ["x", "y", "z"], "conflict": None}


async def test_mismatched_priors_are_skipped_and_listed(tmp_path, weights_dir, serve):
    shutil.copy(weights_dir / "vqvae.safetensors", tmp_path / "vqvae.safetensors")
    torch.manual_seed(1)
    vq = tiny_vqvae()  # another codebook than the one saved
    served, _ = load_model(tmp_path / "vqvae.safetensors")
    cfg = dict(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8, n_layers=1, first_kernel_size=3)
    save_prior(tmp_path / "a_wrong_codebook.safetensors", PixelCNN(PixelCNNConfig(**cfg)), vq)
    save_prior(tmp_path / "b_orphan.safetensors", PixelCNN(PixelCNNConfig(**cfg)), served, vq_name="vqvae_missing")
    save_prior(tmp_path / "c_wrong_shape.safetensors", PixelCNN(PixelCNNConfig(**{**cfg, "code_shape": (3, 3)})), served)
    save_prior(tmp_path / "d_good.safetensors", GatedPixelCNN(GatedPixelCNNConfig(**cfg)), served, bits=1.0)
    save_prior(tmp_path / "e_duplicate.safetensors", GatedPixelCNN(GatedPixelCNNConfig(**cfg)), served, bits=0.5)
    (tmp_path / "f_garbage.safetensors").write_bytes(b"not a weight file")
    async with serve(weights_dir=tmp_path) as (_app, client):
        [vq_entry] = (await client.get("/models")).json()
        problems = {p["file"]: p for p in (await client.get("/models/problems")).json()}
        r = await client.get("/sample", params={"model": "vqvae", "prior": "pixelcnn"})
    assert [p["name"] for p in vq_entry["priors"]] == ["gated"] and vq_entry["default_prior"] == "gated"
    rejected = {p["file"]: p["reason"] for p in vq_entry["rejected_priors"]}
    assert set(rejected) == {"a_wrong_codebook.safetensors", "c_wrong_shape.safetensors", "e_duplicate.safetensors"}
    assert "codebook digest" in rejected["a_wrong_codebook.safetensors"]
    assert "code_shape (3, 3)" in rejected["c_wrong_shape.safetensors"]
    assert "already loaded" in rejected["e_duplicate.safetensors"]
    assert "'vqvae_missing' is not loaded" in problems["b_orphan.safetensors"]["reason"]
    assert "cannot load" in problems["f_garbage.safetensors"]["reason"]
    assert len(problems) == 5
    assert r.status_code == 404 and "available: ['gated']" in r.json()["detail"]


async def test_unknown_model_and_prior_names_are_404(client):
    r = await client.get("/sample", params={"model": "nope"})
    assert r.status_code == 404 and r.json()["detail"] == "unknown model 'nope'; loaded models: ['vae', 'vae_rgb', 'vqvae']"
    r = await client.get("/sample", params={"model": "gated"})  # a prior's own name
    assert r.status_code == 404 and "is a prior; use model=vqvae" in r.json()["detail"]
    r = await client.post("/decode", json={"model": "nope", "z": [[0, 0, 0, 0]]})
    assert r.status_code == 404


async def test_metrics_count_requests_and_batches(client):
    await client.get("/sample", params={"model": "vae", "n": 3, "seed": 0})
    await client.get("/sample", params={"model": "vae", "n": 0})
    text = (await client.get("/metrics")).text
    assert 'genserve_requests_total{endpoint="/sample",method="GET",status="200"} 1.0' in text
    assert 'genserve_requests_total{endpoint="/sample",method="GET",status="422"} 1.0' in text
    assert 'genserve_batch_size_count{batcher="vae:sample"} 1.0' in text
    assert 'genserve_batch_size_sum{batcher="vae:sample"} 3.0' in text
    assert 'genserve_inference_seconds_count{batcher="vae:sample"} 1.0' in text
