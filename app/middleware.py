"""The two raw ASGI middlewares every HTTP request passes through: RequestContext (outermost), then
RequestSizeLimit. Raw ASGI, not BaseHTTPMiddleware: they see each message of a body as it arrives,
and a disconnect as it happens.

RequestContext, per request: its id (the client's `X-Request-ID`, up to 128 characters of
A-Z a-z 0-9 . _ : -, or a new one: echoed in the response's X-Request-ID header and carried by every
log line the request causes, app/logs.py), its metrics, its cancellation when the client goes away
(its queued work is withdrawn, a running multi-step pass stops when nobody waits for it, and it
counts with status 499, client closed request), the 408 deadline of its body, `Connection: close`
where an unread body may be large and while the service drains (app/readiness.py), the models it
holds (app/service.py's `holding`, released when it ends), and a JSON 500 for an exception the app
did not handle. What it answers itself is written by app/errors.py's `error_response`.

RequestSizeLimit: 413 for a body over its route's limit, before it is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import INTERNAL_ERROR, error_response
from app.logs import request_id
from app.readiness import readiness
from app.service import holding

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD = 1024 * 1024  # bytes allowed beyond max_files * max_upload_bytes in one request
UPLOAD_PATHS = frozenset({"/reconstruct", "/encode", "/interpolate"})  # the routes that take multipart uploads


class RequestSizeLimit:
    """413 when a request body is too large, before it is parsed.

    The upload routes (UPLOAD_PATHS) take max_files * max_upload_bytes (+1 MiB of multipart
    overhead); every other route max_json_bytes, whatever Content-Type the client claims. A declared
    Content-Length is refused before anything is read; a chunked body is counted as it streams in.
    Each file is also held to max_upload_bytes as it is read (app/multipart.py).
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
            return await error_response(413, detail)(scope, receive, send)
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
      while the service drains (app/readiness.py; so pooled clients move to another instance).
    - An exception the app did not handle is logged with the request id and answered with a JSON
      500 that carries it, in words, without the exception's text (app/errors.py's error_response).
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
                close = (close_early and not body_done) or readiness(scope["app"]).draining
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
                late = error_response(408, f"the request body did not arrive within {limit:g} s", {"Connection": "close"})
                await late(scope, receive, send_with_id)
            else:  # the server is cancelling this request (shutdown): pass it on
                handler.cancel()
                raise
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            await error_response(500, INTERNAL_ERROR)(scope, receive, send_with_id)
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
