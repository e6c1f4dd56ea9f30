"""Discretized logistic mixture likelihood for 8-bit images (PixelCNN++, Salimans et al. 2017,
arXiv 1701.05517, sec. 2.1 and 2.2; reference code: openai/pixel-cnn `nn.py`).

A subpixel takes one of 256 levels k = 0..255. The project stores images in [0, 1] as k / 255;
the likelihood works, as the paper's code does, on x = 2k / 255 - 1 in [-1, 1], where the levels
are 2 / 255 apart, so level k owns the bin [x - 1/255, x + 1/255].

Sec. 2.1, eq. (1)-(2): a latent intensity nu follows a mixture of logistics,
nu ~ sum_i pi_i logistic(mu_i, s_i), and a level gets the mass of its bin,

    P(x | pi, mu, s) = sum_i pi_i [sigma((x + 1/255 - mu_i) / s_i) - sigma((x - 1/255 - mu_i) / s_i)]

with the edge cases of the paper: for k = 0 the lower edge is -inf (mass sigma((x + 1/255 - mu) / s)),
for k = 255 the upper edge is +inf (mass 1 - sigma((x - 1/255 - mu) / s)), so the 256 masses sum
to 1 and all the tail mass outside [-1, 1] goes to the two extreme levels.

Sec. 2.2, eq. (3): the channels of one pixel share the mixture component i and are coupled
linearly, in the order r, g, b, on the *observed* values of the preceding channels:

    p(r, g, b) = sum_i pi_i P(r | mu_r,i, s_r,i) P(g | mu_g,i + alpha_i r, s_g,i) P(b | mu_b,i + beta_i r + gamma_i g, s_b,i)

with (alpha, beta, gamma) = tanh of raw outputs, as in the reference code.

Layout of the decoder output `params` (B, P, H, W) along P, for C channels and K components:

    [0, K)                  mixture logits                       (K)
    [K, K + CK)             means mu, channel-major              (C, K)
    [K + CK, K + 2CK)       log-scales log s, channel-major      (C, K)
    [K + 2CK, K + 2CK + 3K) RGB only: raw alpha, beta, gamma     (3, K)

so P = 3K for grey and 10K for RGB (`num_params`). The reference code interleaves
(means, log-scales, coefficients) per channel instead; only the order of the output channels
differs, not the distribution.

Numerics follow the reference code: log-scales are clamped below at `log_scale_min` (-7), the
edge bins use log-sigmoid / softplus, an interior bin whose mass is below `min_bin_prob` (1e-5)
is scored by the logistic pdf at the bin centre times the bin width 2/255 (the reference's
`log_pdf_mid - log(127.5)`), and the mixture is combined with log-sum-exp. One change: an
interior bin mass is computed on the side of the mean where both CDF values are small
(1 - sigma(a) = sigma(-a)), which avoids the cancellation of two numbers near 1 in the upper tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_LEVELS = 256  # 8-bit images: levels k = 0..255, stored as k / 255 in [0, 1]
MAX_LEVEL = NUM_LEVELS - 1
LEVEL_STEP = 2.0 / MAX_LEVEL  # distance between level centres on the [-1, 1] scale
HALF_BIN = LEVEL_STEP / 2  # half the bin width 2/255 (the paper's 0.5 on the 0..255 scale)
GRID_TOLERANCE = 1e-3  # how far (in levels) x * 255 may be from an integer before it is rejected
COUPLING_COEFFICIENTS = 3  # RGB: alpha (g <- r), beta (b <- r), gamma (b <- g)


def num_params(channels: int, num_mixtures: int) -> int:
    """Output channels a decoder must produce per pixel: 3K for grey, 10K for RGB (PixelCNN++).

    K logits, C*K means, C*K log-scales, and for RGB 3K coupling coefficients.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if num_mixtures < 1:
        raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
    coupling = COUPLING_COEFFICIENTS * num_mixtures if channels == 3 else 0
    return num_mixtures + 2 * channels * num_mixtures + coupling


def bits_per_dim(nll_nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Negative log-likelihood in nats (B,) -> bits per dimension (B,): nats / (dims * ln 2).

    `dims` is the number of subpixels per image, C * H * W.
    """
    if dims < 1:
        raise ValueError(f"dims must be a positive number of subpixels (C * H * W), got {dims}")
    return nll_nats / (dims * math.log(2.0))


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] on the grid k / 255 -> the integer levels k as floats, same shape.

    Raises ValueError for values outside [0, 1] or off the grid (e.g. dequantised or
    normalised inputs), which the likelihood would otherwise score silently and wrongly.
    """
    if x.numel() == 0:
        return x
    scaled = x * MAX_LEVEL
    levels = scaled.round()
    low, high = x.min().item(), x.max().item()
    if not (0.0 <= low and high <= 1.0):  # also rejects NaN
        raise ValueError(f"x must lie in [0, 1] (k / 255 for integer k), got values in [{low:.4g}, {high:.4g}]")
    off_grid = (scaled - levels).abs().max().item()
    if off_grid > GRID_TOLERANCE:
        raise ValueError(
            f"x must be on the 256-level grid k / 255; a value is {off_grid:.3g} levels off it. "
            "Quantise with (x * 255).round() / 255 first."
        )
    return levels


@dataclass(frozen=True)
class DiscretizedLogisticMixture:
    """The PixelCNN++ pixel likelihood for images with `channels` channels and K = `num_mixtures`.

    Stateless: it holds only the configuration; a decoder produces `params` (B, num_params, H, W)
    and hands them to `log_prob`, `sample` or `mean`.
    """

    channels: int = 3  # 1 (grey) or 3 (RGB, with the sec. 2.2 coupling)
    num_mixtures: int = 10  # K; the reference code's nr_logistic_mix default
    log_scale_min: float = -7.0  # reference clamp: log s >= -7, i.e. s >= 9e-4 (0.12 bin widths)
    min_bin_prob: float = 1e-5  # reference: interior bins below this mass use pdf(centre) * 2/255

    def __post_init__(self) -> None:
        num_params(self.channels, self.num_mixtures)  # validates channels and num_mixtures
        if not math.isfinite(self.log_scale_min):
            raise ValueError(f"log_scale_min must be finite, got {self.log_scale_min}")
        if not 0.0 <= self.min_bin_prob < 1.0:
            raise ValueError(f"min_bin_prob must be in [0, 1), got {self.min_bin_prob}")

    @property
    def num_params(self) -> int:
        """Decoder output channels per pixel: 3K (grey) or 10K (RGB)."""
        return num_params(self.channels, self.num_mixtures)

    def uniform_shape(self, params: torch.Tensor) -> tuple[int, int, int, int]:
        """Shape of the `uniforms` that `sample` takes for these params: (B, 1 + C, H, W)."""
        self._check_params(params)
        batch, _, height, width = params.shape
        return (batch, 1 + self.channels, height, width)

    # -- unpacking -------------------------------------------------------------------------

    def _check_params(self, params: torch.Tensor) -> None:
        if params.dim() != 4 or params.shape[1] != self.num_params:
            raise ValueError(
                f"params must be (B, {self.num_params}, H, W) for channels={self.channels}, "
                f"num_mixtures={self.num_mixtures}, got {tuple(params.shape)}"
            )
        if not params.is_floating_point():
            raise ValueError(f"params must be a floating-point tensor, got {params.dtype}")

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """params (B, P, H, W) -> logits (B, K, H, W), means (B, C, K, H, W),
        log_scales (B, C, K, H, W) clamped below at `log_scale_min`, and for RGB the coupling
        coefficients tanh(raw) (B, 3, K, H, W) in the order alpha (g <- r), beta (b <- r),
        gamma (b <- g); None for grey."""
        self._check_params(params)
        batch, _, height, width = params.shape
        k, c = self.num_mixtures, self.channels
        logits = params[:, :k]  # (B, K, H, W)
        means = params[:, k : k + c * k].reshape(batch, c, k, height, width)  # (B, C, K, H, W)
        log_scales = params[:, k + c * k : k + 2 * c * k].reshape(batch, c, k, height, width)  # (B, C, K, H, W)
        log_scales = log_scales.clamp(min=self.log_scale_min)
        coeffs = None
        if c == 3:
            raw = params[:, k + 2 * c * k :].reshape(batch, COUPLING_COEFFICIENTS, k, height, width)  # (B, 3, K, H, W)
            coeffs = torch.tanh(raw)
        return logits, means, log_scales, coeffs

    def _check_image(self, params: torch.Tensor, x: torch.Tensor) -> None:
        expected = (params.shape[0], self.channels, params.shape[2], params.shape[3])
        if x.dim() != 4 or tuple(x.shape) != expected:
            raise ValueError(
                f"x must be (B, C, H, W) = {expected} to match params {tuple(params.shape)}, got {tuple(x.shape)}"
            )

    # -- likelihood ------------------------------------------------------------------------

    def conditional_log_probs(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P_i(x_c | x_<c) of every subpixel under every component (B, K, C, H, W), in nats.

        Channel c of component i is the discretized logistic of eq. (2) with its mean shifted by
        the coupling of eq. (3) on the observed values of the channels before c. For each i and
        fixed preceding channels, exp of this sums to 1 over the 256 levels of channel c (up to
        the `min_bin_prob` pdf fallback). `x` is (B, C, H, W) in [0, 1] on the grid k / 255.
        """
        logits, means, log_scales, coeffs = self.split(params)
        self._check_image(params, x)
        levels = to_levels(x).to(params.dtype)  # (B, C, H, W), integers 0..255
        centres = LEVEL_STEP * levels - 1.0  # (B, C, H, W), the bin centres in [-1, 1]
        xs = centres.unsqueeze(2)  # (B, C, 1, H, W), broadcast over the K components
        if coeffs is not None:
            # eq. (3): mu_g + alpha r, mu_b + beta r + gamma g, on the observed r and g
            mean_g = means[:, 1] + coeffs[:, 0] * xs[:, 0]  # (B, K, H, W)
            mean_b = means[:, 2] + coeffs[:, 1] * xs[:, 0] + coeffs[:, 2] * xs[:, 1]  # (B, K, H, W)
            means = torch.stack([means[:, 0], mean_g, mean_b], dim=1)  # (B, C, K, H, W)

        centred = xs - means  # (B, C, K, H, W)
        inv_scale = torch.exp(-log_scales)
        plus_in = inv_scale * (centred + HALF_BIN)  # standardised upper bin edge
        min_in = inv_scale * (centred - HALF_BIN)  # standardised lower bin edge
        mid_in = inv_scale * centred  # standardised bin centre

        # edge cases of sec. 2.1: level 0 owns (-inf, x + 1/255], level 255 owns [x - 1/255, inf)
        log_cdf_plus = F.logsigmoid(plus_in)  # log sigma(plus_in), for k = 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigma(min_in)), for k = 255

        # interior: sigma(plus) - sigma(min), or equivalently sigma(-min) - sigma(-plus) above the
        # mean, where both terms are small and their difference keeps its relative precision
        cdf_delta = torch.where(
            mid_in > 0,
            torch.sigmoid(-min_in) - torch.sigmoid(-plus_in),
            torch.sigmoid(plus_in) - torch.sigmoid(min_in),
        )
        tiny = torch.finfo(cdf_delta.dtype).tiny  # keeps log (and its unused gradient) finite
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # log logistic pdf at the centre
        log_interior = torch.where(
            cdf_delta > self.min_bin_prob,
            torch.log(cdf_delta.clamp(min=tiny)),
            log_pdf_mid + math.log(2.0 * HALF_BIN),  # pdf * bin width, the reference's - log(127.5)
        )

        lowest = (levels == 0).unsqueeze(2)  # (B, C, 1, H, W)
        highest = (levels == MAX_LEVEL).unsqueeze(2)  # (B, C, 1, H, W)
        log_probs = torch.where(lowest, log_cdf_plus, torch.where(highest, log_one_minus_cdf_min, log_interior))
        return log_probs.transpose(1, 2)  # (B, K, C, H, W)

    def log_prob_per_pixel(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(pixel) (B, H, W) in nats: log sum_i pi_i prod_c P_i(x_c | x_<c), eq. (2)-(3)."""
        per_component = self.conditional_log_probs(params, x).sum(dim=2)  # (B, K, H, W)
        log_weights = F.log_softmax(params[:, : self.num_mixtures], dim=1)  # (B, K, H, W), log pi_i
        return torch.logsumexp(log_weights + per_component, dim=1)  # (B, H, W)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x) (B,) in nats, summed over pixels: params (B, P, H, W), x (B, C, H, W) in [0, 1]."""
        return self.log_prob_per_pixel(params, x).flatten(1).sum(dim=1)  # (B,)

    # -- sampling and the mean -------------------------------------------------------------

    def sample(
        self,
        params: torch.Tensor,
        generator: torch.Generator | None = None,
        temperature: float | torch.Tensor = 1.0,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw an image (B, C, H, W) with values in {0, 1/255, ..., 1}, one draw per pixel.

        By inversion, from `uniforms` (B, 1 + C, H, W) in [0, 1] (see `uniform_shape`): channel 0
        picks the component i (the first whose cumulative weight reaches it), channel 1 + c gives
        the logistic draw mu + s * logit(u) of subpixel c, rounded to the nearest level and clamped
        to [0, 255], which is exactly the bin assignment of eq. (2) with its edge cases. For RGB the
        mean of g is shifted by alpha * r and that of b by beta * r + gamma * g using the *rounded*
        r and g, as eq. (3) conditions on them, so the draws follow the distribution `log_prob`
        scores (the reference sampler couples the unrounded values instead). Each pixel depends
        only on its own params and uniforms, so passing uniforms makes draws reproducible and
        independent of the batch. Without uniforms they are drawn with torch.rand(generator=...)
        on the params' device.

        `temperature` T > 0 divides the mixture logits and multiplies the logistic scales;
        T = 1 samples the model's distribution exactly. A tensor of shape (B,) gives each image its own.
        """
        logits, means, log_scales, coeffs = self.split(params)
        temperature = temperature_map(temperature, params.shape[0], params)  # float or (B, 1, 1, 1)
        shape = self.uniform_shape(params)
        if uniforms is None:
            uniforms = torch.rand(shape, generator=generator, device=params.device, dtype=params.dtype)
        elif tuple(uniforms.shape) != shape:
            raise ValueError(
                f"uniforms must be (B, 1 + C, H, W) = {shape} for params {tuple(params.shape)}, "
                f"got {tuple(uniforms.shape)}"
            )
        elif uniforms.numel() and not (0.0 <= uniforms.min().item() and uniforms.max().item() <= 1.0):
            raise ValueError("uniforms must lie in [0, 1] (and not be NaN)")
        uniforms = uniforms.to(params.dtype)

        batch, _, height, width = params.shape
        k = self.num_mixtures
        weights = torch.softmax(logits / temperature, dim=1)  # (B, K, H, W)
        below = (weights.cumsum(dim=1) < uniforms[:, :1]).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        component = below.clamp(max=k - 1)  # rounding can leave the last cumulative weight < 1

        def pick(table: torch.Tensor) -> torch.Tensor:
            # (B, N, K, H, W) -> (B, N, H, W), the chosen component of every pixel
            index = component.unsqueeze(1).expand(batch, table.shape[1], 1, height, width)  # (B, N, 1, H, W)
            return table.gather(2, index).squeeze(2)  # (B, N, H, W)

        mu = pick(means)  # (B, C, H, W)
        scale = temperature * torch.exp(pick(log_scales))  # (B, C, H, W)
        noise = torch.logit(uniforms[:, 1:])  # (B, C, H, W), standard logistic draws (+-inf at 0, 1)

        def quantise(value: torch.Tensor) -> torch.Tensor:
            # [-1, 1] scale -> the level whose bin holds it, the tails folded into levels 0 and 255
            return ((value + 1.0) / LEVEL_STEP).round().clamp(0, MAX_LEVEL)

        def centre(level: torch.Tensor) -> torch.Tensor:
            return LEVEL_STEP * level - 1.0  # the level's bin centre on [-1, 1]

        levels = [quantise(mu[:, 0] + scale[:, 0] * noise[:, 0])]  # each (B, H, W), integers 0..255
        if coeffs is not None:
            alpha, beta, gamma = pick(coeffs).unbind(dim=1)  # each (B, H, W)
            r = centre(levels[0])
            levels.append(quantise(mu[:, 1] + alpha * r + scale[:, 1] * noise[:, 1]))
            g = centre(levels[1])
            levels.append(quantise(mu[:, 2] + beta * r + gamma * g + scale[:, 2] * noise[:, 2]))
        return torch.stack(levels, dim=1) / MAX_LEVEL  # (B, C, H, W), k / 255 as the data loader makes them

    def mean(self, params: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """A point estimate of the image (B, C, H, W) in [0, 1], not on the 256-level grid.

        Exactly: the expectation of the *continuous* mixture before discretisation, with the
        coupling applied to the continuous channel values, mapped from [-1, 1] to [0, 1] and then
        clamped. Per component i (logistic means are mu): E[r] = mu_r, E[g] = mu_g + alpha mu_r,
        E[b] = mu_b + beta mu_r + gamma E[g]; the result is (1 + sum_i pi_i E_i) / 2 clamped to
        [0, 1]. It ignores the rounding to levels and the tail mass folded into levels 0 and 255,
        so it differs from the mean of the discrete distribution near the edges and when the
        scales are below a bin width, and is close to it (well under a level) otherwise.
        `clamp=False` leaves it unclamped (a training loss on it keeps its gradient outside [0, 1]).
        """
        logits, means, _, coeffs = self.split(params)
        if coeffs is not None:
            alpha, beta, gamma = coeffs.unbind(dim=1)  # each (B, K, H, W)
            mean_g = means[:, 1] + alpha * means[:, 0]  # (B, K, H, W)
            mean_b = means[:, 2] + beta * means[:, 0] + gamma * mean_g  # (B, K, H, W)
            means = torch.stack([means[:, 0], mean_g, mean_b], dim=1)  # (B, C, K, H, W)
        weights = torch.softmax(logits, dim=1).unsqueeze(1)  # (B, 1, K, H, W)
        expected = (weights * means).sum(dim=2)  # (B, C, H, W) on [-1, 1]
        image = (expected + 1.0) / 2.0  # (B, C, H, W)
        return image.clamp(0.0, 1.0) if clamp else image


def check_mean_mse_weight(weight: float, likelihood: str) -> None:
    """The `mean_mse_weight` config field of the VAE and the VQ-VAE: finite, >= 0, and only beside the
    logistic likelihood (whose mean image it trains). ValueError naming the bad value otherwise."""
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"mean_mse_weight must be a finite number >= 0, got {weight}")
    if weight and likelihood != "logistic":
        raise ValueError(f"mean_mse_weight applies to likelihood='logistic' only, got mean_mse_weight={weight} "
                         f"with likelihood={likelihood!r}")


def temperature_map(temperature: float | torch.Tensor, batch: int, like: torch.Tensor) -> float | torch.Tensor:
    """A sampling temperature T > 0 as a float, or a per-image tensor (B,) -> (B, 1, 1, 1) that
    broadcasts over (B, ., H, W). Raises ValueError naming the bad value otherwise."""
    if not torch.is_tensor(temperature):
        if not (temperature > 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        return float(temperature)
    if tuple(temperature.shape) != (batch,):
        raise ValueError(f"a temperature tensor must have shape (B,) = ({batch},), got {tuple(temperature.shape)}")
    if temperature.numel() and not bool(((temperature > 0) & temperature.isfinite()).all()):
        raise ValueError("every temperature must be finite and > 0")
    return temperature.to(device=like.device, dtype=like.dtype).view(batch, 1, 1, 1)
