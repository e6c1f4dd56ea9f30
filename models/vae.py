"""Variational autoencoder (Kingma & Welling 2013, arXiv 1312.6114), MLP and convolutional.

Both architectures share one interface, the one pytorch/examples made familiar:
`encode(x) -> (mu, logvar)`, `reparameterize(mu, logvar)`, `decode(z) -> logits`,
`forward(x) -> (logits, mu, logvar)`. Pixels in [0, 1] are Bernoulli targets and the
decoder returns logits, so the reconstruction term is computed with
`binary_cross_entropy_with_logits` (stable; no sigmoid-then-clamp).

The conv VAE's decoder is either factorized, p(x|z) = prod_i p(x_i|z) as in the VAE paper, or
autoregressive, p(x|z) = prod_i p(x_i|z, x_<i) in raster order, as in PixelVAE (Gulrajani et
al. 2016, arXiv 1611.05013) and the variational lossy autoencoder (Chen et al. 2016, arXiv
1611.02731): a small masked convolution (PixelCNN paper, arXiv 1601.06759) reads the pixels
before i and is added to the z-path features at i. Its receptive field is kept local so that
global structure must still go through z. Training and every likelihood teacher-force the true
image (`decode(z, context=x)`, one pass); generating (`decode(z)`) runs pixel by pixel and feeds
each pixel's Bernoulli mean back in, so the returned logits are exactly those of the image it
shows (greedy mean decoding, the same convention as showing sigmoid(logits) for a factorized
decoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import MaskedConv2d

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    arch: str = "mlp"  # "mlp" (the classic 784-256-128 model) or "conv"
    in_channels: int = 1
    image_size: int = 28  # 28 (MNIST, Fashion-MNIST) or 32 (CIFAR-10); conv needs a multiple of 4
    latent_dim: int = 20
    hidden_dims: tuple[int, ...] = (256, 128)  # MLP layer widths; the decoder mirrors them
    channels: tuple[int, ...] = (32, 64)  # conv: channels of the two stride-2 stages
    fc_dim: int = 256  # conv: width of the dense layer between the feature map and the latent
    refine_layers: int = 0  # conv: extra 3x3 conv layers at full resolution before the output (decoder)
    decoder: str = "factorized"  # conv: "factorized" p(x|z) or "autoregressive" p(x_i|z, x_<i)
    ar_channels: int = 32  # autoregressive: width of the masked-conv context and of the 1x1 head
    ar_kernel: int = 7  # autoregressive: the mask-A convolution over the image (odd, >= 3)
    ar_layers: int = 1  # autoregressive: the mask-A layer plus (ar_layers - 1) 3x3 mask-B layers

    def __post_init__(self) -> None:
        if self.arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be 'mlp' or 'conv', got {self.arch!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
        if self.arch == "conv" and (self.image_size % 4 or len(self.channels) != 2):
            raise ValueError(
                f"conv VAE needs image_size divisible by 4 and two channel stages, "
                f"got image_size={self.image_size}, channels={self.channels}"
            )
        if self.decoder not in ("factorized", "autoregressive"):
            raise ValueError(f"decoder must be 'factorized' or 'autoregressive', got {self.decoder!r}")
        if self.decoder == "autoregressive":
            if self.arch != "conv":
                raise ValueError("decoder='autoregressive' needs arch='conv'; the MLP VAE is factorized only")
            if self.ar_kernel < 3 or self.ar_kernel % 2 == 0:
                raise ValueError(f"ar_kernel must be odd and >= 3, got {self.ar_kernel}; use 3, 5 or 7")
            if self.ar_layers < 1 or self.ar_channels < 1:
                raise ValueError(
                    f"ar_layers and ar_channels must be positive, got {self.ar_layers} and {self.ar_channels}"
                )

    @property
    def autoregressive(self) -> bool:
        return self.decoder == "autoregressive"

    @property
    def ar_reach(self) -> int:
        """How many rows above (and columns either side of) a pixel its context can read."""
        return self.ar_kernel // 2 + (self.ar_layers - 1)


class VAE(nn.Module):
    KIND: ClassVar[str] = "vae"
    config_class: ClassVar[type] = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c, s, d = config.in_channels, config.image_size, config.latent_dim
        if config.arch == "mlp":
            dims = (c * s * s, *config.hidden_dims)
            self.encoder = nn.Sequential(nn.Flatten(), *_mlp(dims))
            feat = dims[-1]
            self.decoder = nn.Sequential(
                *_mlp((d, *reversed(dims[1:]))),
                nn.Linear(dims[1], dims[0]),
                nn.Unflatten(1, (c, s, s)),
            )
        else:
            c1, c2 = config.channels
            r = s // 4
            self.encoder = nn.Sequential(
                nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(),  # (B, c1, s/2, s/2)
                nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),  # (B, c2, s/4, s/4)
                nn.Flatten(),  # (B, c2 * s/4 * s/4)
                nn.Linear(c2 * r * r, config.fc_dim), nn.ReLU(),
            )
            feat = config.fc_dim
            # the z path ends in logits (factorized) or in features the AR head combines with context
            out = config.ar_channels if config.autoregressive else c
            self.decoder = nn.Sequential(
                nn.Linear(d, config.fc_dim), nn.ReLU(),
                nn.Linear(config.fc_dim, c2 * r * r), nn.ReLU(),
                nn.Unflatten(1, (c2, r, r)),  # (B, c2, s/4, s/4)
                nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),  # (B, c1, s/2, s/2)
                *_refine(c1, out, config.refine_layers),  # (B, out, s, s)
            )
            if config.autoregressive:
                a = config.ar_channels
                context: list[nn.Module] = [MaskedConv2d("A", c, a, config.ar_kernel)]
                for _ in range(config.ar_layers - 1):
                    context += [nn.ReLU(), MaskedConv2d("B", a, a, 3)]
                self.ar_context = nn.Sequential(*context)  # (B, C, s, s) -> (B, a, s, s), reads x_<i
                self.ar_head = nn.Sequential(  # per pixel: z features + context -> C logits
                    nn.ReLU(), nn.Conv2d(a, a, 1), nn.ReLU(), nn.Conv2d(a, c, 1)
                )
        self.fc_mu = nn.Linear(feat, d)
        self.fc_logvar = nn.Linear(feat, d)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) in [0, 1] -> mu, logvar: (B, D), the Gaussian q(z|x)."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(
        self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + eps * sigma with eps ~ N(0, I): the reparameterisation trick (paper, sec. 2.4)."""
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return mu + eps * std

    def decode(
        self, z: torch.Tensor, context: torch.Tensor | None = None, on_step: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """z: (..., D) -> Bernoulli logits (..., C, H, W).

        An autoregressive decoder needs the pixels it conditions on: `context` (B, C, H, W) with z of
        shape (B, D) or (m, B, D) teacher-forces them (training, likelihoods); without it the image is
        generated pixel by pixel, and `on_step()` is called before each row (a server uses it to stop
        work nobody waits for any more, by raising). A factorized decoder ignores `context`.
        """
        lead = z.shape[:-1]
        h = self.decoder(z.reshape(-1, z.shape[-1]))  # (N, C or ar_channels, H, W)
        if not self.config.autoregressive:
            return h.reshape(*lead, *self.image_shape)
        if context is None:
            return self._generate(h, on_step).reshape(*lead, *self.image_shape)
        _, hh, ww = self.image_shape
        ctx = self.ar_context(context)  # (B, a, H, W), computed once for every z of the same image
        h = h.reshape(*lead, -1, hh, ww) + ctx  # (..., B, a, H, W)
        return self.ar_head(h.reshape(-1, *h.shape[-3:])).reshape(*lead, *self.image_shape)

    def _generate(self, h: torch.Tensor, on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Pixel-by-pixel generation from z features h (N, a, H, W) -> logits (N, C, H, W).

        Each step runs the context stack on a window of `ar_reach` rows above and columns either
        side of the pixel (all it can read, so the result is exact) and feeds the pixel's mean back.
        """
        n, _, hh, ww = h.shape
        reach = self.config.ar_reach
        x = h.new_zeros(n, self.config.in_channels, hh, ww)
        logits = torch.empty_like(x)
        for r in range(hh):
            if on_step is not None:
                on_step()
            top = max(0, r - reach)
            for col in range(ww):
                left, right = max(0, col - reach), min(ww, col + reach + 1)
                window = x[:, :, top : r + 1, left:right]  # (N, C, <= reach+1, <= 2 reach+1)
                ctx = self.ar_context(window)[:, :, -1, col - left]  # (N, a): the context at (r, col)
                out = self.ar_head((h[:, :, r, col] + ctx)[:, :, None, None])[:, :, 0, 0]  # (N, C)
                logits[:, :, r, col] = out
                x[:, :, r, col] = torch.sigmoid(out)
        return logits

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        return self.decode(z, context=x), mu, logvar

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None, free_bits: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO averaged over the batch, in nats per image (one sample of z per image).

        With `free_bits` = lambda > 0 the objective is the free-bits bound of Kingma et al. 2016
        (arXiv 1606.04934, eq. 15): each latent dimension's batch-mean KL counts as at least lambda
        nats, so the optimiser gains nothing by pushing a dimension below lambda. That keeps an
        autoregressive decoder from leaving z unused. The returned stats are always the true
        negative ELBO and its terms; only the tensor to differentiate changes.
        """
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0 nats per latent dimension, got {free_bits}")
        logits, mu, logvar = self(x, generator)
        rec = reconstruction_nll(logits, x)  # (B,)
        kl_dims = kl_divergence(mu, logvar, reduce=False)  # (B, D)
        kl = kl_dims.sum(-1)  # (B,)
        neg_elbo = (rec + kl).mean()
        objective = neg_elbo
        if free_bits > 0:
            objective = rec.mean() + kl_dims.mean(0).clamp(min=free_bits).sum()
        return objective, {"loss": neg_elbo.detach(), "rec": rec.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: the Bernoulli means decoded from z = mu (for an autoregressive
        decoder, generated pixel by pixel: the input is never shown to the decoder)."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n images (Bernoulli means) decoded from z ~ N(0, temperature^2 I), or from the given z."""
        if z is None:
            device = next(self.parameters()).device
            z = torch.randn(n, self.config.latent_dim, generator=generator, device=device) * temperature
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def iwae_bound(self, x: torch.Tensor, k: int, chunk: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted bound on log p(x) (Burda et al. 2015, eq. 8), per image, float64.

        log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i | x),  z_i ~ q(z | x).
        All k x B noise vectors are drawn at once (k * B * D numbers), so the bound does not depend
        on `chunk`; the samples are decoded `chunk` at a time so memory stays at chunk * B decodes;
        log-weights are accumulated in float64 and combined with logsumexp.
        """
        mu, logvar = self.encode(x)  # (B, D)
        std = torch.exp(0.5 * logvar)
        noise = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)  # (k, B, D)
        log_w = []
        for start in range(0, k, chunk):
            eps = noise[start : start + chunk]  # (m, B, D)
            z = mu + eps * std  # (m, B, D)
            logits = self.decode(z, context=x)  # (m, B, C, H, W)
            log_px_z = -F.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none"
            ).flatten(2).double().sum(-1)  # (m, B)
            log_pz = (-0.5 * (z.double() ** 2 + LOG_2PI)).sum(-1)
            log_qz = (-0.5 * (eps.double() ** 2 + LOG_2PI) - 0.5 * logvar.double()).sum(-1)
            log_w.append(log_px_z + log_pz - log_qz)
        log_w_all = torch.cat(log_w, 0)  # (k, B)
        return torch.logsumexp(log_w_all, 0) - math.log(k)


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) under independent Bernoullis, summed over pixels: (B, C, H, W) -> (B,)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, closed form (VAE paper, Appendix B):
    -0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2). With reduce=False, per latent dimension."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())  # (..., D)
    return kl.sum(-1) if reduce else kl


def _refine(c1: int, c_out: int, n: int) -> list[nn.Module]:
    """Upsample to full resolution; with n > 0, follow with n 3x3 convs there (sharper detail)."""
    if n == 0:
        return [nn.ConvTranspose2d(c1, c_out, 4, 2, 1)]
    layers: list[nn.Module] = [nn.ConvTranspose2d(c1, c1, 4, 2, 1), nn.ReLU()]
    for _ in range(n - 1):
        layers += [nn.Conv2d(c1, c1, 3, 1, 1), nn.ReLU()]
    return layers + [nn.Conv2d(c1, c_out, 3, 1, 1)]


def _mlp(dims: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers
