"""Data sets, held in memory as uint8 tensors: Fashion-MNIST, MNIST, CIFAR-10, or a folder of images.

Every loader returns an `ImageData` with images (N, C, H, W) uint8 and labels (N,) long
(or None for an unlabelled folder). Batches become float in [0, 1] at the last moment.
A missing data set raises `DataError` with one message that says how to get it.

A folder with `train/` and `test/` subfolders (CIFAR-10's layout, ROOT/{train,test}/{class}/NNNN.jpg)
is decoded once per split into a safetensors file in the user's cache folder (see `cache_dir`), so a
second run reads one file instead of decoding every image again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
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
CACHE_ENV = "GENSERVE_DATA_CACHE"  # overrides the folder that holds decoded image folders
CACHE_FORMAT = "1"  # bump when the decoding changes, so old cache files are re-decoded
DECODE_THREADS = 4  # PIL releases the GIL while it decodes, so a few threads overlap reading and decoding
DECODE_CHUNK = 512  # images per thread-pool task
SPLIT_ORDER_SEED = 0  # the fixed shuffle of a train/test folder's images
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes that load as 1 channel when channels is not given


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
    Named sets keep their shape. A folder with `train/` and `test/` subfolders is read by
    `_split_folder` (each split from its own subfolder, cached; size and channels default to
    the images' own); any other folder by `_folder` (a 1-in-N split; default 28 pixels, 1 channel).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data == "fashion-mnist":
        return _fashion_mnist(split, root)
    if data in ("mnist", "cifar10"):
        return _torchvision(data, split, root, download)
    if Path(data).is_dir():
        if (Path(data) / "train").is_dir() and (Path(data) / "test").is_dir():
            return _split_folder(Path(data), split, image_size, channels)
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


def cache_dir() -> Path:
    """Where decoded train/test folders are cached: $GENSERVE_DATA_CACHE, else
    $XDG_CACHE_HOME/genserve/data, else ~/.cache/genserve/data. Never the data folder itself,
    which may be read-only or shared; delete the folder to reclaim the space."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genserve" / "data"


def _split_folder(path: Path, split: str, image_size: int | None, channels: int | None) -> ImageData:
    """One split of a folder laid out as ROOT/{train,test}/{class}/image (CIFAR-10's layout).

    - Labels: the class folders' names, sorted, one list for both splits. A class folder with
      images in one split but not the other is an error naming it (it is usually a typo, and
      a class the model never trains on, or is never tested on, skews every metric). Images put
      directly in train/ and test/, with no class folders at all, load unlabelled.
    - Channels: `channels` (1 = L, 3 = RGB) converts; when None, the first training image's
      mode decides (grey modes load as 1 channel, anything else as 3).
    - Size: an image already image_size x image_size keeps its pixels; any other is
      center-cropped to a square and resized with Lanczos. When image_size is None, every image
      must be square and as large as the first training image, and keeps its own size; otherwise
      the error says to pass --image-size.
    - Order: a fixed shuffle (seed SPLIT_ORDER_SEED) of each split, so that the first N images
      (--limit-train) and the last N (ImageData.split_last's validation set) hold every class.
    - Name: the folder's name (".../cifar10" gives "cifar10"); a name that is also a named data
      set gets " (image folder)" added, so weight files never mistake a copy for the original.
    - Cache: the decoded split is saved in `cache_dir()` under a name keyed by the folder's
      absolute path, the split and (image_size, channels); it is used only while a fingerprint
      of every file's path, size, mtime, inode and ctime, and the cache format, still match.
    """
    path = path.resolve()
    listing = {s: _class_listing(path / s) for s in ("train", "test")}
    classes = _check_classes(path, listing)
    label_of = {c: i for i, c in enumerate(classes)}
    files = [(f, label_of.get(c, -1)) for c, fs in listing[split].items() for f, *_ in fs]  # -1: unlabelled
    order = np.random.default_rng(SPLIT_ORDER_SEED).permutation(len(files))
    files = [files[i] for i in order]
    name = path.name + (" (image folder)" if path.name in DATASETS else "")
    settings = json.dumps([str(path), split, image_size, channels])
    cache = cache_dir() / f"{path.name}-{split}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.safetensors"
    fingerprint = _fingerprint(listing, settings)
    cached = _read_cache(cache, fingerprint, len(files))
    if cached is not None:
        images, labels = cached
    else:
        first = next(f for fs in listing["train"].values() for f, *_ in fs)
        size, mode = _resolve_shape(first, image_size, channels)
        images = _decode([f for f, _ in files], size, mode, strict=None if image_size else first)  # (N, C, H, W)
        labels = torch.tensor([label for _, label in files], dtype=torch.long) if classes else None
        _write_cache(cache, fingerprint, images, labels)
    return ImageData(name, images, labels, len(classes), tuple(classes))


# (path, size in bytes, mtime in ns, inode, ctime in ns). mtime alone misses a file replaced by one of the
# same size with its mtime restored (cp -p, rsync -a, tar x); ctime cannot be set from user space and changes
# with every write, rename or utime, and the inode changes when a file is replaced by another. Both come
# with the stat already taken, so the fingerprint costs no extra I/O (hashing the contents would read every
# file on every load).
FileStat = tuple[str, int, int, int, int]


def _class_listing(split_dir: Path) -> dict[str, list[FileStat]]:
    """{class folder name: its image files, sorted}, with "" for images directly in split_dir.

    os.scandir rather than pathlib: listing and stat-ing CIFAR-10's 60,000 files is then ~0.2 s, not ~2 s.
    """
    listing: dict[str, list[FileStat]] = {}
    with os.scandir(split_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                found = sorted(_image_files(entry.path))
                if found:
                    listing[entry.name] = found
            elif _is_image(entry):
                listing.setdefault("", []).append(_file_stat(entry))
    return listing


def _image_files(folder: str) -> list[FileStat]:
    """Every image file under `folder`, in any depth of subfolders (hidden ones skipped)."""
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif _is_image(entry):
                    found.append(_file_stat(entry))
    return found


def _is_image(entry: os.DirEntry) -> bool:
    return os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file()


def _file_stat(entry: os.DirEntry) -> FileStat:
    st = entry.stat()
    return entry.path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _check_classes(path: Path, listing: dict[str, dict[str, list[FileStat]]]) -> list[str]:
    """The sorted class names shared by both splits ([] when unlabelled), or a DataError that says what to fix."""
    for split, by_class in listing.items():
        if not by_class:
            raise DataError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path / split}: a folder with "
                f"train/ and test/ needs images in both, e.g. {path / split}/CLASS/0000.jpg"
            )
        if "" in by_class and len(by_class) > 1:
            raise DataError(
                f"{path / split} has images both directly inside it ({Path(by_class[''][0][0]).name}, ...) and in "
                "class folders: move every image into a class folder, or none for unlabelled images"
            )
    train, test = (set(listing[s]) for s in ("train", "test"))
    if ("" in train) != ("" in test):
        raise DataError(
            f"{path}: only one of train/ and test/ has class folders; give both the same class folders"
        )
    for present, missing in (("train", "test"), ("test", "train")):
        only = sorted(set(listing[present]) - set(listing[missing]))
        if only:
            others = f" (nor have {', '.join(only[1:])})" if len(only) > 1 else ""
            raise DataError(
                f"class {only[0]!r} has images in {path / present / only[0]} but none in "
                f"{path / missing / only[0]}{others}: add images of it to {missing}/, or remove or rename the "
                "folder so that both splits have the same classes"
            )
    return [] if "" in train else sorted(train)


def _fingerprint(listing: dict[str, dict[str, list[FileStat]]], settings: str) -> str:
    """A hash of the cache format, the settings and every file's path, size, mtime, inode and ctime."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\n{settings}\n".encode())
    for by_class in listing.values():
        for files in by_class.values():
            h.update("".join("\t".join(map(str, stat)) + "\n" for stat in files).encode())
    return h.hexdigest()


def _resolve_shape(first: str, image_size: int | None, channels: int | None) -> tuple[int, str]:
    """(side, PIL mode) for a train/test folder: the arguments, or else the first training image's own."""
    from PIL import Image

    try:
        with Image.open(first) as im:
            width, height, own_mode = im.width, im.height, im.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {first}: {err}; delete or replace the file") from err
    if image_size is None and width != height:
        raise DataError(
            f"{first} is {width}x{height}, not square, so the images cannot keep their own size: "
            "pass --image-size N to crop and resize them all to N x N"
        )
    channels = channels or (1 if own_mode in GREY_MODES else 3)
    return image_size or width, "L" if channels == 1 else "RGB"


def _decode(files: list[str], size: int, mode: str, strict: str | None) -> torch.Tensor:
    """Decode `files` into one (N, C, size, size) uint8 tensor with a small thread pool.

    With `strict` (the image that set the size), an image of another size is an error instead of being resized.
    """
    from PIL import Image, ImageOps

    c = 1 if mode == "L" else 3
    out = np.empty((len(files), size, size, c), dtype=np.uint8)  # (N, H, W, C)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + DECODE_CHUNK, len(files))):
            try:
                with Image.open(files[i]) as im:
                    if strict is not None and im.size != (size, size):
                        raise DataError(
                            f"{files[i]} is {im.width}x{im.height} but {strict} is {size}x{size}: images keep "
                            "their own size only when all are square and equal; pass --image-size N to crop "
                            "and resize them all"
                        )
                    im = ImageOps.exif_transpose(im)
                    im = im if im.mode == mode else im.convert(mode)
                    if im.size != (size, size):
                        im = ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
                    out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, c)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise DataError(f"cannot read image {files[i]}: {err}; delete or replace the file") from err

    pool = ThreadPoolExecutor(min(DECODE_THREADS, os.cpu_count() or 1))
    try:
        for future in [pool.submit(decode_chunk, s) for s in range(0, len(files), DECODE_CHUNK)]:
            future.result()  # the first failing chunk raises here
    finally:
        pool.shutdown(cancel_futures=True)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def _read_cache(cache: Path, fingerprint: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The cached (images, labels) when `cache` exists and matches `fingerprint`, else None."""
    from safetensors import safe_open

    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            images = f.get_tensor("images")
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
    except Exception:  # a truncated or foreign file is only a cache miss; it is rewritten below
        return None
    return (images, labels) if images.shape[0] == n else None


def _write_cache(cache: Path, fingerprint: str, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Save atomically (a temporary file, then a rename). A cache that cannot be written is a warning."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {"images": images} if labels is None else {"images": images, "labels": labels}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"fingerprint": fingerprint, "format": CACHE_FORMAT})
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk or a file-size limit as its own error
        warnings.warn(
            f"could not cache the decoded images in {cache} ({err}); the next run decodes them again. "
            f"Set {CACHE_ENV} to a writable folder to cache them.",
            stacklevel=3,
        )
