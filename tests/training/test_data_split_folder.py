"""Folders laid out as ROOT/{train,test}/{class}/image (CIFAR-10's layout): splits, labels, shape, cache."""

import os
import time

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from training.data import CACHE_ENV, DataError, cache_dir, load_dataset

CLASSES = ("dog", "bird", "cat")  # written in this order; labels must follow the sorted order


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def pixels(split: str, label: int, i: int, size: int = 8) -> np.ndarray:
    """An image that says where it came from: channel 0 = file id, 1 = 40 * label, 2 = split, plus a gradient."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = 10 * i + label
    image[..., 1] = 40 * label
    image[..., 2] = 200 if split == "test" else 100
    image[0, :, 2] = np.arange(size) * 7  # some structure, so resizing and grey conversion are not trivial
    return image


def make_folder(root, counts=None, size=8, suffix=".png", mode="RGB"):
    """root/{train,test}/{class}/NNNN.png; returns {(split, label, i): pixels} with sorted-class labels."""
    counts = counts or {"train": dict.fromkeys(CLASSES, 4), "test": dict.fromkeys(CLASSES, 2)}
    written = {}
    for split, per_class in counts.items():
        names = sorted(set(counts["train"]) | set(counts["test"]))
        for name, n in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                array = pixels(split, names.index(name), i, size)
                Image.fromarray(array).convert(mode).save(root / split / name / f"{i:04d}{suffix}")
                written[split, names.index(name), i] = array
    return written


def test_each_split_comes_from_its_own_subfolder_with_sorted_class_labels(tmp_path):
    written = make_folder(tmp_path / "pets")
    train = load_dataset(str(tmp_path / "pets"), "train")
    test = load_dataset(str(tmp_path / "pets"), "test")
    assert (len(train), len(test)) == (12, 6)
    assert train.class_names == test.class_names == ("bird", "cat", "dog")
    assert train.num_classes == test.num_classes == 3 and train.name == test.name == "pets"
    assert train.images.shape == (12, 3, 8, 8) and train.images.dtype == torch.uint8
    for split, data in (("train", train), ("test", test)):
        seen = set()
        for image, label in zip(data.images, data.labels):
            label, file_id = int(label), int(image[0, 1, 1])
            assert int(image[1, 1, 1]) == 40 * label  # the label is the class folder the file came from
            key = (split, label, (file_id - label) // 10)
            assert torch.equal(image, torch.from_numpy(written[key]).permute(2, 0, 1))  # native size: exact pixels
            seen.add(key)
        assert seen == {k for k in written if k[0] == split}  # every file of the split once, none of the other
    # a fixed shuffle: the validation images carved from the end hold more than one class
    assert len(set(train.labels[-4:].tolist())) > 1 and train.labels.tolist() != sorted(train.labels.tolist())
    again = load_dataset(str(tmp_path / "pets"), "train")
    assert torch.equal(again.labels, train.labels) and torch.equal(again.images, train.images)


def test_rgb_is_detected_and_explicit_channels_and_size_convert(tmp_path):
    written = make_folder(tmp_path / "rgb")
    make_folder(tmp_path / "grey", mode="L")
    assert load_dataset(str(tmp_path / "rgb"), "train").image_shape == (3, 8, 8)
    assert load_dataset(str(tmp_path / "grey"), "train").image_shape == (1, 8, 8)
    grey = load_dataset(str(tmp_path / "rgb"), "test", channels=1)
    assert grey.image_shape == (1, 8, 8)
    for image, label in zip(grey.images, grey.labels):
        candidates = [np.asarray(Image.fromarray(a).convert("L")) for (s, lab, _), a in written.items()
                      if s == "test" and lab == int(label)]
        assert any(np.array_equal(image[0].numpy(), c) for c in candidates)
    small = load_dataset(str(tmp_path / "rgb"), "train", image_size=4)
    assert small.image_shape == (3, 4, 4)
    assert load_dataset(str(tmp_path / "grey"), "train", channels=3).image_shape == (3, 8, 8)


def test_jpeg_images_decode_close_to_what_was_written(tmp_path):
    written = make_folder(tmp_path / "jpegs", size=16, suffix=".jpg")
    train = load_dataset(str(tmp_path / "jpegs"), "train")
    assert train.image_shape == (3, 16, 16)
    originals = torch.stack([torch.from_numpy(written[k]) for k in sorted(written) if k[0] == "train"])
    assert abs(train.images.float().mean() - originals.float().mean()) < 3  # lossy, but the same images


def test_second_load_reads_the_cache_and_decodes_nothing(tmp_path, private_cache, monkeypatch):
    make_folder(tmp_path / "pets")
    opened = []
    real_open = PIL.Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    first = load_dataset(str(tmp_path / "pets"), "train")
    assert len(opened) == 12 + 1  # every training image, plus the first one's header for size and channels
    assert cache_dir() == private_cache and len(list(private_cache.glob("pets-train-*.safetensors"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened although the cache was valid")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    second = load_dataset(str(tmp_path / "pets"), "train")
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert second.class_names == first.class_names and second.name == first.name
    with pytest.raises(AssertionError, match="although the cache"):  # other settings are another cache file
        load_dataset(str(tmp_path / "pets"), "train", image_size=4)


def test_a_changed_or_added_file_is_decoded_again(tmp_path):
    make_folder(tmp_path / "pets")
    before = load_dataset(str(tmp_path / "pets"), "train")
    changed = tmp_path / "pets" / "train" / "cat" / "0001.png"
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = load_dataset(str(tmp_path / "pets"), "train")
    white = (after.images == 255).flatten(1).all(1)
    assert int(white.sum()) == 1 and not (before.images == 255).flatten(1).all(1).any()
    assert after.labels[white].tolist() == [after.class_names.index("cat")]
    Image.fromarray(pixels("train", 0, 9)).save(tmp_path / "pets" / "train" / "bird" / "0009.png")
    assert len(load_dataset(str(tmp_path / "pets"), "train")) == 13


def test_a_class_missing_from_one_split_is_named(tmp_path):
    make_folder(tmp_path / "a", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1}})
    with pytest.raises(DataError, match=r"class 'dog' has images in .*train/dog but none in .*test/dog"):
        load_dataset(str(tmp_path / "a"), "train")
    make_folder(tmp_path / "b", {"train": {"cat": 2}, "test": {"cat": 1, "dgo": 1}})
    with pytest.raises(DataError, match=r"class 'dgo' .* add images of it to train/"):
        load_dataset(str(tmp_path / "b"), "test")


def test_an_unreadable_image_names_the_file(tmp_path):
    make_folder(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*train/dog/broken\.png.*delete or replace"):
        load_dataset(str(tmp_path / "pets"), "train")
    assert len(load_dataset(str(tmp_path / "pets"), "test")) == 6  # the other split does not read it


def test_images_keep_their_own_size_only_when_all_are_square_and_equal(tmp_path):
    make_folder(tmp_path / "mixed")
    Image.fromarray(pixels("train", 2, 7, size=6)).save(tmp_path / "mixed" / "train" / "dog" / "0007.png")
    with pytest.raises(DataError, match=r"train/dog/0007\.png is 6x6 but .* is 8x8.*--image-size"):
        load_dataset(str(tmp_path / "mixed"), "train")
    assert load_dataset(str(tmp_path / "mixed"), "train", image_size=6).image_shape == (3, 6, 6)
    make_folder(tmp_path / "wide", {"train": {"cat": 1}, "test": {"cat": 1}})
    Image.fromarray(np.zeros((8, 12, 3), dtype=np.uint8)).save(tmp_path / "wide" / "train" / "cat" / "0000.png")
    with pytest.raises(DataError, match=r"is 12x8, not square.*--image-size"):
        load_dataset(str(tmp_path / "wide"), "train")


def test_unlabelled_splits_empty_splits_and_the_name_of_a_copy(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / "plain" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(pixels(split, 0, i)).save(tmp_path / "plain" / split / f"{i}.png")
    plain = load_dataset(str(tmp_path / "plain"), "test")
    assert len(plain) == 2 and plain.labels is None and plain.num_classes == 0 and plain.class_names == ()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match=r"no images .* under .*empty/train"):
        load_dataset(str(tmp_path / "empty"), "test")
    make_folder(tmp_path / "cifar10")
    assert load_dataset(str(tmp_path / "cifar10"), "train").name == "cifar10 (image folder)"


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch):
    make_folder(tmp_path / "pets")
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "not-a-folder"))
    with pytest.warns(UserWarning, match="could not cache"):
        data = load_dataset(str(tmp_path / "pets"), "train")
    assert len(data) == 12 and data.num_classes == 3


def test_a_full_disk_while_writing_the_cache_is_a_warning(tmp_path, monkeypatch):
    """safetensors reports a failed write (full disk, file-size limit) as SafetensorError, not OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    make_folder(tmp_path / "pets")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.warns(UserWarning, match="could not cache .*File too large"):
        data = load_dataset(str(tmp_path / "pets"), "train")
    assert len(data) == 12 and data.num_classes == 3
    assert not list((tmp_path / "cache").iterdir())  # no temporary file left behind


def same_size_png(path, avoid: int) -> bytes:
    """PNG bytes of a flat 8x8 RGB image, as many bytes as the file at `path`, of a value other than `avoid`."""
    import io

    for value in range(256):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, format="PNG")
        if value != avoid and len(buf.getvalue()) == path.stat().st_size:
            return buf.getvalue()
    raise AssertionError("no flat image of the same size")


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_file_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path, how):
    """cp -p writes in place and restores the mtime; rsync -a and tar x write another file, rename it over the
    old one and restore the mtime. The size and mtime are as before; the ctime (or the inode) is not."""
    for i in range(3):  # flat images: PNGs of the same size whatever their value
        for split in ("train", "test"):
            (tmp_path / "flat" / split / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(tmp_path / "flat" / split / "a" / f"{i}.png")
    before = load_dataset(str(tmp_path / "flat"), "train")
    target = tmp_path / "flat" / "train" / "a" / "1.png"
    st = target.stat()
    new = same_size_png(target, avoid=10)
    time.sleep(0.02)  # past the file system's timestamp granularity, so the ctime differs
    if how == "in place":
        target.write_bytes(new)
    else:
        (tmp_path / "new.png").write_bytes(new)
        os.replace(tmp_path / "new.png", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = load_dataset(str(tmp_path / "flat"), "train")
    values = sorted(int(v) for v in after.images.flatten(1)[:, 0])
    assert values != sorted(int(v) for v in before.images.flatten(1)[:, 0])
    assert values == sorted([0, 20, int(np.asarray(Image.open(target))[0, 0, 0])])
