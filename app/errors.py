"""The service's errors, each with its HTTP status, and `deadline`, which bounds a request.

app/main.py renders every `ServiceError` as `{"detail": ...}` with its status and headers.
The batcher (app/batching.py) raises these types and knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ServiceError(Exception):
    """An error with an HTTP status: app/main.py turns it into `{"detail": ...}`."""

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


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """Bound a request's whole handling; raises RequestTimeoutError (504) when it runs out."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"request timed out after {seconds:g} s") from None
