"""`python -m app`: serve with uvicorn on the configured host and port (GENSERVE_HOST, GENSERVE_PORT).

On SIGTERM or SIGINT the service drains before it stops (app/server.py): GET /ready answers 503
at once, requests are served for GENSERVE_DRAIN_DELAY_S more, then the listener closes and the
requests in hand get up to GENSERVE_GRACEFUL_TIMEOUT_S. Logs are text lines or, with
GENSERVE_LOG_FORMAT=json, one JSON object per line, each with its request id (app/logs.py).

With GENSERVE_WORKERS=N > 1, uvicorn starts N worker processes on the same port, each loading
every model (`app.main:app` reads its settings from the same environment) with its share of the
cores as torch threads; their Prometheus metrics are merged through a shared directory
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import os
import tempfile

from app.server import run
from app.settings import get_settings


def main() -> None:
    settings = get_settings()
    if settings.workers == 1:
        from app.main import create_app

        run(create_app(settings), settings)
        return
    with tempfile.TemporaryDirectory(prefix="genserve-metrics-") as metrics_dir:
        # A fresh directory each start (stale files would be merged in forever), set before any
        # worker imports prometheus_client; a PROMETHEUS_MULTIPROC_DIR of the caller is replaced.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        run("app.main:app", settings)


if __name__ == "__main__":
    main()
