import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import fake_mnist_arrays, write_idx
from training.data import DataError, load_dataset


def test_fashion_mnist_from_gzipped_idx(fashion_root):
    train = load_dataset("fashion-mnist", "train", root=fashion_root)
    test = load_dataset("fashion-mnist", "test", root=fashion_root)
    assert train.images.shape == (256, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 64 and train.num_classes == 10 and train.class_names[0] == "T-shirt/top"
    images, labels = fake_mnist_arrays(256, 0)
    assert np.array_equal(train.images[:, 0].numpy(), images) and np.array_equal(train.labels.numpy(), labels)
    x, y = train.batch(torch.tensor([0, 1]))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.shape == (2,)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_truncated_idx_is_a_clear_error(fashion_root):
    path = fashion_root / "train-images-idx3-ubyte.gz"
    import gzip

    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "train", root=fashion_root)


def test_mnist_through_torchvision_from_a_local_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    for split, n in (("train", 20), ("t10k", 8)):
        images, labels = fake_mnist_arrays(n, 3)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, compress=False)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, compress=False)
    train = load_dataset("mnist", "train", root=tmp_path)
    assert train.images.shape == (20, 1, 28, 28) and train.num_classes == 10
    assert len(load_dataset("mnist", "test", root=tmp_path)) == 8


def test_missing_mnist_suggests_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", "train", root=tmp_path)


def test_cifar10_through_torchvision_from_a_local_root(tmp_path, monkeypatch):
    from torchvision import datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch(4)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(3)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # our files are not the real ones, so torchvision's md5 check would (rightly) reject them
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and len(load_dataset("cifar10", "test", root=tmp_path)) == 3


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        for i in range(10):
            (tmp_path / label).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    train = load_dataset(str(tmp_path), "train", image_size=32, channels=3)
    test = load_dataset(str(tmp_path), "test", image_size=32, channels=3)
    assert len(train) + len(test) == 20 and len(test) == 2
    assert train.images.shape[1:] == (3, 32, 32) and train.num_classes == 2
    gray = load_dataset(str(tmp_path), "train")
    assert gray.images.shape[1:] == (1, 28, 28)


def test_unknown_data_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn", "train")
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path), "train")


def test_split_last_carves_the_last_images_off(fashion_root):
    train = load_dataset("fashion-mnist", "train", root=fashion_root)
    rest, val = train.split_last(56)
    assert (len(rest), len(val)) == (200, 56)
    assert torch.equal(torch.cat([rest.images, val.images]), train.images)
    assert torch.equal(torch.cat([rest.labels, val.labels]), train.labels)
    for bad in (0, 256, -1):
        with pytest.raises(ValueError, match="validation split"):
            train.split_last(bad)
