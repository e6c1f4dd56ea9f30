"""The one weight-file format of the project: safetensors with the config inside.

A weight file is a `.safetensors` file. Its metadata (a ``dict[str, str]``) holds

    format_version  "1"
    kind            the model class: "vae", "vqvae", "pixelcnn", "gated_pixelcnn", "pixelcnnpp"
    name            the name the service exposes, e.g. "vae"
    config          the full constructor config as one JSON object
    image_shape     [C, H, W] as JSON
    dataset         the data set the model was trained on
    command         the training command that produced the file
    metrics         JSON object of evaluation results
    extra           JSON object of kind-specific facts (a prior's VQ-VAE name and codebook hash)
    class_names     JSON list of the data set's class names, label i is class_names[i]; optional
                    (files written before it lack the key and load with none); at most
                    MAX_CLASS_NAMES names of at most MAX_CLASS_NAME_CHARS characters each
    sha256          a digest of every tensor's name, dtype, shape and bytes

`load_model` rebuilds the module from the metadata alone, checks every tensor's
name and shape against the module, and raises `WeightFileError` naming the file
and the key when anything is off. No pickle is involved anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import reprlib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.pixelcnn import GatedPixelCNN, PixelCNN
from models.pixelcnnpp import PixelCNNpp
from models.vae import VAE
from models.vqvae import VQVAE

FORMAT_VERSION = "1"
REQUIRED_KEYS = ("format_version", "kind", "name", "config", "image_shape", "dataset", "command", "metrics", "sha256")
# Caps on class_names: far above any real data set's, low enough that a file cannot make the service
# hold and list megabytes of names (GET /models shows them, the page builds one <option> per name).
MAX_CLASS_NAMES = 10_000
MAX_CLASS_NAME_CHARS = 200


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
    """Build a config dataclass from JSON data; unknown or missing keys are errors.

    JSON turns tuples into lists, so fields typed as tuples are converted back.
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightFileError(f"{source}: unknown config keys {unknown} for {config_cls.__name__}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints[key]):
            value = tuple(value)
        kwargs[key] = value
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise WeightFileError(f"{source}: invalid config for {config_cls.__name__}: {err}") from err


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
        h.update(f"{key}|{t.dtype}|{tuple(tensors[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


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
) -> None:
    """Write `model` and everything needed to rebuild it into one safetensors file.

    `image_shape` defaults to `model.image_shape`; a prior passes its VQ-VAE's.
    `class_names` are the training data's classes in label order (empty for unlabelled data).
    """
    kind = getattr(model, "KIND", None)
    if kind not in KINDS:
        raise ValueError(f"cannot save a {type(model).__name__}: it has no known KIND")
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"class_names must be a sequence of strings, got {reprlib.repr(class_names)}")
    over_cap = _class_names_over_cap(class_names)
    if over_cap:
        raise ValueError(f"class_names: {over_cap}")
    tensors = state_tensors(model)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # readable by a service running as another user
    os.replace(tmp, path)  # a reader never sees a half-written file


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such weight file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightFileError(f"{path}: not a readable safetensors file ({err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise WeightFileError(f"{path}: metadata lacks {missing}; was it written by models.io.save_model?")
    if metadata["format_version"] != FORMAT_VERSION:
        raise WeightFileError(
            f"{path}: format_version {metadata['format_version']!r}, this code reads {FORMAT_VERSION!r}"
        )
    return metadata


def _json(path: Path, metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise WeightFileError(f"{path}: metadata key {key!r} is not valid JSON ({err})") from err


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
    if "class_names" not in metadata:  # written before the key existed
        return ()
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


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelInfo]:
    """Rebuild the model a weight file describes, load its tensors strictly, return it in eval mode."""
    path = Path(path)
    metadata = read_metadata(path)
    kind = metadata["kind"]
    if kind not in KINDS:
        raise WeightFileError(f"{path}: unknown model kind {kind!r}; known kinds are {sorted(KINDS)}")
    cls = model_class(kind)
    config = config_from_dict(cls.config_class, _json(path, metadata, "config"), source=str(path))
    model = cls(config)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightFileError(f"{path}: tensors cannot be read ({err})") from err
    if tensors_digest(tensors) != metadata["sha256"]:
        raise WeightFileError(f"{path}: tensor checksum mismatch; the file was modified or corrupted")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightFileError(f"{path}: tensors missing {missing[:5]} unexpected {unexpected[:5]} for {kind} config")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise WeightFileError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the config needs {tuple(value.shape)}"
            )
    model.load_state_dict(tensors, strict=True)
    image_shape = tuple(_json(path, metadata, "image_shape"))
    if hasattr(model, "image_shape") and tuple(image_shape) != tuple(model.image_shape):
        raise WeightFileError(f"{path}: image_shape {image_shape} disagrees with the config's {model.image_shape}")
    info = ModelInfo(
        kind=kind,
        name=metadata["name"],
        image_shape=tuple(int(s) for s in image_shape),  # type: ignore[arg-type]
        dataset=metadata["dataset"],
        command=metadata["command"],
        metrics=_json(path, metadata, "metrics"),
        extra=_json(path, metadata, "extra"),
        path=str(path),
        class_names=_class_names(path, metadata),
    )
    return model.to(device).eval(), info
