"""The FastAPI application: `create_app(settings)`, its lifespan, and SIGHUP's rescan.

Nothing is loaded at import: `app = create_app()` below only builds routes, so
`uvicorn app.main:app` works and settings come from GENSERVE_* variables when the
lifespan starts. The lifespan returns at once, so the server listens from the start (GET /health
answers 200, GET /ready 503 "starting"), and starts the service in the background: it loads every
model (app/registry.py), starts one batcher per operation (app/operations.py, app/batching.py),
and is ready, then warms every operation up and runs the pass size checks while serving (with
CUDA graphs, before it is ready: app/service.py); on shutdown it drains and stops them. `app.state.starting` is that
start-up task (it resolves to the Service); `app.state.service` is set when it is done. A start-up
that fails (no weights directory, a device that is missing) records why in `app.state.start_error`
(/health then answers 503 with it, /ready 503 "start-up failed": app/readiness.py) and calls
`app.state.on_start_failure` (app/server.py stops the process with it).

`create_app` puts together what the other modules hold, one concern each: the middlewares
(app/middleware.py: request ids, metrics, cancellation, the body's deadline and size), the error
handlers (app/errors.py: every error is JSON `{"detail": ...}`), and one router per concern
(app/routes/). GET / is a page to try every model in a browser (app/routes/page.py, app/static/);
/docs and /redoc document the API without fetching anything from another host (app/routes/docs.py).

A model route's data goes one way: upload (app/multipart.py) -> imaging (app/imaging.py) -> batcher
(app/batching.py, app/operations.py) -> model (models/) -> imaging -> response (app/responses.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import errors
from app.metrics import Metrics
from app.middleware import RequestContext, RequestSizeLimit
from app.registry import LoadProgress
from app.routes import docs, generate, health, models, page, uploads
from app.server import hangup_pending
from app.service import Service
from app.settings import Settings, get_settings, unknown_variables

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings=None` reads them (get_settings) when the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings or get_settings()
        for name in unknown_variables(os.environ):
            log.warning("%s is not a setting and is ignored (README.md lists the settings)", name)
        app.state.start_error = None
        app.state.progress = LoadProgress()  # how far loading has got: GET /ready's 503 while starting
        starting = asyncio.get_running_loop().create_task(
            Service.start(app.state.settings, app.state.metrics, app.state.progress), name="genserve-start")
        starting.add_done_callback(lambda task: _started(app, task))
        app.state.starting = starting
        hangup = _on_hangup(app)
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            for task in list(app.state.rescans):
                task.cancel()
            starting.cancel()  # a no-op once it is done
            try:
                service = await starting
            except (Exception, asyncio.CancelledError):
                service = None  # it stopped what it had started (Service.start); the error is logged
            if service is not None:  # stays in app.state: /ready says "shutting down" from now on
                await service.stop()

    app = FastAPI(
        title="genserve",
        summary="Batched inference for VAEs and VQ-VAEs with PixelCNN priors",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from app/routes/docs.py, with their assets served here (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.starting = None
    app.state.start_error = None
    app.state.progress = None  # a LoadProgress from the lifespan's start on
    app.state.on_start_failure = None  # called with the exception when start-up fails (app/server.py)
    app.state.rescans = set()  # SIGHUP's reloads in progress
    app.state.metrics = Metrics()

    app.add_middleware(RequestSizeLimit)
    app.add_middleware(RequestContext)  # outermost: ids, metrics and cancellation cover what RequestSizeLimit refuses

    errors.install(app)  # every error answer is JSON {"detail": ...} (app/errors.py)
    for module in (health, models, generate, uploads, page, docs):
        app.include_router(module.router)
    app.mount("/static", page.static_files(), name="static")  # the page's CSS, module and images (GET /)
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")  # Swagger UI's and ReDoc's files (/docs, /redoc)
    return app


def _on_hangup(app: FastAPI) -> bool:
    """SIGHUP rescans the weights directory at once (Service.reload); whether the handler could be
    installed (only in the main thread of a process, as under `python -m app` or uvicorn)."""
    loop = asyncio.get_running_loop()

    def hangup() -> None:
        service = getattr(app.state, "service", None)
        if service is None:
            log.info("SIGHUP: the weights directory is rescanned once start-up has finished")
            hangup_pending.set()
            return
        rescan(app, service)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):  # not the main thread; no SIGHUP
        return False
    return True


def rescan(app: FastAPI, service: Service) -> None:
    """Rescan the weights directory now (SIGHUP), in a task the app keeps until it ends."""
    log.info("SIGHUP: rescanning %s", service.settings.weights_dir)
    hangup_pending.clear()
    tasks: set[asyncio.Task] = app.state.rescans
    task = asyncio.get_running_loop().create_task(service.reload_logged(force=True), name="genserve-rescan")
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _started(app: FastAPI, task: asyncio.Task) -> None:
    """The start-up task's done callback: serve with its Service, or record why it failed."""
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        app.state.service = task.result()
        if hangup_pending.is_set():  # a SIGHUP came while starting: the files may have changed since
            rescan(app, app.state.service)
        return
    app.state.start_error = f"{type(error).__name__}: {error}"
    log.error("start-up failed: %s", app.state.start_error, exc_info=error)
    if app.state.on_start_failure is not None:
        app.state.on_start_failure(error)


app = create_app()
