"""PixelCNN++ (Salimans et al. 2017, arXiv 1701.05517) adapted to a VQ-VAE's grid of codes.

Kept from the paper and its code: two streams, u (down-shifted convolutions: sees the rows
above) and ul (down-shifted plus down-right-shifted: sees the rows above and the positions to
the left), so there is no blind spot; gated resnet blocks on concat_elu (`gated_resnet`);
downsampling by stride-2 shifted convolutions instead of dilation (sec. 2.3) with short-cut
connections from the first half to the second, a U-Net (sec. 2.4); dropout inside each block
(sec. 2.5); a constant channel of ones so the network can tell the zero padding from data.

Changed for codes: the input is an embedding of the codes, not pixel values, and the
output is a categorical over the K codes, not the discretized logistic mixture (sec. 2.1).

Causality at odd sizes: a stride-2 shifted conv maps output row i to input rows 2i - 1..2i
(and, for ul, column j to columns 2j - 1..2j), the transposed conv maps low-res row i back
to rows 2i..2i + 1 (and column j to 2j..2j + 1 for ul), and both crop to the high-res size:
ceil(h / 2) rows and back, 7 -> 4 -> 7. Everything reads only rows at or above the one it
writes, so the top rows compute the same whether the grid below them exists or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.pixelcnn import (
    check_inputs,
    code_log_prob,
    down_shift,
    label_bias,
    right_shift,
    sample_codes,
    validate_prior_fields,
)


@dataclass(frozen=True)
class PixelCNNppConfig:
    codebook_size: int = 512  # K, the VQ-VAE's codebook size
    code_shape: tuple[int, int] = (7, 7)  # (h, w), the VQ-VAE's code grid
    num_classes: int = 0  # 0 = unconditional, else one label in [0, num_classes) per example
    hidden_channels: int = 128  # paper: 160
    n_layers: int = 3  # gated resnet blocks per scale in each half (paper: 5)
    n_scales: int = 2  # resolutions of the U-Net: 2 -> 7x7 and 4x4 (paper: 3, 32 -> 16 -> 8)
    dropout: float = 0.1  # inside every gated resnet (paper: 0.5 on CIFAR-10)

    def __post_init__(self) -> None:
        validate_prior_fields(self)
        if self.n_scales < 1:
            raise ValueError(f"n_scales must be >= 1 (1 = no down/up path), got {self.n_scales}")
        smallest = min(self.code_shape)
        if smallest < 2 ** (self.n_scales - 1):
            raise ValueError(
                f"n_scales={self.n_scales} halves the grid {self.n_scales - 1} times, too often for "
                f"code_shape={self.code_shape}; use n_scales <= {smallest.bit_length()}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of [x, -x] on the channel axis (PixelCNN++ code): (B, C, H, W) -> (B, 2C, H, W)."""
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Module):
    """Output (r, c) sees rows r - kh + 1..r and columns c - (kw - 1)/2..c + (kw - 1)/2:
    nothing below its own row. With stride 2, output row i sees rows 2i - 1..2i."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] = (2, 3), stride: int = 1):
        super().__init__()
        kh, kw = kernel_size
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)  # (left, right, top, bottom)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Module):
    """Output (r, c) sees rows r - kh + 1..r and columns c - kw + 1..c: nothing after (r, c)
    in raster order. With stride 2, output (i, j) sees rows 2i - 1..2i, columns 2j - 1..2j."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] = (2, 2), stride: int = 1):
        super().__init__()
        kh, kw = kernel_size
        self.pad = (kw - 1, 0, kh - 1, 0)  # (left, right, top, bottom)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, kernel (2, 3): low-res (i, j) writes rows 2i..2i + 1 and,
    after dropping the first column, columns 2j - 1..2j + 1. Output row R reads low-res row R // 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, (2, 3), stride=2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        return self.deconv(x)[:, :, :h, 1:w + 1]  # (B, C, 2h', 2w' + 1) -> (B, C, h, w)


class DownRightShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, kernel (2, 2): low-res (i, j) writes rows 2i..2i + 1,
    columns 2j..2j + 1. Output (R, C) reads low-res (R // 2, C // 2), at or before it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, (2, 2), stride=2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        return self.deconv(x)[:, :, :h, :w]  # (B, C, 2h', 2w') -> (B, C, h, w)


class GatedResnet(nn.Module):
    """x + a ⊙ σ(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(skip)))))
    (PixelCNN++ code, `gated_resnet`), the label bias added to [a, b] as in Gated PixelCNN eq. 4.
    `conv` is a shifted conv class, so the block stays causal."""

    def __init__(self, channels: int, conv: type[nn.Module], skip_channels: int, dropout: float, num_classes: int):
        super().__init__()
        self.conv_in = conv(2 * channels, channels)
        self.skip = nn.Conv2d(2 * skip_channels, channels, 1) if skip_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * channels, 2 * channels)
        self.label_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        y = self.conv_in(concat_elu(x))  # (B, C, H, W)
        if self.skip is not None:
            y = y + self.skip(concat_elu(skip))
        y = self.conv_out(self.dropout(concat_elu(y))) + label_bias(self.label_bias, labels)  # (B, 2C, H, W)
        a, b = y.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """PixelCNN++ over codes: streams u and ul through a U-Net of gated resnets, categorical head."""

    KIND: ClassVar[str] = "pixelcnnpp"
    config_class: ClassVar[type] = PixelCNNppConfig

    def __init__(self, config: PixelCNNppConfig) -> None:
        super().__init__()
        self.config = config
        p, k, nc = config.hidden_channels, config.codebook_size, config.num_classes
        n, scales, drop = config.n_layers, config.n_scales, config.dropout
        self.embed = nn.Embedding(k, p)
        # First layer, p + 1 input channels (the ones channel). u: rows r - 2..r - 1 after the
        # down-shift. ul: row r - 1 (down-shifted 1 x 3) and (r - 1..r, c - 1) (right-shifted 2 x 1).
        self.u_init = DownShiftedConv2d(p + 1, p, (2, 3))
        self.ul_init_above = DownShiftedConv2d(p + 1, p, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(p + 1, p, (2, 1))
        # First half, high resolution to low; ul's skip input is u at the same position.
        self.up_u = nn.ModuleList(
            nn.ModuleList(GatedResnet(p, DownShiftedConv2d, 0, drop, nc) for _ in range(n)) for _ in range(scales)
        )
        self.up_ul = nn.ModuleList(
            nn.ModuleList(GatedResnet(p, DownRightShiftedConv2d, p, drop, nc) for _ in range(n)) for _ in range(scales)
        )
        self.downsample_u = nn.ModuleList(DownShiftedConv2d(p, p, (2, 3), stride=2) for _ in range(scales - 1))
        self.downsample_ul = nn.ModuleList(DownRightShiftedConv2d(p, p, (2, 2), stride=2) for _ in range(scales - 1))
        # Second half, low resolution to high; every block takes one short-cut from the first
        # half (u: u's; ul: [u, ul's]). Each scale above the lowest has one more block, to use
        # the short-cut saved after the downsampling (or the first layer) at that scale.
        sizes = [n] + [n + 1] * (scales - 1)
        self.down_u = nn.ModuleList(
            nn.ModuleList(GatedResnet(p, DownShiftedConv2d, p, drop, nc) for _ in range(m)) for m in sizes
        )
        self.down_ul = nn.ModuleList(
            nn.ModuleList(GatedResnet(p, DownRightShiftedConv2d, 2 * p, drop, nc) for _ in range(m)) for m in sizes
        )
        self.upsample_u = nn.ModuleList(DownShiftedDeconv2d(p, p) for _ in range(scales - 1))
        self.upsample_ul = nn.ModuleList(DownRightShiftedDeconv2d(p, p) for _ in range(scales - 1))
        self.head = nn.Conv2d(p, k, 1)  # on elu(ul), the paper's `nin_out`

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h', w), h' <= h -> logits (B, K, h', w); position i sees every code before i."""
        labels = check_inputs(self.config, codes, labels)
        return self._logits(codes.long(), labels)

    def _logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, p, h', w)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, p + 1, h', w)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))
        us, uls = [u], [ul]  # short-cuts for the second half
        for s in range(self.config.n_scales):
            for u_block, ul_block in zip(self.up_u[s], self.up_ul[s]):
                u = u_block(u, None, labels)
                ul = ul_block(ul, u, labels)
                us.append(u)
                uls.append(ul)
            if s < self.config.n_scales - 1:
                u = self.downsample_u[s](u)  # (B, p, ceil(H / 2), ceil(W / 2))
                ul = self.downsample_ul[s](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for s in range(self.config.n_scales):
            for u_block, ul_block in zip(self.down_u[s], self.down_ul[s]):
                u = u_block(u, us.pop(), labels)
                ul = ul_block(ul, torch.cat([u, uls.pop()], dim=1), labels)
            if s < self.config.n_scales - 1:
                size = tuple(us[-1].shape[-2:])  # the next scale up, cropping 2 * ceil(H / 2) back to H
                u = self.upsample_u[s](u, size)
                ul = self.upsample_ul[s](ul, size)
        return self.head(F.elu(ul))  # (B, K, h', w)

    def log_prob(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(codes | labels) in nats, summed over positions: (B,)."""
        return code_log_prob(self(codes, labels), codes)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood in nats per code (cross-entropy)."""
        return F.cross_entropy(self(codes, labels), codes.long())

    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n code grids (n, h, w); runs on rows 0..r while sampling row r. See `sample_codes`.
        Runs in eval mode (dropout off) and restores the training flag afterwards."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, crop_rows=True)

    def sample_naive(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reference sampler: the whole network on the whole grid once per position."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, crop_rows=False)
