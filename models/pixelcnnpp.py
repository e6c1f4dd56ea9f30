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

The prior interface (`forward`, `log_prob`, `loss`, `sample(..., mode=)`) comes from
`AutoregressivePrior` (models/prior.py); this file brings the network and the activation cache
of the "cached" sampling mode (`PixelCNNppSamplingCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import down_shift, label_bias, right_shift
from models.prior import AutoregressivePrior, validate_prior_fields


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


class PixelCNNpp(AutoregressivePrior):
    """PixelCNN++ over codes: streams u and ul through a U-Net of gated resnets, categorical head.
    No blind spot: position i sees every code before i."""

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

    def _sampling_cache(self, n: int, labels: torch.Tensor | None) -> PixelCNNppSamplingCache:
        """For `sample(mode="cached")`: caches each shifted convolution's input at every scale.
        The u stream (and the coarse scales' u) reads only the rows above, so it runs once per
        row, at the row's start; the ul stream at (r, c) reads only positions before (r, c), so it
        runs at (r, c) alone, and at scale s only where r and c are multiples of 2^s
        (`PixelCNNppSamplingCache`)."""
        return PixelCNNppSamplingCache(self, n, labels)


# ---------------------------------------------------------------------------------------------
# Cached sampling (Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive
# Models", arXiv 1704.06001). Every activation is stored in a grid with one zero row above and
# one zero column on each side, (B, C, H + 1, W + 2), channels last in memory, grid position
# (i, j) at [i + 1, j + 1]: the zero padding every shifted convolution here applies (none
# reaches further), and, since concat_elu(0) = 0, also the padding of a concat_elu'd input.


def put(padded: torch.Tensor, i: int, j0: int, j1: int, value: torch.Tensor) -> None:
    """Write value (B, C, 1, j1 - j0) at row i, columns j0..j1 - 1 of a padded grid."""
    padded[:, :, i + 1:i + 2, j0 + 1:j1 + 1] = value


def nin(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution, as a matrix product at a single position: (B, C_in, 1, w) -> (B, C_out, 1, w)."""
    if x.shape[-1] == 1:
        return F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)[:, :, None, None]
    return conv(x)


class PixelCNNppSamplingCache:
    """PixelCNN++ activations of n grids being sampled: the u stream once per row, the ul
    stream once per position, scale s only at the rows and columns that are multiples of 2^s.

    Caches, padded, at every scale: the grid of embedded codes (with the ones channel); both
    shifted convolutions' inputs of every gated resnet; each stream's first-half output that the
    stride-2 conv downsamples; each stream's second-half output that the transposed conv
    upsamples; and the current row of the u stream, which the ul stream reads as its skip input.

    Exact because of what each activation reads (module docstring). Every u activation at grid
    row r reads codes in rows < r only, and at scale s, row i reads grid rows < 2^s * i: so at
    the start of grid row r the u stream is computed on row r, and on row r / 2^s of each scale
    s with 2^s dividing r, first half up the scales, then second half down, each layer on its
    window of rows above. Every ul activation at grid position (r, c) reads codes before (r, c)
    only, and at scale s, (i, j) reads codes before (2^s * i, 2^s * j) only: so at (r, c) the ul
    stream is computed at (r / 2^s, c / 2^s) for each s with 2^s dividing both, in the same
    order, and the upsampling reads the coarse position (i // 2, j // 2), computed at the same
    or an earlier step. Each conv is applied to the window `forward` reads, with the same
    weights, biases and zero padding; only summation orders differ. Dropout is skipped: the
    samplers run in eval mode.
    """

    def __init__(self, model: PixelCNNpp, n: int, labels: torch.Tensor | None) -> None:
        config = model.config
        p, scales = config.hidden_channels, config.n_scales
        self.model = model
        self.sizes = [config.code_shape]  # (H_s, W_s) of each scale
        for _ in range(scales - 1):
            h, w = self.sizes[-1]
            self.sizes.append(((h + 1) // 2, (w + 1) // 2))
        weight = model.embed.weight

        def padded(channels: int, s: int) -> torch.Tensor:
            # Channels last in memory, so that the window of a position is a few contiguous runs.
            size = (n, channels, self.sizes[s][0] + 1, self.sizes[s][1] + 2)
            grid = torch.empty(size, dtype=weight.dtype, device=weight.device, memory_format=torch.channels_last)
            return grid.zero_()

        self.x = padded(p + 1, 0)  # the network's input: embedded codes and the ones channel
        self.x[:, p, 1:, 1:-1] = 1
        self.inputs, self.biases = {}, {}  # per gated resnet: its two conv inputs, its label bias
        for s in range(scales):
            second = scales - 1 - s  # the second half runs the scales coarsest first
            for block in (*model.up_u[s], *model.up_ul[s], *model.down_u[second], *model.down_ul[second]):
                self.inputs[block] = (padded(2 * p, s), padded(2 * p, s))
                self.biases[block] = label_bias(block.label_bias, labels)  # (n, 2p, 1, 1) or 0.0
        self.to_downsample_u = [padded(p, s) for s in range(scales - 1)]
        self.to_downsample_ul = [padded(p, s) for s in range(scales - 1)]
        self.to_upsample_u = [None] + [weight.new_zeros(n, p, *self.sizes[s]) for s in range(1, scales)]
        self.to_upsample_ul = [None] + [weight.new_zeros(n, p, *self.sizes[s]) for s in range(1, scales)]
        # The current row of scale s of the u stream: after the first layer and each first-half
        # block (the short-cuts; the ul blocks' skip inputs), and after each second-half block.
        self.u_first = [[] for _ in range(scales)]
        self.u_second = [[] for _ in range(scales)]
        self.zero = weight.new_zeros(n, p, 1, 1)
        # Every kernel wider than 1x1, flattened in the order of a channels-last window: (C_out, kh * kw * C_in).
        self.kernels = {
            conv: conv.weight.permute(0, 2, 3, 1).flatten(1)
            for conv in model.modules()
            if isinstance(conv, nn.Conv2d) and conv.kernel_size != (1, 1)
        }

    def _top_scale(self, r: int, c: int) -> int:
        """The coarsest scale s whose grid has a position at (r, c): 2^s divides r and c."""
        s = 0
        while s + 1 < self.model.config.n_scales and r % 2 ** (s + 1) == 0 and c % 2 ** (s + 1) == 0:
            s += 1
        return s

    def _conv(self, module: nn.Module, padded: torch.Tensor, i: int, j0: int, j1: int) -> torch.Tensor:
        """A DownShiftedConv2d or DownRightShiftedConv2d (any stride) at its output row i,
        columns j0..j1 - 1, its input read from a padded grid: -> (n, C_out, 1, j1 - j0). The
        window is the one `module.forward` reads there, so only the summation order differs."""
        conv = module.conv
        (kh, kw), stride = conv.kernel_size, conv.stride[0]
        left, _, top, _ = module.pad
        row, col = stride * i - top + 1, stride * j0 - left + 1  # the window's corner in the padded grid
        if j1 - j0 == 1:  # one position: the window, channels last, times the flattened kernel
            window = padded[:, :, row:row + kh, col:col + kw].permute(0, 2, 3, 1).flatten(1)  # (n, kh * kw * C_in)
            return F.linear(window, self.kernels[conv], conv.bias)[:, :, None, None]
        window = padded[:, :, row:row + kh, col:stride * (j1 - 1) - left + 1 + kw]
        return F.conv2d(window, conv.weight, conv.bias, stride=stride)

    def _block(
        self, block: GatedResnet, x: torch.Tensor, skip: torch.Tensor | None, i: int, j0: int, j1: int
    ) -> torch.Tensor:
        """GatedResnet.forward in eval mode at row i, columns j0..j1 - 1: x, skip (n, C, 1, j1 - j0)
        there -> (n, C, 1, j1 - j0). Its two convs' inputs at earlier positions are in the cache;
        it writes its own first."""
        conv_in_input, conv_out_input = self.inputs[block]
        put(conv_in_input, i, j0, j1, concat_elu(x))
        y = self._conv(block.conv_in, conv_in_input, i, j0, j1)  # (n, C, 1, j1 - j0)
        if block.skip is not None:
            y = y + nin(block.skip, concat_elu(skip))
        put(conv_out_input, i, j0, j1, concat_elu(y))
        y = self._conv(block.conv_out, conv_out_input, i, j0, j1) + self.biases[block]  # dropout: identity in eval
        a, b = y.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)

    def _u_row(self, r: int) -> None:
        """The u stream on grid row r, and on row r / 2^s of each coarser scale s that has it;
        it reads rows above only, all drawn."""
        m, scales = self.model, self.model.config.n_scales
        top = self._top_scale(r, 0)
        w = self.sizes[0][1]
        # down_shift: row 0 gets zeros, row r the first layer at row r - 1.
        u = self._conv(m.u_init, self.x, r - 1, 0, w) if r > 0 else self.zero.expand(-1, -1, -1, w)
        for s in range(top + 1):
            i, width = r >> s, self.sizes[s][1]
            if s > 0:
                u = self._conv(m.downsample_u[s - 1], self.to_downsample_u[s - 1], i, 0, width)
            self.u_first[s] = [u]
            for block in m.up_u[s]:
                u = self._block(block, u, None, i, 0, width)
                self.u_first[s].append(u)
            if s < scales - 1:
                put(self.to_downsample_u[s], i, 0, width, u)
        for s in range(top, -1, -1):
            i, width = r >> s, self.sizes[s][1]
            shortcuts = list(self.u_first[s])
            if s == scales - 1:
                u = shortcuts.pop()
            else:  # DownShiftedDeconv2d: row i reads coarse row i // 2, kernel row i % 2
                deconv = m.upsample_u[scales - 2 - s].deconv
                coarse = self.to_upsample_u[s + 1][:, :, i // 2:i // 2 + 1]  # (n, p, 1, W_{s + 1})
                u = F.conv_transpose2d(coarse, deconv.weight, deconv.bias, stride=deconv.stride)
                u = u[:, :, i % 2:i % 2 + 1, 1:width + 1]  # (n, p, 1, W_s)
            self.u_second[s] = []
            for block in m.down_u[scales - 1 - s]:
                u = self._block(block, u, shortcuts.pop(), i, 0, width)
                self.u_second[s].append(u)
            if s > 0:
                self.to_upsample_u[s][:, :, i:i + 1] = u

    def logits(self, r: int, c: int) -> torch.Tensor:
        """The logits at (r, c), every code before it recorded: (n, K)."""
        if c == 0:
            self._u_row(r)
        m, scales = self.model, self.model.config.n_scales
        top = self._top_scale(r, c)
        # down_shift and right_shift: zeros at row 0 and column 0.
        above = self._conv(m.ul_init_above, self.x, r - 1, c, c + 1) if r > 0 else self.zero
        left = self._conv(m.ul_init_left, self.x, r, c - 1, c) if c > 0 else self.zero
        ul = above + left  # (n, p, 1, 1)
        shortcuts = []
        for s in range(top + 1):
            i, j = r >> s, c >> s
            if s > 0:
                ul = self._conv(m.downsample_ul[s - 1], self.to_downsample_ul[s - 1], i, j, j + 1)
            shortcuts.append([ul])
            for block, u in zip(m.up_ul[s], self.u_first[s][1:]):
                ul = self._block(block, ul, u[..., j:j + 1], i, j, j + 1)
                shortcuts[s].append(ul)
            if s < scales - 1:
                put(self.to_downsample_ul[s], i, j, j + 1, ul)
        for s in range(top, -1, -1):
            i, j = r >> s, c >> s
            if s == scales - 1:
                ul = shortcuts[s].pop()
            else:  # DownRightShiftedDeconv2d: (i, j) reads coarse (i // 2, j // 2), kernel (i % 2, j % 2)
                deconv = m.upsample_ul[scales - 2 - s].deconv
                coarse = self.to_upsample_ul[s + 1][:, :, i // 2, j // 2]  # (n, p)
                ul = torch.addmm(deconv.bias, coarse, deconv.weight[:, :, i % 2, j % 2])[:, :, None, None]
            for block, u in zip(m.down_ul[scales - 1 - s], self.u_second[s]):
                skip = torch.cat([u[..., j:j + 1], shortcuts[s].pop()], dim=1)  # (n, 2p, 1, 1)
                ul = self._block(block, ul, skip, i, j, j + 1)
            if s > 0:
                self.to_upsample_ul[s][:, :, i, j] = ul[:, :, 0, 0]
        return nin(m.head, F.elu(ul))[:, :, 0, 0]  # (n, K)

    def record(self, r: int, c: int, code: torch.Tensor) -> None:
        """Store the codes drawn at (r, c): (n,)."""
        self.x[:, :-1, r + 1, c + 1] = self.model.embed.weight[code]
