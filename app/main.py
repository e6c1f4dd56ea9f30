"""The FastAPI application: `create_app(settings)` and its lifespan.

Nothing is loaded at import: `app = create_app()` below only builds routes, so
`uvicorn app.main:app` works and settings come from GENSERVE_* variables when the
lifespan starts. The lifespan returns at once, so the server listens from the start (GET /health
answers 200, GET /ready 503 "starting"), and starts the service in the background: it loads and
warms every model (app/registry.py), starts one batcher per operation (app/operations.py,
app/batching.py), and is ready; on shutdown it drains and stops them. `app.state.starting` is that
start-up task (it resolves to the Service); `app.state.service` is set when it is done. A start-up
that fails (no weights directory, a device that is missing) makes /health and /ready answer 503
with the reason and calls `app.state.on_start_failure` (app/server.py stops the process with it).
GET / is a page to try every model in a browser (app/routes/page.py, app/static/); /docs and /redoc
document the API without fetching anything from another host (app/routes/docs.py).

Errors are always JSON `{"detail": ...}`: 404 unknown model or prior, 400 undecodable
upload, 413 too large, 422 invalid parameters (an operation the model does not offer too: GET
/models' `operations`, app/dependencies.py's find_model), 503 (+ Retry-After) queue full or not
ready, 504 timed out, 500 only for a failure inside the service. A 5xx body says in words what
failed and adds `request_id`; tracebacks and tensors go to the log only.

Every request has an id: the client's `X-Request-ID` (up to 128 characters of A-Z a-z 0-9 . _ : -)
or a new one. It is echoed in the response's X-Request-ID header and carried by every log line
the request causes (app/logs.py). A request whose client disconnects is cancelled: its queued
work is withdrawn, a running multi-step pass stops when nobody waits for it, and the metrics
count it with status 499 (client closed request), not 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import reprlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServiceError
from app.imaging import ImageError
from app.logs import request_id
from app.metrics import Metrics
from app.registry import LoadProgress
from app.routes import docs, generate, health, models, page, uploads
from app.server import hangup_pending
from app.service import Service, holding
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 1024 * 1024  # bytes allowed beyond max_files * max_upload_bytes in one request
UPLOAD_PATHS = frozenset({"/reconstruct", "/encode", "/interpolate"})  # the routes that take multipart uploads
ECHO_CHARS = 200  # a 422 shows at most this much of the offending input
MAX_ERRORS = 10  # a 422 lists at most this many errors (and says how many there were)


def _short(value: Any) -> Any:
    """An offending input as a 422 shows it: whole when short, else the start of its JSON and its size.

    A list or dict is measured by reprlib first, so that a 1 MiB input costs microseconds, not a full
    JSON encoding; its size is then given in items."""
    if isinstance(value, (list, tuple, dict)) and len(value) > ECHO_CHARS:
        return f"{reprlib.repr(value)[:ECHO_CHARS]} ({len(value)} items)"
    text = json.dumps(value, default=str)
    return value if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a 422 lists for pydantic's `errors`: at most MAX_ERRORS of them, each input cut short,
    non-finite floats as strings; when there are more, a last item says how many were left out."""
    shown = [{**e, "input": _short(e["input"])} if "input" in e else dict(e) for e in errors[:MAX_ERRORS]]
    shown = _json_safe(jsonable_encoder(shown))
    if len(errors) > MAX_ERRORS:
        left = len(errors) - MAX_ERRORS
        shown.append({"type": "more_errors", "loc": [], "msg": f"{left} more error(s) not shown; fix these first"})
    return shown


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by its repr ('inf', 'nan'), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings=None` reads them (get_settings) when the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings or get_settings()
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

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.detail}
        if exc.status_code >= 500:
            body["request_id"] = request_id.get()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every error with its whole input: a JSON body of `Infinity` or
        # `NaN` cannot be written back as strict JSON (a 500), and a body with a million errors took
        # seconds of the event loop to encode. So: a few errors, short inputs, floats as strings.
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); the log has the details", "request_id": request_id.get()},
            status_code=500,
        )

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


class RequestSizeLimit:
    """413 when a request body is too large, before it is parsed.

    The upload routes (UPLOAD_PATHS) take max_files * max_upload_bytes (+1 MiB of multipart
    overhead); every other route max_json_bytes, whatever Content-Type the client claims. A declared
    Content-Length is refused before
    anything is read; a chunked body is counted as it streams in. Each file is also held to
    max_upload_bytes as it is read (app/dependencies.py).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = scope["app"].state.settings if scope["type"] == "http" and "app" in scope else None
        if settings is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] in UPLOAD_PATHS:
            limit = settings.max_files * settings.max_upload_bytes + MULTIPART_OVERHEAD
            detail = f"request body exceeds {limit} bytes (max_files x max_upload_bytes + 1 MiB)"
        else:
            limit = settings.max_json_bytes
            detail = f"request body exceeds {limit} bytes (max_json_bytes)"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await JSONResponse({"detail": detail}, 413)(scope, receive, send)
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail)  # FastAPI's handler renders it as JSON
            return message

        await self.app(scope, receive_limited, send)


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A body refused before it has all arrived is read to its end and dropped (by uvicorn, cheaply:
# about 1 ms per MiB) when it declares at most this many bytes, so the client sees its 4xx; a
# larger or chunked one gets `Connection: close` instead, and its client may see a reset.
LINGER_BYTES = 64 * 1024 * 1024


class RequestContext:
    """Per request: its id, its metrics, its deadline for the body, its cancellation when the client
    goes away, and a JSON 500 for anything the app failed to handle.

    - The id is the client's X-Request-ID when it is well-formed (REQUEST_ID), else a new uuid4
      hex; it is set in app.logs.request_id for the request's task and echoed as X-Request-ID.
    - Requests are counted by route template (not raw path), a known method or "other", and
      status, so a client cannot create label values without bound.
    - The handler runs as a task of its own, and one reader pumps the request's messages to it,
      at most one message ahead (a body is never buffered beyond what the handler reads). When
      that reader sees `http.disconnect` before the response is complete, the handler is
      cancelled: what it queued is withdrawn (app/batching.py), and the request counts as 499.
    - A body that has not fully arrived within request_timeout_s of the request's start is 408
      (the client's slowness, not the server's), and the handler is cancelled.
    - An answer gets `Connection: close` when the rest of an unread body may be large (chunked,
      or over LINGER_BYTES), when the client sent `Expect: 100-continue` and no body yet, and
      while the service drains (so pooled clients move to another instance).
    - An exception the app did not handle is logged with the request id and answered with a JSON
      500 that carries it, in words, without the exception's text.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        state = scope["app"].state
        status = 500
        response_started = response_done = client_gone = body_late = False
        # Whether the whole body has arrived. An answer that starts before it has (an early 413, a bad
        # first file, a bad query) gets `Connection: close` when the rest may be large (chunked, or
        # over LINGER_BYTES), so the server does not go on reading it. A smaller rest is read and
        # dropped by uvicorn instead: closing a socket with unread data in it sends a reset, and the
        # client may then never see its 4xx.
        length = headers.get(b"content-length", b"")
        body_done = length in (b"", b"0") and b"transfer-encoding" not in headers
        close_early = not (length.isdigit() and int(length) <= LINGER_BYTES) or b"expect" in headers  # read at call time
        start = time.perf_counter()
        inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, response_done
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                service = getattr(state, "service", None)
                close = (close_early and not body_done) or bool(service is not None and service.draining)
                close = close and (b"connection", b"close") not in message.get("headers", [])
                extra = [(b"x-request-id", rid.encode())] + ([(b"connection", b"close")] if close else [])
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response_done = True
            await send(message)

        state.metrics.requests_in_progress.inc()
        held: list = []  # the models this request finds (Service.hold), released when it ends
        holding_token = holding.set(held)
        handler = asyncio.ensure_future(self.app(scope, inbox.get, send_with_id))
        holding.reset(holding_token)

        async def pump() -> None:
            nonlocal client_gone, body_done
            while True:
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False):
                    body_done = True
                if message["type"] == "http.disconnect":
                    if not response_done and not handler.done():
                        client_gone = True
                        handler.cancel()
                    if not inbox.full():
                        inbox.put_nowait(message)
                    return
                await inbox.put(message)

        def body_deadline() -> None:
            nonlocal body_late
            if not body_done and not response_started and not handler.done():
                body_late = True
                handler.cancel()

        reader = asyncio.ensure_future(pump())
        settings = getattr(state, "settings", None)
        timer = (
            asyncio.get_running_loop().call_later(settings.request_timeout_s, body_deadline)
            if settings is not None and not body_done
            else None
        )
        try:
            await handler
        except asyncio.CancelledError:
            if client_gone:
                status = 499  # nginx's "client closed request": nobody is left to answer
            elif body_late:
                limit = settings.request_timeout_s  # type: ignore[union-attr]
                body = {"detail": f"the request body did not arrive within {limit:g} s"}
                await self._answer(send_with_id, 408, body, close=True)
            else:  # the server is cancelling this request (shutdown): pass it on
                handler.cancel()
                raise
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            detail = {"detail": "internal error: the log has the details", "request_id": rid}
            await self._answer(send_with_id, 500, detail, close=False)
        finally:
            if timer is not None:
                timer.cancel()
            reader.cancel()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            state.metrics.observe_request(endpoint, scope["method"], status, time.perf_counter() - start)
            state.metrics.requests_in_progress.dec()
            service = getattr(state, "service", None)
            for entry in held:
                service.release(entry)
            request_id.reset(token)

    @staticmethod
    async def _answer(send: Send, status: int, body: dict[str, Any], close: bool) -> None:
        """A JSON answer written here, through `send` (which adds the request id, and Connection: close
        where an unread body calls for it; `close` asks for it in any case)."""
        headers = [(b"content-type", b"application/json")] + ([(b"connection", b"close")] if close else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


app = create_app()
