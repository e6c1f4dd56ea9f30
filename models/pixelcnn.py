"""Autoregressive priors over a VQ-VAE's code grid: PixelCNN and Gated PixelCNN.

A prior models p(codes) = prod_i p(code_i | code_<i) over an (h, w) grid of code indices in
[0, K), in raster order, with a categorical over the K codes at every position. With
`num_classes > 0` it models p(codes | label) instead: each layer adds a per-channel bias
looked up from the label (the Gated PixelCNN paper's conditional model, eq. 4, with a one-hot h).

Both subclass `AutoregressivePrior` (models/prior.py), which holds the interface every prior
shares (`forward`, `log_prob`, `loss`, `sample(..., mode=)`), the checks and the sampling loop;
each brings its network (`_logits`) and the activation cache of the "cached" sampling mode
(`_sampling_cache`), defined here beside it. The masked convolution, the shifts and the label
bias are shared blocks (models/layers.py).

PixelCNN: van den Oord et al. 2016, "Pixel Recurrent Neural Networks", arXiv 1601.06759.
Gated PixelCNN: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders", arXiv 1606.05328.
Cached sampling: Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive
Models", arXiv 1704.06001.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import MaskedConv2d, down_shift, label_bias
from models.prior import AutoregressivePrior, validate_prior_fields


# ---------------------------------------------------------------------------------------------
# Shared by PixelCNN and Gated PixelCNN: the kernel-size check, one-position helpers of the caches.


def check_kernel_size(name: str, k: int) -> None:
    if k < 3 or k % 2 == 0:
        raise ValueError(f"{name} must be odd and >= 3 so the causal mask has a centre, got {k}; use 3, 5 or 7")


def flat_label_bias(embedding: nn.Embedding | None, labels: torch.Tensor | None) -> torch.Tensor | float:
    """label_bias for one position: (B, C), or 0.0 when unconditional."""
    if embedding is None:
        return 0.0
    return embedding(labels)  # (B, C)


def linear_1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution at one position: x (B, C_in) -> (B, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


# ---------------------------------------------------------------------------------------------
# PixelCNN


@dataclass(frozen=True)
class PixelCNNConfig:
    codebook_size: int = 512  # K, the VQ-VAE's codebook size
    code_shape: tuple[int, int] = (7, 7)  # (h, w), the VQ-VAE's code grid
    num_classes: int = 0  # 0 = unconditional, else one label in [0, num_classes) per example
    hidden_channels: int = 128
    n_layers: int = 12  # residual blocks after the mask-A input layer
    first_kernel_size: int = 7  # the mask-A input layer (paper: 7x7)
    kernel_size: int = 3  # the mask-B convolution in each residual block (paper: 3x3)

    def __post_init__(self) -> None:
        validate_prior_fields(self)
        check_kernel_size("first_kernel_size", self.first_kernel_size)
        check_kernel_size("kernel_size", self.kernel_size)
        if self.hidden_channels < 2:
            raise ValueError(f"hidden_channels must be >= 2 (residual blocks halve it), got {self.hidden_channels}")


class ResidualBlock(nn.Module):
    """PixelCNN residual block (paper, fig. 5): ReLU, 1x1 halving the channels, ReLU,
    k x k mask-B conv (+ label bias), ReLU, 1x1 back to the full width, plus the input."""

    def __init__(self, channels: int, kernel_size: int, num_classes: int) -> None:
        super().__init__()
        mid = channels // 2
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.conv = MaskedConv2d("B", mid, mid, kernel_size)
        self.expand = nn.Conv2d(mid, channels, 1)
        self.label_bias = nn.Embedding(num_classes, mid) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        y = self.conv(F.relu(self.reduce(F.relu(x)))) + label_bias(self.label_bias, labels)
        return x + self.expand(F.relu(y))


class PixelCNN(AutoregressivePrior):
    """PixelCNN over codes: embedding, one mask-A layer, mask-B residual blocks, 1x1 head.

    Stacked masked convolutions leave a blind spot (Gated PixelCNN paper, sec. 2.2, fig. 1):
    the receptive field grows only one column to the right per row up, so e.g. position
    (1, 0) never sees (0, w - 1) when first_kernel_size // 2 < w - 1. GatedPixelCNN fixes that.
    """

    KIND: ClassVar[str] = "pixelcnn"
    config_class: ClassVar[type] = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        p, k, nc = config.hidden_channels, config.codebook_size, config.num_classes
        self.embed = nn.Embedding(k, p)
        self.input_conv = MaskedConv2d("A", p, p, config.first_kernel_size)
        self.input_label_bias = nn.Embedding(nc, p) if nc else None
        self.blocks = nn.ModuleList(ResidualBlock(p, config.kernel_size, nc) for _ in range(config.n_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(p, p, 1), nn.ReLU(), nn.Conv2d(p, k, 1))

    def _logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, p, h', w)
        x = self.input_conv(x) + label_bias(self.input_label_bias, labels)
        for block in self.blocks:
            x = block(x, labels)
        return self.head(x)  # (B, K, h', w)

    def _sampling_cache(self, n: int, labels: torch.Tensor | None) -> PixelCNNSamplingCache:
        """For `sample(mode="cached")`: caches the embedded codes and each residual block's
        masked-conv input; at (r, c) each layer is evaluated at (r, c) alone, from the window
        above and left of it. Exact: a masked conv's output at (r, c) reads only (r, c) and
        earlier positions, so it is final once computed (`PixelCNNSamplingCache`)."""
        return PixelCNNSamplingCache(self, n, labels)


def masked_window_weight(conv: MaskedConv2d) -> torch.Tensor:
    """A masked kernel's rows down to its centre (those below are all masked), flattened for a
    channels-last window (k//2 + 1, k, C_in): (C_out, (k//2 + 1) * k * C_in)."""
    rows = conv.kernel_size[0] // 2 + 1
    return (conv.weight * conv.mask)[:, :, :rows].permute(0, 2, 3, 1).flatten(1)


def masked_window(padded: torch.Tensor, r: int, c: int, k: int) -> torch.Tensor:
    """Rows r - k//2..r, columns c - k//2..c + k//2 of a channels-last grid stored with k//2
    zeros above, left and right: (B, h + k//2, w + 2 * (k//2), C) -> (B, (k//2 + 1) * k * C).
    Channels last, so that the window is a few contiguous runs of memory."""
    return padded[:, r:r + k // 2 + 1, c:c + k].flatten(1)


def head_at(head: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The ReLU-1x1-ReLU-1x1 head at one position: (B, p) -> (B, K)."""
    for layer in head:
        x = linear_1x1(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
    return x


class PixelCNNSamplingCache:
    """PixelCNN activations of n grids being sampled, one position at a time (Ramachandran et
    al. 2017).

    Caches: the embedding of every code drawn so far (the mask-A layer's input) and, for each
    residual block, the input of its mask-B convolution (after the 1x1 reduce and ReLU), each
    in a zero-padded channels-last grid (n, h + k//2, w + 2 * (k//2), C).

    Exact because a masked convolution's output at (r, c) reads its input only at positions
    before (r, c) in raster order (mask A) or those and (r, c) itself (mask B), and everything
    else (1x1 convolutions, ReLUs, label biases, residual sums, the head) acts position by
    position. So every layer's activation at (r, c) depends on codes before (r, c) alone and is
    final once computed; the logits at (r, c) need each layer at (r, c) only. Each masked conv
    is applied to the window of its input above and left of (r, c), with the same weights,
    biases and zero padding as `forward`; only the summation order differs, in the last bits.
    """

    def __init__(self, model: PixelCNN, n: int, labels: torch.Tensor | None) -> None:
        config = model.config
        h, w = config.code_shape
        weight = model.embed.weight
        self.model = model
        self.k_first, self.k = config.first_kernel_size, config.kernel_size
        pad_first, pad = self.k_first // 2, self.k // 2
        self.embedded = weight.new_zeros(n, h + pad_first, w + 2 * pad_first, config.hidden_channels)
        self.mids = [weight.new_zeros(n, h + pad, w + 2 * pad, config.hidden_channels // 2) for _ in model.blocks]
        self.input_weight = masked_window_weight(model.input_conv)
        self.block_weights = [masked_window_weight(block.conv) for block in model.blocks]
        self.input_bias = flat_label_bias(model.input_label_bias, labels)  # (n, p) or 0.0
        self.block_biases = [flat_label_bias(block.label_bias, labels) for block in model.blocks]

    def logits(self, r: int, c: int) -> torch.Tensor:
        """The logits at (r, c), every code before it recorded: (n, K)."""
        m, pad = self.model, self.k // 2
        window = masked_window(self.embedded, r, c, self.k_first)
        x = F.linear(window, self.input_weight, m.input_conv.bias) + self.input_bias  # (n, p)
        for block, mid, weight, bias in zip(m.blocks, self.mids, self.block_weights, self.block_biases):
            mid[:, r + pad, c + pad] = F.relu(linear_1x1(block.reduce, F.relu(x)))  # (n, p / 2)
            y = F.linear(masked_window(mid, r, c, self.k), weight, block.conv.bias) + bias  # (n, p / 2)
            x = x + linear_1x1(block.expand, F.relu(y))  # (n, p)
        return head_at(m.head, x)  # (n, K)

    def record(self, r: int, c: int, code: torch.Tensor) -> None:
        """Store the codes drawn at (r, c): (n,)."""
        pad = self.k_first // 2
        self.embedded[:, r + pad, c + pad] = self.model.embed.weight[code]


# ---------------------------------------------------------------------------------------------
# Gated PixelCNN


@dataclass(frozen=True)
class GatedPixelCNNConfig:
    codebook_size: int = 512  # K, the VQ-VAE's codebook size
    code_shape: tuple[int, int] = (7, 7)  # (h, w), the VQ-VAE's code grid
    num_classes: int = 0  # 0 = unconditional, else one label in [0, num_classes) per example
    hidden_channels: int = 128
    n_layers: int = 15  # gated layers, the first one included
    first_kernel_size: int = 7  # the first layer's receptive width
    kernel_size: int = 3  # every later layer's

    def __post_init__(self) -> None:
        validate_prior_fields(self)
        check_kernel_size("first_kernel_size", self.first_kernel_size)
        check_kernel_size("kernel_size", self.kernel_size)


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation unit, Gated PixelCNN eq. 2: y = tanh(W_f * x) ⊙ σ(W_g * x).
    x holds both halves (the conditional bias of eq. 4 already added): (B, 2C, H, W) -> (B, C, H, W)."""
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of both stacks (Gated PixelCNN paper, fig. 2).

    Vertical stack: a (k//2 + 1) x k conv whose output at (r, c) sees rows r - k//2..r, columns
    c - k//2..c + k//2 (nothing below). It sees its own row, so the horizontal stack only gets
    it shifted down a row, through a 1x1 conv: rows above, every column in reach. Horizontal
    stack: a 1 x (k//2 + 1) conv over columns c - k//2..c of the same row (1 x k//2 over
    c - k//2..c - 1 in the first layer, "mask A"), plus a residual connection after the first
    layer. Together they cover every earlier position: no blind spot.
    """

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int) -> None:
        super().__init__()
        self.half = kernel_size // 2
        self.first = first
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel_size))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.half if first else self.half + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.label_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = h.shape[-1]
        v_feat = self.v_conv(F.pad(v, (self.half, self.half, self.half, 0)))  # (B, 2C, H, W)
        h_feat = self.h_conv(F.pad(h, (self.half, 0, 0, 0)))[..., :width]  # (B, 2C, H, W)
        h_feat = h_feat + self.v_to_h(down_shift(v_feat))
        bias = label_bias(self.label_bias, labels)  # eq. 4: V_f^T h and V_g^T h in both stacks
        v_out = gate(v_feat + bias)
        h_out = self.h_out(gate(h_feat + bias))
        # The first layer's input holds position (r, c) itself, so it gets no residual connection.
        return v_out, (h_out if self.first else h + h_out)


class GatedPixelCNN(AutoregressivePrior):
    """Gated PixelCNN over codes: embedding, gated layers with vertical and horizontal stacks,
    a ReLU-1x1-ReLU-1x1 head on the horizontal stack. No blind spot: position i sees every code
    before i."""

    KIND: ClassVar[str] = "gated_pixelcnn"
    config_class: ClassVar[type] = GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        p, k, nc = config.hidden_channels, config.codebook_size, config.num_classes
        self.embed = nn.Embedding(k, p)
        self.layers = nn.ModuleList(
            GatedLayer(p, config.first_kernel_size if i == 0 else config.kernel_size, i == 0, nc)
            for i in range(config.n_layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(p, p, 1), nn.ReLU(), nn.Conv2d(p, k, 1))

    def _logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        v = h = self.embed(codes).permute(0, 3, 1, 2)  # (B, p, h', w)
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)  # (B, K, h', w)

    def _sampling_cache(self, n: int, labels: torch.Tensor | None) -> GatedPixelCNNSamplingCache:
        """For `sample(mode="cached")`: caches each layer's vertical-stack input (the whole grid
        so far) and the current row of its horizontal-stack input. The vertical stack of a row
        reads no row below it, so it runs once per row, after the row is drawn, and feeds the next
        row; the horizontal stack at (r, c) reads only columns <= c of row r, so it runs at (r, c)
        alone (`GatedPixelCNNSamplingCache`)."""
        return GatedPixelCNNSamplingCache(self, n, labels)


class GatedPixelCNNSamplingCache:
    """Gated PixelCNN activations of n grids being sampled: the vertical stack once per row,
    the horizontal stack once per position (Ramachandran et al. 2017).

    Caches, per layer: the vertical stack's input on the whole grid so far, zero-padded as in
    `forward` (n, p, h + k//2, w + 2 * (k//2)); the horizontal stack's input on the current row,
    channels last, with k//2 zero columns on the left (n, k//2 + w, p); and the current row's
    vertical contribution to the horizontal stack, v_to_h(down_shift(v_feat)) (n, 2p, w).

    Exact because the vertical stack's output at row q reads only rows <= q of its input, and
    the embedding is its input, so once row q is drawn, row q of every layer's vertical stack
    is final: it is computed then, on the k//2 + 1 rows ending at q, and its v_to_h, which the
    horizontal stack reads one row down, is kept for row q + 1 (row 0 gets v_to_h of zeros,
    its bias, as down_shift gives). The horizontal stack at (r, c) reads columns <= c of row r
    (< c in the first layer) and that vertical contribution at (r, c), so it is computed at
    (r, c) alone, layer by layer, on the 1 x k//2 + 1 window ending at c; the head acts position
    by position. Same weights, biases and padding as `forward`; only summation orders differ.
    """

    def __init__(self, model: GatedPixelCNN, n: int, labels: torch.Tensor | None) -> None:
        config = model.config
        h, w = config.code_shape
        p = config.hidden_channels
        weight = model.embed.weight
        self.model = model
        self.halves = [layer.half for layer in model.layers]
        self.v_inputs = [weight.new_zeros(n, p, h + half, w + 2 * half) for half in self.halves]
        self.h_inputs = [weight.new_zeros(n, half + w, p) for half in self.halves]
        # The horizontal kernels, flattened for a channels-last window (kw, p): (2p, kw * p).
        self.h_kernels = [layer.h_conv.weight[:, :, 0].transpose(1, 2).flatten(1) for layer in model.layers]
        self.v_to_h = [layer.v_to_h.bias[None, :, None].expand(n, -1, w) for layer in model.layers]  # (n, 2p, w)
        self.row_biases = [label_bias(layer.label_bias, labels) for layer in model.layers]  # (n, 2p, 1, 1) or 0.0
        self.biases = [flat_label_bias(layer.label_bias, labels) for layer in model.layers]  # (n, 2p) or 0.0

    def logits(self, r: int, c: int) -> torch.Tensor:
        """The logits at (r, c), every code before it recorded: (n, K)."""
        if c == 0 and r > 0:
            self._vertical(r - 1)
        layers = self.model.layers
        x = None
        for i, layer in enumerate(layers):
            window = self.h_inputs[i][:, c:c + layer.h_conv.kernel_size[1]].flatten(1)  # (n, kw * p)
            feat = F.linear(window, self.h_kernels[i], layer.h_conv.bias) + self.v_to_h[i][:, :, c]
            out = linear_1x1(layer.h_out, gate(feat + self.biases[i]))  # (n, p)
            x = out if layer.first else x + out
            if i + 1 < len(layers):
                self.h_inputs[i + 1][:, self.halves[i + 1] + c] = x
        return head_at(self.model.head, x)  # (n, K)

    def _vertical(self, q: int) -> None:
        """Every layer's vertical stack at row q, whose codes are all drawn."""
        layers = self.model.layers
        for i, layer in enumerate(layers):
            feat = layer.v_conv(self.v_inputs[i][:, :, q:q + layer.half + 1])  # rows q - k//2..q -> (n, 2p, 1, w)
            self.v_to_h[i] = layer.v_to_h(feat)[:, :, 0]  # (n, 2p, w), for row q + 1
            if i + 1 < len(layers):
                half = self.halves[i + 1]
                self.v_inputs[i + 1][:, :, q + half, half:-half] = gate(feat + self.row_biases[i])[:, :, 0]

    def record(self, r: int, c: int, code: torch.Tensor) -> None:
        """Store the codes drawn at (r, c): (n,)."""
        embedded = self.model.embed.weight[code]  # (n, p)
        half = self.halves[0]
        self.v_inputs[0][:, :, r + half, c + half] = embedded
        self.h_inputs[0][:, half + c] = embedded
