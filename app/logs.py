"""Request ids and logging.

`request_id` holds the id of the request being handled (the client's X-Request-ID, or one made
up by app/middleware.py's RequestContext); `RequestIdFilter` copies it onto every log record
as `record.request_id` ("-" outside a request), so every line a request causes can carry it.

`log_config(log_format)` is the logging configuration `python -m app` hands uvicorn (which applies
it in every worker): the service's loggers (app, models), uvicorn's error and access logs and
anything else that reaches the root logger go through handlers that carry the filter, written
either as text lines (`... [req <id>]: message`) or as one JSON object per line.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS

request_id: ContextVar[str] = ContextVar("request_id", default="-")

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")

TEXT_PREFIX = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] [req %(request_id)s]"
# uvicorn.logging.AccessFormatter fills client_addr, request_line and status_code from the record's args.
TEXT_ACCESS = TEXT_PREFIX + ': %(client_addr)s - "%(request_line)s" %(status_code)s'
# The JSON keys, in order: time (ISO 8601, UTC), level, logger, message, request_id, pid; an
# exception adds exc_info. uvicorn's `color_message` extra (the message with ANSI colours) is dropped.
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s %(process)d"
JSON_RENAMES = {"levelname": "level", "name": "logger", "process": "pid"}


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (the current request's id, "-" outside one) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


def log_config(log_format: LogFormat = "text") -> dict[str, Any]:
    """A `logging.config.dictConfig` configuration for uvicorn, in `log_format` ("text" or "json").

    Two handlers, both with `RequestIdFilter`: "default" (stderr) for uvicorn's error log, the
    app and models loggers and the root logger (WARNING and above from other libraries), and
    "access" (stdout) for uvicorn's access log, one line per request.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(map(repr, LOG_FORMATS))}, got {log_format!r}")
    if log_format == "json":
        json_formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": JSON_RENAMES,
            "timestamp": "time",
            "reserved_attrs": [*RESERVED_ATTRS, "color_message", "taskName"],
        }
        formatters = {"default": json_formatter, "access": dict(json_formatter)}
    else:
        formatters = {
            "default": {"format": TEXT_PREFIX + ": %(message)s"},
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": TEXT_ACCESS, "use_colors": False},
        }

    def handler(formatter: str, stream: str) -> dict[str, Any]:
        return {"class": "logging.StreamHandler", "formatter": formatter, "filters": ["request_id"], "stream": stream}

    service_logger = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.logs.RequestIdFilter"}},
        "formatters": formatters,
        "handlers": {"default": handler("default", "ext://sys.stderr"), "access": handler("access", "ext://sys.stdout")},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "app": service_logger,
            "models": dict(service_logger),
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
