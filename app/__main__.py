"""`python -m app`: serve with uvicorn on the configured host and port (GENSERVE_HOST, GENSERVE_PORT).

With GENSERVE_WORKERS=N > 1, uvicorn starts N worker processes on the same port, each loading
every model (`app.main:app` reads its settings from the same environment) with its share of the
cores as torch threads; their Prometheus metrics are merged through a shared directory
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import logging
import os
import tempfile

import uvicorn

from app.settings import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    common = dict(host=settings.host, port=settings.port, access_log=settings.access_log)
    if settings.workers == 1:
        from app.main import create_app

        uvicorn.run(create_app(settings), **common)
        return
    with tempfile.TemporaryDirectory(prefix="genserve-metrics-") as metrics_dir:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)  # before any worker imports prometheus_client
        uvicorn.run("app.main:app", workers=settings.workers, **common)


if __name__ == "__main__":
    main()
