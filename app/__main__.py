"""`python -m app`: serve with uvicorn on the configured host and port (GENSERVE_HOST, GENSERVE_PORT).

The port is bound first, before torch is imported or any model loaded, so a port in use fails in a
fraction of a second; then the app starts and loads its models in the background (GET /health is
200 at once, GET /ready 503 "starting" until every model is loaded).

On SIGTERM or SIGINT the service drains before it stops (app/server.py): GET /ready answers 503
at once, requests are served for GENSERVE_DRAIN_DELAY_S more, then the listener closes and the
requests in hand get up to GENSERVE_GRACEFUL_TIMEOUT_S. Logs are text lines or, with
GENSERVE_LOG_FORMAT=json, one JSON object per line, each with its request id (app/logs.py).

One process serves one replica; run more of them (Kubernetes, Ray Serve, compose) to scale out.

Before torch is imported, OMP_WAIT_POLICY defaults to PASSIVE (unless set): the one thread with
more than one torch thread (a lone pass's, app/scheduling.py) then lets its idle OpenMP thread sleep
instead of spinning on a core that the event loop and the PNG pool need. On 2 cores, with lone passes
of 64 rows, p99 at concurrency 1 went from 35-37 ms spinning to 24-26 ms (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os

from app.server import bind, catch_hangup_early, run
from app.settings import get_settings


def main() -> None:
    catch_hangup_early()  # a SIGHUP while starting is remembered, not fatal
    settings = get_settings()
    sock = bind(settings)  # before the heavy imports below
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP
    from app.main import create_app  # torch, the models, FastAPI

    run(create_app(settings), settings, sock)


if __name__ == "__main__":
    main()
