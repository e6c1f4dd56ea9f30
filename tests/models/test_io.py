import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from models.io import MAX_CLASS_NAME_CHARS, MAX_CLASS_NAMES, WeightFileError, load_model, read_metadata, save_model
from models.vae import VAE, VAEConfig


def save_tiny(path, **config):
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(16, 8), channels=(4, 8), fc_dim=8, **config)).eval()
    save_model(path, model, name="tiny", dataset="unit-test", command="pytest", metrics={"test_neg_elbo": 1.5})
    return model


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model = save_tiny(tmp_path / "m.safetensors", arch="conv")
    loaded, info = load_model(tmp_path / "m.safetensors")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    assert loaded.config == model.config and isinstance(loaded.config.channels, tuple)
    assert (info.kind, info.name, info.dataset, info.command) == ("vae", "tiny", "unit-test", "pytest")
    assert info.image_shape == (1, 28, 28) and info.metrics == {"test_neg_elbo": 1.5}
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["format_version"] == "1" and json.loads(meta["config"])["arch"] == "conv"
    assert not loaded.training


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(["mlp", "conv"]), latent=st.integers(1, 8), channels=st.sampled_from([1, 3]),
       size=st.sampled_from([28, 32]), fc=st.integers(2, 12))
def test_round_trip_over_random_configs(tmp_path_factory, arch, latent, channels, size, fc):
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"
    model = VAE(VAEConfig(arch=arch, latent_dim=latent, in_channels=channels, image_size=size,
                          hidden_dims=(fc, fc), channels=(2, 3), fc_dim=fc)).eval()
    save_model(path, model, name="x", dataset="d", command="c")
    loaded, _ = load_model(path)
    z = torch.randn(2, latent)
    assert loaded.config == model.config
    assert torch.equal(model.sample(2, z=z), loaded.sample(2, z=z))


def _rewrite(path, out, change_tensors=None, change_meta=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(out), metadata=meta)


def test_tampered_tensor_is_refused_with_the_file_name(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "tampered.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_tensors=lambda t: t["fc_mu.bias"].add_(0.01))
    with pytest.raises(WeightFileError, match="tampered.safetensors.*checksum"):
        load_model(bad)


def test_wrong_shape_is_refused_naming_the_key(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "wrong.safetensors"

    def change_meta(meta):  # a config that no longer matches the tensors
        config = json.loads(meta["config"])
        config["latent_dim"] = 5
        meta["config"] = json.dumps(config)

    _rewrite(tmp_path / "m.safetensors", bad, change_meta=change_meta)
    with pytest.raises(WeightFileError, match=r"wrong.safetensors: tensor 'decoder.0.weight' has shape \(8, 3\), the config needs \(8, 5\)"):
        load_model(bad)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    from models.io import tensors_digest

    def drop(t):
        del t["fc_mu.bias"]
        t["extra.weight"] = torch.zeros(1)

    bad = tmp_path / "keys.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_tensors=drop)
    # make the checksum agree so the key check itself is exercised
    with safe_open(str(bad), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["sha256"] = tensors_digest(tensors)
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(WeightFileError, match=r"missing \['fc_mu.bias'\] unexpected \['extra.weight'\]"):
        load_model(bad)


@pytest.mark.parametrize("content,match", [
    (b"", "not a readable safetensors file"),
    (b"\x00" * 64, "not a readable safetensors file"),
])
def test_corrupt_files_are_refused(tmp_path, content, match):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match=f"corrupt.safetensors: {match}"):
        load_model(path)


def test_truncated_file_is_refused(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_metadata_errors(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    with pytest.raises(WeightFileError, match="no such weight file"):
        load_model(tmp_path / "absent.safetensors")
    for key, value, match in [("format_version", "9", "format_version '9'"), ("kind", "gan", "unknown model kind 'gan'"),
                              ("config", '{"arch": "mlp", "colour": 1}', "unknown config keys \\['colour'\\]"),
                              ("metrics", "{not json", "'metrics' is not valid JSON")]:
        bad = tmp_path / f"bad_{key}.safetensors"
        _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__(key, value))
        with pytest.raises(WeightFileError, match=match):
            load_model(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(WeightFileError, match="metadata lacks"):
        load_model(plain)


def test_no_pickle_in_the_file(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    assert b"\x80\x04" not in (tmp_path / "m.safetensors").read_bytes()[:8]
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert all(isinstance(v, str) for v in f.metadata().values())


def test_weight_file_is_world_readable_and_written_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tiny(path)
    assert path.stat().st_mode & 0o777 == 0o644  # a service running as another user can read it
    assert not list(tmp_path.glob("*.tmp"))


def test_class_names_round_trip_as_a_tuple(tmp_path):
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(8,))).eval()
    names = ("T-shirt/top", "Trouser", "Ankle boot")
    save_model(tmp_path / "m.safetensors", model, name="m", dataset="d", command="c", class_names=list(names))
    _, info = load_model(tmp_path / "m.safetensors")
    assert info.class_names == names and isinstance(info.class_names, tuple)
    assert json.loads(read_metadata(tmp_path / "m.safetensors")["class_names"]) == list(names)
    save_model(tmp_path / "plain.safetensors", model, name="p", dataset="d", command="c")
    assert load_model(tmp_path / "plain.safetensors")[1].class_names == ()
    with pytest.raises(TypeError, match="class_names"):
        save_model(tmp_path / "s.safetensors", model, name="s", dataset="d", command="c", class_names="abc")
    with pytest.raises(TypeError, match="class_names"):
        save_model(tmp_path / "s.safetensors", model, name="s", dataset="d", command="c", class_names=["a", 1])


def test_files_without_class_names_load_with_none(tmp_path):
    model = save_tiny(tmp_path / "m.safetensors")
    old = tmp_path / "old.safetensors"  # as written before the key existed
    _rewrite(tmp_path / "m.safetensors", old, change_meta=lambda m: m.pop("class_names"))
    assert "class_names" not in read_metadata(old)
    loaded, info = load_model(old)
    x = torch.rand(2, 1, 28, 28)
    assert info.class_names == () and torch.equal(loaded.reconstruct(x), model.reconstruct(x))


def test_shipped_weight_files_still_load():
    shipped = sorted((Path(__file__).resolve().parents[2] / "weights").glob("*.safetensors"))
    if not shipped:
        pytest.skip("no shipped weight files")
    for path in shipped:
        _, info = load_model(path)
        recorded = read_metadata(path).get("class_names")
        assert info.class_names == (() if recorded is None else tuple(json.loads(recorded))), path.name


@pytest.mark.parametrize("value", ['{"0": "cat"}', '["cat", 2]', '"cat"', "null", "[cat]"])
def test_malformed_class_names_are_refused_naming_the_file_and_key(tmp_path, value):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__("class_names", value))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: metadata key 'class_names'"):
        load_model(bad)


def test_a_huge_malformed_class_names_value_is_shortened_in_the_error(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    ints = json.dumps(list(range(10**5)))  # 588 kB
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__("class_names", ints))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: metadata key 'class_names' .* \[0, 1, 2, .*\.\.\.\]") as info:
        load_model(bad)
    assert len(str(info.value)) < 300 + len(str(bad))


@pytest.mark.parametrize("names, problem", [
    (["n%d" % i for i in range(MAX_CLASS_NAMES + 1)], f"{MAX_CLASS_NAMES + 1} names, more than the {MAX_CLASS_NAMES}"),
    (["cat", "x" * (MAX_CLASS_NAME_CHARS + 1)], f"name 1 .* has {MAX_CLASS_NAME_CHARS + 1} characters, more than the"),
])
def test_class_names_are_capped_on_save_and_on_load(tmp_path, names, problem):
    model = save_tiny(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"class_names: {problem}"):
        save_model(tmp_path / "s.safetensors", model, name="s", dataset="d", command="c", class_names=names)
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__("class_names", json.dumps(names)))
    with pytest.raises(WeightFileError, match=rf"bad\.safetensors: metadata key 'class_names': {problem}") as info:
        load_model(bad)
    assert len(str(info.value)) < 200 + len(str(bad))
    at_cap = names[:MAX_CLASS_NAMES] if len(names) > MAX_CLASS_NAMES else ["cat", "x" * MAX_CLASS_NAME_CHARS]
    save_model(tmp_path / "ok.safetensors", model, name="ok", dataset="d", command="c", class_names=at_cap)
    assert load_model(tmp_path / "ok.safetensors")[1].class_names == tuple(at_cap)
