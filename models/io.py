"""The one weight-file format of the project: safetensors with the config inside.

A weight file is a `.safetensors` file. Its metadata (a ``dict[str, str]``) holds exactly these keys
(FORMAT_KEYS), none optional:

    format_version  "2" (FORMAT_VERSION)
    kind            the model class: "vae", "vqvae", "pixelcnn", "gated_pixelcnn", "pixelcnnpp"
    name            the name the service exposes, e.g. "vae"
    config          the full constructor config as one JSON object: every field of the kind's
                    config class, no other
    image_shape     [C, H, W] as JSON
    dataset         the data set the model was trained on
    command         the training command that produced the file
    metrics         JSON object of evaluation results
    extra           JSON object of kind-specific facts (a prior's VQ-VAE name and codebook hash), {} if none
    class_names     JSON list of the data set's class names, label i is class_names[i], [] if unlabelled;
                    at most MAX_CLASS_NAMES names of at most MAX_CLASS_NAME_CHARS characters each
    sha256          a digest of every tensor's name, dtype, shape and bytes

`load_model` rebuilds the module from the metadata alone, checks every tensor's
name, shape and dtype against the module, and raises `WeightFileError` naming the file
and the key when anything is off: a metadata or config key missing or unknown (a missing config
key never takes its field's default), a value malformed. No pickle is involved anywhere.

Older formats are read by migration, in one place (MIGRATIONS, "format versions" below): the
metadata of a file of an older format_version is turned, a version at a time, into what the current
version holds, before any check. Version 1 (the shipped files') may lack `extra`, `class_names` and
the config fields added to a class after the file was written; its migration gives them the values
version 1 read them as (V1_CONFIG_ADDITIONS). A format_version this code does not know is refused,
naming the versions it reads. So a change of what a file holds (a new config field, say) bumps
FORMAT_VERSION and adds a migration with its test; files are never rewritten to load.

A weight file is untrusted input (the service loads whatever lies in its weights directory), so
nothing in it may cost more than a bounded amount of memory or time before it is checked:

- the safetensors header (which holds the metadata) is at most MAX_HEADER_BYTES, read from the
  file's first 8 bytes before the header is parsed;
- every metadata value is type-checked and size-capped: `name` a short identifier (NAME_PATTERN),
  `dataset` at most MAX_DATASET_CHARS, `command` at most MAX_COMMAND_CHARS, `config`, `metrics`
  and `extra` JSON objects of at most MAX_JSON_CHARS each (no NaN or infinity: GET /models could
  not write them), `image_shape` three positive ints of at most MAX_IMAGE_ELEMENTS in all;
- the model is first built on the meta device (shapes only, no memory; at most MAX_MODULES
  modules) and refused if its parameters and buffers exceed MAX_PARAMETERS elements, a side of its
  code grid MAX_CODE_SIDE (a prior samples code by code) or its latent_dim MAX_LATENT_DIM;
- every tensor's name, shape and dtype is checked against that meta model from the header alone,
  so no tensor data is read from a file that holds anything else;
- only then are the tensors read, their digest compared with `sha256`, every floating tensor
  checked to be finite, and the real model built and loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import reprlib
import struct
import threading
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from models.pixelcnn import GatedPixelCNN, PixelCNN
from models.pixelcnnpp import PixelCNNpp
from models.vae import VAE
from models.vqvae import VQVAE

FORMAT_VERSION = "2"
# Keys a weight file of every format version has: `read_metadata` checks them before anything else.
REQUIRED_KEYS = ("format_version", "kind", "name", "config", "image_shape", "dataset", "command", "metrics", "sha256")
# The keys of a FORMAT_VERSION file, no more and no fewer (an older file's once migrated: MIGRATIONS)
FORMAT_KEYS = ("format_version", "kind", "name", "config", "image_shape", "dataset", "command", "metrics", "extra",
               "class_names", "sha256")
# Caps on class_names: far above any real data set's, low enough that a file cannot make the service
# hold and list megabytes of names (GET /models shows them, the page builds one <option> per name).
MAX_CLASS_NAMES = 10_000
MAX_CLASS_NAME_CHARS = 200
# The safetensors header (tensor table and metadata) is parsed whole; its length is the file's first
# 8 bytes (little-endian u64). The shipped files' largest header is 9,448 bytes; the metadata caps
# below and class_names' (10,000 names of 200 characters, about 2 MB of ASCII) fit under 8 MiB.
MAX_HEADER_BYTES = 8 * 1024 * 1024
# `name` appears in URLs (/models/NAME), query parameters and Prometheus labels: a short identifier.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# `dataset` is a data set's name or an image folder's (a file name is at most 255 bytes on Linux,
# plus " (image folder)"); GET /models lists it on every call.
MAX_DATASET_CHARS = 512
# `command` is every invocation that trained the file, joined by " && " (a resumed run adds one);
# the shipped longest is 1,415 characters (vqvae_cifar10, five invocations): room for ~200.
MAX_COMMAND_CHARS = 65_536
# `config`, `metrics` and `extra`, each as its JSON text; the shipped largest is 987 characters.
MAX_JSON_CHARS = 65_536
# Parameters plus buffers, counted from shapes on the meta device before anything is allocated.
# The shipped largest is 4,618,290 (vae_cifar10); 50 M is 200 MB of float32, ~11x that.
MAX_PARAMETERS = 50_000_000
# Modules built (on the meta device, ~0.3 ms each): bounds the build time and the operations of one
# forward pass a config can ask for. The shipped most is 111 (the PixelCNN++ priors).
MAX_MODULES = 2_048
# C * H * W of the images a model takes: 256 x 256 x 3, 64 times CIFAR-10's 32 x 32 x 3, 250 times
# Fashion-MNIST's. Warm-up and every request run images of this size, which have no parameters.
MAX_IMAGE_ELEMENTS = 3 * 256 * 256
# Each side of a code grid (a VQ-VAE's, a prior's): a prior samples one code after another, h * w
# sequential passes. 64 x 64 = 4,096 steps is 64 times the shipped 8 x 8 (CIFAR-10) and 83 times the
# 7 x 7 (Fashion-MNIST) grids. (app/schemas.py bounds a /decode grid at 256 a side, above this.)
MAX_CODE_SIDE = 64
# A VAE's latent_dim: the shipped largest is 128. (app/schemas.py bounds a /decode latent at 4096, as this.)
MAX_LATENT_DIM = 4096
# safetensors dtypes a tensor may have, by the kind of tensor the model holds there
# (load_state_dict converts a float16 file into a float32 model, but never an integer into a float).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8"})


class WeightFileError(ValueError):
    """A weight file is missing, corrupt, or does not match the model it describes."""


@dataclasses.dataclass
class ModelInfo:
    """Everything a weight file says about its model, besides the tensors."""

    kind: str
    name: str
    image_shape: tuple[int, int, int]
    dataset: str
    command: str
    metrics: dict[str, Any]
    extra: dict[str, Any]
    path: str | None = None
    class_names: tuple[str, ...] = ()  # the data set's classes, by label; () when the file records none


# kind -> class, built from the classes themselves (each carries its KIND and config_class).
MODEL_CLASSES: tuple[type[torch.nn.Module], ...] = (VAE, VQVAE, PixelCNN, GatedPixelCNN, PixelCNNpp)
KINDS: dict[str, type[torch.nn.Module]] = {cls.KIND: cls for cls in MODEL_CLASSES}


def model_class(kind: str) -> type[torch.nn.Module]:
    if kind not in KINDS:
        raise KeyError(kind)
    return KINDS[kind]


def config_to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _is_tuple_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(annotation))
    return False


def config_from_dict(config_cls: type, data: dict[str, Any], *, source: str = "config") -> Any:
    """Build a config dataclass from JSON data; unknown or missing keys are errors (a missing key
    never takes the field's default: an older file gets its keys from its migration, MIGRATIONS).

    JSON turns tuples into lists, so fields typed as tuples are converted back.
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightFileError(f"{source}: unknown config keys {reprlib.repr(unknown)} for {config_cls.__name__}")
    missing = sorted(names - set(data))
    if missing:
        raise WeightFileError(
            f"{source}: config lacks keys {missing} of {config_cls.__name__}; a file of format_version "
            f"{FORMAT_VERSION} records every key, and an older file gets those it may lack from its migration "
            "(models/io.py MIGRATIONS)"
        )
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints[key]):
            value = tuple(value)
        kwargs[key] = value
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise WeightFileError(f"{source}: invalid config for {config_cls.__name__}: {_clip(err)}") from err


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
        h.update(f"{key}|{t.dtype}|{tuple(tensors[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (safetensors refuses shared storage), its
    floating tensors in `dtype` when given (integer and bool tensors keep theirs)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def round_to_storage(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Round every floating parameter and buffer of `model` to `dtype` and back, in place, so that the
    model computes (in its own dtype) exactly what it computes once saved in `dtype` and loaded again
    (`load_model` casts a float16 file into the float32 model). Refuses a value out of `dtype`'s range
    (it would become infinity). Returns {"values": floating values, "flushed_to_zero": nonzero values
    that became 0, "changed": values that changed}."""
    limit = torch.finfo(dtype).max
    counts = {"values": 0, "flushed_to_zero": 0, "changed": 0}
    with torch.no_grad():
        for key, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            peak = tensor.abs().max().item() if tensor.numel() else 0.0
            if peak > limit:
                raise ValueError(f"{key} holds {peak:g}, beyond {dtype}'s largest value {limit:g}: store it in float32")
            rounded = tensor.to(dtype).to(tensor.dtype)
            counts["values"] += tensor.numel()
            counts["flushed_to_zero"] += int(((rounded == 0) & (tensor != 0)).sum())
            counts["changed"] += int((rounded != tensor).sum())
            tensor.copy_(rounded)
    return counts


def save_model(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    name: str,
    dataset: str,
    command: str,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    image_shape: tuple[int, int, int] | None = None,
    class_names: Sequence[str] = (),
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` and everything needed to rebuild it into one safetensors file.

    `dtype` (torch.float16, say) stores the floating tensors in that dtype (as diffusers' fp16
    variants); `load_model` casts them back into the model's own dtype, which computes. Metrics
    that describe the stored file must be measured after `round_to_storage(model, dtype)`.

    `image_shape` defaults to `model.image_shape`; a prior passes its VQ-VAE's.
    `class_names` are the training data's classes in label order (empty for unlabelled data).
    The metadata and the model's size are checked as `load_model` checks them (the caps of the module
    docstring), so `load_model` never refuses a file this wrote: a `WeightFileError` says what to change.
    """
    kind = getattr(model, "KIND", None)
    if kind not in KINDS:
        raise ValueError(f"cannot save a {type(model).__name__}: it has no known KIND")
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"class_names must be a sequence of strings, got {reprlib.repr(class_names)}")
    over_cap = _class_names_over_cap(class_names)
    if over_cap:
        raise ValueError(f"class_names: {over_cap}")
    tensors = state_tensors(model, dtype)
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "config": config_to_json(model.config),
        "image_shape": json.dumps(list(image_shape or model.image_shape)),
        "dataset": dataset,
        "command": command,
        "metrics": json.dumps(metrics or {}, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
        "class_names": json.dumps(list(class_names)),
        "sha256": tensors_digest(tensors),
    }
    path = Path(path)
    info, _ = _parse_metadata(path, metadata)  # refuse now what load_model would refuse
    _check_size(path, model, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    header = _header_length(tmp)
    if header > MAX_HEADER_BYTES:
        tmp.unlink()
        raise WeightFileError(
            f"{path}: its safetensors header would be {header} bytes, more than the {MAX_HEADER_BYTES} allowed "
            "(MAX_HEADER_BYTES); record fewer or shorter class_names, metrics or extra"
        )
    os.chmod(tmp, 0o644)  # readable by a service running as another user
    os.replace(tmp, path)  # a reader never sees a half-written file


def _clip(message: object, limit: int = 300) -> str:
    """An error message from untrusted input, cut to `limit` characters."""
    text = str(message)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _header_length(path: Path) -> int:
    """The safetensors header's length in bytes: the file's first 8 bytes, a little-endian u64."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise WeightFileError(f"{path}: not a readable safetensors file ({err})") from err
    if len(head) < 8:
        raise WeightFileError(f"{path}: not a readable safetensors file ({len(head)} bytes, no 8-byte header length)")
    return struct.unpack("<Q", head)[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A weight file's metadata as stored, once its header is known to be at most MAX_HEADER_BYTES,
    its format_version to be one this code reads (FORMAT_VERSION or one of MIGRATIONS) and it to hold
    every REQUIRED_KEYS. An older file's is not migrated here (`migrate_metadata` does), and the values
    are not checked here (`load_model` does)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such weight file")
    length = _header_length(path)
    if length > MAX_HEADER_BYTES:
        raise WeightFileError(
            f"{path}: its safetensors header claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed "
            "(MAX_HEADER_BYTES); not parsed"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightFileError(f"{path}: not a readable safetensors file ({_clip(err)})") from err
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if "format_version" in metadata and metadata["format_version"] not in READ_VERSIONS:
        # before the other keys: a later format may have other keys
        version = metadata["format_version"]
        later = version.isdigit() and not version.startswith("0") and int(version) > int(FORMAT_VERSION)
        raise WeightFileError(
            f"{path}: format_version {reprlib.repr(version)} is not one this code reads "
            f"({', '.join(map(repr, READ_VERSIONS))}; the older migrated on load)"
            + (": written by a later version of this project?" if later else "")
        )
    if missing:
        raise WeightFileError(f"{path}: metadata lacks {missing}; was it written by models.io.save_model?")
    return metadata


# -- format versions ----------------------------------------------------------------------------
#
# Every change of what a weight file holds bumps FORMAT_VERSION and adds a migration here, from the
# previous version to the new one: a function (path, metadata) -> the metadata as the new version
# writes it. Adding a field to a model's config is such a change: the migration gives the files
# written before it the value that reproduces what the code that wrote them computed (not
# necessarily the field's default; diffusers' VectorQuantizer(legacy=True) shows the cost of a
# default that changes what old files compute). Each migration has a test in tests/models/test_io.py.

# Version 1 (the project's first, 2026-11-24 to 2026-12-07). Its reader read a missing `extra` as {}, a
# missing `class_names` as no names (the key came on 2026-12-05), and a missing config key as its
# field's default; it ignored other keys, which no version 1 writer wrote. A version 1 file written by
# save_model lacks only the config fields added to its class after it was written: these, with the
# value that reproduces what the code computed before each was added (the field's default then, and
# unchanged since: a version 1 file computes what it computed before version 2).
V1_CONFIG_ADDITIONS: dict[str, dict[str, Any]] = {
    "vae": {
        "refine_layers": 0,  # 2026-11-24: no refinement layers before
        "decoder": "factorized", "ar_channels": 32, "ar_kernel": 7, "ar_layers": 1,  # 2026-11-24: AR decoders
        # 2026-12-05: the Bernoulli decoder was the only one, always fed z; the AR options unused
        "likelihood": "bernoulli", "num_mixtures": 5, "use_latent": True, "reconstruct_seed": 0,
        "mean_mse_weight": 0.0,  # 2026-12-06: a training loss term only, none before
    },
    "vqvae": {
        "likelihood": "mse", "num_mixtures": 5,  # 2026-12-05: the MSE decoder was the only one
        "mean_mse_weight": 0.0,  # 2026-12-06: a training loss term only, none before
    },
}


def _v1_to_v2(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """Version 1 -> 2: the keys a version 1 file may lack, with the values version 1 read them as."""
    out = {**metadata, "format_version": "2"}
    out.setdefault("extra", "{}")
    out.setdefault("class_names", "[]")
    added = V1_CONFIG_ADDITIONS.get(metadata["kind"], {})
    config = _json(path, metadata, "config", dict, max_chars=MAX_JSON_CHARS)
    if metadata["kind"] == "vae" and config.get("decoder") == "autoregressive" and "likelihood" not in config:
        # before `likelihood` (2026-12-05) an autoregressive decoder fed back each pixel's mean; since, it
        # feeds back a draw: no config value computes what such a file computed
        raise WeightFileError(
            f"{path}: an autoregressive VAE of format_version 1 without 'likelihood' fed its pixel means back, "
            "which no version of the config reproduces now; retrain it (python -m training vae ...)"
        )
    if any(key not in config for key in added):
        out["config"] = json.dumps({**added, **config}, sort_keys=True)
    return out


# format_version -> its migration to the next version; applied in turn up to FORMAT_VERSION
MIGRATIONS: dict[str, Callable[[Path, dict[str, str]], dict[str, str]]] = {"1": _v1_to_v2}
READ_VERSIONS = (*MIGRATIONS, FORMAT_VERSION)


def migrate_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> dict[str, str]:
    """`read_metadata`'s result as a FORMAT_VERSION file holds it: older versions migrated in turn
    (MIGRATIONS), then the keys checked to be exactly FORMAT_KEYS. The values are checked by `load_model`."""
    path = Path(path)
    while metadata["format_version"] != FORMAT_VERSION:
        metadata = MIGRATIONS[metadata["format_version"]](path, metadata)
    missing = [k for k in FORMAT_KEYS if k not in metadata]
    unknown = sorted(k for k in metadata if k not in FORMAT_KEYS)
    if missing:
        raise WeightFileError(f"{path}: metadata lacks {missing}; was it written by models.io.save_model?")
    if unknown:
        raise WeightFileError(
            f"{path}: unknown metadata keys {reprlib.repr(unknown)}; format_version {FORMAT_VERSION} has "
            f"{list(FORMAT_KEYS)}"
        )
    return metadata


def _no_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}; only finite numbers are allowed (GET /models cannot send {name} as JSON)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {reprlib.repr(text)} is out of a float's range")
    return value


_JSON_TYPES = {dict: "object", list: "list", object: "value"}


def _json(path: Path, metadata: dict[str, str], key: str, expected: type = object, *, default: str = "{}",
          max_chars: int | None = None) -> Any:
    """The metadata value `key` parsed as JSON of type `expected` (NaN and infinity refused), at most
    `max_chars` characters as text."""
    raw = metadata.get(key, default)
    if not isinstance(raw, str):
        raise WeightFileError(f"{path}: metadata key {key!r} must be a string, got {type(raw).__name__}")
    if max_chars is not None and len(raw) > max_chars:
        raise WeightFileError(
            f"{path}: metadata key {key!r} has {len(raw)} characters, more than the {max_chars} allowed "
            f"({reprlib.repr(raw)})"
        )
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError, as are the two above
        raise WeightFileError(f"{path}: metadata key {key!r} is not valid JSON ({_clip(err)})") from err
    if not isinstance(value, expected):
        raise WeightFileError(
            f"{path}: metadata key {key!r} must be a JSON {_JSON_TYPES[expected]}, got {reprlib.repr(value)}"
        )
    return value


def _text(path: Path, metadata: dict[str, str], key: str, max_chars: int) -> str:
    """The metadata string `key`, at most `max_chars` characters."""
    value = metadata[key]
    if not isinstance(value, str):
        raise WeightFileError(f"{path}: metadata key {key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise WeightFileError(
            f"{path}: metadata key {key!r} has {len(value)} characters, more than the {max_chars} allowed "
            f"({reprlib.repr(value)})"
        )
    return value


def _image_shape(path: Path, metadata: dict[str, str]) -> tuple[int, int, int]:
    shape = _json(path, metadata, "image_shape", list, max_chars=256)
    if len(shape) != 3 or not all(type(s) is int and s > 0 for s in shape):  # type(): true is not 1 here
        raise WeightFileError(
            f"{path}: metadata key 'image_shape' must be [C, H, W], three positive ints, got {reprlib.repr(shape)}"
        )
    if math.prod(shape) > MAX_IMAGE_ELEMENTS:
        raise WeightFileError(
            f"{path}: metadata key 'image_shape' {shape} is {math.prod(shape)} values per image, more than the "
            f"{MAX_IMAGE_ELEMENTS} (3 x 256 x 256) allowed (MAX_IMAGE_ELEMENTS)"
        )
    return (shape[0], shape[1], shape[2])


def _class_names_over_cap(names: Sequence[str]) -> str | None:
    """What is wrong with `names` (strings) under the caps, or None."""
    if len(names) > MAX_CLASS_NAMES:
        return f"{len(names)} names, more than the {MAX_CLASS_NAMES} allowed"
    long = next((i for i, n in enumerate(names) if len(n) > MAX_CLASS_NAME_CHARS), None)
    if long is not None:
        return (f"name {long} ({reprlib.repr(names[long])}) has {len(names[long])} characters, more than the "
                f"{MAX_CLASS_NAME_CHARS} allowed")
    return None


def _class_names(path: Path, metadata: dict[str, str]) -> tuple[str, ...]:
    names = _json(path, metadata, "class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        # reprlib: a malformed value can be megabytes long; the error shows its start
        raise WeightFileError(
            f"{path}: metadata key 'class_names' must be a JSON list of strings, got {reprlib.repr(names)}"
        )
    over_cap = _class_names_over_cap(names)
    if over_cap:
        raise WeightFileError(f"{path}: metadata key 'class_names': {over_cap}")
    return tuple(names)


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[ModelInfo, dict[str, Any]]:
    """(ModelInfo, the config as a dict) from a file's metadata, every value type-checked and capped."""
    kind = metadata["kind"]
    if kind not in KINDS:
        raise WeightFileError(f"{path}: unknown model kind {reprlib.repr(kind)}; known kinds are {sorted(KINDS)}")
    name = metadata["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise WeightFileError(
            f"{path}: metadata key 'name' {reprlib.repr(name)} is not a short identifier: 1 to 64 characters of "
            "A-Z a-z 0-9 _ . -, the first a letter or digit (the name is used in URLs and metric labels)"
        )
    info = ModelInfo(
        kind=kind,
        name=name,
        image_shape=_image_shape(path, metadata),
        dataset=_text(path, metadata, "dataset", MAX_DATASET_CHARS),
        command=_text(path, metadata, "command", MAX_COMMAND_CHARS),
        metrics=_json(path, metadata, "metrics", dict, max_chars=MAX_JSON_CHARS),
        extra=_json(path, metadata, "extra", dict, max_chars=MAX_JSON_CHARS),
        path=str(path),
        class_names=_class_names(path, metadata),
    )
    return info, _json(path, metadata, "config", dict, max_chars=MAX_JSON_CHARS)


class _TooManyModules(Exception):
    pass


class _SkipRandomInit(TorchFunctionMode):
    """Skips random initialisation: on the meta device it computes nothing anyway, and meta `normal_`
    (nn.Embedding's init) imports torch._dynamo, 2 s once per process."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        is_init = getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and not name.startswith("_")
        if is_init or func in _RANDOM_FILLS:
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


_RANDOM_FILLS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_,
})


def _build_on_meta(path: Path, cls: type[torch.nn.Module], config: Any) -> torch.nn.Module:
    """`cls(config)` on the meta device: every parameter and buffer has its shape and dtype but no
    memory. Refused once it registers more than MAX_MODULES submodules, before it builds the rest."""
    owner, count = threading.get_ident(), 0

    def count_module(module: torch.nn.Module, name: str, submodule: torch.nn.Module | None) -> None:
        nonlocal count
        if threading.get_ident() == owner:  # the hook is global: count only this thread's build
            count += 1
            if count > MAX_MODULES:
                raise _TooManyModules

    handle = torch.nn.modules.module.register_module_module_registration_hook(count_module)
    try:
        with torch.device("meta"), _SkipRandomInit():
            return cls(config)
    except _TooManyModules:
        raise WeightFileError(
            f"{path}: its config builds more than {MAX_MODULES} modules (MAX_MODULES); refused before building the rest"
        ) from None
    except Exception as err:  # a config of the right keys but absurd values (negative sizes, wrong types)
        raise WeightFileError(f"{path}: its config cannot build a {cls.__name__} ({_clip(err)})") from err
    finally:
        handle.remove()


def _check_size(path: Path, skeleton: torch.nn.Module, info: ModelInfo) -> None:
    """A model (on the meta device, or one being saved) against the caps, and against the file's image_shape."""
    modules = sum(1 for _ in skeleton.modules()) - 1  # as _build_on_meta counts: the submodules
    if modules > MAX_MODULES:
        raise WeightFileError(f"{path}: the model has {modules} modules, more than the {MAX_MODULES} allowed (MAX_MODULES)")
    count = sum(t.numel() for t in itertools.chain(skeleton.parameters(), skeleton.buffers()))
    if count > MAX_PARAMETERS:
        raise WeightFileError(
            f"{path}: its config makes {count:,} parameters and buffers, more than the {MAX_PARAMETERS:,} allowed "
            "(MAX_PARAMETERS); refused before allocating them"
        )
    shape = getattr(skeleton, "image_shape", None)
    if shape is not None and tuple(shape) != info.image_shape:
        raise WeightFileError(f"{path}: image_shape {list(info.image_shape)} disagrees with the config's {tuple(shape)}")
    code_shape = getattr(skeleton.config, "code_shape", None) or getattr(skeleton, "code_shape", None)
    if code_shape is not None and max(code_shape) > MAX_CODE_SIDE:
        raise WeightFileError(
            f"{path}: code_shape {tuple(code_shape)} has a side over the {MAX_CODE_SIDE} allowed (MAX_CODE_SIDE): "
            "a prior draws the codes one after another"
        )
    latent_dim = getattr(skeleton.config, "latent_dim", None)
    if latent_dim is not None and latent_dim > MAX_LATENT_DIM:
        raise WeightFileError(f"{path}: latent_dim {latent_dim} is more than the {MAX_LATENT_DIM} allowed (MAX_LATENT_DIM)")


def _check_tensor_table(path: Path, f: Any, expected: dict[str, torch.Tensor], kind: str) -> None:
    """The file's tensor names, shapes and dtypes (from its header: no data is read) against `expected`."""
    keys = set(f.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        raise WeightFileError(
            f"{path}: tensors missing {reprlib.repr(missing)} unexpected {reprlib.repr(unexpected)} for {kind} config"
        )
    for key, value in expected.items():
        tensor = f.get_slice(key)
        shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
        if shape != tuple(value.shape):
            raise WeightFileError(f"{path}: tensor {key!r} has shape {shape}, the config needs {tuple(value.shape)}")
        allowed = FLOAT_DTYPES if value.is_floating_point() else {"BOOL"} if value.dtype == torch.bool else INT_DTYPES
        if dtype not in allowed:
            raise WeightFileError(
                f"{path}: tensor {key!r} has dtype {dtype}, the model holds {value.dtype} there "
                f"(allowed: {', '.join(sorted(allowed))})"
            )


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelInfo]:
    """Rebuild the model a weight file describes, load its tensors strictly, return it on `device` in eval mode.

    An older format is migrated first (`migrate_metadata`). Each check of the module docstring runs
    before the memory it guards is used: the header's size before the header is parsed, the model's
    size on the meta device before it is allocated, the
    tensors' names, shapes and dtypes from the header before any tensor is read. Raises
    `WeightFileError` naming the file and what is wrong.
    """
    path = Path(path)
    metadata = migrate_metadata(path, read_metadata(path))
    info, config_data = _parse_metadata(path, metadata)
    cls = model_class(info.kind)
    config = config_from_dict(cls.config_class, config_data, source=str(path))
    skeleton = _build_on_meta(path, cls, config)
    _check_size(path, skeleton, info)
    expected = skeleton.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_tensor_table(path, f, expected, info.kind)
            tensors = {k: f.get_tensor(k) for k in expected}
    except WeightFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightFileError(f"{path}: tensors cannot be read ({_clip(err)})") from err
    if tensors_digest(tensors) != metadata["sha256"]:
        raise WeightFileError(f"{path}: tensor checksum mismatch; the file was modified or corrupted")
    for key, tensor in tensors.items():
        # as the model will hold it: a float64 1e300 is finite, and infinity once cast to float32
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.to(expected[key].dtype)).all()):
            raise WeightFileError(
                f"{path}: tensor {key!r} holds non-finite values (NaN or infinity); such a model only answers "
                "NaN: retrain it, or use a file from before training diverged"
            )
    with _SkipRandomInit():  # every parameter and persistent buffer is overwritten next (strict=True)
        model = cls(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), info
