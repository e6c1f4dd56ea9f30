"""Every error the service answers with, its HTTP status, and the one way its body is written.

Types. `ServiceError` and its family carry their status and headers: the batcher (app/batching.py)
raises them and knows nothing of HTTP. `ImageError` is an upload that cannot be used, 400
(undecodable) or 413 (too large): app/imaging.py raises it. `deadline` bounds a request's whole
handling (504).

Bodies. Every error answer is JSON `{"detail": ...}`, written by `error_response`: 404 unknown
model or prior (a VQ-VAE with no prior to sample with too), 400 undecodable upload, 413 too large,
422 invalid parameters (an operation a model without a latent does not offer too: GET /models'
`operations`, app/dependencies.py's find_model), 503
(+ Retry-After) queue full or not ready, 504 timed out, 500 only for a failure inside the
service. A 5xx body says in words what failed and adds `request_id`; tracebacks and tensors go to
the log only. A 422 lists at most MAX_ERRORS errors, each offending input cut to ECHO_CHARS
(`validation_errors`).

`install(app)` registers the handlers (app/main.py's create_app calls it); app/middleware.py's
RequestContext writes its 500 (an exception nobody handled) and its 408 with `error_response` too.
FastAPI's own handler renders `HTTPException` the same way, `{"detail": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import reprlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.logs import request_id

log = logging.getLogger(__name__)

ECHO_CHARS = 200  # a 422 shows at most this much of the offending input
MAX_ERRORS = 10  # a 422 lists at most this many errors (and says how many there were)
INTERNAL_ERROR = "internal error: the log has the details"  # the 500 of an exception nobody handled


class ServiceError(Exception):
    """An error with an HTTP status: answered as `{"detail": ...}` with its status and headers."""

    status_code = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class QueueFullError(ServiceError):
    """A batcher's queue is full: retry after `Retry-After` seconds."""

    status_code = 503


class NotRunningError(ServiceError):
    """The service is starting, shutting down, or a batcher is not running."""

    status_code = 503


class RequestTimeoutError(ServiceError):
    status_code = 504


class BatchFailedError(ServiceError):
    """A forward pass raised: the batch is bisected until only the failing request is left
    (app/batching.py); that request gets this, its batch-mates their answers."""

    status_code = 500


class ImageError(ServiceError):
    """An upload that cannot be used: status 400 (undecodable) or 413 (too large); app/imaging.py."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """Bound a request's whole handling; raises RequestTimeoutError (504) when it runs out."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"request timed out after {seconds:g} s") from None


def error_response(status_code: int, detail: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Every error answer: `{"detail": detail}` with its status; a 5xx adds the request's id."""
    body: dict[str, Any] = {"detail": detail}
    if status_code >= 500:
        body["request_id"] = request_id.get()
    return JSONResponse(body, status_code=status_code, headers=headers)


def install(app: FastAPI) -> None:
    """Register the exception handlers: a ServiceError (an ImageError too) with its own status, a
    RequestValidationError as a short 422, and anything else as a 500."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every error with its whole input: a JSON body of `Infinity` or
        # `NaN` cannot be written back as strict JSON (a 500), and a body with a million errors took
        # seconds of the event loop to encode. So: a few errors, short inputs, floats as strings.
        return error_response(422, validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # RequestContext (app/middleware.py) answers an HTTP request's exception itself; one it passes
        # on (raised after the answer began) reaches this handler from Starlette's outermost
        # middleware, which sends this answer only where nothing has been sent yet.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, INTERNAL_ERROR)


def validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a 422 lists for pydantic's `errors`: at most MAX_ERRORS of them, each input cut short,
    non-finite floats as strings; when there are more, a last item says how many were left out."""
    shown = [{**e, "input": _short(e["input"])} if "input" in e else dict(e) for e in errors[:MAX_ERRORS]]
    shown = _json_safe(jsonable_encoder(shown))
    if len(errors) > MAX_ERRORS:
        left = len(errors) - MAX_ERRORS
        shown.append({"type": "more_errors", "loc": [], "msg": f"{left} more error(s) not shown; fix these first"})
    return shown


def _short(value: Any) -> Any:
    """An offending input as a 422 shows it: whole when short, else the start of its JSON and its size.

    A list or dict is measured by reprlib first, so that a 1 MiB input costs microseconds, not a full
    JSON encoding; its size is then given in items."""
    if isinstance(value, (list, tuple, dict)) and len(value) > ECHO_CHARS:
        return f"{reprlib.repr(value)[:ECHO_CHARS]} ({len(value)} items)"
    text = json.dumps(value, default=str)
    return value if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def _json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by its repr ('inf', 'nan'), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
