"""Settings come from GENSERVE_* variables; a bad device is a clear error at startup."""

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings

from .conftest import make_settings


def test_environment_variables_with_the_prefix(monkeypatch):
    monkeypatch.setenv("GENSERVE_MAX_N", "7")
    monkeypatch.setenv("GENSERVE_PRECISION", "bf16")
    monkeypatch.setenv("GENSERVE_DEVICE", "CPU")
    s = Settings()
    assert (s.max_n, s.precision, s.device) == (7, "bf16", "cpu")
    assert s.max_upload_bytes == 10 * 1024 * 1024 and s.max_pixels == 2048 * 2048 and s.port == 8000
    assert s.max_json_bytes == 1024 * 1024 and s.drain_delay_s == 5.0 and s.graceful_timeout_s == 30.0


@pytest.mark.parametrize("field, value", [("device", "gpu"), ("device", "cuda:x"), ("precision", "fp8"), ("max_batch_size", 0)])
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_auto_device_resolves_to_what_exists():
    assert Settings(device="auto").resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_cuda_without_cuda_fails_startup_with_a_clear_error(weights_dir):
    app = create_app(make_settings(weights_dir, device="cuda"))
    async with LifespanManager(app):
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            await app.state.starting


async def test_a_missing_weights_dir_fails_startup(tmp_path):
    """The listener is up before the models load, so a failed start-up is told by /health and /ready
    (503, with the reason), and the app's on_start_failure hook is called (python -m app exits with 3)."""
    app = create_app(make_settings(tmp_path / "nowhere"))
    failures = []
    app.state.on_start_failure = failures.append
    async with LifespanManager(app) as manager:
        with pytest.raises(FileNotFoundError, match="nowhere"):
            await app.state.starting
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://test") as client:
            health, ready, models = [await client.get(p) for p in ("/health", "/ready", "/models")]
            assert health.status_code == 503 and "nowhere" in health.json()["detail"]
            assert health.json()["detail"].startswith("start-up failed: FileNotFoundError")
            assert ready.status_code == 503 and ready.json() == {"detail": "start-up failed"}
            assert models.status_code == 503
    assert len(failures) == 1 and isinstance(failures[0], FileNotFoundError)


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    """A container's CPU limit is not in the affinity mask: the threads follow the quota (rounded up)."""
    from app import service

    assert service.cgroup_cpu_limit(tmp_path) is None  # nothing to read
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert service.cgroup_cpu_limit(tmp_path) is None  # no limit
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert service.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert service.cgroup_cpu_limit(tmp_path) is None  # cgroup v1, no limit
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert service.cgroup_cpu_limit(tmp_path) == 2.0
    monkeypatch.setattr(service, "cgroup_cpu_limit", lambda: 1.5)
    monkeypatch.setattr(service.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert service.usable_cores() == 2
    assert service.torch_threads(Settings()) == 1
    monkeypatch.setattr(service, "cgroup_cpu_limit", lambda: None)
    assert service.usable_cores() == 32


async def test_a_variable_that_names_no_setting_is_warned_of(weights_dir, monkeypatch, caplog):
    """GENSERVE_MAX_INFLIGHT (removed) or a typo is ignored by Settings: the start-up says so, once
    per variable; the project's other GENSERVE_* variables (the client's GENSERVE_URL) are not."""
    from app.settings import unknown_variables

    env = {"GENSERVE_MAX_INFLIGHT": "2", "genserve_max_batchsize": "8", "GENSERVE_URL": "http://x", "GENSERVE_MAX_N": "4"}
    assert unknown_variables(env) == ["GENSERVE_MAX_INFLIGHT", "genserve_max_batchsize"]
    monkeypatch.setenv("GENSERVE_MAX_INFLIGHT", "2")
    caplog.set_level("WARNING", logger="app.main")
    async with LifespanManager(create_app(make_settings(weights_dir))):
        pass
    warned = [r.getMessage() for r in caplog.records if "is not a setting" in r.getMessage()]
    assert warned == ["GENSERVE_MAX_INFLIGHT is not a setting and is ignored (README.md lists the settings)"]
