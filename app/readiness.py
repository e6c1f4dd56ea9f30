"""Readiness, decided once: `readiness(app)` says what the service can do now, and why not.

    state              GET /health       GET /ready        model routes
    "starting"         200               503 (+ progress)  503
    "start-up failed"  503 (+ reason)    503               503
    "ready"            200               200               served
    "draining"         200               503               served, each answer with Connection: close
    "recovering"       200               503               served
    "shutting down"    200               503               503

"starting": the lifespan's start-up task is still loading (app/main.py); "start-up failed": it
raised, and `reason` says what; "draining": shutdown has begun (Service.begin_drain, app/server.py)
and requests are still served; "recovering": a batcher's worker is being restarted
(app/batching.py); "shutting down": Service.stop has run. `draining` stays true from begin_drain
on, while shutting down too: every answer then closes its connection, so pooled clients move to
another instance.

Its callers: GET /health and GET /ready (app/routes/health.py), the dependency every model route
gets the service from (app/dependencies.py's get_service), app/middleware.py's RequestContext
(Connection: close) and app/ray_serve.py's health check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

STARTING = "starting"
FAILED = "start-up failed"
READY = "ready"
DRAINING = "draining"
RECOVERING = "recovering"
SHUTTING_DOWN = "shutting down"
SERVING = frozenset({READY, DRAINING, RECOVERING})  # the states in which model routes answer


@dataclass(frozen=True)
class Readiness:
    state: str  # one of the states above
    reason: str | None = None  # why start-up failed (FAILED only)
    draining: bool = False  # shutdown has begun (Service.begin_drain): answers close their connection

    @property
    def alive(self) -> bool:
        """GET /health's 200: the process serves, or will once it has started."""
        return self.state != FAILED

    @property
    def ready(self) -> bool:
        """GET /ready's 200."""
        return self.state == READY

    @property
    def serving(self) -> bool:
        """Whether model routes answer (else 503 with Retry-After)."""
        return self.state in SERVING


def readiness(app: FastAPI) -> Readiness:
    """The app's readiness, from its start-up (app.state: `service`, `start_error`) and its Service."""
    service = getattr(app.state, "service", None)
    if service is None:
        error = getattr(app.state, "start_error", None)
        return Readiness(FAILED, reason=error) if error else Readiness(STARTING)
    if not service.ready:
        state = SHUTTING_DOWN
    elif service.draining:
        state = DRAINING
    elif any(not b.alive for b in service.batchers.values()):
        state = RECOVERING
    else:
        state = READY
    return Readiness(state, draining=service.draining)
