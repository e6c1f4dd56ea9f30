"""Building blocks that more than one model family uses unchanged.

- `MaskedConv2d`: the causal k x k convolution of PixelCNN (models/pixelcnn.py), also the
  context of the conv VAE's autoregressive decoder (models/vae.py).
- `down_shift`, `right_shift`: the one-row / one-column shifts that keep a stack causal, in
  Gated PixelCNN (models/pixelcnn.py) and PixelCNN++ (models/pixelcnnpp.py).
- `label_bias`: the class-conditional per-channel bias of Gated PixelCNN eq. 4, in every prior
  (models/pixelcnn.py, models/pixelcnnpp.py).
- `Linear`: nn.Linear that can compute at least `min_rows` rows (`set_min_rows`), so a row's
  result does not depend on how many rows share its product; every Linear of the VAEs
  (models/vae.py), the only models with one.

A block that only one family uses stays in that family's file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution that sees only the positions before its centre in raster order
    (mask "A") or those and the centre (mask "B") (PixelCNN paper, sec. 3.4 and fig. 2).
    The mask is purely spatial: codes have no colour channels, and the VAE's decoder draws all the
    channels of a pixel at once."""

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


class Linear(nn.Linear):
    """nn.Linear whose input of fewer than `min_rows` rows is computed as part of a product of
    `min_rows` rows (the last row repeated), then cut back.

    CPU BLAS (MKL) multiplies a matrix of 1-3 rows with other kernels than a taller one, so a
    row's last bits change with the size of its batch; the convolutions do not. Padding only the
    Linear inputs (a few hundred numbers) is far cheaper than padding a whole batch: a row's
    result is then its result in a product of at least `min_rows` rows, whatever the batch size.
    `min_rows` is 1 (plain nn.Linear) unless `set_min_rows` sets it; it is not saved (no tensor,
    no config field): the service sets it when it serves a model with GENSERVE_PAD_BATCHES
    (app/service.py, GENSERVE_LINEAR_MIN_ROWS).
    Same parameters and state-dict keys as nn.Linear.
    """

    min_rows: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (rows, in_features): every leading dimension counts as rows
        rows = flat.shape[0]
        if rows == 0 or rows >= self.min_rows:
            return F.linear(x, self.weight, self.bias)
        flat = torch.cat([flat, flat[-1:].expand(self.min_rows - rows, -1)])  # (min_rows, in_features)
        return F.linear(flat, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], -1)


def set_min_rows(model: nn.Module, min_rows: int) -> int:
    """Make every `Linear` of `model` compute at least `min_rows` rows (1: none padded); returns how
    many Linears changed."""
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.min_rows != min_rows:
            module.min_rows = min_rows
            changed += 1
    return changed
