"""app/logs.py: the logging configuration `python -m app` gives uvicorn, in both formats.

Each test applies the real configuration with logging.config.dictConfig (the streams resolve to
pytest's captured stdout and stderr) and puts the loggers back afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
from collections.abc import Callable

import pytest

from app.logs import log_config, request_id

LOGGERS = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "app", "models"]


@pytest.fixture(autouse=True)
def restore_logging():
    saved = {name: (logging.getLogger(name), list(logging.getLogger(name).handlers), logging.getLogger(name).level,
                    logging.getLogger(name).propagate, logging.getLogger(name).disabled) for name in LOGGERS}
    yield
    for logger, handlers, level, propagate, disabled in saved.values():
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


def access_line(client: str = "127.0.0.1:5000", method: str = "GET", path: str = "/ready", status: int = 200) -> None:
    """A record shaped like uvicorn's access log (uvicorn/protocols/http/h11_impl.py)."""
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', client, method, path, "1.1", status)


def in_request(rid: str, fn: Callable[..., None], *args: object) -> None:
    token = request_id.set(rid)
    try:
        fn(*args)
    finally:
        request_id.reset(token)


def test_text_lines_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    logging.config.dictConfig(log_config("text"))
    in_request("req-1", logging.getLogger("app.batching").info, "pass of %d items", 3)
    in_request("req-2", access_line)
    logging.getLogger("uvicorn.error").info("Started server process")
    out, err = capsys.readouterr()
    first, started = err.splitlines()
    assert "INFO app.batching" in first and "[req req-1]: pass of 3 items" in first and f"[pid {os.getpid()}]" in first
    assert "INFO uvicorn.error" in started and "[req -]: Started server process" in started  # outside a request
    assert "[req req-2]" in out and '127.0.0.1:5000 - "GET /ready HTTP/1.1" 200' in out  # the access log, on stdout


def test_json_lines_parse_and_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    logging.config.dictConfig(log_config("json"))
    in_request("req-1", logging.getLogger("models.vae").warning, "odd %s", "shape")
    in_request("req-2", access_line, "10.0.0.1:80", "POST", "/encode?model=vae", 413)
    # uvicorn adds its message with ANSI colours as an extra; it stays out of the JSON
    logging.getLogger("uvicorn.error").info("Uvicorn running", extra={"color_message": "\x1b[1mUvicorn running\x1b[0m"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        in_request("req-3", logging.getLogger("app.main").exception, "unhandled error")
    out, err = capsys.readouterr()
    warning, running, error = (json.loads(line) for line in err.splitlines())
    [access] = (json.loads(line) for line in out.splitlines())
    pid = os.getpid()
    assert {k: warning[k] for k in ("level", "logger", "message", "request_id", "pid")} == {
        "level": "WARNING", "logger": "models.vae", "message": "odd shape", "request_id": "req-1", "pid": pid}
    assert access["logger"] == "uvicorn.access" and access["request_id"] == "req-2"
    assert access["message"] == '10.0.0.1:80 - "POST /encode?model=vae HTTP/1.1" 413'
    assert running["request_id"] == "-" and "color_message" not in running
    # A traceback stays inside its line.
    assert error["request_id"] == "req-3" and error["level"] == "ERROR" and "RuntimeError: boom" in error["exc_info"]
    assert all(set(line) >= {"time", "level", "logger", "message", "request_id", "pid"} for line in (warning, running, error, access))


async def test_the_id_follows_the_request_into_its_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """A task or thread started while handling a request logs with that request's id, whatever
    another request sets meanwhile."""
    logging.config.dictConfig(log_config("json"))
    log = logging.getLogger("app.service")

    async def handle(rid: str) -> None:
        request_id.set(rid)  # each task runs in a copy of the context, as each request does
        await asyncio.sleep(0)
        await asyncio.to_thread(log.info, "in a worker thread")
        log.info("in the request's task")

    await asyncio.gather(handle("a"), handle("b"))
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert sorted(line["request_id"] for line in lines) == ["-", "a", "a", "b", "b"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log_format must be one of 'text', 'json', got 'xml'"):
        log_config("xml")  # type: ignore[arg-type]
