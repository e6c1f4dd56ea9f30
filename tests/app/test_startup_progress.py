"""Start-up says how far it has got: GET /ready's 503 counts the weight files read, and the log has a
line per file loaded, per model warmed up and per model whose pass sizes are checked, then a summary;
each batcher's pass sizes are logged at DEBUG only."""

import asyncio
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.registry import LoadProgress

from .conftest import make_settings, started


async def test_ready_counts_the_files_read_while_starting(weights_dir: Path, tmp_path: Path):
    """The tiny VAE and, sorted after it, a FIFO named like a weight file: loading blocks on it, with 1 of 2 read."""
    shutil.copy(weights_dir / "vae.safetensors", tmp_path)
    held = tmp_path / "zz_held.safetensors"
    os.mkfifo(held)
    app = create_app(make_settings(tmp_path))
    released = False

    def release() -> None:  # the loader reads the FIFO as empty: the file is refused, start-up goes on
        with open(held, "wb"):
            pass

    try:
        async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                deadline = time.monotonic() + 60
                while (body := (r := await client.get("/ready")).json()).get("loaded") != 1:
                    assert time.monotonic() < deadline, body
                    await asyncio.sleep(0.02)
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert body["detail"] == "starting"  # what probes and the Kubernetes doc read, unchanged
                assert body["files"] == 2 and body["elapsed_s"] >= 0 and set(body) == {"detail", "loaded", "files", "elapsed_s"}
                await asyncio.to_thread(release)
                released = True
                await app.state.starting
                r = await client.get("/ready")
                assert r.status_code == 200 and r.json() == {"status": "ready", "models": 1}
    finally:
        if not released:
            await asyncio.to_thread(release)


def test_load_progress_counts_from_another_thread():
    progress = LoadProgress()
    assert progress.snapshot()["files"] is None and progress.snapshot()["loaded"] == 0
    progress.found(400)
    threads = [threading.Thread(target=lambda: [progress.read_one() for _ in range(100)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = progress.snapshot()
    assert (snapshot["loaded"], snapshot["files"]) == (400, 400) and snapshot["elapsed_s"] >= 0


async def test_the_schema_documents_ready_while_starting(weights_dir: Path):
    app = create_app(make_settings(weights_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        schema = (await client.get("/openapi.json")).json()
    ref = schema["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"]
    props = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert {"detail", "loaded", "files", "elapsed_s"} <= set(props)


async def test_start_up_logs_its_progress_and_keeps_pass_sizes_at_debug(weights_dir: Path, caplog):
    caplog.set_level(logging.DEBUG, logger="app")
    async with started(weights_dir):
        pass
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name.startswith("app.")]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name.startswith("app.")]
    files = len(list(weights_dir.glob("*.safetensors")))  # 6: three models and three priors
    loaded = [m for m in info if m.startswith("loaded ")]
    assert [re.match(r"loaded (\d+)/(\d+) files \(", m).groups() for m in loaded] == [(str(i), str(files)) for i in range(1, files + 1)]
    assert all(re.search(r" in \d+\.\d\d s$", m) for m in loaded)
    assert any(m.startswith(f"weights directory {weights_dir}: {files} file(s), {files} read, 3 model(s) and 3 prior(s)")
               for m in info)
    warmed = [m for m in info if m.startswith("warm-ups: ")]
    assert [m.split()[1] for m in warmed] == ["1/3", "2/3", "3/3"]
    checks = [m for m in info if m.startswith("pass size checks: ")]
    assert len(checks) == 3 and re.match(r"pass size checks: (\d+)/\1 done", checks[-1])  # one per model, the last all
    assert sum(m.startswith("pass size checks done: ") for m in info) == 1
    assert not [m for m in info if "pass sizes" in m]  # per batcher: DEBUG only
    assert sum("pass sizes" in m for m in debug) == int(re.match(r"pass size checks: (\d+)/", checks[-1]).group(1))
