"""Tiny real models written to a temporary weights directory, and the real app around them.

Served: "vae" (1x8x8, MLP, Bernoulli), "vae_rgb" (3x8x8, conv with an autoregressive
discretized-logistic decoder), "vqvae" (1x8x8, 2x2 codes, K=16, discretized logistic) with
three priors: "pixelcnn" (unconditional, 3.0 bits/code), "gated" (3 classes, 2.0: the
default) and "pixelcnnpp" (unconditional, 2.5); "vae_rgb", "gated" and "pixelcnnpp" record a test
bits/dim (the page's bits/dim table). Class names (CLASS_NAMES) are recorded by
"vae", "pixelcnn" and "gated"; "vae_rgb", "vqvae" and "pixelcnnpp" record none, as older files.
"""

from __future__ import annotations

import io
import os
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
from asgi_lifespan import LifespanManager
from PIL import Image

from app.main import create_app
from app.settings import Settings
from models.io import save_model
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig
from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE, VQVAEConfig

LATENT_DIM = 4
CODEBOOK_SIZE = 16
CODE_SHAPE = (2, 2)
NUM_CLASSES = 3
CLASS_NAMES = ("circle", "square", "T-shirt/top")


def tiny_vqvae() -> VQVAE:
    vq = VQVAE(VQVAEConfig(image_size=8, hidden_channels=8, res_channels=4, n_res_blocks=1,
                           codebook_size=CODEBOOK_SIZE, embedding_dim=4, init="uniform", likelihood="logistic",
                           num_mixtures=2)).eval()
    with torch.no_grad():  # spread the codebook so different images get different codes
        vq.quantizer.embedding.copy_(torch.randn(CODEBOOK_SIZE, 4) * 0.3)
    return vq


def save_prior(path: Path, prior: torch.nn.Module, vq: VQVAE, vq_name: str = "vqvae", bits: float = 3.0,
               digest: str | None = None, class_names: tuple[str, ...] = (), bits_per_dim: float | None = None,
               marginal_bits_per_dim: float | None = None) -> None:
    extra = {"vqvae": vq_name, "codebook_sha256": digest or vq.codebook_digest()}
    metrics = {"test_bits_per_code": bits, **({"test_bits_per_dim": bits_per_dim} if bits_per_dim is not None else {}),
               **({"test_marginal_bits_per_dim": marginal_bits_per_dim} if marginal_bits_per_dim is not None else {})}
    save_model(path, prior.eval(), name=path.stem, dataset="unit-test", command="pytest",
               metrics=metrics, extra=extra, image_shape=vq.image_shape, class_names=class_names)


def write_weights(d: Path) -> Path:
    torch.manual_seed(0)
    save_model(d / "vae.safetensors", VAE(VAEConfig(image_size=8, latent_dim=LATENT_DIM, hidden_dims=(16,))),
               name="vae", dataset="unit-test", command="pytest", metrics={"test_neg_elbo": 40.0}, class_names=CLASS_NAMES)
    save_model(d / "vae_rgb.safetensors",
               VAE(VAEConfig(arch="conv", in_channels=3, image_size=8, latent_dim=LATENT_DIM, channels=(4, 8), fc_dim=16,
                             decoder="autoregressive", ar_channels=4, ar_kernel=3, ar_layers=2, likelihood="logistic",
                             num_mixtures=2)),
               name="vae_rgb", dataset="unit-test", command="pytest",
               metrics={"iwae_k": 10, "test_bits_per_dim": 5.25, "test_nll_nats": 698.7})
    vq = tiny_vqvae()
    save_model(d / "vqvae.safetensors", vq, name="vqvae", dataset="unit-test", command="pytest")
    common = dict(codebook_size=CODEBOOK_SIZE, code_shape=CODE_SHAPE, hidden_channels=8)
    save_prior(d / "pixelcnn.safetensors", PixelCNN(PixelCNNConfig(**common, n_layers=1, first_kernel_size=3)), vq, bits=3.0,
               class_names=CLASS_NAMES)
    save_prior(d / "gated.safetensors",
               GatedPixelCNN(GatedPixelCNNConfig(**common, n_layers=2, first_kernel_size=3, num_classes=NUM_CLASSES)),
               vq, bits=2.0, class_names=CLASS_NAMES, bits_per_dim=3.25, marginal_bits_per_dim=3.4)
    save_prior(d / "pixelcnnpp.safetensors", PixelCNNpp(PixelCNNppConfig(**common, n_layers=1, n_scales=1)), vq, bits=2.5,
               bits_per_dim=3.5)
    return d


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights"))


def make_settings(weights: Path, **overrides) -> Settings:
    # GENSERVE_DEVICE=cuda runs the app's tests on a GPU (benchmarks/gpu/check.sh); the CPU otherwise
    device = os.environ.get("GENSERVE_DEVICE", "cpu")
    # no check cache (every test checks afresh unless it asks for one), no polling of the weights directory
    values = dict(weights_dir=weights, device=device, max_batch_size=8, max_wait_ms=1.0, request_timeout_s=30.0,
                  check_cache_dir=None, reload_interval_s=0)
    return Settings(**{**values, **overrides})


@pytest.fixture
def serve(weights_dir: Path):
    """serve(**settings) -> async context manager yielding (app, client) around a started app."""

    def _serve(**overrides):
        return started(weights_dir, **overrides)

    return _serve


@pytest.fixture
async def client(serve):
    async with serve() as (_app, client):
        yield client


@asynccontextmanager
async def started(weights: Path, checked: bool = True, **overrides):
    """(app, client) around an app started on `weights` with the test settings and `overrides`, once
    its models are loaded (the lifespan returns before) and, with `checked`, its pass size checks
    have run (they run after the service is ready)."""
    app = create_app(make_settings(weights, **overrides))
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        service = await app.state.starting
        if checked:
            await service.checks
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield app, client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_app(weights_dir: Path):
    """One started app with the default test settings for a whole module, for tests that only ask it
    questions (a start-up costs about 2 s). A module using it runs its tests in the module's event
    loop (`pytestmark = pytest.mark.asyncio(loop_scope="module")`) and overrides `client` with it."""
    async with started(weights_dir) as app_and_client:
        yield app_and_client


def image_bytes(fmt: str = "PNG", mode: str = "L", size: tuple[int, int] = (8, 8), seed: int = 0) -> bytes:
    """A random image of `size` (w, h) in `mode`, saved as `fmt`."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").quantize(16)
    else:
        bands = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
        arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_array(data: bytes) -> np.ndarray:
    """A PNG's pixels: (H, W) for L, (H, W, 3) for RGB."""
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img)


def grid_size(n: int, nrow: int, h: int = 8, w: int = 8, padding: int = 2) -> tuple[int, int]:
    """(width, height) of make_grid's layout."""
    if n == 1:
        return w, h
    cols = min(nrow, n)
    rows = -(-n // cols)
    return cols * (w + padding) + padding, rows * (h + padding) + padding


def cell(grid: np.ndarray, i: int, nrow: int, h: int = 8, w: int = 8, padding: int = 2) -> np.ndarray:
    r, c = divmod(i, nrow)
    top, left = padding + r * (h + padding), padding + c * (w + padding)
    return grid[top:top + h, left:left + w]


@contextmanager
def live_server(weights: Path, wait_s: float = 120.0):
    """The real app under uvicorn in a thread, on a socket bound here (port 0); yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    app = create_app(make_settings(weights))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + wait_s
    while not (server.started and server.config.loaded_app is not None and app.state.service is not None):
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()

