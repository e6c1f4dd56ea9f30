"""Building blocks that more than one model family uses unchanged.

- `MaskedConv2d`: the causal k x k convolution of PixelCNN (models/pixelcnn.py), also the
  context of the conv VAE's autoregressive decoder (models/vae.py).
- `down_shift`, `right_shift`: the one-row / one-column shifts that keep a stack causal, in
  Gated PixelCNN (models/pixelcnn.py) and PixelCNN++ (models/pixelcnnpp.py).
- `label_bias`: the class-conditional per-channel bias of Gated PixelCNN eq. 4, in every prior
  (models/pixelcnn.py, models/pixelcnnpp.py).

A block that only one family uses stays in that family's file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution that sees only the positions before its centre in raster order
    (mask "A") or those and the centre (mask "B") (PixelCNN paper, sec. 3.4 and fig. 2).
    Codes have no colour channels, so the mask is purely spatial."""

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        mask = torch.ones(kernel_size, kernel_size)
        mask[centre, centre + (mask_type == "B"):] = 0  # the centre row: the left half (and the centre for B)
        mask[centre + 1:] = 0  # every row below the centre
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Row r takes row r - 1's value (row 0 gets zeros): (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Column c takes column c - 1's value (column 0 gets zeros): (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(x, (1, 0))[..., :-1]


def label_bias(embedding: nn.Embedding | None, labels: torch.Tensor | None) -> torch.Tensor | float:
    """The conditional per-channel bias V^T h of the Gated PixelCNN paper (eq. 4), h one-hot: (B, C, 1, 1)."""
    if embedding is None:
        return 0.0
    return embedding(labels)[:, :, None, None]
