"""Liveness, readiness, the effective configuration, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.dependencies import service_state
from app.schemas import Error, Ready, Status

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Status)
async def health() -> dict[str, str]:
    """Liveness: the process answers. Says nothing about the models."""
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses={503: {"model": Error}})
async def ready(request: Request) -> Any:
    """200 once every model is loaded and warmed up and the batchers run; 503 before and while shutting down."""
    state = service_state(request.app)
    if state != "ready":
        return JSONResponse({"detail": state}, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "models": len(request.app.state.service.registry.entries)}


@router.get("/config", responses={503: {"model": Error}})
async def config(request: Request) -> dict[str, Any]:
    """The settings in effect (GENSERVE_* environment variables), the device they resolved to, and
    per batcher the pass sizes it pads to (`pass_sizes`: the batch-invariant sizes found at
    start-up with pad_batches; null where passes are unpadded), and the passes that compute at once
    (`resolved_compute_slots`: null when nothing is scheduled, app/scheduling.py), and per batcher
    the pass sizes it replays from CUDA graphs (`graph_sizes`: null where it runs eagerly, app/graphs.py)."""
    settings = request.app.state.settings
    if settings is None:
        return JSONResponse({"detail": "starting"}, status_code=503, headers={"Retry-After": "1"})
    service = getattr(request.app.state, "service", None)
    return {
        **settings.model_dump(mode="json"),
        "resolved_device": str(service.device) if service is not None else None,
        "pass_sizes": service.pass_sizes() if service is not None else None,
        "resolved_compute_slots": service.scheduler.slots if service is not None and service.scheduler else None,
        "graph_sizes": service.graph_sizes() if service is not None else None,
    }


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests by endpoint and status, batch sizes, inference latency."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
