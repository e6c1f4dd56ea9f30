"""uvicorn's HTTP protocol with two limits it lacks: a deadline for request headers, and a cap on
open connections.

- **Header deadline.** A connection must complete a request's headers within `header_timeout_s`
  of opening, or of its previous response completing; otherwise it is closed (silently, as
  nginx's client_header_timeout does). Bytes that trickle in do not extend the deadline. Once the
  headers are in, the body has request_timeout_s (app/middleware.py's RequestContext, 408). uvicorn 0.54
  has no such deadline: its keep-alive timer starts only after a response and stops at the first
  byte of the next request, so a connection that sends part of a request line, or nothing at
  all, stays open for ever.
- **Connection cap.** When `max_connections` connections are already open, a new one is answered
  at once with a fixed `503` (`Connection: close`, `Retry-After: 1`) and closed, before anything
  is read from it, so open sockets stay bounded whatever clients do, inside the open file limit
  (the default leaves half of it for connections being accepted and refused in a burst). (uvicorn's own `limit_concurrency` cannot do this: it answers
  503 only once a request's headers are in, so connections that never send them are never
  refused; it is not set.)

Refusals and header timeouts are logged at most once per LOG_INTERVAL_S per server (the first at
once, then a count), never one line per connection.

`protocol_class(http)` is the parser GENSERVE_HTTP names, with the limits; "auto" is what uvicorn's
`http="auto"` would pick: httptools when it is installed (uvicorn[standard]), h11 otherwise.
`app/server.py` hands it to uvicorn with a `GuardedConfig`, which carries the limits. Every accepted
connection also gets TCP_NODELAY (`no_delay`). Written against uvicorn's H11Protocol and
HttpToolsProtocol (0.54 and 0.55): `connection_made`, `data_received`, `on_response_complete`,
`connection_lost`, and their `cycle`, `connections` and `transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # at most one line per this many seconds for each kind of event
# File descriptors kept out of the connection budget: the listening socket, the log streams, the
# event loop's, the weight files while they load, and CUDA's (measured: 9 open in `python -m app`
# serving the shipped weights on CPU, before and after requests); the rest is headroom.
RESERVED_FDS = 256
DEFAULT_MAX_CONNECTIONS = 2048  # per worker process, when the file limit allows it


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits every connection of a server is held to (see the module doc)."""

    header_timeout_s: float
    max_connections: int


def open_file_limit() -> int:
    """The process's soft RLIMIT_NOFILE (open file descriptors)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as most servers do at start (the soft limit
    is often 1024, the hard one far higher); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:  # e.g. macOS refuses more than OPEN_MAX
            log.warning("could not raise the open file limit from %d to %d: %s", soft, target, err)
    return open_file_limit()


def default_max_connections(file_limit: int | None = None) -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer when the file limit is low: half of what RESERVED_FDS
    leaves, so connections being accepted and refused in a burst still find descriptors."""
    limit = open_file_limit() if file_limit is None else file_limit
    return max(1, min(DEFAULT_MAX_CONNECTIONS, (limit - RESERVED_FDS) // 2))


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config with the connection limits, serving with `protocol_class()` unless `http` says otherwise."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs.setdefault("http", protocol_class())
        super().__init__(app, **kwargs)
        self.connection_limits = limits


class _Throttled:
    """Counts one kind of event; logs the first at once, then at most one line per LOG_INTERVAL_S
    with the number since the last line (and the latest event's arguments)."""

    def __init__(self, level: int, first: str, later: str) -> None:
        self.level, self.first, self.later = level, first, later  # `later` starts with "%d ... %g s"
        self.count = 0
        self.args: tuple[object, ...] = ()
        self.timer: asyncio.TimerHandle | None = None

    def event(self, loop: asyncio.AbstractEventLoop, *args: object) -> None:
        self.args = args
        if self.timer is None:
            log.log(self.level, self.first, *args)
            self.timer = loop.call_later(LOG_INTERVAL_S, self._flush, loop)
        else:
            self.count += 1

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.count:
            log.log(self.level, self.later, self.count, LOG_INTERVAL_S, *self.args)
            self.count = 0
            self.timer = loop.call_later(LOG_INTERVAL_S, self._flush, loop)


@dataclass
class _ServerLogs:
    refused: _Throttled
    header_timeouts: _Throttled


_server_logs: weakref.WeakKeyDictionary[ServerState, _ServerLogs] = weakref.WeakKeyDictionary()


def _logs_for(server_state: ServerState) -> _ServerLogs:
    logs = _server_logs.get(server_state)
    if logs is None:
        logs = _server_logs[server_state] = _ServerLogs(
            refused=_Throttled(
                logging.WARNING,
                "refused a connection: %d connections are open (max_connections); further refusals are "
                f"counted and logged every {LOG_INTERVAL_S:g} s",
                "refused %d connection(s) in the last %g s: %d connections are open (max_connections)",
            ),
            header_timeouts=_Throttled(
                logging.INFO,
                "closed a connection that had not sent a request's headers within %g s (header_timeout_s); "
                f"further ones are counted and logged every {LOG_INTERVAL_S:g} s",
                "closed %d connection(s) in the last %g s that had not sent a request's headers within %g s",
            ),
        )
    return logs


def refusal(max_connections: int) -> bytes:
    """The whole HTTP response a connection over the cap gets."""
    body = json.dumps({"detail": f"too many open connections (max_connections={max_connections}); retry shortly"})
    return (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}"
    ).encode()


class _Guarded:
    """The limits, over uvicorn's H11Protocol or HttpToolsProtocol (which come after it in the MRO)."""

    # Provided by uvicorn's protocol classes.
    connections: set[Any]
    transport: asyncio.Transport
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        limits = getattr(config, "connection_limits", None)
        if not isinstance(limits, ConnectionLimits):
            raise TypeError(f"{type(self).__name__} needs a GuardedConfig (app/protocol.py), got {type(config).__name__}")
        self.limits = limits
        self.logs = _logs_for(server_state)
        self.refused = False
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        no_delay(transport)
        if len(self.connections) >= self.limits.max_connections:
            self.refused = True
            self.transport = transport
            transport.write(refusal(self.limits.max_connections))
            transport.close()  # after the write is flushed; the 503 fits any socket buffer
            self.logs.refused.event(self.loop, len(self.connections))
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)  # type: ignore[misc]
        if self.header_timer is not None and self._request_in_hand():
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # A pipelined request whose headers were already in has started: its body has its own deadline.
        if not self.transport.is_closing() and not self._request_in_hand():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if not self.refused:
            super().connection_lost(exc)  # type: ignore[misc]

    def _request_in_hand(self) -> bool:
        """Whether a request's headers are in and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self or self._request_in_hand():
            return  # closed already, upgraded to another protocol, or its headers came in the meantime
        self.logs.header_timeouts.event(self.loop, self.limits.header_timeout_s)
        self.transport.close()


def no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a connection's socket. asyncio sets it only on sockets whose `proto` is TCP, and
    a listening socket bound by hand (uvicorn's `bind_socket`, which `python -m app` uses to bind
    before its imports) has proto 0, as do the connections it accepts: Nagle's algorithm then holds
    the body of every answer written in two parts until the client's delayed ACK, 40 ms on Linux
    (measured: /health took 44 ms a request with asyncio's loop, 1.7 ms with it set). uvloop sets it
    itself; setting it twice is harmless."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol with the limits of app/protocol.py."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed (uvicorn[standard] brings it)
    GuardedHttpToolsProtocol: type[asyncio.Protocol] | None = None
else:

    class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):  # type: ignore[no-redef]
        """uvicorn's httptools protocol with the limits of app/protocol.py."""


def protocol_class(http: str = "auto") -> type[asyncio.Protocol]:
    """The HTTP parser to serve with, with the limits: "h11", "httptools" (a ValueError when it is not
    installed), or "auto", what uvicorn's `http="auto"` picks (httptools if installed, else h11)."""
    if http == "h11":
        return GuardedH11Protocol
    if http == "httptools" and GuardedHttpToolsProtocol is None:
        raise ValueError("http='httptools' but httptools is not installed: pip install 'uvicorn[standard]', or use h11")
    return GuardedHttpToolsProtocol or GuardedH11Protocol
