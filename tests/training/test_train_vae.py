import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from models.io import load_model
from training.__main__ import main
from training.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--hidden-dims", "16", "8", "--latent-dim", "3", "--conv-channels", "4", "8", "--fc-dim", "16",
        "--iwae-k", "20", "--batch-size", "64", "--quiet", "--threads", "1"]


def train(fashion_root, tmp_path, *extra, name="vae", arch="conv"):
    out = tmp_path / f"{name}.safetensors"
    argv = ["vae", "--data-root", str(fashion_root), "--arch", arch, "--out", str(out), "--name", name,
            "--run-dir", str(tmp_path / f"run-{name}"), *TINY, *extra]
    return main(argv), out


AR = ["--decoder", "autoregressive", "--ar-channels", "4", "--ar-kernel", "3", "--free-bits", "0.5"]


BERNOULLI = ["--likelihood", "bernoulli"]


@pytest.mark.parametrize(
    "arch,extra",
    [("mlp", BERNOULLI), ("mlp", []), ("conv", []), ("conv", AR), ("conv", [*AR, *BERNOULLI]), ("conv", [*AR, "--no-latent"])],
    ids=["mlp-bernoulli", "mlp", "conv", "conv-ar", "conv-ar-bernoulli", "conv-context-only"],
)
def test_two_epochs_write_a_loadable_file_with_sane_metrics_and_gifs(fashion_root, tmp_path, arch, extra):
    code, out = train(fashion_root, tmp_path, "--epochs", "2", "--batch-size", "16", "--lr", "0.01", *extra, arch=arch)
    assert code == 0
    model, info = load_model(out)
    m = info.metrics
    assert info.kind == "vae" and info.dataset == "fashion-mnist" and info.command.startswith("python -m training vae")
    assert info.class_names == FASHION_MNIST_CLASSES and info.class_names[9] == "Ankle boot"
    assert model.config.arch == arch and info.image_shape == (1, 28, 28)
    assert model.config.decoder == ("autoregressive" if "--decoder" in extra else "factorized")
    assert model.config.use_latent == ("--no-latent" not in extra)
    for key in ("test_neg_elbo", "test_rec", "test_kl", "test_psnr_db"):
        assert math.isfinite(m[key]), key
    if "bernoulli" in extra:
        # grey-pixel BCE: an IWAE bound is never above the negative ELBO (up to Monte-Carlo noise),
        # and a model no better than p = 1/2 for every pixel (784 ln 2 = 543.4 nats) fails
        assert model.config.likelihood == "bernoulli" and "test_bits_per_dim" not in m
        assert 0 < m["test_iwae_grey_bce"] <= m["test_neg_elbo"] + 1.0 < 784 * math.log(2)
    else:
        # a likelihood of the 8-bit images: a model no better than uniform over 256 levels (8 bits/dim) fails
        assert model.config.likelihood == "logistic" and "test_iwae_grey_bce" not in m
        assert 0 < m["test_nll_nats"] <= m["test_neg_elbo"] + 1.0
        assert m["test_bits_per_dim"] == pytest.approx(m["test_nll_nats"] / (784 * math.log(2)), rel=1e-6)
        assert m["test_bits_per_dim"] < 8.0
    assert m["iwae_k"] == 20 and m["iwae_images"] == 64 and m["psnr_images"] == 64 and 0 <= m["active_units"] <= 3
    for gif in ("inputs", "reconstructions", "samples"):  # identical frames (the fixed inputs) are merged
        with Image.open(tmp_path / f"run-vae/{gif}.gif") as im:
            assert im.n_frames == (1 if gif == "inputs" else 2)


def test_psnr_images_limits_the_reconstructions_that_give_the_psnr(fashion_root, tmp_path):
    """--psnr-images N: the PSNR of the first N test images' reconstructions (an autoregressive decoder with a
    deep context draws them slowly); the bounds stay on every test image. A finished run resumed with it
    measures the test split again (how the shipped vae_cifar10_ar was finished)."""
    from training.__main__ import load_splits
    from training.convert import training_args
    from training.evaluate import reconstruction_quality

    code, out = train(fashion_root, tmp_path, "--epochs", "1", *AR, "--ar-layers", "2", "--psnr-images", "10")
    assert code == 0
    model, info = load_model(out)
    assert info.metrics["psnr_images"] == 10 and info.metrics["iwae_images"] == info.metrics["test_images"] == 64
    run_args = training_args(info.command)
    run_args.data_root = str(fashion_root)
    *_, test = load_splits(run_args)
    assert info.metrics["test_psnr_db"] == pytest.approx(reconstruction_quality(model, test.subset(10))["psnr_db"], rel=1e-9)
    assert train(fashion_root, tmp_path, "--epochs", "1", *AR, "--ar-layers", "2", "--psnr-images", "5", "--resume")[0] == 0
    _, again = load_model(out)
    assert again.metrics["psnr_images"] == 5 and " && " in again.command and again.command.endswith("--psnr-images 5 --resume")


def test_resume_continues_and_adds_gif_frames(fashion_root, tmp_path):
    assert train(fashion_root, tmp_path, "--epochs", "1")[0] == 0
    code, out = train(fashion_root, tmp_path, "--epochs", "2", "--resume")
    assert code == 0
    _, info = load_model(out)
    assert info.metrics["epochs_trained"] == 2
    with Image.open(tmp_path / "run-vae/samples.gif") as im:
        assert im.n_frames == 2


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(fashion_root, tmp_path):
    straight = tmp_path / "a"
    resumed = tmp_path / "b"
    straight.mkdir(), resumed.mkdir()
    train(fashion_root, straight, "--epochs", "2", "--iwae-k", "1")
    train(fashion_root, resumed, "--epochs", "1", "--iwae-k", "1")
    train(fashion_root, resumed, "--epochs", "2", "--iwae-k", "1", "--resume")
    a, _ = load_model(straight / "vae.safetensors")
    b, _ = load_model(resumed / "vae.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.equal(vb), k


def test_same_seed_same_weights(fashion_root, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, a_path = train(fashion_root, tmp_path / "a", "--epochs", "1", "--seed", "7", arch="mlp")
    _, b_path = train(fashion_root, tmp_path / "b", "--epochs", "1", "--seed", "7", arch="mlp")
    a, ia = load_model(a_path)
    b, ib = load_model(b_path)
    assert all(x.equal(y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ia.metrics["test_neg_elbo"] == ib.metrics["test_neg_elbo"]


def test_bad_decoder_flags_are_one_clear_error(fashion_root, tmp_path, capsys):
    code, _ = train(fashion_root, tmp_path, "--epochs", "1", "--decoder", "autoregressive", arch="mlp")
    assert code != 0 and "arch='conv'" in capsys.readouterr().err
    code, _ = train(fashion_root, tmp_path, "--epochs", "1", "--free-bits", "-1")
    assert code != 0 and "free_bits must be >= 0" in capsys.readouterr().err


def test_missing_data_is_one_clear_error_not_a_traceback(tmp_path, capsys):
    code, _ = train(tmp_path / "nothing-here", tmp_path, "--epochs", "1")
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_resume_without_checkpoint_is_a_clear_error(fashion_root, tmp_path, capsys):
    code, _ = train(fashion_root, tmp_path, "--epochs", "1", "--resume")
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(fashion_root, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           "-m", "training", "vae", "--data-root", str(fashion_root), "--epochs", "1", "--out", str(out),
           "--run-dir", str(tmp_path / "run"), "--device", "cpu", *TINY]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    _, info = load_model(out)
    assert math.isfinite(info.metrics["test_neg_elbo"]) and info.metrics["epochs_trained"] == 1


def test_the_best_epoch_is_chosen_on_validation_images_and_test_is_used_only_at_the_end(fashion_root, tmp_path, monkeypatch):
    """256 training images -> 232 train + 24 validation; 64 test images are seen only after training."""
    import training.vae

    seen = []
    original = training.vae.vae_neg_elbo

    def recording(model, data, *args, **kwargs):
        seen.append(len(data))
        return original(model, data, *args, **kwargs)

    monkeypatch.setattr(training.vae, "vae_neg_elbo", recording)
    code, out = train(fashion_root, tmp_path, "--epochs", "2", "--val-size", "24", arch="mlp")
    assert code == 0
    assert seen == [24, 24, 64]  # one validation pass per epoch, then the test split once, for the report
    m = load_model(out)[1].metrics
    assert (m["train_images"], m["val_images"], m["test_images"]) == (232, 24, 64)
    assert math.isfinite(m["val_neg_elbo"]) and m["best_epoch"] in (1, 2)


def test_a_validation_split_that_leaves_no_training_images_is_one_error_line(fashion_root, tmp_path, capsys):
    code, _ = train(fashion_root, tmp_path, "--epochs", "1", "--val-size", "256", arch="mlp")
    assert code == 2 and "validation split needs 0 < n < 256" in capsys.readouterr().err


def test_cosine_learning_rate_runs_from_lr_to_min_lr_and_constant_stays_put():
    from training.loop import FitConfig, learning_rate

    cosine = FitConfig(epochs=3, batch_size=8, lr=1e-3, seed=0, run_dir=Path("."), lr_schedule="cosine", min_lr=1e-5)
    rates = [learning_rate(cosine, t, 101) for t in range(101)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)
    assert rates[50] == pytest.approx((1e-3 + 1e-5) / 2)  # half way along the curve, half way down
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[25] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    constant = FitConfig(epochs=3, batch_size=8, lr=1e-3, seed=0, run_dir=Path("."))
    assert {learning_rate(constant, t, 101) for t in range(101)} == {1e-3}
    with pytest.raises(ValueError, match="'linear' is not one of"):
        learning_rate(FitConfig(epochs=1, batch_size=8, lr=1e-3, seed=0, run_dir=Path("."), lr_schedule="linear"), 0, 10)


def test_an_interrupted_cosine_run_resumes_on_the_same_curve_to_the_same_weights(fashion_root, tmp_path, monkeypatch):
    """A run of --epochs 2 stopped after its first epoch's checkpoint, then resumed, equals the straight run:
    the schedule sets each step's rate from the step number, not from the learning rate saved in the checkpoint."""
    import json

    from safetensors import safe_open

    import training.loop

    cosine = ["--epochs", "2", "--iwae-k", "1", "--lr-schedule", "cosine", "--lr", "0.003", "--min-lr", "0.0001"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), resumed.mkdir()
    assert train(fashion_root, straight, *cosine)[0] == 0

    original = training.loop.save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # the run is killed right after epoch 1's checkpoint

    monkeypatch.setattr(training.loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(fashion_root, resumed, *cosine)
    monkeypatch.setattr(training.loop, "save_checkpoint", original)
    assert train(fashion_root, resumed, *cosine, "--resume")[0] == 0

    a, _ = load_model(straight / "vae.safetensors")
    b, _ = load_model(resumed / "vae.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.equal(vb), k
    with safe_open(str(resumed / "run-vae/checkpoint.safetensors"), framework="pt") as f:
        history = json.loads(f.metadata()["state"])["history"]
    # 231 training images at batch 64: 4 steps an epoch, 8 in all; epoch 1 ends at step 3 of 7 (history keeps 5 decimals)
    assert history[0]["train_last_lr"] == pytest.approx(1e-4 + (3e-3 - 1e-4) * (1 + math.cos(math.pi * 3 / 7)) / 2, abs=1e-5)
    assert history[1]["train_last_lr"] == pytest.approx(1e-4, abs=1e-6)


@pytest.mark.parametrize("flags", [["--min-lr", "0.1", "--lr", "0.01"], ["--lr", "0"], ["--min-lr=-1e-4"]])
def test_bad_learning_rates_are_one_clear_error(fashion_root, tmp_path, capsys, flags):
    code, _ = train(fashion_root, tmp_path, "--epochs", "1", "--lr-schedule", "cosine", *flags)
    err = capsys.readouterr().err
    assert code == 2 and "0 <= --min-lr <= --lr" in err and "Traceback" not in err


def test_stop_after_ends_early_without_touching_the_test_split_and_resumes_to_the_same_weights(fashion_root, tmp_path, capsys):
    cosine = ["--epochs", "2", "--iwae-k", "1", "--lr-schedule", "cosine", "--lr", "0.003"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), resumed.mkdir()
    assert train(fashion_root, straight, *cosine)[0] == 0
    capsys.readouterr()
    code, out = train(fashion_root, resumed, *cosine, "--stop-after", "1")
    assert code == 0 and "stopped after epoch 1 of 2: no test evaluation yet" in capsys.readouterr().out
    _, info = load_model(out)
    assert info.metrics["epoch"] == 1 and not any(k.startswith("test_") for k in info.metrics)
    assert train(fashion_root, resumed, *cosine, "--resume")[0] == 0
    a, _ = load_model(straight / "vae.safetensors")
    b, info = load_model(resumed / "vae.safetensors")
    assert info.metrics["epochs_trained"] == 2 and "test_neg_elbo" in info.metrics
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.equal(vb), k


@pytest.mark.parametrize("stop", ["0", "3"])
def test_stop_after_outside_the_run_is_one_clear_error(fashion_root, tmp_path, capsys, stop):
    code, _ = train(fashion_root, tmp_path, "--epochs", "2", "--stop-after", stop)
    assert code == 2 and f"--stop-after {stop} must be between 1 and --epochs 2" in capsys.readouterr().err
