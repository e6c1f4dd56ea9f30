"""Resumable training checkpoints as safetensors: model, optimizer and RNG state, no pickle.

Tensors are stored under "model.*", "optim.<param index>.<name>" and "rng.*"; everything
that is not a tensor (epoch, best metric, history, optimizer hyper-parameters) is JSON in
the metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.io import state_tensors


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place; return the saved training state."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    param_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            param_state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
    for idx, values in json.loads(metadata["optim_scalars"]).items():
        param_state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": param_state, "param_groups": json.loads(metadata["optim_param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    return json.loads(metadata["state"])
