"""`python -m app`: serve with uvicorn on the configured host and port (GENSERVE_HOST, GENSERVE_PORT).

With GENSERVE_WORKERS=N > 1, uvicorn starts N worker processes on the same port, each loading
every model (`app.main:app` reads its settings from the same environment) with its share of the
cores as torch threads; their Prometheus metrics are merged through a shared directory
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from app.settings import get_settings


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration plus the service's own loggers (app, models), applied in every worker."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["genserve"] = {"format": "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"}
    config["handlers"]["genserve"] = {"class": "logging.StreamHandler", "formatter": "genserve", "stream": "ext://sys.stderr"}
    for name in ("app", "models"):
        config["loggers"][name] = {"handlers": ["genserve"], "level": "INFO", "propagate": False}
    return config


def main() -> None:
    settings = get_settings()
    common = dict(host=settings.host, port=settings.port, access_log=settings.access_log, log_config=log_config())
    if settings.workers == 1:
        from app.main import create_app

        uvicorn.run(create_app(settings), **common)
        return
    with tempfile.TemporaryDirectory(prefix="genserve-metrics-") as metrics_dir:
        # A fresh directory each start (stale files would be merged in forever), set before any
        # worker imports prometheus_client; a PROMETHEUS_MULTIPROC_DIR of the caller is replaced.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("app.main:app", workers=settings.workers, **common)


if __name__ == "__main__":
    main()
