"""The interface every autoregressive prior shares, its checks and its sampler.

A prior models p(codes) = prod_i p(code_i | code_<i) over an (h, w) grid of code indices in
[0, K), in raster order, with a categorical over the K codes at every position; with
`num_classes > 0`, p(codes | label). Every prior (PixelCNN and Gated PixelCNN in
models/pixelcnn.py, PixelCNN++ in models/pixelcnnpp.py) subclasses `AutoregressivePrior` and
so offers the same interface: `forward(codes, labels) -> logits (B, K, h', w)` on the full grid
or on its top h' rows, `log_prob`, `loss`, and `sample(..., mode=)`, whose modes "cached"
(the default, fast), "cropped", "naive" (the reference) and "stepped" (what a CUDA graph
records) draw the same codes at different costs, and `draw_noise(n, generator, label)`, the
uniforms (and labels) a sample is drawn from. Each prior brings its network (`_logits`) and its
activation cache for the "cached" mode (`_sampling_cache`).

This file holds what they share: the config and input checks (`validate_prior_fields`,
`check_labels`, `check_codes`), the sampling loop (`sample_codes`) and the inverse-CDF lookup
(`inverse_cdf`).

Cached sampling: Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive
Models", arXiv 1704.06001.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Checks: the config fields every prior has, and its inputs.


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


# ---------------------------------------------------------------------------------------------
# Log-likelihood and the sampler.


def code_log_prob(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(codes) in nats, summed over positions: logits (B, K, h, w), codes (B, h, w) -> (B,)."""
    return -F.cross_entropy(logits, codes.long(), reduction="none").sum((1, 2))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (n, K), u (n,) in [0, 1) -> codes (n,): the smallest k with u * total < cdf[k].

    Code k is chosen for u in [cdf[k-1], cdf[k]) / total, with probability p_k exactly, and a
    code of probability 0 never is. Scaling u by the total (cdf[K-1], 1 up to rounding) keeps
    rounding from pushing u past the last code; the clamp to the last code of positive
    probability is a last guard (a u that rounds up to 1, as 1 - 2^-53 does in float32).
    """
    cdf = probs.cumsum(-1)  # (n, K)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1).contiguous()  # (n, 1)
    codes = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (n,)
    last = (probs > 0).cumsum(-1).argmax(-1)  # (n,): the first index of the largest count, the last positive code
    return torch.minimum(codes, last)


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


def check_sampling_inputs(
    config: Any, n: int, labels: torch.Tensor | None, temperature: float | torch.Tensor, uniforms: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What every sampler checks before drawing n grids: labels (check_labels), the temperatures
    (one float or (n,), positive and finite), the uniforms (n, h, w) in [0, 1). Returns the labels
    (long, or None) and the temperatures as an (n, 1) column."""
    h, w = config.code_shape
    labels = check_labels(labels, config.num_classes, n)
    temp = temperature_column(temperature, n, device)  # (n, 1)
    if tuple(uniforms.shape) != (n, h, w):
        raise ValueError(f"uniforms must have shape ({n}, {h}, {w}), one per position, got {tuple(uniforms.shape)}")
    if not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")
    return labels, temp


SAMPLING_MODES = ("cached", "cropped", "naive", "stepped")


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

    The four modes compute the same logits (up to float rounding) at different costs:
    - "naive" runs the whole network on the whole grid at every position: the reference.
    - "cropped" runs it on rows 0..r while sampling row r: outputs at rows <= r do not depend
      on rows > r (causality).
    - "cached" keeps every layer's activations from earlier positions in the model's
      `_sampling_cache(n, labels)` and computes each layer only where the new position
      changes it (Ramachandran et al. 2017): `cache.logits(r, c)` -> (n, K), then
      `cache.record(r, c, code)` once the code at (r, c) is drawn.
    - "stepped" computes what "naive" computes, one `position_step` per position: fixed shapes
      and the position in a tensor, what a CUDA graph records once for every position (app/graphs.py).

    `on_logits(r, c, logits)`, when given, sees each position's logits (n, K) before the draw (in
    mode "stepped", right after it). The server, through VQVAE.sample_from's `on_step`, uses it to
    check that a pass's size does not change them and to stop a pass nobody waits for.

    The model runs in eval mode (dropout off) and its training flag is restored afterwards.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    config = model.config
    h, w = config.code_shape
    device = next(model.parameters()).device
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if uniforms is None:
        uniforms = torch.rand(n, h, w, generator=generator, device=device)
    labels, temp = check_sampling_inputs(config, n, labels, temperature, uniforms, device)  # temp (n, 1)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        if mode == "stepped":
            pos = torch.zeros(1, dtype=torch.long, device=device)
            for p in range(h * w):
                pos.fill_(p)
                logits = model.position_step(codes, labels, temp, uniforms, pos)  # (n, K), the code drawn
                if on_logits is not None:
                    on_logits(p // w, p % w, logits)
            return codes
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

    def position_step(
        self, codes: torch.Tensor, labels: torch.Tensor | None, temp: torch.Tensor, uniforms: torch.Tensor,
        pos: torch.Tensor,
    ) -> torch.Tensor:
        """One draw of ancestral sampling at the raster position `pos` ((1,) long, r * w + c), in place:
        the network on the whole grid codes (n, h, w) (labels (n,) or None), the logits there (n, K)
        divided by temp (n, 1), the code inverse_cdf draws with uniforms (n, h, w) at that position
        written into codes. Returns the logits. Shapes never change and the position is a tensor,
        with no value read back to the host, so a CUDA graph records it once for every position."""
        n = codes.shape[0]
        logits = self._logits(codes, labels).flatten(2).index_select(2, pos).squeeze(2)  # (n, K, h*w) -> (n, K)
        u = uniforms.flatten(1).index_select(1, pos).squeeze(1)  # (n,)
        code = inverse_cdf(torch.softmax(logits.float() / temp, dim=-1), u)  # (n,)
        codes.view(n, -1).index_copy_(1, pos, code[:, None])
        return logits

    def draw_noise(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The noise of n samples, drawn in this order from `generator` on the CPU: the uniforms of
        the draws rand(n, h, w), then for a class-conditional prior without `label` one random class
        per sample randint(num_classes, (n,)). With `label`, every sample is of that class. Returns
        (uniforms, labels (n,) long or None for an unconditional prior)."""
        h, w = self.config.code_shape
        classes = self.config.num_classes
        if label is not None and not (classes and 0 <= label < classes):
            raise ValueError(f"label {label} is not a class of this prior: it has {classes} classes")
        uniforms = torch.rand(n, h, w, generator=generator)  # (n, h, w) in [0, 1)
        if not classes:
            return uniforms, None
        if label is None:
            return uniforms, torch.randint(classes, (n,), generator=generator)  # (n,)
        return uniforms, torch.full((n,), label, dtype=torch.long)

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
        *,
        mode: str = "cached",
        on_logits: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """n code grids (n, h, w), drawn in raster order (see `sample_codes`).

        `mode` picks how the logits at each position are computed; the four compute the same
        logits up to float rounding, so from the same uniforms they draw the same codes in float64,
        and in float32 the same codes except where a uniform sits within rounding of a
        cumulative-probability edge (the same distribution):
        - "cached" (default, what the service runs): every layer computed once per position, from
          the activations of the positions drawn so far; what each prior caches, and why that is
          exact, is in its `_sampling_cache`.
        - "cropped": caches nothing; runs the network on rows 0..r while sampling row r, exact
          because no output at rows <= r reads a row below. The fast sampler before "cached",
          kept to compare.
        - "naive": the reference; caches nothing, runs the whole network on the whole grid once
          per position.
        - "stepped": what "naive" computes, as `position_step` (what a CUDA graph records).
        `on_logits(r, c, logits)`, when given, sees each position's logits (n, K) before the draw
        (in mode "stepped", right after it). Runs in eval mode (dropout off) and restores the
        training flag afterwards."""
        return sample_codes(self, n, labels, temperature, generator, uniforms, mode=mode, on_logits=on_logits)


def per_label_log_prob(prior: torch.nn.Module, codes: torch.Tensor, num_labels: int) -> torch.Tensor:
    """log P(z | y) of each grid under every label, float64 (B, Y): codes (B, h, w) on the prior's device."""
    labels = [torch.full((len(codes),), y, dtype=torch.long, device=codes.device) for y in range(num_labels)]  # Y x (B,)
    return torch.stack([prior.log_prob(codes, label).double() for label in labels], 1)  # (B, Y)


def marginal_log_prob(
    prior: torch.nn.Module, codes: torch.Tensor, label_freqs: torch.Tensor, per_label: torch.Tensor | None = None
) -> torch.Tensor:
    """log P(z) = log sum_y p(y) P(z | y) in float64 (B,), p(y) = label_freqs / sum (Y,), a class-
    conditional prior's label marginalised out (logsumexp). `per_label` (B, Y): per_label_log_prob's,
    when already computed."""
    log_py = (label_freqs.double() / label_freqs.sum()).log().to(codes.device)  # (Y,)
    if per_label is None:
        per_label = per_label_log_prob(prior, codes, len(log_py))
    return torch.logsumexp(per_label + log_py, 1)  # (B,)
