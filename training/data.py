"""Data sets, held in memory as uint8 tensors: Fashion-MNIST, MNIST, CIFAR-10, or a folder of images.

Every loader returns an `ImageData` with images (N, C, H, W) uint8 and labels (N,) long
(or None for an unlabelled folder). Batches become float in [0, 1] at the last moment.
A missing data set raises `DataError` with one message that says how to get it.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
DATASETS = ("fashion-mnist", "mnist", "cifar10")


class DataError(RuntimeError):
    """A data set cannot be found or read; the message says how to fix it."""


@dataclass
class ImageData:
    name: str
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor | None  # (N,) long
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int | None) -> "ImageData":
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return ImageData(self.name, self.images[:n], labels, self.num_classes, self.class_names)

    def split_last(self, n: int) -> tuple["ImageData", "ImageData"]:
        """(all but the last n images, the last n): a validation split carved from a training set."""
        if not 0 < n < len(self):
            raise ValueError(f"a validation split needs 0 < n < {len(self)} images, got {n}")
        labels = (None, None) if self.labels is None else (self.labels[:-n], self.labels[-n:])
        return (
            ImageData(self.name, self.images[:-n], labels[0], self.num_classes, self.class_names),
            ImageData(self.name, self.images[-n:], labels[1], self.num_classes, self.class_names),
        )

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as float in [0, 1] on `device`, and their labels."""
        x = self.images[index].to(device).float().div_(255.0)
        y = None if self.labels is None else self.labels[index].to(device)
        return x, y


def load_dataset(
    data: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
) -> ImageData:
    """Load `split` ("train" or "test") of a named data set or of a folder of images.

    `data` is one of "fashion-mnist", "mnist", "cifar10", or a path to a folder of images.
    `image_size`/`channels` apply to folders (default 28 and 1); named sets keep their shape.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data == "fashion-mnist":
        return _fashion_mnist(split, root)
    if data in ("mnist", "cifar10"):
        return _torchvision(data, split, root, download)
    if Path(data).is_dir():
        return _folder(Path(data), split, image_size or 28, channels or 1, test_fraction)
    raise DataError(
        f"unknown data set {data!r}: use one of {', '.join(DATASETS)} or a path to a folder of images"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(split: str, root: str | os.PathLike | None) -> ImageData:
    roots = [Path(root)] if root else [Path(r) for r in FASHION_MNIST_ROOTS] + [Path("data/fashion-mnist")]
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    for r in roots:
        images_path, labels_path = _find_idx(r, image_stem), _find_idx(r, label_stem)
        if images_path and labels_path:
            images = torch.from_numpy(_read_idx(images_path).copy()).unsqueeze(1)  # (N, 1, 28, 28)
            labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
            return ImageData("fashion-mnist", images, labels, 10, FASHION_MNIST_CLASSES)
    raise DataError(
        f"Fashion-MNIST {split} files ({image_stem}.gz, {label_stem}.gz) not found in "
        f"{', '.join(str(r) for r in roots)}. Install them with `apt-get install dataset-fashion-mnist` "
        "(Debian/Ubuntu) or put the four IDX files in a folder and pass --data-root FOLDER."
    )


def _torchvision(name: str, split: str, root: str | os.PathLike | None, download: bool) -> ImageData:
    from torchvision import datasets

    root = Path(root or "data")
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError as err:
        raise DataError(
            f"{name} not found under {root} ({err}). Pass --data-root to a folder that holds torchvision's "
            f"{cls.__name__} files, or add --download on a machine with internet access."
        ) from err
    except OSError as err:  # no network during --download
        raise DataError(f"{name} could not be downloaded to {root}: {err}") from err
    if name == "mnist":
        images = ds.data.unsqueeze(1).clone()  # (N, 1, 28, 28) uint8
        labels = ds.targets.long().clone()
    else:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        labels = torch.tensor(ds.targets, dtype=torch.long)
    return ImageData(name, images, labels, len(ds.classes), tuple(ds.classes))


def _folder(path: Path, split: str, image_size: int, channels: int, test_fraction: float) -> ImageData:
    """Every image under `path`. Labels come from first-level subfolders when there are several.

    Each image is converted to L (channels=1) or RGB (channels=3), center-cropped to a square
    and resized to image_size with Lanczos. A fixed 1-in-N hash split makes the test set.
    """
    from PIL import Image, ImageOps

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    subdirs = sorted({p.relative_to(path).parts[0] for p in files if len(p.relative_to(path).parts) > 1})
    labelled = len(subdirs) > 1 and all(len(p.relative_to(path).parts) > 1 for p in files)
    every = max(2, round(1 / test_fraction)) if test_fraction > 0 else 0
    chosen = [
        (i, p) for i, p in enumerate(files) if (every and i % every == every - 1) == (split == "test")
    ]
    if not chosen:
        raise DataError(f"the {split} split of {path} is empty: add images or change the test fraction")
    arrays, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    for _, p in chosen:
        try:
            with Image.open(p) as im:
                im = ImageOps.exif_transpose(im).convert(mode)
                im = ImageOps.fit(im, (image_size, image_size), Image.Resampling.LANCZOS)
                arrays.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels))
        except OSError as err:
            raise DataError(f"cannot read image {p}: {err}") from err
        if labelled:
            labels.append(subdirs.index(p.relative_to(path).parts[0]))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    label_tensor = torch.tensor(labels, dtype=torch.long) if labelled else None
    return ImageData(str(path), images, label_tensor, len(subdirs) if labelled else 0, tuple(subdirs) if labelled else ())
