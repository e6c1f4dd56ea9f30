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
