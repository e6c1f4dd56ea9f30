"""Autoregressive priors over a VQ-VAE's code grid: PixelCNN and Gated PixelCNN.

A prior models p(codes) = prod_i p(code_i | code_<i) over an (h, w) grid of code indices in
[0, K), in raster order, with a categorical over the K codes at every position. With
`num_classes > 0` it models p(codes | label) instead: each layer adds a per-channel bias
looked up from the label (the Gated PixelCNN paper's conditional model, eq. 4, with a one-hot h).

Every prior (these two and PixelCNN++ in models/pixelcnnpp.py) offers the same interface:
`forward(codes, labels) -> logits (B, K, h', w)` on the full grid or on its top h' rows,
`log_prob`, `loss`, `sample` (fast, cached), `sample_cropped` and `sample_naive` (reference).
They live here once, in `AutoregressivePrior`, with the checks, the sampling loop and the
inverse-CDF lookup; each prior subclasses it and brings its network (`_logits`) and its
activation cache for `sample` (`_sampling_cache`).

PixelCNN: van den Oord et al. 2016, "Pixel Recurrent Neural Networks", arXiv 1601.06759.
Gated PixelCNN: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders", arXiv 1606.05328.
Cached sampling: Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive
Models", arXiv 1704.06001.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Shared by every prior: config checks, input checks, shifts, the sampler.


def validate_prior_fields(config: Any) -> None:
    """The checks every prior config shares; each config's __post_init__ calls this first."""
    if config.codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2 (the VQ-VAE's K), got {config.codebook_size}")
    shape = config.code_shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise ValueError(f"code_shape must be a tuple (h, w) of positive ints, the VQ-VAE's code grid, got {shape!r}")
    if config.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {config.num_classes}")
    if config.hidden_channels < 1:
        raise ValueError(f"hidden_channels must be positive, got {config.hidden_channels}")
    if config.n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {config.n_layers}")


def check_kernel_size(name: str, k: int) -> None:
    if k < 3 or k % 2 == 0:
        raise ValueError(f"{name} must be odd and >= 3 so the causal mask has a centre, got {k}; use 3, 5 or 7")


def check_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> torch.Tensor | None:
    """Labels must be given iff the prior is conditional: (batch,) integers in [0, num_classes)."""
    if num_classes == 0:
        if labels is not None:
            raise ValueError("this prior is unconditional (num_classes=0): pass labels=None")
        return None
    if labels is None:
        raise ValueError(
            f"this prior is class-conditional: pass labels, an integer tensor of shape ({batch},) "
            f"with values in [0, {num_classes})"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {labels!r}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must have shape ({batch},), one per example, got {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"label {bad} is out of range: this prior has num_classes={num_classes}, use [0, {num_classes})"
        )
    return labels.long()


def check_codes(codes: torch.Tensor, config: Any) -> None:
    """codes: (B, h', w) integers in [0, K) with 1 <= h' <= h: the full grid or its top rows."""
    h, w = config.code_shape
    k = config.codebook_size
    if not isinstance(codes, torch.Tensor) or codes.dtype not in INTEGER_DTYPES:
        raise ValueError(f"codes must be an integer tensor of shape (B, {h}, {w}), got {codes!r}")
    if codes.dim() != 3 or codes.shape[0] < 1 or not 1 <= codes.shape[1] <= h or codes.shape[2] != w:
        raise ValueError(
            f"codes must have shape (B, h', {w}) with 1 <= h' <= {h} (the grid or its top rows), "
            f"got {tuple(codes.shape)}"
        )
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise ValueError(f"code {bad} is out of range: this prior has codebook_size={k}, use [0, {k})")


def check_inputs(config: Any, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    check_codes(codes, config)
    return check_labels(labels, config.num_classes, codes.shape[0])


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


def code_log_prob(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(codes) in nats, summed over positions: logits (B, K, h, w), codes (B, h, w) -> (B,)."""
    return -F.cross_entropy(logits, codes.long(), reduction="none").sum((1, 2))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (n, K), u (n,) in [0, 1) -> codes (n,): the smallest k with u * total < cdf[k].

    Code k is chosen for u in [cdf[k-1], cdf[k]) / total, with probability p_k exactly, and a
    code of probability 0 never is. Scaling u by the total (cdf[K-1], 1 up to rounding) keeps
    rounding from pushing u past the last code; the clamp is a last guard.
    """
    cdf = probs.cumsum(-1)  # (n, K)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1).contiguous()  # (n, 1)
    codes = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (n,)
    return codes.clamp_(max=probs.shape[-1] - 1)


def temperature_column(temperature: float | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """A float, or one temperature per example, as a (n, 1) column that divides (n, K) logits."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if tuple(t.shape) != (n,):
        raise ValueError(f"temperature must be a float or a tensor of shape ({n},), got shape {tuple(t.shape)}")
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return t[:, None]


SAMPLING_MODES = ("cached", "cropped", "naive")


@torch.no_grad()
def sample_codes(
    model: nn.Module,
    n: int,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    *,
    mode: str = "cached",
    on_logits: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling in raster order, shared by every prior: -> codes (n, h, w).

    At each position (r, c): logits = model(codes)[:, :, r, c] / temperature (one temperature
    per example when a tensor), code = inverse_cdf(softmax(logits), uniforms[:, r, c]). The
    uniforms (n, h, w) are drawn upfront from `generator` unless given, so a server can draw
    each request's noise from its own generator and still batch the requests together.

    The three modes compute the same logits (up to float rounding) at different costs:
    - "naive" runs the whole network on the whole grid at every position: the reference.
    - "cropped" runs it on rows 0..r while sampling row r: outputs at rows <= r do not depend
      on rows > r (causality).
    - "cached" keeps every layer's activations from earlier positions in the model's
      `_sampling_cache(n, labels)` and computes each layer only where the new position
      changes it (Ramachandran et al. 2017): `cache.logits(r, c)` -> (n, K), then
      `cache.record(r, c, code)` once the code at (r, c) is drawn.

    `on_logits(r, c, logits)`, when given, sees each position's logits (n, K) before the draw
    (the server uses it to check that a pass's size does not change them).

    The model runs in eval mode (dropout off) and its training flag is restored afterwards.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    config = model.config
    h, w = config.code_shape
    device = next(model.parameters()).device
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    labels = check_labels(labels, config.num_classes, n)
    temp = temperature_column(temperature, n, device)  # (n, 1)
    if uniforms is None:
        uniforms = torch.rand(n, h, w, generator=generator, device=device)
    elif tuple(uniforms.shape) != (n, h, w):
        raise ValueError(f"uniforms must have shape ({n}, {h}, {w}), one per position, got {tuple(uniforms.shape)}")
    elif not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model._sampling_cache(n, labels) if mode == "cached" else None
        for r in range(h):
            rows = r + 1 if mode == "cropped" else h
            for c in range(w):
                if cache is not None:
                    logits = cache.logits(r, c)  # (n, K)
                else:
                    logits = model._logits(codes[:, :rows], labels)[:, :, r, c]  # (n, K)
                if on_logits is not None:
                    on_logits(r, c, logits)
                codes[:, r, c] = inverse_cdf(torch.softmax(logits.float() / temp, dim=-1), uniforms[:, r, c])
                if cache is not None:
                    cache.record(r, c, codes[:, r, c])
    finally:
        model.train(was_training)
    return codes


def flat_label_bias(embedding: nn.Embedding | None, labels: torch.Tensor | None) -> torch.Tensor | float:
    """label_bias for one position: (B, C), or 0.0 when unconditional."""
    if embedding is None:
        return 0.0
    return embedding(labels)  # (B, C)


def linear_1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution at one position: x (B, C_in) -> (B, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class AutoregressivePrior(nn.Module):
    """The interface every prior shares. A subclass sets KIND, config_class and `self.config`,
    and provides `_logits(codes, labels)` (its network, on checked inputs) and
    `_sampling_cache(n, labels)` (its activation cache for `sample`, see `sample_codes`)."""

    config: Any

    def _logits(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """codes (B, h', w) long, labels (B,) long or None, both checked -> logits (B, K, h', w)."""
        raise NotImplementedError

    def _sampling_cache(self, n: int, labels: torch.Tensor | None) -> Any:
        """The activations of n grids being sampled: `.logits(r, c)` -> (n, K), `.record(r, c, code)`."""
        raise NotImplementedError

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h', w), h' <= h -> logits (B, K, h', w); position i sees only codes before i."""
        labels = check_inputs(self.config, codes, labels)
        return self._logits(codes.long(), labels)

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
        on_logits: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """n code grids (n, h, w), every layer computed once per position (see `sample_codes`).

        Caches each layer's activations at the positions drawn so far; what each prior caches,
        and why that is exact, is in its `_sampling_cache`. Runs in eval mode (dropout off) and
        restores the training flag afterwards. Same codes as `sample_naive` for the same uniforms."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, mode="cached", on_logits=on_logits)

    def sample_cropped(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Caches nothing; runs the network on rows 0..r while sampling row r, exact because no
        output at rows <= r reads a row below. The fast sampler before `sample`, kept to compare."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, mode="cropped")

    def sample_naive(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reference sampler: caches nothing, runs the whole network on the whole grid once per position."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, mode="naive")


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
        """For `sample`: caches the embedded codes and each residual block's masked-conv input;
        at (r, c) each layer is evaluated at (r, c) alone, from the window above and left of it.
        Exact: a masked conv's output at (r, c) reads only (r, c) and earlier positions, so it is
        final once computed (`PixelCNNSamplingCache`)."""
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
        """For `sample`: caches each layer's vertical-stack input (the whole grid so far) and the
        current row of its horizontal-stack input. The vertical stack of a row reads no row below
        it, so it runs once per row, after the row is drawn, and feeds the next row; the horizontal
        stack at (r, c) reads only columns <= c of row r, so it runs at (r, c) alone
        (`GatedPixelCNNSamplingCache`)."""
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
