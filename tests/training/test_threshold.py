"""`python -m training threshold`: an out-of-distribution threshold set on validation, stored in the
weight file, shown by GET /models and applied by POST /score."""

from __future__ import annotations

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from app.main import create_app
from models.io import load_model, read_metadata
from training.__main__ import load_splits, main
from training.convert import training_args
from training.threshold import scores

from .conftest import train_tiny


@pytest.fixture
def trained(fashion_root, tmp_path):
    """A tiny VAE (logistic), VQ-VAE and Gated PixelCNN prior on the miniature Fashion-MNIST."""
    return train_tiny(fashion_root, tmp_path, likelihood="logistic")


def test_the_threshold_accepts_its_share_of_the_validation_split_and_changes_nothing_else(trained, fashion_root, capsys):
    vae_path, prior_path = trained / "vae.safetensors", trained / "vqvae_gated.safetensors"
    before = {p: (read_metadata(p), load_model(p)[1]) for p in (vae_path, prior_path)}
    assert main(["threshold", "--score", "webp", "--k", "4", "--data-root", str(fashion_root), str(vae_path)]) == 0
    assert main(["threshold", "--score", "bits", "--data-root", str(fashion_root), str(prior_path)]) == 0
    for path, score in ((vae_path, "webp"), (prior_path, "bits")):
        model, info = load_model(path)
        old_meta, old_info = before[path]
        ood = info.extra["ood"]
        assert ood["score"] == score and ood["accept"] == 0.95 and "validation" in ood["split"] and "test" not in ood["split"]
        assert read_metadata(path)["sha256"] == old_meta["sha256"] and info.metrics == old_info.metrics  # same tensors, metrics
        assert info.command.startswith(old_info.command + " && python -m training threshold")
        run_args = training_args(old_info.command)
        run_args.data_root = str(fashion_root)
        _, val, _ = load_splits(run_args)
        if path == vae_path:
            values = scores(model, None, val, "webp", 4, 0)
            assert info.command.endswith(f"--k 4 --seed 0 --batch-size 250 {vae_path}")  # 1000 // k images a batch
        else:
            values = scores(load_model(trained / "vqvae.safetensors")[0], model, val, "bits", 100, 0)
        assert ood["threshold"] == pytest.approx(sorted(values.tolist())[60], rel=1e-9)  # the 61st of 64: ceil(0.95 x 64)
        assert (values <= ood["threshold"]).double().mean() >= 0.95
    assert main(["threshold", str(trained / "vqvae.safetensors")]) == 1  # a VQ-VAE is scored under a prior
    assert "set the threshold on the prior's file" in capsys.readouterr().err


def test_a_vae_is_scored_at_most_a_thousand_rows_at_a_time(trained, fashion_root, monkeypatch):
    """By default a batch holds 1000 // k images: 100 images x k = 100 at once ran ten times slower."""
    from models.vae import VAE
    from training import threshold

    model = load_model(trained / "vae.safetensors")[0]
    run_args = training_args(load_model(trained / "vae.safetensors")[1].command)
    run_args.data_root = str(fashion_root)
    _, val, _ = load_splits(run_args)
    rows: list[int] = []
    real = VAE.decode
    monkeypatch.setattr(VAE, "decode", lambda self, z, context=None: rows.append(z.shape[:-1].numel()) or real(self, z, context))
    values = threshold.scores(model, None, val, "bits", 30, 0)
    assert len(val) == 64 and rows == [33 * 30, 31 * 30]  # 1000 // 30 = 33 images a batch, then the other 31
    assert values.shape == (64,) and torch.isfinite(values).all()
    with pytest.raises(ValueError, match="batch_size must be positive"):
        threshold.scores(model, None, val, "bits", 30, 0, batch_size=0)


async def test_models_shows_the_threshold_and_score_answers_a_verdict_against_it(trained, fashion_root):
    from app.settings import Settings

    assert main(["threshold", "--score", "png", "--k", "4", "--data-root", str(fashion_root),
                 str(trained / "vae.safetensors")]) == 0
    app = create_app(Settings(weights_dir=trained, device="cpu", check_cache_dir=None, reload_interval_s=0))
    async with LifespanManager(app, startup_timeout=120) as manager:
        await app.state.starting
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t", timeout=60) as c:
            models = {m["name"]: m for m in (await c.get("/models")).json()}
            threshold = models["vae"]["ood"]["threshold"]
            assert models["vae"]["ood"]["score"] == "png" and models["vqvae"]["priors"][0]["ood"] is None
            noise = torch.randint(256, (28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
            from PIL import Image
            import io

            blobs = []
            for array in (noise, noise * 0):
                buf = io.BytesIO()
                Image.fromarray(array, "L").save(buf, "PNG")
                blobs.append(("file", (f"{len(blobs)}.png", buf.getvalue(), "image/png")))
            r = await c.post("/score", params={"model": "vae", "k": 4}, files=blobs)  # png is added for the verdict
            assert r.status_code == 200, r.text
            for item in r.json()["items"]:
                verdict = item["verdict"]
                assert verdict["score"] == "png" and verdict["threshold"] == threshold
                assert verdict["value"] == item["complexity_score"]["png"] and verdict["unusual"] == (verdict["value"] > threshold)
            from app.client import AsyncClient

            async with AsyncClient("http://t", transport=httpx.ASGITransport(app=manager.app), timeout=60) as api:
                scored = await api.score("vae", [blob[1][1] for blob in blobs], k=4)
            assert [s.verdict for s in scored] == [item["verdict"] for item in r.json()["items"]]
            r = await c.post("/score", params={"model": "vae", "k": 5}, files=blobs)  # not as the threshold was set
            assert all("verdict" not in item for item in r.json()["items"])
            r = await c.post("/score", params={"model": "vqvae", "prior": "gated"}, files=blobs[:1])
            assert "verdict" not in r.json()["items"][0]  # no threshold stored for that prior
