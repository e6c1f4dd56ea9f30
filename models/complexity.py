"""What a general-purpose lossless codec needs for an image, in bits/dim: the anchor of the model
card's likelihood table and the correction of the input-complexity out-of-distribution score
(Serrà et al. 2020, arXiv 1909.11480, eq. 2: S(x) = -log2 p(x) - L(x), both per dimension).

Each image is compressed on its own and its whole file is counted (headers included): that is what
a codec needs to store one image, and the only fair comparison with a model that scores one image.
The codecs are Pillow's: PNG at zlib level 9 (`optimize=True`) and WebP lossless at its slowest,
best setting (`lossless=True, method=6, quality=100`: in lossless mode quality is the effort;
Pillow's default 80 needs 2% more on Fashion-MNIST's test split). Images are 8-bit, 1 or 3 channels, (C, H, W).
"""

from __future__ import annotations

import io
from typing import Literal

import torch
from PIL import Image

Codec = Literal["png", "webp"]
CODECS: tuple[Codec, ...] = ("png", "webp")
SAVE_OPTIONS: dict[str, dict] = {
    "png": {"format": "PNG", "optimize": True, "compress_level": 9},
    "webp": {"format": "WEBP", "lossless": True, "method": 6, "quality": 100},  # lossless: quality is the effort
}


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (C, H, W), uint8 or floats on the grid k / 255 in [0, 1], as a Pillow image ("L" or "RGB")."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"an image must be (C, H, W) with 1 or 3 channels, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)
    array = image.permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    return Image.fromarray(array[:, :, 0], "L") if image.shape[0] == 1 else Image.fromarray(array, "RGB")


def codec_bytes(image: torch.Tensor, codec: Codec) -> int:
    """The size in bytes of one image (C, H, W) compressed on its own by `codec`."""
    if codec not in SAVE_OPTIONS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    buffer = io.BytesIO()
    to_pil(image).save(buffer, **SAVE_OPTIONS[codec])
    return buffer.tell()


def codec_bits_per_dim(images: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Bits per dimension (subpixel) that `codec` needs for each image of (B, C, H, W): (B,) float64."""
    dims = images[0].numel()
    return torch.tensor([8.0 * codec_bytes(image, codec) / dims for image in images], dtype=torch.float64)
