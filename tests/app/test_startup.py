"""The start-up of a real `python -m app` (app/__main__.py, app/server.py, app/main.py).

The port is bound before anything heavy is imported, the listener answers while the models load
(/health 200, /ready 503 "starting"), a port in use fails before any model is loaded, and a start-up
that fails exits with uvicorn's start-up failure code. Nothing here is timed: a start-up is held
in the middle deterministically by a FIFO named like a weight file, which the loader blocks on
reading until the test writes to it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.test_drain import REPO, START_TIMEOUT_S, free_port, server_process


def wait_for(predicate, what: str, timeout_s: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def held_weights(weights_dir: Path, tmp_path: Path) -> Path:
    """The tiny VAE and, sorted after it, a FIFO named like a weight file: loading blocks on it."""
    d = tmp_path / "weights"
    d.mkdir()
    shutil.copy(weights_dir / "vae.safetensors", d)
    os.mkfifo(d / "zz_held.safetensors")
    return d


def test_the_listener_answers_while_the_models_load(tmp_path: Path, held_weights: Path) -> None:
    with server_process(tmp_path, held_weights, wait_ready=False) as server:
        health = wait_for(lambda: httpx.get(f"{server.base_url}/health", timeout=5), "/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        # the loader counts the VAE, then blocks on the FIFO: /ready says how far it has got
        ready = wait_for(lambda: (r := httpx.get(f"{server.base_url}/ready", timeout=5)).json().get("loaded") == 1 and r,
                         "/ready to count the first file")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert {k: ready.json()[k] for k in ("detail", "loaded", "files")} == {"detail": "starting", "loaded": 1, "files": 2}
        models = httpx.get(f"{server.base_url}/models", timeout=5)
        assert models.status_code == 503 and "starting" in models.json()["detail"]
        sample = httpx.get(f"{server.base_url}/sample", params={"model": "vae"}, timeout=5)
        assert sample.status_code == 503 and sample.headers["retry-after"] == "1"
        with open(held_weights / "zz_held.safetensors", "wb"):  # release the loader: the FIFO reads as empty
            pass
        wait_for(lambda: httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200, "/ready")
        assert [m["name"] for m in httpx.get(f"{server.base_url}/models", timeout=5).json()] == ["vae"]
        [problem] = httpx.get(f"{server.base_url}/models/problems", timeout=5).json()
        assert problem["file"] == "zz_held.safetensors" and "cannot load" in problem["reason"]
        assert httpx.get(f"{server.base_url}/sample", params={"model": "vae", "seed": 1}, timeout=30).status_code == 200


def test_a_port_in_use_fails_before_any_model_is_loaded(tmp_path: Path, held_weights: Path) -> None:
    """A loader that had started would block on the FIFO for ever: the exit shows it never started.
    (app/__main__.py binds before it imports torch: test_python_m_app_binds_before_importing_torch.)"""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with server_process(tmp_path, held_weights, wait_ready=False, port=port) as server:
            assert server.proc.wait(START_TIMEOUT_S) == 3  # uvicorn's start-up failure
            logs = server.logs()
    assert "address already in use" in logs.lower()
    assert "ready on" not in logs and "Application startup" not in logs


def test_a_failed_start_up_exits_with_code_3(tmp_path: Path) -> None:
    with server_process(tmp_path, tmp_path / "nowhere", wait_ready=False) as server:
        assert server.proc.wait(START_TIMEOUT_S) == 3
        logs = server.logs()
    assert "start-up failed: FileNotFoundError" in logs and "nowhere" in logs


def test_python_m_app_binds_before_importing_torch() -> None:
    """app/__main__.py imports app.server and app.settings, then binds: neither may import torch."""
    code = "import sys, app.server, app.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_connections_on_the_bound_socket_send_without_delay(weights_dir: Path) -> None:
    """`bind` makes the listening socket by hand (proto 0), so asyncio does not set TCP_NODELAY on the
    connections it accepts; app/protocol.py's `no_delay` does (without it, Nagle held every answer's
    body for the client's delayed ACK: 40 ms a request). Checked on the server's own sockets."""
    import socket as socket_module
    import threading

    from app.protocol import no_delay
    from app.server import DrainingServer, bind, make_config
    from app.settings import Settings

    class Transport:
        def __init__(self, sock):
            self.sock = sock

        def get_extra_info(self, name):
            return self.sock if name == "socket" else None

    with socket_module.socket() as raw:  # proto 0, as bind_socket makes it
        assert raw.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) == 0
        no_delay(Transport(raw))
        assert raw.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) != 0

    settings = Settings(port=free_port(), weights_dir=weights_dir, device="cpu", loop="asyncio", check_cache_dir=None,
                        reload_interval_s=0)
    sock = bind(settings)
    from app.main import create_app

    server = DrainingServer(make_config(create_app(settings), settings, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server")
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as client:
            assert client.get("/health").status_code == 200  # the connection stays open (keep-alive)
            [connection] = list(server.server_state.connections)
            accepted = connection.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) != 0
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
