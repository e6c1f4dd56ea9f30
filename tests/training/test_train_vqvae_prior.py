import math

import pytest
import torch
from PIL import Image

from models.io import load_model
from training.__main__ import main
from training.data import FASHION_MNIST_CLASSES

VQ_TINY = ["--hidden-channels", "16", "--res-channels", "8", "--n-res-blocks", "1", "--codebook-size", "16",
           "--embedding-dim", "4", "--dead-code-steps", "2", "--batch-size", "64", "--quiet", "--threads", "1"]


@pytest.fixture
def vqvae_file(fashion_root, tmp_path):
    out = tmp_path / "vqvae.safetensors"
    code = main(["vqvae", "--data-root", str(fashion_root), "--epochs", "1", "--out", str(out),
                 "--run-dir", str(tmp_path / "run-vq"), *VQ_TINY])
    assert code == 0
    return out


def test_vqvae_one_epoch(vqvae_file, tmp_path):
    model, info = load_model(vqvae_file)
    m = info.metrics
    assert info.kind == "vqvae" and model.code_shape == (7, 7) and m["code_shape"] == [7, 7]
    assert info.class_names == FASHION_MNIST_CLASSES
    assert 0 < m["test_mse"] < 0.25 and math.isclose(m["test_psnr_db"], 10 * math.log10(1 / m["test_mse"]))
    assert 1 <= m["test_codes_used"] <= 16 and 1 <= m["test_perplexity"] <= m["test_codes_used"] + 1e-6
    assert 0 < m["train_epoch_codes_used_share"] <= 1 and m["restarts_total"] >= 0
    assert m["train_restarts"] == m["restarts_total"]  # a running total is reported as its last value, not averaged
    # a likelihood of the 8-bit images: the decoder must beat uniform over 256 levels (8 bits/dim), and a
    # uniform prior over the 16 codes adds exactly 49 log2(16) bits per image
    assert model.config.likelihood == "logistic" and 0 < m["test_rec_bits_per_dim"] < 8.0
    assert m["test_uniform_prior_bits_per_dim"] == pytest.approx(m["test_rec_bits_per_dim"] + 49 * 4 / 784, abs=1e-9)
    assert m["test_uniform_prior_nll_nats"] == pytest.approx(m["test_uniform_prior_bits_per_dim"] * 784 * math.log(2))
    assert 0 < m["val_rec_bits_per_dim"] < 8.0
    with Image.open(tmp_path / "run-vq/reconstructions.gif") as im:
        assert im.n_frames == 1


@pytest.mark.parametrize("arch", ["pixelcnn", "gated", "pixelcnnpp"])
def test_prior_two_epochs_beat_uniform_and_record_its_vqvae(vqvae_file, fashion_root, tmp_path, arch):
    out = tmp_path / f"prior-{arch}.safetensors"
    code = main(["prior", "--vqvae", str(vqvae_file), "--arch", arch, "--data-root", str(fashion_root),
                 "--epochs", "2", "--batch-size", "16", "--hidden-channels", "8", "--n-layers", "2", "--out", str(out),
                 "--name", f"vqvae_{arch}", "--run-dir", str(tmp_path / f"run-{arch}"), "--quiet", "--threads", "1"])
    assert code == 0
    vqvae, _ = load_model(vqvae_file)
    prior, info = load_model(out)
    m = info.metrics
    assert info.extra["vqvae"] == "vqvae" and info.extra["codebook_sha256"] == vqvae.codebook_digest()
    assert set(info.extra) == {"vqvae", "codebook_sha256"} and info.image_shape == (1, 28, 28)
    assert prior.config.codebook_size == 16 and prior.config.num_classes == 10 and m["conditional"] is True
    assert info.class_names == FASHION_MNIST_CLASSES  # label i of the prior is class i of its data set
    assert m["log2_K"] == 4.0 and 0 <= m["unigram_entropy_bits"] <= 4.0
    # better than the uniform code distribution (log2 K bits), which any trained prior must beat
    assert 0 < m["test_bits_per_code"] < m["log2_K"] and 0 < m["val_bits_per_code"] < m["log2_K"]
    assert 0 < m["test_marginal_bits_per_code"] < m["log2_K"]  # the label marginalised out
    # the image bound -log p(x|z_q) - log P(z) is the decoder's bits plus the prior's, per subpixel
    rec = load_model(vqvae_file)[1].metrics["test_rec_bits_per_dim"]
    assert m["test_bits_per_dim"] == pytest.approx(rec + m["test_bits_per_code"] * 49 / 784, rel=1e-5)
    assert m["test_marginal_bits_per_dim"] == pytest.approx(rec + m["test_marginal_bits_per_code"] * 49 / 784, rel=1e-5)
    # and they are what the one metric computes directly, with the label given and marginalised out
    from training.data import load_dataset
    from training.evaluate import nll_bound

    test = load_dataset("fashion-mnist", "test", root=fashion_root)
    train, _ = load_dataset("fashion-mnist", "train", root=fashion_root).split_last(25)  # the run's default split
    freqs = torch.bincount(train.labels, minlength=10)
    assert m["test_bits_per_dim"] == pytest.approx(nll_bound(vqvae, test, prior=prior)["bits_per_dim"], rel=1e-6)
    assert m["test_marginal_bits_per_dim"] == pytest.approx(
        nll_bound(vqvae, test, prior=prior, label_freqs=freqs)["bits_per_dim"], rel=1e-6)
    with Image.open(tmp_path / f"run-{arch}/samples.gif") as im:
        assert im.n_frames == 2


def test_prior_refuses_a_file_that_is_not_a_vqvae(fashion_root, tmp_path, capsys):
    from models.io import save_model
    from models.vae import VAE, VAEConfig

    save_model(tmp_path / "vae.safetensors", VAE(VAEConfig(hidden_dims=(4, 4), latent_dim=2)), name="vae", dataset="d", command="c")
    code = main(["prior", "--vqvae", str(tmp_path / "vae.safetensors"), "--data-root", str(fashion_root), "--epochs", "1",
                 "--out", str(tmp_path / "p.safetensors"), "--quiet"])
    assert code == 2 and "not a VQ-VAE" in capsys.readouterr().err


def test_model_card_is_generated_from_the_files(vqvae_file, fashion_root, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    vqvae_file.rename(weights / "vqvae.safetensors")
    assert main(["prior", "--vqvae", str(weights / "vqvae.safetensors"), "--arch", "gated", "--data-root", str(fashion_root),
                 "--epochs", "1", "--hidden-channels", "8", "--n-layers", "2", "--out", str(weights / "vqvae_gated.safetensors"),
                 "--name", "vqvae_gated", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    (weights / "samples").mkdir()
    gif = tmp_path / "run" / "samples.gif"
    (weights / "samples" / "vqvae_gated__samples.gif").write_bytes(gif.read_bytes())  # as copied from the run
    assert main(["card", "--weights", str(weights)]) == 0
    card = (weights / "README.md").read_text()
    _, info = load_model(weights / "vqvae_gated.safetensors")
    # the class-conditional prior's grid: one row of 8 per class, in label order, the rows named
    assert len(info.class_names) == 10 and f"samples (rows: {', '.join(info.class_names)})" in card
    with Image.open(weights / "samples" / "vqvae_gated.png") as grid:
        assert grid.size == (8 * 30 + 2, 10 * 30 + 2)
    assert "![samples](samples/vqvae_gated__samples.gif)" in card
    assert "(*)" not in card  # the JPEG note is for image folders only
    assert f"{info.metrics['test_bits_per_code']:.4g}" in card and "python -m training prior" in card
    table = card.split("every model in one table")[1].split("###")[0]  # the one bits/dim table
    assert f"| {info.metrics['test_bits_per_dim']:.4f} | {info.metrics['test_nll_nats']:.2f} | 64 |" in table
    assert f"| {info.metrics['test_marginal_bits_per_dim']:.4f} |" in table and "label marginalised out" in table
    assert (weights / "samples" / "vqvae_gated.png").is_file() and "samples/vqvae_gated.png" in card


def test_model_card_keeps_the_prose_above_the_marker(vqvae_file, tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    vqvae_file.rename(weights / "vqvae.safetensors")
    (weights / "README.md").write_text("# Card\n\nHand-written notes.\n\n## Generated from the weight files\nold tables\n")
    assert main(["card", "--weights", str(weights)]) == 0
    card = (weights / "README.md").read_text()
    assert card.startswith("# Card\n\nHand-written notes.") and "old tables" not in card and "test_psnr_db" in card


def test_the_marginal_over_labels_is_a_normalised_distribution_of_code_grids():
    """With K = 2 codes on a 2x2 grid there are 16 grids: p(z) = sum_y p(y) p(z|y) sums to 1 over them,
    and it lies between the best and the worst label's p(z|y)."""
    import itertools

    import torch

    from models.pixelcnn import PixelCNN
    from training.prior import code_nats

    torch.manual_seed(0)
    prior = PixelCNN(PixelCNN.config_class(codebook_size=2, code_shape=(2, 2), num_classes=3, hidden_channels=8, n_layers=2)).eval()
    grids = torch.tensor(list(itertools.product([0, 1], repeat=4))).reshape(16, 2, 2)
    freqs = torch.tensor([5, 3, 2])
    bits = (code_nats(prior, grids, None, freqs)["marginal"] / (4 * math.log(2))).tolist()  # per code: 4 codes a grid
    total = sum(2 ** (-4 * b) for b in bits)
    assert abs(total - 1) < 1e-6  # the prior's log-probabilities are float32
    with torch.no_grad():
        per_label = torch.stack([prior.log_prob(grids, torch.full((16,), y)) for y in range(3)], 1).double()  # (16, 3)
    marginal = torch.tensor([-4 * b * math.log(2) for b in bits], dtype=torch.float64)
    assert (marginal <= per_label.max(1).values + 1e-9).all() and (marginal >= per_label.min(1).values - 1e-9).all()
    direct = (per_label.exp() * (freqs.double() / 10)).sum(1).log()  # weighted by the class frequencies
    torch.testing.assert_close(marginal, direct, rtol=0, atol=1e-6)  # float32 log_prob, batches of 1 vs 16


def test_an_unconditional_priors_bound_is_nll_bound_on_the_same_codes(vqvae_file, fashion_root, tmp_path):
    from training.data import load_dataset
    from training.evaluate import nll_bound

    out = tmp_path / "prior.safetensors"
    assert main(["prior", "--vqvae", str(vqvae_file), "--arch", "pixelcnn", "--unconditional", "--data-root",
                 str(fashion_root), "--epochs", "1", "--batch-size", "16", "--hidden-channels", "8", "--n-layers", "2",
                 "--out", str(out), "--run-dir", str(tmp_path / "run"), "--quiet", "--threads", "1"]) == 0
    vqvae, _ = load_model(vqvae_file)
    prior, info = load_model(out)
    m = info.metrics
    assert m["conditional"] is False and "test_marginal_bits_per_dim" not in m and prior.config.num_classes == 0
    test = load_dataset("fashion-mnist", "test", root=fashion_root)
    assert m["test_bits_per_dim"] == pytest.approx(nll_bound(vqvae, test, prior=prior)["bits_per_dim"], rel=1e-6)


def _history(run_dir) -> list[dict]:
    import json

    from safetensors import safe_open

    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["state"])["history"]


def test_select_by_mse_keeps_the_epoch_with_the_lowest_validation_mse(fashion_root, tmp_path):
    out = tmp_path / "vq.safetensors"
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(out), "--run-dir", str(tmp_path / "run"), *VQ_TINY]
    assert main([*argv, "--epochs", "3", "--select-by", "mse", "--lr", "0.01"]) == 0
    history = _history(tmp_path / "run")
    _, info = load_model(out)
    assert info.metrics["best_epoch"] == min(history, key=lambda h: h["val_mse"])["epoch"]
    assert info.metrics["val_mse"] == pytest.approx(min(h["val_mse"] for h in history), abs=1e-5)


def _strip_from_checkpoint(run_dir, *keys) -> None:
    """Make the checkpoint look like one written before these state keys existed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(metadata["state"])
    for key in keys:
        state.pop(key)
    # A checkpoint from before those keys had no digest either (training/checkpoint.py warns and loads it)
    save_file(tensors, str(path), metadata={**{k: v for k, v in metadata.items() if k != "sha256"}, "state": json.dumps(state)})


@pytest.mark.parametrize("old_checkpoint", [False, True], ids=["best_key-saved", "best_key-inferred"])
def test_resuming_with_another_selection_metric_chooses_among_the_resumed_epochs_only(
    fashion_root, tmp_path, capsys, old_checkpoint
):
    """Epoch 1 was chosen by MSE (about 0.05); from epoch 2 by bits/dim (about 6), a different scale:
    without starting the choice again, no later epoch could ever beat the saved MSE. A checkpoint
    written before the metric was saved has it inferred from its best epoch's row."""
    out = tmp_path / "vq.safetensors"
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(out), "--run-dir", str(tmp_path / "run"), *VQ_TINY]
    assert main([*argv, "--epochs", "1", "--select-by", "mse"]) == 0
    if old_checkpoint:
        _strip_from_checkpoint(tmp_path / "run", "best_key", "commands", "schedule")
    capsys.readouterr()
    assert main([*argv, "--epochs", "3", "--resume"]) == 0
    assert "chosen by val_rec_bits_per_dim, not val_mse: only epochs after 1 compete" in capsys.readouterr().out
    history = _history(tmp_path / "run")
    model, info = load_model(out)
    best = min(history[1:], key=lambda h: h["val_rec_bits_per_dim"])["epoch"]
    assert info.metrics["best_epoch"] == best >= 2 and info.metrics["selected_by"] == "val_rec_bits_per_dim"
    first = "(epochs 1-1: command not recorded)" if old_checkpoint else "python -m training vqvae"
    assert info.command.startswith(first) and info.command.count(" && ") == 1 and info.command.endswith("--resume")


def test_a_resume_with_nothing_left_to_train_keeps_the_best_epoch(fashion_root, tmp_path, capsys):
    out = tmp_path / "vq.safetensors"
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(out), "--run-dir", str(tmp_path / "run"), *VQ_TINY]
    assert main([*argv, "--epochs", "2", "--stop-after", "2"]) == 0  # a whole run: --stop-after at the end is a no-op
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--select-by", "mse", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "already at epoch 2, past --stop-after/--epochs 2: nothing to train" in said and "now chosen by" not in said
    _, info = load_model(out)
    assert info.metrics["best_epoch"] in (1, 2) and info.metrics["epochs_trained"] == 2


def test_a_resume_that_changes_the_schedule_says_so(fashion_root, tmp_path, capsys):
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(tmp_path / "vq.safetensors"),
            "--run-dir", str(tmp_path / "run"), *VQ_TINY, "--lr-schedule", "cosine"]
    assert main([*argv, "--epochs", "3", "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--epochs", "4", "--stop-after", "2", "--resume"]) == 0
    assert "schedule differs from the checkpoint's (epochs 3 -> 4): from epoch 2" in capsys.readouterr().out


def test_stop_after_leaves_the_test_split_alone_for_a_vqvae_and_a_prior(vqvae_file, fashion_root, tmp_path, capsys):
    out = tmp_path / "vq.safetensors"
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(out), "--run-dir", str(tmp_path / "run"), *VQ_TINY]
    assert main([*argv, "--epochs", "2", "--stop-after", "1"]) == 0
    _, info = load_model(out)
    assert not any(k.startswith("test_") for k in info.metrics)
    assert info.metrics["epoch"] == 1 and info.metrics["epochs_planned"] == 2
    prior = tmp_path / "prior.safetensors"
    assert main(["prior", "--data-root", str(fashion_root), "--vqvae", str(vqvae_file), "--arch", "pixelcnn",
                 "--hidden-channels", "8", "--n-layers", "2", "--epochs", "2", "--stop-after", "1", "--out", str(prior),
                 "--run-dir", str(tmp_path / "run-prior"), "--batch-size", "64", "--quiet", "--threads", "1"]) == 0
    assert "stopped after epoch 1 of 2: no test evaluation yet" in capsys.readouterr().out
    _, info = load_model(prior)
    assert not any(k.startswith("test_") for k in info.metrics) and info.metrics["epochs_planned"] == 2


def test_select_by_likelihood_needs_the_logistic_decoder(fashion_root, tmp_path, capsys):
    argv = ["vqvae", "--data-root", str(fashion_root), "--out", str(tmp_path / "vq.safetensors"),
            "--run-dir", str(tmp_path / "run"), *VQ_TINY, "--epochs", "1", "--likelihood", "mse", "--select-by", "likelihood"]
    assert main(argv) == 2
    assert "--select-by likelihood needs --likelihood logistic" in capsys.readouterr().err


def test_a_cold_sample_grid_draws_each_classes_most_likely_grid_in_every_cell():
    """At a temperature near 0 every draw is the argmax, so the PER_CLASS cells of a class's row are one
    image; at temperature 1 they differ. Rows differ by class, since the label shifts the logits."""
    from models.io import ModelInfo
    from models.pixelcnn import PixelCNN, PixelCNNConfig
    from models.vqvae import VQVAE, VQVAEConfig
    from training.card import PER_CLASS, sample_grid

    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1, codebook_size=8,
                           embedding_dim=2, init="uniform")).eval()
    with torch.no_grad():
        vq.quantizer.embedding.copy_(torch.randn(8, 2) * 3)
    prior = PixelCNN(PixelCNNConfig(codebook_size=8, code_shape=vq.code_shape, num_classes=3, hidden_channels=8,
                                    n_layers=2, first_kernel_size=3)).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(3)  # logits far enough apart that classes disagree, not so far that a warm draw is the argmax
    info = ModelInfo(kind="pixelcnn", name="p", image_shape=(1, 8, 8), dataset="t", command="", metrics={},
                     extra={"vqvae": "vq"})
    with torch.inference_mode():
        cold, nrow = sample_grid(prior, info, {"vq": vq}, seed=0, temperature=1e-4)
        warm, _ = sample_grid(prior, info, {"vq": vq}, seed=0)
    assert nrow == PER_CLASS and cold.shape[0] == 3 * PER_CLASS
    rows = cold.view(3, PER_CLASS, *cold.shape[1:])
    assert all(torch.equal(row[0], cell) for row in rows for cell in row)
    assert not torch.equal(rows[0, 0], rows[1, 0]) or not torch.equal(rows[1, 0], rows[2, 0])
    assert not all(torch.equal(w, warm[0]) for w in warm[:PER_CLASS])
