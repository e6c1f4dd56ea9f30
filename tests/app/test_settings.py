"""Settings come from GENSERVE_* variables; a bad device is a clear error at startup."""

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
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        async with LifespanManager(app):
            pass


async def test_a_missing_weights_dir_fails_startup(tmp_path):
    app = create_app(make_settings(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        async with LifespanManager(app):
            pass
