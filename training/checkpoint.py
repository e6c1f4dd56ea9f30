"""Resumable training checkpoints as safetensors: model, optimizer and RNG state, no pickle.

Tensors are stored under "model.*", "optim.<param index>.<name>" and "rng.*"; everything
that is not a tensor (epoch, best metric, history, optimizer hyper-parameters) is JSON in
the metadata.

The metadata's `sha256` is a digest of every tensor (models.io.tensors_digest: name, dtype,
shape and bytes) and of every other metadata value, so `load_checkpoint` refuses a corrupted,
truncated or edited checkpoint with a `CheckpointError` instead of resuming from garbage. A
checkpoint written before the digest existed still loads, with a logged warning that it cannot
be verified. Non-finite values in any floating tensor are refused as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.io import state_tensors, tensors_digest

log = logging.getLogger(__name__)

_ADVICE = "delete it to train from scratch, or start without --resume (or with another --run-dir)"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from: unreadable, corrupted, or not this model's."""


def checkpoint_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of the tensors (models.io.tensors_digest) and of every metadata value but `sha256` itself."""
    h = hashlib.sha256(tensors_digest(tensors).encode())
    for key in sorted(k for k in metadata if k != "sha256"):
        value = metadata[key].encode()
        h.update(f"|{key}|{len(value)}|".encode())  # lengths: no two different metadata hash alike
        h.update(value)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write model, optimizer and CPU RNG state plus the JSON `state` to `path` atomically, with a digest."""
    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in optim["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    metadata = {
        "state": json.dumps(state),
        "optim_param_groups": json.dumps(optim["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    metadata["sha256"] = checkpoint_digest(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG state in place; return the saved training state.

    Everything is read and verified (digest, finite values, every key present) before anything is
    restored. Raises `CheckpointError` naming the file and what to do when it cannot be used.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or corrupted ({err}); {_ADVICE}") from err
    recorded = metadata.get("sha256")
    if recorded is None:
        log.warning("checkpoint %s has no digest (written before checkpoints had one): it cannot be verified; "
                    "resuming from it anyway", path)
    elif recorded != checkpoint_digest(tensors, metadata):
        raise CheckpointError(f"checkpoint {path} fails its checksum: it was corrupted or modified; {_ADVICE}")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} holds NaN or infinity; {_ADVICE}")
    try:
        state = json.loads(metadata["state"])
        param_groups = json.loads(metadata["optim_param_groups"])
        saved_scalars = json.loads(metadata["optim_scalars"])
        rng = tensors["rng.cpu"]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is incomplete (no valid {err}); {_ADVICE}") from err
    device = next(model.parameters()).device
    param_state: dict[int, dict[str, Any]] = {}
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                param_state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
        for idx, values in saved_scalars.items():
            param_state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": param_state, "param_groups": param_groups})
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model and optimizer (was it written with other options?): "
            f"{str(err)[:300]}; {_ADVICE}"
        ) from err
    return state
