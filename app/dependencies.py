"""What routes are given: the service (`ServiceDep`, refused with 503 unless app/readiness.py says it
serves) and the model a request names (`find_model`, held for the rest of the request).

What they answer with is app/responses.py's; what they read from uploads app/multipart.py's.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.errors import NotRunningError
from app.readiness import readiness
from app.registry import LATENT, LIKELIHOOD, PRIOR, Entry
from app.service import Service, holding


def get_service(request: Request) -> Service:
    """The running Service; 503 (Retry-After: 1) while it does not serve (app/readiness.py)."""
    now = readiness(request.app)
    if not now.serving:
        raise NotRunningError(f"the service is not ready ({now.state})", headers={"Retry-After": "1"})
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


# Why a model cannot do an operation, by what it lacks (Entry.lacks)
LACKING = {
    LATENT: "it has no latent (its decoder ignores z: it was trained with use_latent=False, as a context-only baseline)",
    PRIOR: "no prior is loaded for it (a prior's weight file names its VQ-VAE; see GET /models/problems)",
    LIKELIHOOD: "its pixel likelihood is not a probability of 8-bit images (it was not trained with likelihood='logistic')",
}


async def find_model(service: Service, name: str, operation: str) -> Entry:
    """The served model `name`, held for the rest of the request (Service.hold: a reload that swaps it
    out keeps this version for the request), once it is known to offer `operation` (an API operation,
    app/schemas.py's ApiOperation). Right after start-up, it waits for the model's first pass.

    A model that cannot do `operation` is refused, naming what it lacks and what it offers: 422 when
    it has no latent (the request is well-formed, but these weights can never answer it: the same code
    as every other parameter that does not fit the model, e.g. include_z_e for a VAE), 404 when a
    VQ-VAE has no prior to sample with (as for a prior named but not loaded: a reload may add one)."""
    entry = await _find(service, name)
    lacking = entry.lacks(operation)
    if lacking is not None:
        offers = ", ".join(entry.operations) or "nothing"
        detail = f"model {entry.name!r} cannot {operation}: {LACKING[lacking]}; it offers: {offers}"
        raise HTTPException(404 if lacking == PRIOR else 422, detail)
    return entry


async def _find(service: Service, name: str) -> Entry:
    entry = service.registry.get(name)
    if entry is not None and entry.warmed is not None and not entry.warmed.done():
        await asyncio.shield(entry.warmed)
        if service.registry.get(name) is not entry:
            raise NotRunningError(f"model {name!r} failed its first pass and is not served; see GET /models/problems")
    if entry is not None:
        held = holding.get()
        if held is not None:
            service.hold(entry)
            held.append(entry)
        return entry
    owner = service.registry.prior_owner(name)
    if owner is not None:
        raise HTTPException(404, f"{name!r} is a prior; use model={owner} and prior=<its API name>")
    raise HTTPException(404, f"unknown model {name!r}; loaded models: {sorted(service.registry.entries)}")
