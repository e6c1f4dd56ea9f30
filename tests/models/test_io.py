import json
import os
import shutil
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
    assert meta["format_version"] == "2" and json.loads(meta["config"])["arch"] == "conv"
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
    old = tmp_path / "old.safetensors"  # as written before the key existed (format_version 1)
    _rewrite(tmp_path / "m.safetensors", old, change_meta=lambda m: (m.pop("class_names"), m.update(format_version="1")))
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


# --- untrusted files: bounded before allocation, header checked before reading (issue 19, item 7) ---

import struct  # noqa: E402
import time  # noqa: E402

import models.io  # noqa: E402
from models.io import (  # noqa: E402
    MAX_COMMAND_CHARS, MAX_DATASET_CHARS, MAX_HEADER_BYTES, MAX_JSON_CHARS, MAX_LATENT_DIM, MAX_MODULES, MAX_PARAMETERS,
    tensors_digest,
)
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig  # noqa: E402
from models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig  # noqa: E402
from models.vqvae import VQVAE, VQVAEConfig  # noqa: E402

TINY_PRIOR = dict(codebook_size=16, code_shape=(2, 2), hidden_channels=8, n_layers=1)


def _rewrite_signed(path, out, change_tensors=None, change_meta=None):
    """`_rewrite`, with the digest recomputed: only the checks after the checksum can refuse the file."""
    def sign(meta):
        if change_meta:
            change_meta(meta)
    _rewrite(path, out, change_tensors, sign)
    with safe_open(str(out), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["sha256"] = tensors_digest(tensors)
    save_file(tensors, str(out), metadata=meta)


def _set_config(**changes):
    def change(meta):
        meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    return change


def _only_meta_builds(monkeypatch):
    """From now on, fail the test the moment a model is built anywhere but on the meta device."""
    for cls in (VAE, PixelCNN):
        original = cls.__init__

        def guarded(self, config, _original=original):
            device = torch.get_default_device()
            assert device.type == "meta", f"{type(self).__name__} built on {device} before its size was checked"
            _original(self, config)

        monkeypatch.setattr(cls, "__init__", guarded)


def test_a_config_of_800_million_parameters_is_refused_before_allocating(tmp_path, monkeypatch):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "huge.safetensors"  # the review's 1.5 kB file: 3.9 GB and 6.4 s before it was refused
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=_set_config(hidden_dims=[20000, 20000]))
    _only_meta_builds(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(WeightFileError, match=r"huge\.safetensors: its config makes 831,620,790 parameters and buffers, "
                       f"more than the {MAX_PARAMETERS:,} allowed"):
        load_model(bad)
    assert time.perf_counter() - start < 1.0


def test_a_config_of_a_million_layers_is_refused_while_building_it(tmp_path, monkeypatch):
    save_model(tmp_path / "p.safetensors", PixelCNN(PixelCNNConfig(**TINY_PRIOR)), name="p", dataset="d", command="c",
               image_shape=(1, 8, 8))
    bad = tmp_path / "deep.safetensors"
    _rewrite(tmp_path / "p.safetensors", bad, change_meta=_set_config(n_layers=10**6))
    _only_meta_builds(monkeypatch)
    built = []  # modules constructed: the refusal comes while building, not after a million layers
    real_init = torch.nn.Module.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting)
    with pytest.raises(WeightFileError, match=f"deep.safetensors: its config builds more than {MAX_MODULES} modules"):
        load_model(bad)
    assert len(built) <= 2 * MAX_MODULES, len(built)


@pytest.mark.parametrize("kind, config", [
    ("vae", VAEConfig(latent_dim=3, hidden_dims=(16, 8))),
    ("vae", VAEConfig(arch="conv", latent_dim=3, channels=(4, 8), fc_dim=8, refine_layers=1, likelihood="logistic", num_mixtures=2)),
    ("vae", VAEConfig(arch="conv", in_channels=3, image_size=8, latent_dim=3, channels=(4, 8), fc_dim=8,
                      decoder="autoregressive", ar_channels=4, ar_kernel=3, ar_layers=2)),
    ("vqvae", VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1, codebook_size=16, embedding_dim=4)),
    ("vqvae", VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, codebook_size=16, embedding_dim=4, ema=False, init="uniform")),
    ("pixelcnn", PixelCNNConfig(**TINY_PRIOR, first_kernel_size=3)),
    ("gated_pixelcnn", GatedPixelCNNConfig(**TINY_PRIOR, first_kernel_size=3, num_classes=3)),
    ("pixelcnnpp", PixelCNNppConfig(**TINY_PRIOR, n_scales=2, num_classes=2)),
])
def test_the_meta_device_build_has_the_real_models_tensors(kind, config):
    cls = models.io.KINDS[kind]
    meta, real = models.io._build_on_meta(Path("x"), cls, config), cls(config)
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == {k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    count = lambda m: sum(t.numel() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert count(meta) == count(real) > 0


class _NoDataReads:
    """safe_open, but reading any tensor's data fails the test."""

    def __init__(self, *args, **kwargs):
        self._real = safe_open(*args, **kwargs)

    def __enter__(self):
        self._f = self._real.__enter__()
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def get_tensor(self, key):
        raise AssertionError(f"tensor {key!r} read before the header was checked")


def _add_sparse_tensor(path, key, nbytes):
    """Append a tensor `key` of `nbytes` zero bytes to a safetensors file, as a hole: no disk, no writing."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    header[key] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [len(body), len(body) + nbytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    os.truncate(path, 8 + len(text) + len(body) + nbytes)


@pytest.mark.parametrize("problem", ["extra_1GiB_tensor", "wrong_shape", "wrong_dtype"])
def test_tensor_names_shapes_and_dtypes_are_checked_from_the_header_before_any_data_is_read(tmp_path, monkeypatch, problem):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    if problem == "extra_1GiB_tensor":  # peaked at 2.8 GB before: every tensor was read and hashed first
        shutil.copy(tmp_path / "m.safetensors", bad)
        _add_sparse_tensor(bad, "huge", 2**30)
        match = r"bad\.safetensors: tensors missing \[\] unexpected \['huge'\]"
    elif problem == "wrong_shape":
        _rewrite(tmp_path / "m.safetensors", bad, change_meta=_set_config(latent_dim=5))
        match = r"tensor 'decoder.0.weight' has shape \(8, 3\), the config needs \(8, 5\)"
    else:
        _rewrite_signed(tmp_path / "m.safetensors", bad, change_tensors=lambda t: t.__setitem__("fc_mu.bias", t["fc_mu.bias"].long()))
        match = r"tensor 'fc_mu.bias' has dtype I64, the model holds torch.float32 there \(allowed: BF16, F16, F32, F64\)"
    monkeypatch.setattr(models.io, "safe_open", _NoDataReads)
    with pytest.raises(WeightFileError, match=match):
        load_model(bad)


def test_a_float16_file_loads_into_the_float32_model(tmp_path):
    model = save_tiny(tmp_path / "m.safetensors")
    half = tmp_path / "half.safetensors"
    _rewrite_signed(tmp_path / "m.safetensors", half, change_tensors=lambda t: t.update({k: v.half() for k, v in t.items()}))
    loaded, _ = load_model(half)
    assert loaded.fc_mu.weight.dtype == torch.float32
    assert torch.equal(loaded.fc_mu.weight, model.fc_mu.weight.half().float())


@pytest.mark.parametrize("key, value", [("fc_mu.bias", float("nan")), ("decoder.0.weight", float("inf")), ("fc_logvar.weight", -float("inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, key, value):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "nan.safetensors"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = value

    _rewrite_signed(tmp_path / "m.safetensors", bad, change_tensors=poison)
    with pytest.raises(WeightFileError, match=rf"nan\.safetensors: tensor '{key}' holds non-finite values \(NaN or infinity\)"):
        load_model(bad)


def test_a_float64_value_that_overflows_float32_is_refused(tmp_path):
    # 1e300 is finite as float64, and infinity in the float32 model that load_state_dict casts it into
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "f64.safetensors"

    def widen(tensors):
        tensors["fc_mu.bias"] = tensors["fc_mu.bias"].double()
        tensors["fc_mu.bias"][0] = 1e300

    _rewrite_signed(tmp_path / "m.safetensors", bad, change_tensors=widen)
    with pytest.raises(WeightFileError, match=r"tensor 'fc_mu.bias' holds non-finite values"):
        load_model(bad)


BIG_OBJECT = json.dumps({f"k{i}": i for i in range(MAX_JSON_CHARS // 10)})  # ~ 90 kB


@pytest.mark.parametrize("key, value, problem", [
    ("name", "a b", r"'name' 'a b' is not a short identifier"),
    ("name", "../vae", r"'name' '../vae' is not a short identifier"),
    ("name", "", r"'name' '' is not a short identifier"),
    ("name", "x" * 65, r"'name' 'xxxxxxxxxxxx\.\.\.xxxxxxxxxxxxx' is not a short identifier"),
    ("dataset", "d" * (MAX_DATASET_CHARS + 1), f"'dataset' has {MAX_DATASET_CHARS + 1} characters, more than the {MAX_DATASET_CHARS}"),
    ("dataset", "d" * 4_000_000, f"'dataset' has 4000000 characters, more than the {MAX_DATASET_CHARS}"),
    ("command", "c" * (MAX_COMMAND_CHARS + 1), f"'command' has {MAX_COMMAND_CHARS + 1} characters, more than the"),
    ("metrics", "[]", r"'metrics' must be a JSON object, got \[\]"),
    ("metrics", '"fine"', r"'metrics' must be a JSON object, got 'fine'"),
    ("metrics", '{"test_neg_elbo": NaN}', r"'metrics' is not valid JSON \(it holds NaN; only finite numbers"),
    ("metrics", '{"test_neg_elbo": 1e999}', r"'metrics' is not valid JSON \(the number '1e999' is out of a float's range"),
    ("metrics", BIG_OBJECT, f"'metrics' has {len(BIG_OBJECT)} characters, more than the {MAX_JSON_CHARS}"),
    ("extra", "[]", r"'extra' must be a JSON object, got \[\]"),
    ("extra", BIG_OBJECT, f"'extra' has {len(BIG_OBJECT)} characters, more than the {MAX_JSON_CHARS}"),
    ("config", "[]", r"'config' must be a JSON object, got \[\]"),
    ("image_shape", "[1, 28]", r"'image_shape' must be \[C, H, W\], three positive ints, got \[1, 28\]"),
    ("image_shape", "[1, 28, 28.0]", r"'image_shape' must be \[C, H, W\]"),
    ("image_shape", "[true, 28, 28]", r"'image_shape' must be \[C, H, W\]"),
    ("image_shape", "[1, -28, 28]", r"'image_shape' must be \[C, H, W\]"),
    ("image_shape", "[3, 300, 300]", r"'image_shape' \[3, 300, 300\] is 270000 values per image, more than the 196608"),
])
def test_every_metadata_field_is_type_checked_and_capped(tmp_path, key, value, problem):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__(key, value))
    start = time.perf_counter()
    with pytest.raises(WeightFileError, match=rf"bad\.safetensors: metadata key {problem}") as info:
        load_model(bad)
    assert len(str(info.value)) < 300 + len(str(bad))  # never the value itself
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("change, problem", [
    (_set_config(latent_dim=4097), "latent_dim 4097 is more than the 4096 allowed"),
    (_set_config(image_size=1024), r"image_shape \[1, 28, 28\] disagrees with the config's \(1, 1024, 1024\)"),
])
def test_a_vae_config_beyond_the_caps_is_refused(tmp_path, change, problem):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=change)
    with pytest.raises(WeightFileError, match=problem):
        load_model(bad)


def test_a_prior_code_grid_over_64_a_side_is_refused(tmp_path):
    save_model(tmp_path / "p.safetensors", PixelCNN(PixelCNNConfig(**TINY_PRIOR)), name="p", dataset="d", command="c",
               image_shape=(1, 8, 8))
    bad = tmp_path / "grid.safetensors"
    _rewrite(tmp_path / "p.safetensors", bad, change_meta=_set_config(code_shape=[65, 2]))
    with pytest.raises(WeightFileError, match=r"grid\.safetensors: code_shape \(65, 2\) has a side over the 64 allowed"):
        load_model(bad)
    _rewrite(tmp_path / "p.safetensors", tmp_path / "ok.safetensors", change_meta=_set_config(code_shape=[64, 64]))
    assert load_model(tmp_path / "ok.safetensors")[0].config.code_shape == (64, 64)


def test_the_header_is_bounded_before_it_is_parsed(tmp_path):
    claims = tmp_path / "claims.safetensors"  # the first 8 bytes say 1 TiB of header
    claims.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(WeightFileError, match=rf"claims\.safetensors: its safetensors header claims {2**40} bytes, "
                       f"more than the {MAX_HEADER_BYTES} allowed"):
        load_model(claims)
    save_tiny(tmp_path / "m.safetensors")
    padded = tmp_path / "padded.safetensors"  # a real header of 9 MB, in a key nobody reads
    _rewrite(tmp_path / "m.safetensors", padded, change_meta=lambda m: m.__setitem__("padding", "x" * (MAX_HEADER_BYTES + 1)))
    with pytest.raises(WeightFileError, match=r"padded\.safetensors: its safetensors header claims \d+ bytes, more than"):
        read_metadata(padded)


@pytest.mark.parametrize("kwargs, problem", [
    (dict(name="my model"), "'name' 'my model' is not a short identifier"),
    (dict(metrics={"loss": float("nan")}), "'metrics' is not valid JSON"),
    (dict(dataset="d" * (MAX_DATASET_CHARS + 1)), "'dataset' has"),
    (dict(extra={"pad": "x" * MAX_JSON_CHARS}), "'extra' has"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, kwargs, problem):
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(8,))).eval()
    args = {"name": "m", "dataset": "d", "command": "c", **kwargs}
    with pytest.raises(WeightFileError, match=f"m.safetensors: metadata key {problem}"):
        save_model(tmp_path / "m.safetensors", model, **args)
    assert not list(tmp_path.iterdir())  # nothing written


def test_save_refuses_a_model_over_the_caps_so_training_fails_at_its_first_save(tmp_path):
    model = VAE(VAEConfig(latent_dim=MAX_LATENT_DIM + 1, hidden_dims=(2,))).eval()
    with pytest.raises(WeightFileError, match=f"m.safetensors: latent_dim {MAX_LATENT_DIM + 1} is more than the"):
        save_model(tmp_path / "m.safetensors", model, name="m", dataset="d", command="c")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model", [
    lambda: VAE(VAEConfig(arch="conv", image_size=8, latent_dim=4, channels=(4, 8), fc_dim=16, decoder="autoregressive",
                          ar_channels=4, ar_kernel=3, ar_layers=2, likelihood="logistic", num_mixtures=2)),
    lambda: PixelCNN(PixelCNNConfig(**TINY_PRIOR)),
    lambda: GatedPixelCNN(GatedPixelCNNConfig(**TINY_PRIOR, num_classes=3)),
    lambda: PixelCNNpp(PixelCNNppConfig(**{**TINY_PRIOR, "n_scales": 1})),
    lambda: VQVAE(VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1, codebook_size=16,
                              embedding_dim=4, init="uniform")),
], ids=["vae_ar", "pixelcnn", "gated", "pixelcnnpp", "vqvae"])
def test_a_loaded_model_has_every_tensor_of_the_saved_one(tmp_path, model):
    """load_model builds the model without random initialisation (the file overwrites every parameter and
    persistent buffer): what the file does not hold, the non-persistent buffers such as the masked
    convolutions' masks, must still be the model's own, and nothing may stay uninitialised."""
    torch.manual_seed(0)
    saved = model().eval()
    save_model(tmp_path / "m.safetensors", saved, name="m", dataset="d", command="c", image_shape=(1, 8, 8))
    loaded, _ = load_model(tmp_path / "m.safetensors")
    expected = {**dict(saved.named_parameters()), **dict(saved.named_buffers())}
    got = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])]
    if isinstance(saved, (PixelCNN, VAE)):  # the case this is for: masked convolutions' masks are not in the file
        assert any(k.endswith("mask") for k in expected)


# --- an honest format: every key required, older versions migrated in one place (issue 23) ---

import dataclasses  # noqa: E402
import itertools  # noqa: E402

from models.io import (  # noqa: E402
    FORMAT_KEYS, FORMAT_VERSION, KINDS, MIGRATIONS, READ_VERSIONS, V1_CONFIG_ADDITIONS, migrate_metadata,
)

# The config keys of each kind in a file of format_version 2. A field added to (or removed from) a
# config class changes what a file holds: files written before it lack the key, and are refused. Bump
# FORMAT_VERSION, add a migration (models/io.py MIGRATIONS) that gives the older files the value that
# reproduces what they computed, with its test, and record the new version's keys here.
FORMAT_2_CONFIG_KEYS = {
    "vae": ["arch", "in_channels", "image_size", "latent_dim", "hidden_dims", "channels", "fc_dim", "refine_layers",
            "decoder", "ar_channels", "ar_kernel", "ar_layers", "likelihood", "num_mixtures", "use_latent",
            "reconstruct_seed", "mean_mse_weight"],
    "vqvae": ["in_channels", "image_size", "hidden_channels", "res_channels", "n_res_blocks", "codebook_size",
              "embedding_dim", "beta", "ema", "ema_decay", "ema_epsilon", "init", "kmeans_iters", "dead_code_steps",
              "likelihood", "num_mixtures", "mean_mse_weight"],
    "pixelcnn": ["codebook_size", "code_shape", "num_classes", "hidden_channels", "n_layers", "first_kernel_size",
                 "kernel_size"],
    "gated_pixelcnn": ["codebook_size", "code_shape", "num_classes", "hidden_channels", "n_layers",
                       "first_kernel_size", "kernel_size"],
    "pixelcnnpp": ["codebook_size", "code_shape", "num_classes", "hidden_channels", "n_layers", "n_scales", "dropout"],
}
TINY_VQVAE = dict(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1, codebook_size=16, embedding_dim=4,
                  init="uniform")


def test_config_classes_have_the_keys_of_the_current_format_version():
    assert FORMAT_VERSION == "2", "a new format version: record its config keys in FORMAT_<version>_CONFIG_KEYS"
    for kind, cls in KINDS.items():
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        recorded = FORMAT_2_CONFIG_KEYS[kind]
        added, removed = sorted(set(fields) - set(recorded)), sorted(set(recorded) - set(fields))
        assert not added and not removed, (
            f"{cls.config_class.__name__} gained {added} and lost {removed} since format_version 2: files of that "
            "version would be refused. Bump FORMAT_VERSION and add a migration in models/io.py MIGRATIONS, with a test"
        )


def test_save_writes_every_key_of_the_current_format_and_of_the_config(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    meta = read_metadata(tmp_path / "m.safetensors")
    assert sorted(meta) == sorted(FORMAT_KEYS) and meta["format_version"] == FORMAT_VERSION
    assert sorted(json.loads(meta["config"])) == sorted(FORMAT_2_CONFIG_KEYS["vae"])


@pytest.mark.parametrize("key", ["latent_dim", "likelihood", "hidden_dims"])
def test_a_config_lacking_a_key_is_refused_naming_the_file_and_the_key(tmp_path, key):
    """Never the field's default: that is how a file silently computes something else than it was trained to."""
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__(
        "config", json.dumps({k: v for k, v in json.loads(m["config"]).items() if k != key})))
    with pytest.raises(WeightFileError, match=rf"bad\.safetensors: config lacks keys \['{key}'\] of VAEConfig"):
        load_model(bad)


def test_a_config_with_a_key_the_class_does_not_know_is_refused_naming_the_file_and_the_key(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=_set_config(legacy=True))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: unknown config keys \['legacy'\] for VAEConfig"):
        load_model(bad)


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.pop("class_names"), r"metadata lacks \['class_names'\]"),
    (lambda m: m.pop("extra"), r"metadata lacks \['extra'\]"),
    (lambda m: m.__setitem__("colour", "1"), r"unknown metadata keys \['colour'\]"),
])
def test_metadata_lacking_a_key_or_with_an_unknown_one_is_refused_naming_the_file_and_the_key(tmp_path, change, problem):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=change)
    with pytest.raises(WeightFileError, match=rf"bad\.safetensors: {problem}"):
        load_model(bad)


@pytest.mark.parametrize("version", ["3", "0", "", "1.0", "x" * 10_000])
def test_a_format_version_this_code_does_not_read_is_refused_naming_those_it_reads(tmp_path, version):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: m.__setitem__("format_version", version))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: format_version .* is not one this code reads "
                                              r"\('1', '2'; the older migrated on load\)") as info:
        read_metadata(bad)
    assert len(str(info.value)) < 400  # a huge value is shortened
    assert READ_VERSIONS == ("1", "2")


def test_migrations_lead_from_every_older_version_to_the_current_one(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    current = read_metadata(tmp_path / "m.safetensors")
    versions = [*MIGRATIONS, FORMAT_VERSION]
    assert versions == sorted(versions, key=int) and FORMAT_VERSION not in MIGRATIONS
    for old, new in itertools.pairwise(versions):
        assert MIGRATIONS[old](tmp_path / "m.safetensors", {**current, "format_version": old})["format_version"] == new


def as_version_1(drop_config=(), drop_meta=("class_names", "extra")):
    """A metadata change that makes a current file one that version 1 wrote before `drop_config` (config
    keys) and `drop_meta` (metadata keys) existed."""
    def change(meta):
        meta["format_version"] = "1"
        for key in drop_meta:
            meta.pop(key)
        meta["config"] = json.dumps({k: v for k, v in json.loads(meta["config"]).items() if k not in drop_config})
    return change


@pytest.mark.parametrize("make, x", [
    (lambda: VAE(VAEConfig(latent_dim=3, hidden_dims=(16, 8))), torch.rand(2, 1, 28, 28)),
    (lambda: VQVAE(VQVAEConfig(**TINY_VQVAE)), torch.rand(2, 1, 8, 8)),
    (lambda: GatedPixelCNN(GatedPixelCNNConfig(**TINY_PRIOR, num_classes=3)), None),
], ids=["vae", "vqvae", "gated_pixelcnn"])
def test_a_version_1_file_is_migrated_to_the_same_model(tmp_path, make, x):
    """Migration 1 -> 2: a version 1 file written before every config field added during version 1
    (V1_CONFIG_ADDITIONS), `class_names` and `extra` loads as the model that wrote it."""
    torch.manual_seed(0)
    saved = make().eval()
    save_model(tmp_path / "m.safetensors", saved, name="m", dataset="d", command="c",
               image_shape=(1, 8, 8) if x is None else None)
    old = tmp_path / "old.safetensors"
    added = V1_CONFIG_ADDITIONS.get(saved.KIND, {})
    _rewrite(tmp_path / "m.safetensors", old, change_meta=as_version_1(drop_config=added))
    raw = read_metadata(old)
    assert raw["format_version"] == "1" and "class_names" not in raw and not set(added) & set(json.loads(raw["config"]))
    migrated = migrate_metadata(old, raw)
    assert migrated["format_version"] == "2" and sorted(migrated) == sorted(FORMAT_KEYS)
    assert {k: json.loads(migrated["config"])[k] for k in added} == added
    loaded, info = load_model(old)
    assert loaded.config == saved.config and info.class_names == () and info.extra == {}
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
    if x is not None:
        assert torch.equal(loaded.reconstruct(x), saved.reconstruct(x))


def test_the_version_1_migration_keeps_what_a_file_records(tmp_path):
    """A version 1 file written after a field was added records it: the migration fills only what is
    missing (a logistic VAE stays logistic), and an older file's class_names and extra are kept."""
    model = VAE(VAEConfig(arch="conv", latent_dim=3, channels=(4, 8), fc_dim=8, likelihood="logistic", num_mixtures=2)).eval()
    save_model(tmp_path / "m.safetensors", model, name="m", dataset="d", command="c", class_names=["a", "b"],
               extra={"note": 1})
    old = tmp_path / "old.safetensors"
    _rewrite(tmp_path / "m.safetensors", old, change_meta=as_version_1(drop_config=("mean_mse_weight",), drop_meta=()))
    loaded, info = load_model(old)
    assert loaded.config == model.config and loaded.config.likelihood == "logistic"
    assert info.class_names == ("a", "b") and info.extra == {"note": 1}


def test_a_version_1_autoregressive_vae_from_before_likelihood_is_refused(tmp_path):
    """Before `likelihood` an autoregressive decoder fed back pixel means, which no config reproduces
    now: refused, never served with draws in their place. One that records `likelihood` migrates."""
    model = VAE(VAEConfig(arch="conv", latent_dim=3, channels=(4, 8), fc_dim=8, decoder="autoregressive",
                          ar_channels=4, ar_layers=1)).eval()
    save_model(tmp_path / "m.safetensors", model, name="m", dataset="d", command="c")
    old = tmp_path / "old.safetensors"
    _rewrite(tmp_path / "m.safetensors", old, change_meta=as_version_1(drop_config=("likelihood", "num_mixtures")))
    with pytest.raises(WeightFileError, match=r"old\.safetensors: an autoregressive VAE of format_version 1 without "
                                              r"'likelihood' fed its pixel means back"):
        load_model(old)
    kept = tmp_path / "kept.safetensors"
    _rewrite(tmp_path / "m.safetensors", kept, change_meta=as_version_1(drop_config=("mean_mse_weight",)))
    assert load_model(kept)[0].config == model.config


def test_only_a_later_version_is_called_later(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    for version, later in (("3", True), ("10", True), ("0", False), ("02", False), (" 2", False)):
        bad = tmp_path / "bad.safetensors"
        _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m, v=version: m.__setitem__("format_version", v))
        with pytest.raises(WeightFileError) as info:
            read_metadata(bad)
        assert ("later version" in str(info.value)) == later, version


def test_a_version_1_file_lacking_a_key_version_1_always_wrote_is_refused_naming_the_file_and_the_key(tmp_path):
    save_tiny(tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=as_version_1(drop_config=("latent_dim",)))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: config lacks keys \['latent_dim'\] of VAEConfig"):
        load_model(bad)
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=as_version_1(drop_meta=("command",)))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: metadata lacks \['command'\]"):
        load_model(bad)
    _rewrite(tmp_path / "m.safetensors", bad, change_meta=lambda m: (as_version_1()(m), m.__setitem__("config", "{x")))
    with pytest.raises(WeightFileError, match=r"bad\.safetensors: metadata key 'config' is not valid JSON"):
        load_model(bad)


def test_the_shipped_version_1_files_lack_no_key_of_version_2():
    """The shipped files were written (format_version 1) by code whose classes had every field they
    have in version 2: their migration adds no key, to the metadata nor to the config."""
    shipped = sorted((Path(__file__).resolve().parents[2] / "weights").glob("*.safetensors"))
    if not shipped:
        pytest.skip("no shipped weight files")
    for path in shipped:
        raw = read_metadata(path)
        if raw["format_version"] == "1":
            assert sorted(raw) == sorted(FORMAT_KEYS), path.name
            assert sorted(json.loads(raw["config"])) == sorted(FORMAT_2_CONFIG_KEYS[raw["kind"]]), path.name
