"""The codecs' bits/dim (models/complexity.py): lossless, per image, and ordered as they must be."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.complexity import CODECS, SAVE_OPTIONS, codec_bits_per_dim, codec_bytes, to_pil


def images(n: int, channels: int, size: int = 28) -> torch.Tensor:
    return torch.randint(256, (n, channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("channels", [1, 3])
def test_the_codec_is_lossless_and_counts_the_whole_file(codec, channels):
    image = images(1, channels)[0]
    buffer = io.BytesIO()
    to_pil(image).save(buffer, **SAVE_OPTIONS[codec])
    back = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L" if channels == 1 else "RGB"))
    assert np.array_equal(back.reshape(28, 28, channels).transpose(2, 0, 1), image.numpy())
    assert codec_bytes(image, codec) == len(buffer.getvalue())
    assert codec_bits_per_dim(image[None], codec).item() == pytest.approx(8 * len(buffer.getvalue()) / image.numel())


@pytest.mark.parametrize("codec", CODECS)
def test_noise_costs_about_8_bits_a_dimension_and_a_flat_image_almost_nothing(codec):
    noise = codec_bits_per_dim(images(3, 1), codec)
    flat = codec_bits_per_dim(torch.full((2, 1, 28, 28), 128, dtype=torch.uint8), codec)
    assert noise.dtype == torch.float64 and noise.shape == (3,)
    assert bool((noise > 7.9).all()) and bool((flat < 1.0).all())
    floats = codec_bits_per_dim(images(3, 1).float() / 255, codec)  # on the grid k / 255: the same bytes
    assert torch.equal(floats, noise)


def test_a_bad_image_or_codec_is_refused():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        codec_bytes(torch.zeros(2, 4, 4, dtype=torch.uint8), "png")
    with pytest.raises(ValueError, match="codec must be one of png, webp"):
        codec_bytes(torch.zeros(1, 4, 4, dtype=torch.uint8), "jpeg")
