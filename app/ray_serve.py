"""Ray Serve: the app of `python -m app` (app/main.py's create_app, same routes and settings) in every
replica of a Ray Serve deployment, each replica with one Service and its batchers.

    serve run deploy/ray/serve.yaml          # import_path: app.ray_serve:build

Needs `ray[serve]` (pip install -e '.[ray]'); `import app` never imports this module. Written against
Ray 2.60, whose source says how a replica runs the app:

- Start-up. A replica runs, in order: the constructor, `__serve_build_asgi_app__` (the app, built
  here from the replica's GENSERVE_* environment and `settings` overrides), the app's lifespan
  startup (uvicorn's LifespanOn, ray/serve/_private/http_util.py ASGIAppReplicaWrapper), then
  `check_health` (replica.py `initialize`: "A new replica should not be considered healthy until it
  passes an initial health check"). Ray routes requests to it only after all of that. The lifespan
  runs after the constructor, so the models are awaited in `check_health`: where the lifespan
  returns at once and loads in the background (`app.state.starting`, a task that resolves to the
  Service), the first check waits for it, with no time limit (a slow start only logs warnings); where
  the lifespan itself loads (no `starting`), it has finished before the check.
- Health. `check_health` raises when start-up failed, when there is no Service, or when the Service
  has stopped (app/readiness.py); Ray then replaces the replica. "draining" and "recovering" (a
  batcher's worker being restarted, app/batching.py) pass: the first is a shutdown under way, the second mends itself.
- Shutdown (scaling down, redeploying, `serve shutdown`). The controller first takes the replica out
  of routing, then the replica waits `graceful_shutdown_wait_loop_s` and checks its ongoing requests,
  again every `graceful_shutdown_wait_loop_s` until none is left, then runs the app's lifespan
  shutdown (Service.stop); the controller kills it `graceful_shutdown_timeout_s` after the stop began
  (replica.py `_perform_graceful_shutdown`, deployment_state.py `stop`). `build` sets the first to
  GENSERVE_DRAIN_DELAY_S and the second to it plus GENSERVE_GRACEFUL_TIMEOUT_S, as `python -m app`
  serves for the drain delay and then gives the requests in hand the graceful timeout (app/server.py).
  Ray offers no hook when the drain begins (the class's own `__del__` runs after the lifespan
  shutdown, api.py `ASGIIngressWrapper.__del__`), so Service.begin_drain is not called: Ray's
  routing, not /ready, keeps new requests away from a replica that is stopping.
- CPU. A replica counts its `num_cpus` (ray_actor_options) as its cores: torch_threads and, on the
  CPU, compute_slots follow from them as app/service.py derives them from a machine's cores, unless
  GENSERVE_TORCH_THREADS / GENSERVE_COMPUTE_SLOTS are set (the node's cores are not this replica's).
- Which replica answered: every response carries `X-Genserve-Replica`, the replica's Ray actor name
  (`ray.get_actor(name, namespace="serve")` finds it).
- A replica that dies with requests in hand: Ray's HTTP proxy then sends no response, and its uvicorn
  answers a bare `500 Internal Server Error` (http_util.py `send_http_response_on_exception` writes an
  answer only for 408, 429 and 503). `proxy_middlewares` turns that into a JSON 503 with Retry-After,
  which the client may retry (app/client.py does, for repeatable requests); it runs in the proxy when
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.ray_serve:proxy_middlewares is set where Ray starts.

Not applied under Ray: host and port (Ray's proxy listens), header_timeout_s and
max_connections (app/protocol.py guards `python -m app`'s uvicorn, not Ray's proxy), log_format and
access_log (Ray writes each replica's logs and the proxy's access log). /metrics is the metrics of
the replica that answered.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.readiness import SHUTTING_DOWN, readiness  # imports nothing else

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from app.settings import Settings

# app.main, app.settings and torch are imported where a replica or `build` needs them, not here: Ray's
# HTTP proxy imports this module for `proxy_middlewares` and should not load torch.

REPLICA_HEADER = "x-genserve-replica"
# Requests a replica takes at once; more wait in Ray's router. The service batches what arrives
# together (up to max_batch_size items per pass, max_queue per batcher), so a replica should hold
# a few passes' worth rather than Ray's default of 5.
MAX_ONGOING_REQUESTS = 128


def replica_settings(overrides: dict[str, Any], cpus: float | None) -> Settings:
    """The replica's settings: GENSERVE_* variables, then `overrides`; with `cpus` (the replica's
    num_cpus) as its cores, torch_threads = max(1, cores // 2) and on the CPU compute_slots =
    max(1, cores // torch_threads), app/service.py's rule, where neither is set."""
    from app.settings import Settings

    settings = Settings(**overrides)
    if cpus is None:
        return settings
    cores = max(1, int(cpus))
    derived: dict[str, Any] = {}
    threads = settings.torch_threads or max(1, cores // 2)
    if settings.torch_threads is None:
        derived["torch_threads"] = threads
    if settings.compute_slots is None and settings.resolve_device().type == "cpu":
        derived["compute_slots"] = max(1, cores // threads)
    return Settings(**{**overrides, **derived}) if derived else settings


class ReplicaHeaders:
    """Adds X-Genserve-Replica (the replica's actor name) to every response, and leaves the echo of
    the request's X-Request-ID to Ray's proxy.

    Ray's proxy gives every request an X-Request-ID (the client's, else a new uuid) and appends it to
    the response (http_util.py RequestIdMiddleware); the app echoes the same id (app/middleware.py's
    RequestContext), so the client would see the header twice ("id, id"). The app's copy is dropped
    when it is that id; when the app made a new one (the client's was malformed), both stay."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if not (k.lower() == b"x-request-id" and v == given)]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


@serve.deployment(name="genserve", max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
@serve.ingress()  # the app is built in each replica, by __serve_build_asgi_app__
class GenServe:
    """One replica: create_app(settings) and its Service."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        self.settings = replica_settings(dict(settings or {}), cpus)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app (Ray's wrapper then keeps it as `self.app` and runs its lifespan)."""
        from app.main import create_app

        app = create_app(self.settings)
        app.add_middleware(ReplicaHeaders, replica=serve.get_replica_context().replica_id.to_full_id_str())
        return app

    async def check_health(self) -> None:
        """Raise when this replica cannot serve and will not recover (Ray then replaces it); the first
        call, right after the lifespan startup, waits until every model is loaded."""
        starting: asyncio.Task | None = getattr(self.app.state, "starting", None)
        if starting is not None:
            await asyncio.shield(starting)  # raises what start-up raised; a cancelled check leaves it running
        if self.app.state.service is None:
            raise RuntimeError("no Service: start-up has not completed")
        if readiness(self.app).state == SHUTTING_DOWN:
            raise RuntimeError("the Service has stopped")


def shutdown_options(settings: Settings) -> dict[str, float]:
    """Ray's shutdown timing from the service's: check for ongoing requests first after the drain
    delay, and be killed after drain delay + graceful timeout (python -m app's whole shutdown)."""
    return {
        "graceful_shutdown_wait_loop_s": settings.drain_delay_s,
        "graceful_shutdown_timeout_s": settings.drain_delay_s + settings.graceful_timeout_s,
    }


def build(args: dict[str, Any]) -> Application:
    """The application of deploy/ray/serve.yaml (`import_path: app.ray_serve:build`).

    `args["settings"]`: settings that override the GENSERVE_* variables of the runtime_env, in every
    replica. Ray runs this with the application's runtime_env, so the settings are validated here
    and a bad one fails the deploy before any replica starts. The config file's own deployment
    options (autoscaling, num_cpus, max_ongoing_requests, and the shutdown timing if given) override
    what is set here.
    """
    from app.settings import Settings

    overrides = dict(args.get("settings") or {})
    return GenServe.options(**shutdown_options(Settings(**overrides))).bind(overrides)


class ReplicaLostAs503:
    """In Ray's HTTP proxy: a request that got no response at all (its replica died while it ran) is
    answered 503 with Retry-After, in the service's JSON error form, instead of uvicorn's bare 500.

    Ray's proxy (proxy.py `send_request_to_replica`) writes nothing when the call to the replica
    fails with anything but a timeout (408), backpressure (503) or an unavailable deployment (503);
    an error inside the app never gets here (the app answers it itself, app/errors.py). A client that
    has gone away gets nothing (uvicorn drops the write)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        if started:
            return
        body = {"detail": "the replica serving this request stopped before it answered; retry"}
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def proxy_middlewares() -> list[Middleware]:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.ray_serve:proxy_middlewares: Ray's HTTP proxy
    calls this once at start and wraps itself in what it returns (http_util.py configure_http_middlewares)."""
    return [Middleware(ReplicaLostAs503)]
