"""uvicorn, with a start-up and a shutdown an orchestrator can follow: `bind(settings)`, `run(app, settings, sock)`.

One process is one replica: scale by starting more (Kubernetes, Ray Serve, compose), each with
its own port or behind a load balancer.

Start-up: `python -m app` binds its port before it imports torch or loads a model (a port in use
fails at once), then the app's lifespan returns at once and the models load in the background:
GET /health answers 200 and GET /ready 503 "starting" until they are all loaded (app/main.py).
A start-up that fails stops the process with uvicorn's start-up failure exit code (3).

On SIGTERM or SIGINT the process
1. marks its Service draining at once (`Service.begin_drain`: GET /ready answers 503, every other
   route keeps serving),
2. keeps serving for `drain_delay_s`, so the load balancer sees /ready fail and takes it out of
   rotation, then
3. lets uvicorn shut down: the listener closes (new connections are refused) and the requests in
   hand get up to `graceful_timeout_s` (uvicorn's timeout_graceful_shutdown) before being cancelled;
   then the lifespan stops the batchers.
A second signal during the delay ends the delay at once (a third SIGINT forces the exit, as in uvicorn).

Every connection is held to a deadline for its request headers (header_timeout_s) and the
open connections to max_connections, as app/protocol.py describes; `bind` first raises
the process's soft open file limit to its hard limit.

Written against uvicorn's `Server.handle_exit` and `on_tick` (0.54 and 0.55).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE

from app.logs import log_config
from app.protocol import (
    RESERVED_FDS,
    ConnectionLimits,
    GuardedConfig,
    default_max_connections,
    protocol_class,
    raise_open_file_limit,
)
from app.settings import Settings

if TYPE_CHECKING:
    from app.service import Service

log = logging.getLogger(__name__)


# A SIGHUP (rescan the weights directory) that came before the app could act on it: from the bind
# on (`catch_hangup_early`: its default action would end the process) until the service is ready.
# app/main.py rescans once the service is ready when it is set.
hangup_pending = threading.Event()


def catch_hangup_early() -> None:
    """Until the app installs its own handler, a SIGHUP is remembered instead of ending the process."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: hangup_pending.set())


class DrainingServer(uvicorn.Server):
    """A uvicorn Server whose first SIGTERM/SIGINT drains the service before shutting down.

    The Service is found in the loaded app (`app.state.service`, below uvicorn's middleware); a
    signal that arrives before start-up has finished, or for an app without a Service, shuts down
    at once as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.start_failed = False  # the app's start-up failed (start_failed): exit with STARTUP_FAILURE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_signal: int | None = None  # the signal that started the drain
        self._drain_deadline: float | None = None  # time.monotonic() at which the drain delay ends

    @property
    def service(self) -> Service | None:
        """The running app's Service, or None (not loaded or not started yet, or not a genserve app)."""
        app = getattr(self.config, "loaded_app", None)
        while app is not None and not isinstance(app, Starlette):
            app = getattr(app, "app", None)  # uvicorn's ProxyHeadersMiddleware and friends keep the app as .app
        return getattr(app.state, "service", None) if app is not None else None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def start_failed_with(self, error: BaseException) -> None:
        """The app's `on_start_failure` (app/main.py), on the event loop: shut down at once, exit with 3."""
        self.start_failed = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread): start the drain, or end it early, or defer to uvicorn."""
        service = self.service if self.started else None
        if self.should_exit or self._drain_signal is not None or service is None or self._loop is None:
            # Already shutting down (a second SIGINT forces the exit), a second signal during the
            # delay (shut down now), or nothing to drain yet.
            super().handle_exit(sig, frame)
            return
        delay = service.settings.drain_delay_s
        self._drain_signal = sig
        self._drain_deadline = time.monotonic() + delay
        # The loop runs begin_drain (and its log line) outside the signal handler.
        self._loop.call_soon_threadsafe(self._begin_drain, service, sig, delay)

    def _begin_drain(self, service: Service, sig: int, delay: float) -> None:
        service.begin_drain()
        log.info(
            "received %s: serving for %.1f s more while /ready answers 503, then closing the listener and "
            "giving requests in hand up to %.1f s (send the signal again to skip the wait)",
            signal.Signals(sig).name, delay, self.config.timeout_graceful_shutdown or 0,
        )

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main-loop tick (every 0.1 s); ends the drain delay by starting uvicorn's shutdown."""
        sig, deadline = self._drain_signal, self._drain_deadline
        if sig is not None and deadline is not None and not self.should_exit and time.monotonic() >= deadline:
            super().handle_exit(sig, None)
        return await super().on_tick(counter)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The per-connection limits of settings (max_connections=None: derived from the open file limit now)."""
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
    )


def make_config(app: Any, settings: Settings, **overrides: Any) -> GuardedConfig:
    """The uvicorn configuration `run` serves with: settings' address, logs and shutdown
    timeout, and the connection limits of app/protocol.py. `overrides` go to uvicorn.Config as they are."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": settings.access_log,
        "log_config": log_config(settings.log_format),
        "timeout_graceful_shutdown": settings.graceful_timeout_s,  # a float works
        "http": protocol_class(settings.http),
        "loop": settings.loop,
    }
    return GuardedConfig(app, limits=connection_limits(settings), **{**options, **overrides})


def bind(settings: Settings) -> socket.socket:
    """Raise the open file limit, then bind and listen on settings.host:port (uvicorn's own binding:
    IPv4 or IPv6, SO_REUSEADDR). A port in use logs uvicorn's error and exits with 3 (STARTUP_FAILURE). Connections
    that arrive before the app runs wait in the backlog rather than being refused."""
    raise_open_file_limit()  # before the limits are derived from it
    config = make_config(None, settings)
    config.configure_logging()  # uvicorn's error line for a port in use goes through its loggers
    sock = config.bind_socket()
    sock.listen(config.backlog)
    return sock


def run(app: Any, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve `app` with uvicorn on `sock` (from `bind`; bound here when None), draining on
    SIGTERM/SIGINT (see the module doc), with the header deadline and connection cap of
    app/protocol.py. Exits with uvicorn's start-up failure code (3) when the app's start-up fails."""
    if sock is None:
        sock = bind(settings)
    file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    config = make_config(app, settings)
    limits = config.connection_limits
    log.info(
        "connections: at most %d open (max_connections; open file limit %d), request headers "
        "within %g s (header_timeout_s)", limits.max_connections, file_limit, limits.header_timeout_s,
    )
    if limits.max_connections > file_limit - RESERVED_FDS:
        log.warning("max_connections=%d leaves fewer than %d of the %d open files for everything else: "
                    "accepting may fail with 'Too many open files'", limits.max_connections, RESERVED_FDS, file_limit)
    server = DrainingServer(config)
    state = getattr(app, "state", None)
    if state is not None:
        state.on_start_failure = server.start_failed_with
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises a captured SIGINT once it has shut down
        pass
    if not server.started or server.start_failed:
        sys.exit(STARTUP_FAILURE)
