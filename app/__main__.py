"""`python -m app`: serve with uvicorn on the configured host and port (GENSERVE_HOST, GENSERVE_PORT)."""

from __future__ import annotations

import logging

import uvicorn

from app.main import create_app
from app.settings import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=settings.access_log)


if __name__ == "__main__":
    main()
