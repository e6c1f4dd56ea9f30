"""Uploads in, PNGs out: the pixels on both sides of the model (app/multipart.py reads the uploads,
app/responses.py sends the PNGs). An upload that cannot be used raises ImageError (app/errors.py;
importable from here too): 400 when it cannot be decoded, 413 when it is too large.

The upload conversion rule (`decode_upload`), in order:

1. The bytes must be one of FORMATS (PNG, JPEG, GIF, WebP, BMP, TIFF), opened by Pillow with
   only those plugins (`Image.open(..., formats=FORMATS)`); anything else is 400. None of them
   decodes a pixel while opening (ICO, for one, decodes its largest embedded image inside
   `Image.open`, so a 16x16 icon could carry a 12000x12000 PNG past the size check: it is not
   accepted). The size in the header is checked against `max_pixels` before any pixel is decoded
   (413). Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, process-wide) is set to
   `max_pixels` by the service (`set_pixel_limit`), so whatever Pillow checks on its own is held
   to the same bound: its warning is left on, and its error is 413 too. Animated images use their
   first frame.
2. The EXIF orientation tag is applied (`ImageOps.exif_transpose`).
3. Modes are brought to 8 bits: 16- and 32-bit integer images (I;16, I) are read on a 16-bit
   scale (v / 257, rounded, clipped to 0..65535 first), float images (F) on an 8-bit scale
   (clipped to 0..255); bilevel (1) becomes L; palette images become RGB, or RGBA when they
   declare transparency; CMYK, YCbCr, LAB and HSV become RGB.
4. Alpha is composited over BLACK: a transparent pixel becomes 0. The grey models were trained on
   Fashion-MNIST (MNIST's layout: light garments on a black background), so "nothing there" maps
   to the data's background value; for the colour models (CIFAR-10 photos) black is as good a
   background as any.
5. The colour model: L (ITU-R 601-2 luma, Pillow's convert("L")) for 1-channel models, RGB
   (grey replicated) for 3-channel ones. Nothing is inverted: Fashion-MNIST is white-on-black,
   so send white-on-black images.
6. Geometry: the largest centred crop with the model's aspect ratio (a square: both models
   are H = W), then a Lanczos resize to H x W. An image already H x W is left untouched.
7. Pixels v in 0..255 become v / 255 in [0, 1], shape (C, H, W), float32.

Output: images in [0, 1] become 8-bit as round(255 * clamp(x, 0, 1)), laid out by
`make_grid` (torchvision's layout: `nrow` per row, 2 black pixels of padding around every
cell; a single image is returned as is) and encoded as PNG, L or RGB. The same tensor
always gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps

from app.errors import ImageError
from app.settings import PNG_COMPRESSION

RESAMPLE = Image.Resampling.LANCZOS
ALPHA_BACKGROUND = 0  # composite transparent pixels over black (see the module docstring)
# The formats an upload may be: the common ones whose plugins read only the header when opened.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


SNIFF_BYTES = 16  # what Pillow's plugins look at to recognise their format


def sniff(prefix: bytes) -> bool:
    """Whether a file starting with `prefix` (its first SNIFF_BYTES, or all of a shorter file) can be
    one of FORMATS, by the same test Pillow's plugins use; so an upload of another kind can be
    refused from its first bytes, before the rest of it is read."""
    Image.init()
    return any(Image.OPEN[fmt][1] is None or Image.OPEN[fmt][1](prefix) for fmt in FORMATS if fmt in Image.OPEN)


def set_pixel_limit(max_pixels: int) -> None:
    """Hold Pillow's own decompression-bomb check, process-wide, to `max_pixels`: it warns above it
    and raises DecompressionBombError above twice it, wherever a plugin checks a size of its own."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_upload(
    data: bytes | bytearray, filename: str, *, image_shape: tuple[int, int, int], max_pixels: int
) -> torch.Tensor:
    """Bytes of any common image file -> (C, H, W) float32 in [0, 1] for a model of `image_shape`."""
    label = f"file {filename!r}" if filename else "the file"
    if not data:
        raise ImageError(400, f"{label} is empty")
    c, h, w = image_shape
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(400, f"{label} is not a decodable image (not one of {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(413, f"{label} is too large to decode safely ({err})") from None
    except Exception as err:  # Pillow raises many types on hostile bytes; all of them mean "not an image"
        raise ImageError(400, f"{label} is not a decodable image ({type(err).__name__})") from None
    width, height = img.size
    if width * height > max_pixels:  # from the header: nothing is decoded yet
        raise ImageError(413, f"{label} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageError(413, f"{label} is too large to decode safely ({err})") from None
    except Exception as err:
        raise ImageError(400, f"{label} is not a decodable image ({type(err).__name__})") from None
    try:
        img = ImageOps.exif_transpose(img)
        img = _to_8bit(img)
        img = _composite_alpha(img)
        img = img.convert("L" if c == 1 else "RGB")
        img = _fit(img, w, h)
        arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # e.g. a malformed EXIF block or an exotic mode Pillow cannot convert
        raise ImageError(400, f"{label} could not be converted ({type(err).__name__}: {err})") from None
    x = torch.from_numpy(arr.copy()).float().div_(255)  # (H, W) or (H, W, 3)
    if x.dim() == 2:
        return x.unsqueeze(0)  # (1, H, W)
    return x.permute(2, 0, 1).contiguous()  # (3, H, W)


def _to_8bit(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I: a 16-bit scale
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), "L")
    if mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L")
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode in ("LA", "La"):
        return img.convert("LA")
    if mode in ("RGBa",):
        return img.convert("RGBA")
    if mode in ("L", "RGB", "RGBA"):
        return img
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _composite_alpha(img: Image.Image) -> Image.Image:
    if img.mode not in ("LA", "RGBA"):
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB" if img.mode == "RGBA" else "L")


def _fit(img: Image.Image, w: int, h: int) -> Image.Image:
    """Centre-crop to the aspect ratio w:h, then resize to (w, h) with Lanczos."""
    iw, ih = img.size
    if (iw, ih) == (w, h):
        return img
    if iw * h > ih * w:  # too wide
        cw, ch = max(1, round(ih * w / h)), ih
    else:  # too tall (or right)
        cw, ch = iw, max(1, round(iw * h / w))
    left, top = (iw - cw) // 2, (ih - ch) // 2
    if (cw, ch) != (iw, ih):
        img = img.crop((left, top, left + cw, top + ch))
    return img.resize((w, h), RESAMPLE)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8, round(255 x); NaN counts as 0."""
    return torch.round(images.float().nan_to_num(0.0).clamp(0, 1) * 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (C, H', W'): torchvision.utils.make_grid's layout, black padding."""
    b, c, h, w = images.shape
    if b == 1:
        return images[0]
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = images.new_zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(b):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def grid_nrow(n: int) -> int:
    """Images per row of a grid of n: ceil(sqrt(n))."""
    return math.isqrt(n - 1) + 1 if n > 0 else 1


def png_bytes(image: torch.Tensor, compress_level: int = PNG_COMPRESSION) -> bytes:
    """(C, H, W) uint8 or float in [0, 1], C in {1, 3} -> PNG bytes (mode L or RGB), zlib at
    `compress_level` (0-9: the same pixels, smaller and slower to write as it rises)."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    arr = image.cpu().numpy()
    if arr.shape[0] == 1:
        pil = Image.fromarray(arr[0], "L")
    elif arr.shape[0] == 3:
        pil = Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")
    else:
        raise ValueError(f"cannot encode {arr.shape[0]} channels as PNG")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def grid_png(images: torch.Tensor, nrow: int | None = None, compress_level: int = PNG_COMPRESSION) -> bytes:
    """(B, C, H, W) in [0, 1] -> one PNG: a grid of ceil(sqrt(B)) per row unless nrow is given."""
    nrow = nrow or grid_nrow(images.shape[0])
    return png_bytes(make_grid(to_uint8(images), nrow), compress_level)


# The heat map's colours (matplotlib's "inferno" at 0, 1/4, 1/2, 3/4 and 1), linearly interpolated
HEAT_COLOURS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255


def heat_map(values: torch.Tensor, vmax: float) -> torch.Tensor:
    """(B, H, W) values -> (B, 3, H, W) RGB in [0, 1]: 0 black, `vmax` (and above) pale yellow, through
    HEAT_COLOURS; NaN counts as 0."""
    if not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    t = (values.double().nan_to_num(0.0) / vmax).clamp(0, 1) * (len(HEAT_COLOURS) - 1)  # (B, H, W)
    lo = t.floor().long().clamp(max=len(HEAT_COLOURS) - 2)
    frac = (t - lo)[..., None]  # (B, H, W, 1)
    colours = HEAT_COLOURS.double()
    rgb = colours[lo] * (1 - frac) + colours[lo + 1] * frac  # (B, H, W, 3)
    return rgb.permute(0, 3, 1, 2).float()  # (B, 3, H, W)


def pngs_base64(images: torch.Tensor, compress_level: int = PNG_COMPRESSION) -> list[str]:
    """(B, C, H, W) in [0, 1] -> one base64-encoded PNG per image."""
    return [base64.b64encode(png_bytes(img, compress_level)).decode("ascii") for img in to_uint8(images)]
