"""What is loaded, and what was refused."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.dependencies import ServiceDep
from app.schemas import Error, ModelEntry, Problem

router = APIRouter(prefix="/models", tags=["models"], responses={503: {"model": Error}})  # 503: not ready


@router.get("", response_model=list[ModelEntry], response_model_exclude_unset=True)
async def list_models(service: ServiceDep) -> list[dict[str, Any]]:
    """One entry per served model, with the operations it offers. A VQ-VAE lists its priors (the
    default has the lowest validation NLL, `val_bits_per_code`; a file without one is ranked by its
    test NLL) and the prior files refused for it, with the reason."""
    return service.registry.describe()


@router.get("/problems", response_model=list[Problem])
async def problems(service: ServiceDep) -> list[dict[str, Any]]:
    """Every weight file skipped at startup and why: unreadable files, name clashes, mismatched priors."""
    return [vars(p) for p in service.registry.problems]
