"""The drain of a real `python -m app` under load (app/server.py).

After SIGTERM, GET /ready answers 503 while the listener is still open and requests are still
served; then the listener closes (connection refused); a request the server had accepted (an
upload whose body is still arriving) is answered after that; the process exits without
cancelling anything. Clients open a new connection per request, as a load balancer's probes do,
so a refused connection is what a client sees once the listener has closed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import image_bytes

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # start-up imports torch and warms the model up (slow on a busy 2-core machine)
CLIENTS = 3


@pytest.fixture(scope="module")
def vae_weights(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tiny MLP VAE of write_weights: the quickest start-up."""
    d = tmp_path_factory.mktemp("vae-only")
    shutil.copy(weights_dir / "vae.safetensors", d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return self.stderr.read_text() + self.stdout.read_text()


@contextmanager
def server_process(tmp_path: Path, weights: Path, wait_ready: bool = True, port: int | None = None,
                   **settings: object) -> Iterator[Server]:
    """`python -m app` on a free port (or `port`) with GENSERVE_<KEY>=value for each setting, once /ready
    answers 200 (with `wait_ready`); killed on the way out."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    env.update({"GENSERVE_WEIGHTS_DIR": str(weights), "GENSERVE_HOST": "127.0.0.1", "GENSERVE_PORT": str(port),
                "GENSERVE_DEVICE": "cpu", "GENSERVE_MAX_WAIT_MS": "1", "GENSERVE_CHECK_CACHE_DIR": "none",
                "GENSERVE_RELOAD_INTERVAL_S": "0"})
    env.update({f"GENSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # its own process group, so the finally reaches its children
    server = Server(proc, f"http://127.0.0.1:{port}", stdout, stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while wait_ready:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{server.logs()}"
            assert time.monotonic() < deadline, f"not ready after {START_TIMEOUT_S} s:\n{server.logs()}"
            try:
                if httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Outcome:
    start: float  # time.monotonic() when the request was sent
    end: float
    status: int | None = None  # None: no response
    detail: str | None = None  # the JSON error detail of a non-200 response
    error: str | None = None  # the transport error, when there was no response


def fetch(client: httpx.Client, url: str) -> Outcome:
    start = time.monotonic()
    try:
        r = client.get(url)
    except httpx.TransportError as err:
        return Outcome(start, time.monotonic(), error=type(err).__name__)
    detail = r.json().get("detail") if r.status_code != 200 else None
    return Outcome(start, time.monotonic(), r.status_code, detail)


@dataclass
class Load:
    """CLIENTS threads asking for /sample in a loop and one polling /ready, each on a new connection
    per request, each until its first refused connection (or stop)."""

    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[list[Outcome]] = field(default_factory=lambda: [[] for _ in range(CLIENTS)])
    ready: list[Outcome] = field(default_factory=list)

    def _loop(self, path: str, outcomes: list[Outcome], pause_s: float) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60, headers={"Connection": "close"}) as client:
            while not self.stop.is_set():
                outcomes.append(outcome := fetch(client, path))
                if outcome.error == "ConnectError":  # refused: the listener has closed
                    return
                time.sleep(pause_s)

    @contextmanager
    def running(self) -> Iterator[Load]:
        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            futures = [pool.submit(self._loop, "/sample?model=vae&n=1", outcomes, 0) for outcomes in self.samples]
            futures.append(pool.submit(self._loop, "/ready", self.ready, 0.02))
            try:
                yield self
            finally:
                self.stop.set()
                for f in futures:
                    f.result()

    def wait(self, condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.02)

    def first_ready(self, predicate: Callable[[Outcome], bool]) -> Outcome | None:
        return next((o for o in list(self.ready) if predicate(o)), None)

    def refused(self) -> Outcome | None:
        return self.first_ready(lambda o: o.error == "ConnectError")


@contextmanager
def held_upload(base_url: str) -> Iterator[tuple[threading.Event, Future]]:
    """POST /encode whose last bytes wait for release.set(): accepted by the server (its headers
    and most of its body have been sent when this yields) but not complete until then."""
    request = httpx.Request("POST", f"{base_url}/encode", params={"model": "vae"},
                            files={"file": ("held.png", image_bytes(), "image/png")})
    data = request.read()
    headers = {"Content-Type": request.headers["Content-Type"], "Content-Length": str(len(data)),
               "X-Request-ID": "held-upload"}
    sent, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield data[:-16]
        sent.set()  # the generator resumes once the bytes above are written
        release.wait(60)
        yield data[-16:]

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(1) as pool:
        response = pool.submit(client.post, request.url, content=body(), headers=headers)
        assert sent.wait(30), "the held upload was not sent"
        try:
            yield release, response
        finally:
            release.set()


def check_drain(server: Server, load: Load, held: Future, signalled: float) -> None:
    """The drain seen from outside, once the process has exited."""
    first_503 = load.first_ready(lambda o: o.status == 503)
    refused = load.refused()
    assert first_503 is not None and first_503.detail == "draining", load.ready
    assert all(o.status == 200 for o in load.ready if o.end < signalled), "/ready was not ready before the signal"
    # /ready turned 503 before the listener closed, and never came back.
    after_503 = load.ready[load.ready.index(first_503):]
    assert refused is not None and refused in after_503
    assert all(o.status == 503 or o.error for o in after_503)
    samples = [o for outcomes in load.samples for o in outcomes]
    # Every request that got a response got its image: none was refused for draining nor failed.
    assert all(o.status == 200 for o in samples if o.status is not None), [o for o in samples if o.status != 200]
    # Requests kept being served after /ready turned 503.
    assert any(o.status == 200 and o.start > first_503.end for o in samples)
    # A request without a response is one the closing server never read: it came after the drain began.
    assert all(o.end > first_503.end for o in samples if o.error), [o for o in samples if o.error]
    # The upload accepted before the listener closed was answered after it closed.
    response = held.result(timeout=30)
    assert response.status_code == 200, response.text
    assert [item["file"] for item in response.json()["items"]] == ["held.png"]
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # with one worker uvicorn re-raises the signal
    logs = server.logs()
    assert "timeout graceful shutdown exceeded" not in logs and "Traceback" not in logs, logs


def test_sigterm_drains_then_closes_and_answers_what_it_accepted(tmp_path: Path, vae_weights: Path) -> None:
    with server_process(tmp_path, vae_weights, drain_delay_s=1.5, graceful_timeout_s=20, log_format="json") as server:
        with Load(server.base_url).running() as load:
            load.wait(lambda: all(outcomes for outcomes in load.samples) and load.ready, "the first responses")
            with held_upload(server.base_url) as (release, held):
                signalled = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                load.wait(load.refused, "the listener to close")
                release.set()
                check_drain(server, load, held, signalled)
        # log_format=json: every line of both streams is a JSON object, the access log carries request ids.
        lines = [json.loads(line) for line in server.logs().splitlines()]
        assert all({"time", "level", "logger", "message", "request_id", "pid"} <= set(line) for line in lines)
        [held_access] = [line for line in lines if line["logger"] == "uvicorn.access" and line["request_id"] == "held-upload"]
        assert "POST /encode?model=vae" in held_access["message"] and held_access["pid"] == server.proc.pid
