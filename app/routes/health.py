"""Liveness, readiness (as app/readiness.py decides them), the effective configuration, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.readiness import STARTING, readiness
from app.schemas import Error, NotReady, Ready, Status

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Status, responses={503: {"model": Error}})
async def health(request: Request) -> Any:
    """Liveness: the process answers, from the moment it listens (while the models load too).
    503 only when start-up has failed for good (the reason is in `detail` and the log): a process
    that cannot serve should be restarted."""
    now = readiness(request.app)
    if not now.alive:
        return JSONResponse({"detail": f"start-up failed: {now.reason}"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses={503: {"model": NotReady}})
async def ready(request: Request) -> Any:
    """200 once every model is loaded and the batchers run; 503 before (`starting`), from the start of
    a drain (`draining`) and once the service has stopped (`shutting down`), while a batcher restarts
    (`recovering`), or when start-up failed (`start-up failed`). While starting,
    the 503 also says how far loading has got: `{"detail": "starting", "loaded": 3, "files": 14,
    "elapsed_s": 2.1}` (`files` is null until the weights directory is listed)."""
    now = readiness(request.app)
    if not now.ready:
        body: dict[str, Any] = {"detail": now.state}
        progress = getattr(request.app.state, "progress", None)
        if now.state == STARTING and progress is not None:
            body.update(progress.snapshot())
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "models": len(request.app.state.service.registry.entries)}


@router.get("/config", responses={503: {"model": Error}})
async def config(request: Request) -> dict[str, Any]:
    """The settings in effect (GENSERVE_* environment variables), the device they resolved to, and
    per batcher the pass sizes it pads to (`pass_sizes`: the batch-invariant sizes found at
    start-up with pad_batches; null where passes are unpadded) and where they came from
    (`pass_size_sources`: "checked" by this process, "cache" from an earlier start on the same machine,
    code and file, "default" max_batch_size alone until its check has run, or "unpadded"), the passes that compute at once
    (`resolved_compute_slots`: null when nothing is scheduled, app/scheduling.py), and per batcher
    the pass sizes it replays from CUDA graphs (`graph_sizes`: null where it runs eagerly, app/graphs.py)
    and those that run with every core when nothing else computes (`lone_pass_sizes`, app/scheduling.py)."""
    settings = request.app.state.settings
    if settings is None:
        return JSONResponse({"detail": "starting"}, status_code=503, headers={"Retry-After": "1"})
    service = getattr(request.app.state, "service", None)
    return {
        **settings.model_dump(mode="json"),
        "resolved_device": str(service.device) if service is not None else None,
        "pass_sizes": service.pass_sizes() if service is not None else None,
        "pass_size_sources": service.pass_size_source() if service is not None else None,
        "resolved_compute_slots": service.scheduler.slots if service is not None and service.scheduler else None,
        "graph_sizes": service.graph_sizes() if service is not None else None,
        "resolved_lone_pass_threads": service.lone_pass_threads() if service is not None else None,
        "lone_pass_sizes": service.lone_pass_sizes() if service is not None else None,
    }


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests by endpoint and status, requests in progress, batch sizes,
    inference latency, and the items waiting in each batcher's queue."""
    m = request.app.state.metrics
    service = getattr(request.app.state, "service", None)
    queues = {str(key): b.queued_items for key, b in service.batchers.items()} if service is not None else None
    return Response(m.render(queues), media_type=m.content_type)
