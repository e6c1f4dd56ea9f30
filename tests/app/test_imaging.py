"""The upload conversion rule and the PNG grid, without the app."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid as tv_make_grid

from app import imaging
from app.errors import ImageError
from app.imaging import decode_upload

from .conftest import image_bytes

GRAY = (1, 8, 8)
RGB = (3, 8, 8)


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, shape=GRAY, max_pixels: int = 10**8) -> torch.Tensor:
    return decode_upload(data, "x.png", image_shape=shape, max_pixels=max_pixels)


def test_an_image_of_the_model_size_passes_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    x = decode(save(Image.fromarray(arr)))
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(arr).float() / 255)


def test_rgb_becomes_luma_for_gray_models_and_gray_is_replicated_for_rgb_models():
    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    assert torch.allclose(decode(save(rgb)), torch.full((1, 8, 8), 76 / 255))  # ITU-R 601-2: 0.299 * 255
    gray = decode(save(Image.new("L", (8, 8), 200)), RGB)
    assert gray.shape == (3, 8, 8) and torch.all(gray == 200 / 255)


def test_alpha_is_composited_over_black():
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., :3] = 255
    arr[:4, :, 3] = 0  # transparent white -> black
    arr[4:, :, 3] = 255  # opaque white stays white
    x = decode(save(Image.fromarray(arr, "RGBA")))[0]
    assert torch.all(x[:4] == 0) and torch.all(x[4:] == 1)
    half = decode(save(Image.new("LA", (8, 8), (200, 128))))
    assert torch.allclose(half, torch.full_like(half, round(200 * 128 / 255) / 255), atol=1 / 255)


def test_16_bit_images_are_read_on_a_16_bit_scale():
    arr = np.array([[0, 257 * 100, 65535, 257 * 255]] * 4, dtype=np.uint16).repeat(2, axis=1)  # 4 x 8
    img = Image.fromarray(np.vstack([arr, arr]))  # 8 x 8, mode I;16
    assert img.mode == "I;16"
    x = decode(save(img))[0]
    assert x[0, :8:2].tolist() == pytest.approx([0, 100 / 255, 1.0, 1.0])


def test_palette_with_transparency_and_bilevel_images():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    assert torch.all(decode(save(pal)) == 1)
    pal.info["transparency"] = 1
    assert torch.all(decode(save(pal, transparency=1)) == 0)  # transparent -> black
    assert torch.all(decode(save(Image.new("1", (8, 8), 1))) == 1)


def test_centre_crop_then_resize():
    arr = np.zeros((8, 16), dtype=np.uint8)  # 16 wide, 8 tall: the centre 8 columns survive
    arr[:, :4] = arr[:, 12:] = 255
    assert torch.all(decode(save(Image.fromarray(arr))) == 0)
    tall = np.full((40, 20), 255, dtype=np.uint8)  # 20 wide, 40 tall: rows 10..29 survive
    tall[10:30] = 0
    assert torch.all(decode(save(Image.fromarray(tall))) == 0)
    big = decode(save(Image.new("L", (300, 200), 90)))
    assert torch.allclose(big, torch.full((1, 8, 8), 90 / 255), atol=1 / 255)  # Lanczos keeps a flat image flat


def test_exif_orientation_is_applied():
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[:, 0] = 255  # left column white
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees
    x = decode(save(Image.fromarray(arr), exif=exif))[0]
    assert torch.all(x[:, -1] == 1) and torch.all(x[:, :-1] == 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_common_formats_decode(fmt):
    x = decode(image_bytes(fmt, "RGB", (13, 21)), RGB)
    assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_an_animated_gif_uses_its_first_frame():
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert torch.allclose(decode(data), torch.full((1, 8, 8), 10 / 255), atol=1 / 255)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, image_bytes()[:60]])
def test_undecodable_bytes_are_400(data):
    with pytest.raises(ImageError) as err:
        decode(data)
    assert err.value.status_code == 400
    assert ("empty" if not data else "not a decodable image") in err.value.detail


def test_too_many_pixels_is_413_from_the_header():
    with pytest.raises(ImageError) as err:
        decode(image_bytes(size=(20, 20)), max_pixels=399)
    assert err.value.status_code == 413 and "20x20 = 400 pixels" in err.value.detail


def huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height, with a tiny (invalid) body: only the header is read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_413_before_decoding():
    for size in (100_000, 20_000):  # beyond our limit, and beyond Pillow's own bomb guard
        with pytest.raises(ImageError) as err:
            decode(huge_png(size, size), max_pixels=10**12 if size == 20_000 else 4096 * 4096)
        assert err.value.status_code == 413


def test_grid_matches_torchvision_layout():
    images = torch.rand(5, 1, 8, 8)
    ours = imaging.make_grid(images, nrow=imaging.grid_nrow(5))
    theirs = tv_make_grid(images, nrow=3, padding=2)
    assert ours.shape == (1, 22, 32) and torch.equal(ours[0], theirs[0])
    assert torch.equal(imaging.make_grid(images[:1], nrow=1), images[0])
    assert [imaging.grid_nrow(n) for n in (1, 2, 4, 5, 9, 10, 16, 17)] == [1, 2, 2, 3, 3, 4, 4, 5]


def test_png_bytes_are_deterministic_and_exact():
    images = torch.rand(4, 3, 8, 8)
    png = imaging.grid_png(images)
    assert png == imaging.grid_png(images.clone())
    arr = np.asarray(Image.open(io.BytesIO(png)))
    assert arr.shape == (22, 22, 3)
    assert np.array_equal(arr[2:10, 2:10], imaging.to_uint8(images[0]).permute(1, 2, 0).numpy())
    assert imaging.to_uint8(torch.tensor([float("nan"), -1.0, 0.5, 2.0])).tolist() == [0, 0, 128, 255]


def ico_with_png(png: bytes, side_in_directory: int = 16) -> bytes:
    """An ICO whose directory says side x side, embedding `png` (Pillow reads the PNG's own size)."""
    header = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 = icon, one image
    entry = struct.pack("<BBBBHHII", side_in_directory, side_in_directory, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_an_ico_carrying_a_huge_png_is_refused_before_decoding(monkeypatch):
    # The review's bomb: a 16x16 icon embedding a 12000x12000 PNG, decoded inside Image.open (ICO
    # loads at open), before the size check (which then saw 413 only after the decoding). Here
    # 3000x3000: ICO is not an accepted format, so the file is refused before Pillow opens its PNG.
    buf = io.BytesIO()
    Image.new("RGBA", (3000, 3000)).save(buf, "PNG")
    data = ico_with_png(buf.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a started service lowers it, process-wide
    icon = Image.open(io.BytesIO(data))
    assert icon.format == "ICO" and icon.size == (3000, 3000)  # Pillow alone takes it, decoded at open
    with pytest.raises(ImageError) as err:
        decode_upload(data, "bomb.ico", image_shape=GRAY, max_pixels=64)
    assert err.value.status_code == 400 and "(not one of PNG, JPEG, GIF, WEBP, BMP, TIFF)" in err.value.detail


def test_pillows_own_bomb_check_is_held_to_max_pixels(monkeypatch):
    # set_pixel_limit makes Pillow's check (which its plugins also run on sizes of their own) use the
    # service's bound: above twice it, Pillow raises itself, and that is a 413 too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    imaging.set_pixel_limit(100)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageError) as err:
        decode_upload(save(Image.new("L", (20, 20))), "big.png", image_shape=GRAY, max_pixels=10**6)
    assert err.value.status_code == 413 and "too large to decode safely" in err.value.detail


async def test_png_compression_changes_the_bytes_never_the_pixels(serve):
    """GENSERVE_PNG_COMPRESSION: zlib's level of every answer's PNG (the grid and the JSON's), default
    1; level 0 stores the same pixels in more bytes; outside 0-9 it is refused."""
    from pydantic import ValidationError

    from app.settings import PNG_COMPRESSION, Settings

    from .conftest import png_array

    answers = {}
    for level in (None, 0, 9):
        async with serve(**({} if level is None else {"png_compression": level})) as (app, client):
            assert (await client.get("/config")).json()["png_compression"] == (PNG_COMPRESSION if level is None else level)
            grid = await client.get("/sample", params={"model": "vae", "n": 16, "seed": 3})
            each = await client.get("/sample", params={"model": "vae", "n": 2, "seed": 3}, headers={"accept": "application/json"})
            answers[level] = grid.content, each.json()["images"]
    pixels = {level: png_array(grid) for level, (grid, _) in answers.items()}
    assert np.array_equal(pixels[None], pixels[0]) and np.array_equal(pixels[None], pixels[9])
    assert len(answers[0][0]) > len(answers[None][0]) >= len(answers[9][0])
    assert answers[None][0] == imaging.grid_png(torch.tensor(pixels[None]).float()[None, None] / 255, 1)  # level 1 by default
    for level, (_, each) in answers.items():  # the JSON's PNGs: the same pixels, written at the level
        decoded = torch.stack([torch.tensor(png_array(base64.b64decode(b))).float()[None] / 255 for b in each])
        assert each == imaging.pngs_base64(decoded, PNG_COMPRESSION if level is None else level)
        assert torch.equal(decoded, torch.stack([torch.tensor(png_array(base64.b64decode(b))).float()[None] / 255
                                                 for b in answers[None][1]]))
    for bad in (-1, 10):
        with pytest.raises(ValidationError, match="png_compression"):
            Settings(png_compression=bad)
