import gzip
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write an unsigned-byte IDX file, the format of (Fashion-)MNIST."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blobs whose position depends on the label, so there is something to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28))
    for i, y in enumerate(labels):
        cy, cx = 8 + (y // 4) * 5, 6 + (y % 4) * 5
        images[i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    images = np.clip(images * 255 + rng.normal(0, 10, images.shape), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def fashion_root(tmp_path) -> Path:
    """A miniature Fashion-MNIST in the Debian package's layout (gzipped IDX)."""
    root = tmp_path / "fashion"
    for split, n, seed in (("train", 256, 0), ("t10k", 64, 1)):
        images, labels = fake_mnist_arrays(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


TINY = ["--quiet", "--threads", "1", "--limit-train", "192", "--val-size", "64"]  # a run of seconds


def train_tiny(fashion_root: Path, tmp_path: Path, likelihood: str | None = None) -> Path:
    """A tiny VAE, VQ-VAE and class-conditional Gated PixelCNN prior trained one epoch on the miniature
    Fashion-MNIST (`likelihood`: both models' pixel likelihood, else their defaults); their folder."""
    from training.__main__ import main

    d = tmp_path / "weights"
    common = ["--data-root", str(fashion_root), "--epochs", "1", *TINY]
    lik = ["--likelihood", likelihood] if likelihood else []
    assert main(["vae", "--arch", "conv", "--conv-channels", "4", "8", "--fc-dim", "16", "--latent-dim", "4", *lik,
                 "--iwae-k", "4", "--out", str(d / "vae.safetensors"), "--run-dir", str(tmp_path / "r1"), *common]) == 0
    assert main(["vqvae", "--hidden-channels", "16", "--res-channels", "8", "--n-res-blocks", "1", "--codebook-size", "16",
                 "--embedding-dim", "4", *lik, "--batch-size", "64", "--out", str(d / "vqvae.safetensors"),
                 "--run-dir", str(tmp_path / "r2"), *common]) == 0
    assert main(["prior", "--vqvae", str(d / "vqvae.safetensors"), "--arch", "gated", "--hidden-channels", "8",
                 "--n-layers", "2", "--batch-size", "32", "--name", "vqvae_gated", "--out", str(d / "vqvae_gated.safetensors"),
                 "--run-dir", str(tmp_path / "r3"), *common]) == 0
    return d
