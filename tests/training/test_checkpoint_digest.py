"""A checkpoint carries a digest: a corrupted, truncated or edited one is refused by name, never resumed from."""

import json
import logging
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.__main__ import main
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

STATE = {"epoch": 3, "best": 1.25, "best_epoch": 2, "history": [{"epoch": 1, "val_loss": 2.0}]}


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A 64x64 linear layer after two Adam steps, so the optimizer has state."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def checkpoint(tmp_path):
    model, optimizer = trained()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, STATE)
    return path, model, optimizer


def data_start(path) -> int:
    """Where the tensor bytes begin: after the 8-byte header length and the header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_an_untouched_checkpoint_restores_model_optimizer_rng_and_state(checkpoint):
    path, model, optimizer = checkpoint
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    save_checkpoint(path, model, optimizer, STATE)  # saves the RNG state right after seeding 123
    fresh, fresh_opt = trained(seed=1)
    torch.manual_seed(999)
    assert load_checkpoint(path, fresh, fresh_opt) == STATE
    assert torch.equal(torch.rand(3), expected_draw)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    saved, restored = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert torch.equal(saved[0]["exp_avg"], restored[0]["exp_avg"]) and float(restored[0]["step"]) == 2.0
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()["sha256"]) == 64


@pytest.mark.parametrize("corrupt", ["zeros_in_the_middle", "0x7f_bytes", "metadata_edit"])
def test_corrupted_checkpoints_are_refused_naming_the_file(checkpoint, corrupt):
    path, _, _ = checkpoint
    start, size = data_start(path), path.stat().st_size
    if corrupt == "zeros_in_the_middle":
        overwrite(path, (start + size) // 2, bytes(1024))
    elif corrupt == "0x7f_bytes":  # 0x7f7f7f7f is a finite float (3.4e38): only the digest can tell
        overwrite(path, start + 256, b"\x7f" * 64)
    else:  # the JSON state edited in place: a later epoch, same length
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        meta["state"] = json.dumps({**STATE, "epoch": 9})
        save_file(tensors, str(path), metadata=meta)
    model, optimizer = trained(seed=1)
    before = model.weight.clone()
    with pytest.raises(CheckpointError, match=f"checkpoint {path} fails its checksum.*delete it.*without --resume"):
        load_checkpoint(path, model, optimizer)
    assert torch.equal(model.weight, before)  # nothing was restored


@pytest.mark.parametrize("cut", [0.5, 0.99, 0.0])
def test_truncated_or_empty_checkpoint_is_one_clear_error(checkpoint, cut):
    path, _, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is unreadable, truncated or corrupted .*without --resume"):
        load_checkpoint(path, *trained())


def test_non_finite_tensors_are_refused_even_with_a_valid_digest(tmp_path):
    model, optimizer = trained()
    with torch.no_grad():
        model.bias[5] = float("nan")
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model, optimizer, STATE)
    with pytest.raises(CheckpointError, match="tensor 'model.bias' holds NaN or infinity"):
        load_checkpoint(path, *trained())


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, *trained(), STATE)
    other = torch.nn.Linear(64, 32)
    with pytest.raises(CheckpointError, match="does not fit this model and optimizer"):
        load_checkpoint(path, other, torch.optim.Adam(other.parameters()))


def test_a_checkpoint_from_before_the_digest_loads_with_a_warning(checkpoint, caplog):
    path, model, _ = checkpoint
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["sha256"]
    save_file(tensors, str(path), metadata=meta)
    fresh, fresh_opt = trained(seed=1)
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        assert load_checkpoint(path, fresh, fresh_opt) == STATE
    assert torch.equal(fresh.weight, model.weight)
    assert f"checkpoint {path} has no digest" in caplog.text and "cannot be verified" in caplog.text


def test_the_cli_reports_a_corrupted_checkpoint_as_one_line(fashion_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoint.safetensors"
    save_checkpoint(path, *trained(), STATE)
    overwrite(path, data_start(path) + 128, b"\x7f" * 16)
    argv = ["vae", "--data-root", str(fashion_root), "--arch", "mlp", "--hidden-dims", "8", "--latent-dim", "2",
            "--out", str(tmp_path / "vae.safetensors"), "--run-dir", str(run_dir), "--epochs", "2", "--resume",
            "--quiet", "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {path} fails its checksum" in err and "Traceback" not in err
    assert not (tmp_path / "vae.safetensors").exists()  # nothing was trained
