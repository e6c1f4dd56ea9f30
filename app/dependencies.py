"""What routes share: the service dependency, model lookup, image responses (uploads: app/uploads.py)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from app import imaging
from app.errors import NotRunningError
from app.registry import LATENT, PRIOR, Entry
from app.service import Service, holding


def service_state(app: FastAPI) -> str:
    """The one readiness check. "ready": GET /ready is 200. "draining" (shutdown has begun, requests
    are still served) and "recovering" (a batcher is being restarted) make /ready 503 but still
    serve model routes; "starting", "start-up failed" and "shutting down" refuse them too."""
    service: Service | None = getattr(app.state, "service", None)
    if service is None:
        return "start-up failed" if getattr(app.state, "start_error", None) else "starting"
    return service.state


SERVING_STATES = ("ready", "draining", "recovering")
SMALL_IMAGE_ELEMENTS = 3 * 32 * 32  # image_response encodes answers up to this size on the event loop


def get_service(request: Request) -> Service:
    state = service_state(request.app)
    if state not in SERVING_STATES:
        raise NotRunningError(f"the service is not ready ({state})", headers={"Retry-After": "1"})
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


# Why a model cannot do an operation, by what it lacks (Entry.lacks)
LACKING = {
    LATENT: "it has no latent (its decoder ignores z: it was trained with use_latent=False, as a context-only baseline)",
    PRIOR: "no prior is loaded for it (a prior's weight file names its VQ-VAE; see GET /models/problems)",
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


def wants_json(request: Request) -> bool:
    """True when the Accept header prefers application/json to image/png (q-values, then specificity)."""
    accept = request.headers.get("accept")
    if not accept:
        return False
    ranges = []
    for part in accept.split(","):
        media, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((media.strip().lower(), q))

    def score(offer: str) -> tuple[float, int]:
        kind = offer.split("/")[0]
        best = (0.0, -1)
        for media, q in ranges:
            specificity = 2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if specificity > best[1]:
                best = (q, specificity)
        return best

    as_json, as_png = score("application/json"), score("image/png")
    return as_json[0] > 0 and as_json > as_png


async def image_response(
    request: Request, images: torch.Tensor, *, nrow: int | None = None, headers: dict[str, str] | None = None
) -> Response:
    """One PNG grid of images (B, C, H, W), or {"images": [base64 PNG, ...]} for Accept: application/json.

    PNG encoding (and the JSON around base64 PNGs) runs in the service's PNG pool: a grid of 256
    images is too much work for the event loop, and the model threads have their own work. An
    answer of at most SMALL_IMAGE_ELEMENTS values (one CIFAR-10 image: a fraction of a millisecond
    to encode) is encoded right here instead, so that it never waits in the pool behind the grids
    of heavy requests.
    """
    service: Service = request.app.state.service
    small = images.numel() <= SMALL_IMAGE_ELEMENTS
    if wants_json(request):  # the JSON of 256 base64 PNGs is written in the pool too

        def encode() -> JSONResponse:
            return JSONResponse({"images": imaging.pngs_base64(images)}, headers=headers)

        return encode() if small else await service.run_io(encode)
    png = imaging.grid_png(images, nrow) if small else await service.run_io(imaging.grid_png, images, nrow)
    return Response(png, media_type="image/png", headers=headers)
