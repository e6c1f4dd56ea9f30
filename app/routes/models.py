"""What is loaded, and what was refused: GET /models and GET /models/problems, and the payload of
GET /models, written here from the registry's entries (app/registry.py).

The registry checks every item at load (`invalid_model_item`, `invalid_prior_item`: the schema,
app/schemas.py's ModelEntry and PriorInfo, and strict JSON) and refuses a file whose item would not
validate, so GET /models cannot fail later.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from app.dependencies import ServiceDep
from app.registry import Entry, Prior, Registry, iso_time
from app.schemas import Error, ModelEntry, PriorInfo, Problem

router = APIRouter(prefix="/models", tags=["models"], responses={503: {"model": Error}})  # 503: not ready


@router.get("", response_model=list[ModelEntry], response_model_exclude_unset=True)
async def list_models(service: ServiceDep) -> list[dict[str, Any]]:
    """One entry per served model, with the operations it offers. A VQ-VAE lists its priors (the
    default has the lowest validation NLL, `val_bits_per_code`; a file without one is ranked by its
    test NLL) and the prior files refused for it, with the reason."""
    return describe(service.registry)


@router.get("/problems", response_model=list[Problem])
async def problems(service: ServiceDep) -> list[dict[str, Any]]:
    """Every weight file skipped at startup and why: unreadable files, name clashes, mismatched priors."""
    return [vars(p) for p in service.registry.problems]


def describe(registry: Registry) -> list[dict[str, Any]]:
    """The GET /models payload (every entry's was validated against ModelEntry at load)."""
    return [model_item(entry) for entry in registry.entries.values()]


def model_item(entry: Entry) -> dict[str, Any]:
    """One served model's GET /models item (app.schemas.ModelEntry)."""
    item: dict[str, Any] = {
        "name": entry.name,
        "kind": entry.kind,
        "operations": entry.operations,
        "image_shape": list(entry.image_shape),
        # null for a model whose images do not depend on z (the context-only baseline): it has no latent to speak of
        "latent_shape": list(entry.model.latent_shape) if entry.model.has_latent else None,
        "dataset": entry.info.dataset,
        "class_names": list(entry.class_names),
        "metrics": entry.info.metrics,
        "device": str(entry.device),
        "file": Path(entry.info.path).name if entry.info.path else None,
        "sha256": entry.digest or None,
        "loaded_at": iso_time(entry.loaded_at) if entry.loaded_at else None,
    }
    # "logistic": a discretized logistic mixture (a likelihood of 8-bit images); "bernoulli" or "mse" not
    item["likelihood"] = entry.model.config.likelihood
    item["ood"] = entry.ood.model_dump() if entry.ood is not None else None
    if entry.kind == "vae":
        item["arch"] = entry.model.config.arch
        item["decoder"] = entry.model.config.decoder
    if entry.kind == "vqvae":
        default = entry.default_prior
        item["code_shape"] = list(entry.model.code_shape)
        item["codebook_size"] = int(entry.model.config.codebook_size)
        item["default_prior"] = default.api_name if default else None
        item["priors"] = [prior_item(p, default=p is default) for p in entry.priors.values()]
        item["rejected_priors"] = [{"file": p.file, "reason": p.reason} for p in entry.rejected]
    return item


def prior_item(p: Prior, default: bool) -> dict[str, Any]:
    """One prior's item in its VQ-VAE's GET /models item (app.schemas.PriorInfo)."""
    return {
        "name": p.api_name,
        "kind": p.kind,
        "model": p.info.name,
        "test_bits_per_code": p.bits_per_code,
        "test_bits_per_dim": p.info.metrics.get("test_bits_per_dim"),
        "test_marginal_bits_per_dim": p.info.metrics.get("test_marginal_bits_per_dim"),
        "num_classes": p.num_classes,
        "default": default,
        "dataset": p.info.dataset,
        "class_names": list(p.class_names),
        "class_names_conflict": p.class_names_conflict,
        "file": Path(p.info.path).name if p.info.path else None,
        "sha256": p.digest or None,
        "loaded_at": iso_time(p.loaded_at) if p.loaded_at else None,
        "ood": p.ood.model_dump() if p.ood is not None else None,
    }


def invalid_model_item(entry: Entry) -> str | None:
    """Why `entry`'s GET /models item, priors included, would not validate, or None."""
    return _invalid(ModelEntry, model_item(entry))


def invalid_prior_item(prior: Prior) -> str | None:
    """Why `prior`'s item in its VQ-VAE's GET /models item would not validate, or None."""
    return _invalid(PriorInfo, prior_item(prior, default=False))


def _invalid(schema: type[BaseModel], item: dict[str, Any]) -> str | None:
    """Why `item` would fail as a GET /models response (the schema, or strict JSON), or None."""
    try:
        schema.model_validate(item)
        json.dumps(item, allow_nan=False)
    except ValidationError as err:
        return "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {reprlib.repr(e.get('input'))})" for e in err.errors()[:3]
        )
    except (TypeError, ValueError) as err:  # not JSON, or NaN / infinity
        return f"not strict JSON ({reprlib.repr(str(err))})"
    return None
