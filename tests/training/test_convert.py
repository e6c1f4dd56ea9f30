"""`python -m training convert`: weight files stored in float16, with every metric measured again on
the stored weights, the prior's codebook digest following its converted VQ-VAE."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from app.registry import Registry
from models.io import load_model, round_to_storage, save_model
from models.vae import VAE, VAEConfig
from training.__main__ import main
from training.convert import changes, training_args
from training.data import load_dataset
from training.evaluate import nll_bound, reconstruction_quality
from training.prior import code_nats, encode_codes

from .conftest import TINY, train_tiny


@pytest.fixture
def trained(fashion_root, tmp_path):
    """A tiny VAE, VQ-VAE and class-conditional Gated PixelCNN prior trained on the miniature Fashion-MNIST."""
    return train_tiny(fashion_root, tmp_path)


def stored_dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_convert_to_float16_measures_again(trained, fashion_root, tmp_path):
    before = {p.stem: load_model(p) for p in trained.glob("*.safetensors")}
    size_before = {p.stem: p.stat().st_size for p in trained.glob("*.safetensors")}
    files = [str(trained / f) for f in ("vqvae_gated.safetensors", "vae.safetensors", "vqvae.safetensors")]
    assert main(["convert", "--dtype", "float16", "--threads", "1", *files]) == 0  # the prior first: reordered

    test = load_dataset("fashion-mnist", "test", root=fashion_root)
    for name, (old_model, old_info) in before.items():
        path = trained / f"{name}.safetensors"
        model, info = load_model(path)
        # floating tensors stored as F16 (the VQ-VAE's counters stay integers), the file about half as big
        assert "F32" not in stored_dtypes(path) and "F16" in stored_dtypes(path)
        assert path.stat().st_size < 0.6 * size_before[name]
        # what is loaded is the float32 model rounded to float16, computing in float32
        for (key, new), (_, old) in zip(model.state_dict().items(), old_model.state_dict().items()):
            assert new.dtype == old.dtype, key
            expect = old.to(torch.float16).to(old.dtype) if old.is_floating_point() else old
            assert torch.equal(new, expect), key
        assert info.metrics["weights_dtype"] == "float16"
        assert info.command.startswith(old_info.command + " && python -m training convert --dtype float16 ")
        assert info.metrics["best_epoch"] == old_info.metrics["best_epoch"]  # history stays as trained

    # each number measured again on the stored weights, with the run's own settings
    vae, info = load_model(trained / "vae.safetensors")
    assert info.metrics["test_bits_per_dim"] == pytest.approx(nll_bound(vae, test, k=4)["bits_per_dim"], rel=1e-12)
    vq, vq_info = load_model(trained / "vqvae.safetensors")
    assert vq_info.metrics["test_mse"] == pytest.approx(reconstruction_quality(vq, test)["mse"], rel=1e-12)
    prior, p_info = load_model(trained / "vqvae_gated.safetensors")
    codes = encode_codes(vq, test)  # the codes of the converted VQ-VAE
    given = code_nats(prior, codes, test.labels)["given"].mean().item() / (codes[0].numel() * math.log(2))
    assert p_info.metrics["test_bits_per_code"] == pytest.approx(given, rel=1e-12)
    # the prior names the converted codebook, so the service pairs them
    assert p_info.extra["codebook_sha256"] == vq.codebook_digest() != before["vqvae"][0].codebook_digest()
    registry = Registry.load(trained, torch.device("cpu"))
    assert set(registry.entries["vqvae"].priors) == {"gated"} and not registry.problems


def test_a_vqvae_is_not_converted_without_its_priors(trained, capsys):
    """Its priors name its codebook by digest: converted alone, it would orphan them."""
    before = (trained / "vqvae.safetensors").read_bytes()
    assert main(["convert", "--dtype", "float16", str(trained / "vqvae.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "together with its priors" in err and "vqvae_gated.safetensors" in err
    assert (trained / "vqvae.safetensors").read_bytes() == before


def test_a_file_stopped_early_gets_no_test_metrics(fashion_root, tmp_path):
    """--stop-after ends a run before its test evaluation; converting it must not touch the test split either."""
    out = tmp_path / "vae.safetensors"
    assert main(["vae", "--arch", "mlp", "--hidden-dims", "8", "--latent-dim", "2", "--epochs", "3", "--stop-after", "1",
                 "--data-root", str(fashion_root), "--out", str(out), "--run-dir", str(tmp_path / "r"), *TINY]) == 0
    assert not any(k.startswith("test_") for k in load_model(out)[1].metrics)
    assert main(["convert", "--dtype", "float16", "--data", "fashion-mnist", "--data-root", str(fashion_root), str(out)]) == 0
    _, info = load_model(out)
    assert not any(k.startswith("test_") for k in info.metrics) and "val_neg_elbo" in info.metrics
    assert f"convert --dtype float16 --data fashion-mnist --data-root {fashion_root} {out}" in info.command


def test_a_file_that_cannot_be_measured_is_left_alone(tmp_path, capsys):
    path = tmp_path / "hand.safetensors"
    save_model(path, VAE(VAEConfig(image_size=8, latent_dim=2, hidden_dims=(4,))), name="hand", dataset="d",
               command="made by hand")
    data = path.read_bytes()
    assert main(["convert", "--dtype", "float16", str(path)]) == 1
    assert "names no training run" in capsys.readouterr().err and path.read_bytes() == data


def test_round_to_storage_refuses_values_out_of_range():
    model = VAE(VAEConfig(image_size=8, latent_dim=2, hidden_dims=(4,)))
    with torch.no_grad():
        next(model.parameters())[0, 0] = 1e5  # float16's largest is 65504
    with pytest.raises(ValueError, match="beyond torch.float16's largest value"):
        round_to_storage(model, torch.float16)
    small = VAE(VAEConfig(image_size=8, latent_dim=2, hidden_dims=(4,)))
    with torch.no_grad():
        next(small.parameters())[0, :2] = torch.tensor([1e-9, 0.0])
    counts = round_to_storage(small, torch.float16)
    assert counts["flushed_to_zero"] == 1 and counts["values"] == sum(p.numel() for p in small.parameters()) + sum(
        b.numel() for b in small.buffers() if b.is_floating_point())


def test_training_args_reads_the_last_training_invocation():
    chain = ("python -m training vqvae --epochs 3 --lr 5e-4 && python -m training vqvae --epochs 6 --lr 5e-4 --resume"
             " && python -m training convert --dtype float16 weights/vqvae.safetensors")
    args = training_args(chain)
    assert args.family == "vqvae" and args.epochs == 6 and args.resume
    with pytest.raises(ValueError, match="names no training run"):
        training_args("python -m training convert --dtype float16 x.safetensors")
    with pytest.raises(ValueError, match="no longer parses"):
        training_args("python -m training vae --no-such-flag")


def test_changes_lists_numbers_that_moved():
    lines = changes({"a": 1.0, "b": 2.0, "s": "x", "flag": True}, {"a": 1.5, "b": 2.0, "s": "y", "flag": False, "c": 3})
    assert lines == ["  a: 1 -> 1.5 (+0.5)", "  c: (none) -> 3"]

