"""uvicorn, with a shutdown a load balancer can follow: `run(app, settings)`.

On SIGTERM or SIGINT each serving process
1. marks its Service draining at once (`Service.begin_drain`: GET /ready answers 503, every other
   route keeps serving),
2. keeps serving for `drain_delay_s`, so the load balancer sees /ready fail and takes it out of
   rotation, then
3. lets uvicorn shut down: the listener closes (new connections are refused) and the requests in
   hand get up to `graceful_timeout_s` (uvicorn's timeout_graceful_shutdown) before being cancelled;
   then the lifespan stops the batchers.
A second signal during the delay ends the delay at once (a third SIGINT forces the exit, as in uvicorn).

With workers > 1, uvicorn's supervisor sends each worker SIGTERM and each worker drains itself;
`DrainingMultiprocess` runs `DrainingServer` in its workers, closes the supervisor's own copy of the
listening socket (so the port refuses connections once the workers have closed theirs) and passes
a further SIGINT or SIGTERM on to the workers while it waits for them.

Every connection is held to a deadline for its request headers (header_timeout_s) and the
open connections of each process to max_connections, as app/protocol.py describes; `run` first raises
the process's soft open file limit to its hard limit.

Written against uvicorn 0.54: `Server.handle_exit` and `on_tick`, and the supervisor's `Process(config,
sockets)` with its `server` property (uvicorn 0.35 and before built workers from a `target` instead).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from app.logs import log_config
from app.protocol import RESERVED_FDS, ConnectionLimits, GuardedConfig, default_max_connections, raise_open_file_limit
from app.settings import Settings

if TYPE_CHECKING:
    from app.service import Service

log = logging.getLogger(__name__)
uvicorn_log = logging.getLogger("uvicorn.error")  # where uvicorn's supervisor logs


class DrainingServer(uvicorn.Server):
    """A uvicorn Server whose first SIGTERM/SIGINT drains the service before shutting down.

    The Service is found in the loaded app (`app.state.service`, below uvicorn's middleware); a
    signal that arrives before start-up has finished, or for an app without a Service, shuts down
    at once as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
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


class DrainingProcess(Process):
    """A uvicorn worker process that serves with DrainingServer."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(config=self.config)
        return self._server


class DrainingMultiprocess(Multiprocess):
    """uvicorn's supervisor, with DrainingProcess workers.

    init_processes, keep_subprocess_alive, restart_all (SIGHUP) and handle_ttin are uvicorn 0.54's,
    with Process replaced by DrainingProcess, so a worker started later drains like the first ones.
    """

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = DrainingProcess(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def terminate_all(self) -> None:
        """SIGTERM to every worker (each starts its drain), then close the supervisor's copy of the
        listening socket: the port closes when the last worker closes its own after its delay."""
        super().terminate_all()
        for sock in self.sockets:
            sock.close()

    def join_all(self) -> None:
        """Wait for the workers to finish, passing on a further SIGINT or SIGTERM (ending their drain delay)."""
        while any(p.process.is_alive() for p in self.processes):
            for sig in tuple(self.signal_queue):
                self.signal_queue.remove(sig)
                if sig not in (signal.SIGINT, signal.SIGTERM):
                    continue
                uvicorn_log.info("Received %s while stopping, passing it on to the workers.", signal.Signals(sig).name)
                for p in self.processes:
                    if p.process.is_alive() and p.pid is not None:
                        os.kill(p.pid, sig)
            time.sleep(0.1)
        super().join_all()

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return  # parent process is exiting, no need to keep subprocess alive

        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue

            process.kill()  # process is hung, kill it
            process.join()

            if process.exitcode == STARTUP_FAILURE:
                uvicorn_log.error(
                    f"Child process [{process.pid}] failed to start, stopping the parent process."
                )
                self.should_exit.set()
                return

            if self.should_exit.is_set():
                return

            uvicorn_log.info(f"Child process [{process.pid}] died")
            process = DrainingProcess(self.config, self.sockets)
            process.start()
            self.processes[idx] = process

    def restart_all(self) -> None:
        """Replaces each worker, bringing its replacement into service before retiring the old worker."""
        for idx, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return

            new_process = DrainingProcess(self.config, self.sockets)
            new_process.start()

            if not new_process.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    uvicorn_log.error(
                        f"New child process [{new_process.pid}] was not ready in time; "
                        f"keeping worker [{old_process.pid}] and aborting the restart."
                    )
                return

            old_process.terminate()
            old_process.join()
            self.processes[idx] = new_process

    def handle_ttin(self) -> None:
        uvicorn_log.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        process = DrainingProcess(self.config, self.sockets)
        process.start()
        self.processes.append(process)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The per-connection limits of settings (max_connections=None: derived from the open file limit now)."""
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
    )


def make_config(app: Any, settings: Settings, **overrides: Any) -> GuardedConfig:
    """The uvicorn configuration `run` serves with: settings' address, workers, logs and shutdown
    timeout, and the connection limits of app/protocol.py. `overrides` go to uvicorn.Config as they are."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "access_log": settings.access_log,
        "log_config": log_config(settings.log_format),
        "timeout_graceful_shutdown": settings.graceful_timeout_s,  # a float works
    }
    return GuardedConfig(app, limits=connection_limits(settings), **{**options, **overrides})


def run(app: Any, settings: Settings) -> None:
    """Serve `app` with uvicorn on settings.host:port, draining on SIGTERM/SIGINT (see the module doc),
    with the header deadline and connection cap of app/protocol.py (the soft open file limit raised
    to the hard one first).

    With settings.workers > 1, `app` must be an import string ("app.main:app"), which each worker imports.
    """
    if settings.workers > 1 and not isinstance(app, str):
        raise ValueError(f"workers={settings.workers} needs the app as an import string, got {type(app).__name__}")
    file_limit = raise_open_file_limit()  # before the limits are derived from it; worker processes inherit it
    config = make_config(app, settings)
    limits = config.connection_limits
    log.info(
        "connections: at most %d open per process (max_connections; open file limit %d), request headers "
        "within %g s (header_timeout_s)", limits.max_connections, file_limit, limits.header_timeout_s,
    )
    if limits.max_connections > file_limit - RESERVED_FDS:
        log.warning("max_connections=%d leaves fewer than %d of the %d open files for everything else: "
                    "accepting may fail with 'Too many open files'", limits.max_connections, RESERVED_FDS, file_limit)
    if settings.workers > 1:
        DrainingMultiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = DrainingServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises a captured SIGINT once it has shut down
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
