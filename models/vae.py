"""Variational autoencoder (Kingma & Welling 2013, arXiv 1312.6114), MLP and convolutional.

Both architectures share one interface, the one pytorch/examples made familiar:
`encode(x) -> (mu, logvar)`, `reparameterize(mu, logvar)`, `decode(z) -> params`,
`forward(x) -> (params, mu, logvar)`.

The pixel likelihood p(x|z) is a config choice (`likelihood`):

- "bernoulli": each pixel in [0, 1] is a Bernoulli target and `params` are logits, scored with
  `binary_cross_entropy_with_logits`. This is the tutorial's loss. On grey images it is **not**
  a likelihood of the 8-bit data (grey-pixel BCE); it is one for binarized data.
- "logistic": the discretized logistic mixture of PixelCNN++ (models/likelihood.py, Salimans et
  al. 2017, eq. 2-3), a normalised distribution over the 256 levels of every subpixel, so
  -log p(x) in bits/dim is comparable across every model of the project.

The conv VAE's decoder is either factorized, p(x|z) = prod_i p(x_i|z) as in the VAE paper, or
autoregressive, p(x|z) = prod_i p(x_i|z, x_<i) in raster order, as in PixelVAE (Gulrajani et
al. 2016, arXiv 1611.05013) and the variational lossy autoencoder (Chen et al. 2016, arXiv
1611.02731): a small masked convolution (PixelCNN paper, arXiv 1601.06759) reads the pixels
before i and is added to the z-path features at i. Its receptive field is kept local so that
global structure must still go through z. Training and every likelihood teacher-force the true
(discrete) image, `decode(z, context=x)`, in one pass. `generate(z)` draws an image: a factorized
decoder returns its mean image; an autoregressive one draws every pixel from its distribution and
feeds the drawn value back, so what it returns is a sample of the model.
`use_latent=False` gives the context-only baseline: the same decoder fed z = 0.

What the service serves (app/operations.py's table) are methods here, their noise an argument:
`reconstruct(x)`, `encode(x)`, `decode_latents(z)` (images from z, with the fixed draws of
`reconstruct_seed`), and `sample_from(eps, uniforms, temperature)` of the noise `draw_noise(n,
generator)` draws; the stepped ones take `on_step`, which sees each step's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Linear, MaskedConv2d
from models.likelihood import DiscretizedLogisticMixture, check_mean_mse_weight, temperature_map

LOG_2PI = math.log(2 * math.pi)
LIKELIHOODS = ("bernoulli", "logistic")
ORDERS = ("wavefront", "raster")


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
    likelihood: str = "bernoulli"  # "bernoulli" (the tutorial's BCE) or "logistic" (discretized logistic mixture)
    num_mixtures: int = 5  # logistic: mixture components per pixel
    use_latent: bool = True  # False: the decoder is fed z = 0 (the context-only baseline of an AR decoder)
    reconstruct_seed: int = 0  # autoregressive: the seed of the pixel draws of `reconstruct`
    # logistic, training only: weight of an auxiliary squared error between the mixture's mean image and
    # x, per subpixel (as models/vqvae.py's field), added to the objective: on colour data it makes the
    # decoder learn its means early. The reported -ELBO and IWAE bounds are the model's, whatever its value.
    mean_mse_weight: float = 0.0

    def __post_init__(self) -> None:
        check_mean_mse_weight(self.mean_mse_weight, self.likelihood)
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
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.num_mixtures < 1:
            raise ValueError(f"num_mixtures must be >= 1, got {self.num_mixtures}")
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
    def params_per_pixel(self) -> int:
        """Decoder outputs per pixel: C logits (Bernoulli) or the mixture's 3K / 10K parameters."""
        if self.likelihood == "bernoulli":
            return self.in_channels
        return DiscretizedLogisticMixture(self.in_channels, self.num_mixtures).num_params

    @property
    def uniforms_per_pixel(self) -> int:
        """Uniform numbers one pixel draw takes: C (Bernoulli), 1 + C (mixture); 0 when factorized."""
        if not self.autoregressive:
            return 0
        return self.in_channels + (self.likelihood == "logistic")

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
        p = config.params_per_pixel
        self.pixel_likelihood = (
            DiscretizedLogisticMixture(c, config.num_mixtures) if config.likelihood == "logistic" else None
        )
        if config.arch == "mlp":
            dims = (c * s * s, *config.hidden_dims)
            self.encoder = nn.Sequential(nn.Flatten(), *_mlp(dims))
            feat = dims[-1]
            self.decoder = nn.Sequential(
                *_mlp((d, *reversed(dims[1:]))),
                Linear(dims[1], p * s * s),
                nn.Unflatten(1, (p, s, s)),  # (B, P, H, W)
            )
        else:
            c1, c2 = config.channels
            r = s // 4
            self.encoder = nn.Sequential(
                nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(),  # (B, c1, s/2, s/2)
                nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),  # (B, c2, s/4, s/4)
                nn.Flatten(),  # (B, c2 * s/4 * s/4)
                Linear(c2 * r * r, config.fc_dim), nn.ReLU(),
            )
            feat = config.fc_dim
            # the z path ends in the likelihood's parameters (factorized) or in features the AR head
            # combines with the context
            out = config.ar_channels if config.autoregressive else p
            self.decoder = nn.Sequential(
                Linear(d, config.fc_dim), nn.ReLU(),
                Linear(config.fc_dim, c2 * r * r), nn.ReLU(),
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
                self.ar_head = nn.Sequential(  # per pixel: z features + context -> P parameters
                    nn.ReLU(), nn.Conv2d(a, a, 1), nn.ReLU(), nn.Conv2d(a, p, 1)
                )
        self.fc_mu = Linear(feat, d)
        self.fc_logvar = Linear(feat, d)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    @property
    def has_latent(self) -> bool:
        """Whether an image depends on z. False for the context-only baseline (use_latent=False): its
        decoder is fed z = 0, so encoding, decoding a given z, reconstructing and interpolating mean
        nothing for it; it only samples (every draw then comes from the pixel context alone)."""
        return self.config.use_latent

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

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """z: (..., D) -> the likelihood's parameters (..., P, H, W): Bernoulli logits (P = C) or
        the mixture's parameters (P = 3K grey, 10K RGB).

        An autoregressive decoder needs the pixels it conditions on: `context` (B, C, H, W), on the
        256-level grid, with z of shape (B, D) or (m, B, D), teacher-forces them (training,
        likelihoods). To draw an image without one, use `generate`. A factorized decoder ignores
        `context`.
        """
        lead = z.shape[:-1]
        h = self._z_features(z)  # (N, P or ar_channels, H, W)
        if not self.config.autoregressive:
            return h.reshape(*lead, *h.shape[1:])
        if context is None:
            raise ValueError("an autoregressive decoder needs `context` (the image it conditions on); use generate(z) to draw one")
        _, hh, ww = self.image_shape
        ctx = self.ar_context(context)  # (B, a, H, W), computed once for every z of the same image
        h = h.reshape(*lead, -1, hh, ww) + ctx  # (..., B, a, H, W)
        params = self.ar_head(h.reshape(-1, *h.shape[-3:]))  # (N, P, H, W)
        return params.reshape(*lead, *params.shape[1:])

    def _z_features(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (N, P or ar_channels, H, W); with use_latent=False the decoder sees z = 0."""
        flat = z.reshape(-1, z.shape[-1])  # (N, D)
        if not self.config.use_latent:
            flat = torch.zeros_like(flat)
        return self.decoder(flat)

    # -- the likelihood --------------------------------------------------------------------

    def log_likelihood(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per image in nats: params (..., P, H, W), x (B, C, H, W) -> (...).

        Bernoulli: -BCE summed over pixels (the tutorial's loss; on grey pixels not a likelihood of
        8-bit data). Logistic: the discretized logistic mixture, a normalised probability of the
        8-bit image (x must lie on the grid k / 255).
        """
        lead = params.shape[:-3]
        x = x.expand(*lead[:-1], *x.shape) if len(lead) > 1 else x  # (..., B, C, H, W)
        if self.pixel_likelihood is None:
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")  # (..., C, H, W)
            return -nll.flatten(-3).sum(-1)
        flat = params.reshape(-1, *params.shape[-3:])  # (N, P, H, W)
        return self.pixel_likelihood.log_prob(flat, x.reshape(-1, *x.shape[-3:])).reshape(lead)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """A factorized decoder's image (B, C, H, W) in [0, 1]: sigmoid of the Bernoulli logits, or the
        mixture's mean (models/likelihood.py, `mean`)."""
        if self.pixel_likelihood is None:
            return torch.sigmoid(params)
        return self.pixel_likelihood.mean(params)

    def _draw(self, params: torch.Tensor, uniforms: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
        """One draw per pixel by inversion: params (N, P, 1, m), uniforms (N, U, 1, m) -> (N, C, 1, m).

        Bernoulli: 1 where u < sigmoid(logit / T). Logistic: the mixture's inverse-CDF sampler.
        Always in float32 or wider (under autocast the params may be half precision, whose rounding
        would move draws off the 256-level grid).
        """
        if params.dtype in (torch.float16, torch.bfloat16):
            params = params.float()
        if self.pixel_likelihood is None:
            t = temperature_map(temperature, params.shape[0], params)
            return (uniforms < torch.sigmoid(params / t)).to(params.dtype)
        return self.pixel_likelihood.sample(params, temperature=temperature, uniforms=uniforms)

    # -- generation ------------------------------------------------------------------------

    def uniform_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the uniforms `generate` takes for n images: (n, U, H, W), U = uniforms_per_pixel
        (0 for a factorized decoder, which draws nothing)."""
        _, hh, ww = self.image_shape
        return (n, self.config.uniforms_per_pixel, hh, ww)

    def generation_steps(self, order: str = "wavefront") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pixel groups an autoregressive decoder draws one after another: (rows, cols) per step.

        raster: one pixel per step (H * W steps). wavefront: with a context of reach r (it reads
        rows above up to column col + r, and the current row up to col - 1), pixel (row, col)
        depends only on pixels with a smaller t = col + (r + 1) row, so every pixel with the same t
        is drawn in one step: (W - 1) + (r + 1)(H - 1) + 1 steps, 136 instead of 784 at 28x28, r = 3.
        """
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        _, hh, ww = self.image_shape
        rows, cols = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()  # (H*W,) in raster order
        if order == "raster":
            return [(rows[i : i + 1], cols[i : i + 1]) for i in range(hh * ww)]
        t = cols + (self.config.ar_reach + 1) * rows  # (H*W,)
        return [(rows[t == step], cols[t == step]) for step in range(int(t.max()) + 1)]

    def generate(
        self,
        z: torch.Tensor,
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float | torch.Tensor = 1.0,
        order: str = "wavefront",
        on_step: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """z (N, D) -> images (N, C, H, W) in [0, 1].

        Factorized: the mean image of p(x|z) (`mean_image`); uniforms and temperature are unused.
        Autoregressive: a sample of p(x|z), every pixel drawn from its distribution at
        `temperature` (a float or one per image, (N,)) and fed back as context, from `uniforms`
        (`uniform_shape(N)`; drawn with `generator` when absent). Each image depends only on its
        own z and uniforms, so results do not depend on the batch. `order` "wavefront" (default)
        and "raster" draw the same pixels from the same uniforms; wavefront takes 136 steps at
        28x28 instead of 784, and computes each layer of the context only at the step's pixels (each
        pixel's activations once), where raster order reruns the whole stack at each step (the
        reference the tests compare with). `on_step(params)`, when given, sees each step's likelihood
        parameters (N, P, 1, m) before its draw (a server checks with it that the batch size does
        not change them, and stops work nobody waits for any more by raising).
        """
        h = self._z_features(z)  # (N, P or a, H, W)
        if not self.config.autoregressive:
            return self.mean_image(h)
        shape = self.uniform_shape(h.shape[0])
        dtype = torch.promote_types(h.dtype, torch.float32)  # draws in float32 (or float64), even under autocast
        if uniforms is None:
            uniforms = torch.rand(shape, generator=generator, device=h.device, dtype=dtype)
        elif tuple(uniforms.shape) != shape:
            raise ValueError(f"uniforms must have shape {shape} for {h.shape[0]} images, got {tuple(uniforms.shape)}")
        elif uniforms.numel() and not (0.0 <= uniforms.min().item() and uniforms.max().item() <= 1.0):
            raise ValueError("uniforms must lie in [0, 1] (and not be NaN)")
        uniforms = uniforms.to(device=h.device, dtype=dtype)
        n, (c, hh, ww) = h.shape[0], self.image_shape
        fast = order == "wavefront"
        convs = [m for m in self.ar_context if isinstance(m, MaskedConv2d)]  # mask A, then (ar_layers - 1) mask B
        pad = self.config.ar_kernel // 2 if fast else 0
        # undrawn pixels are 0; the masks never read them. The fast path reads windows of the padded buffer.
        padded = h.new_zeros(n, c, hh + 2 * pad, ww + 2 * pad, dtype=dtype)  # (N, C, H + 2p, W + 2p)
        x = padded[:, :, pad : pad + hh, pad : pad + ww]  # (N, C, H, W), a view
        kernels = [((conv.weight * conv.mask).flatten(1), conv.bias) for conv in convs]  # (a, C_in*k*k), (a,)
        # the fast path keeps every mask-B layer's input, ReLU(previous layer), at the pixels computed
        # so far, padded by 1 for the 3 x 3 windows; a pixel's activations are final at its own step,
        # since the wavefront's reach covers the whole stack, so each layer runs once per pixel.
        a = self.config.ar_channels
        hidden = [h.new_zeros(n, a, hh + 2, ww + 2, dtype=dtype) for _ in convs[1:] if fast]  # (N, a, H + 2, W + 2) each
        # the 1x1 head as matrices: ReLU, W1, ReLU, W2 (the same arithmetic as the convolutions)
        w1, b1 = self.ar_head[1].weight.flatten(1), self.ar_head[1].bias  # (a, a), (a,)
        w2, b2 = self.ar_head[3].weight.flatten(1), self.ar_head[3].bias  # (P, a), (P,)
        for rows, cols, windows, windows3 in self._generation_plan(order, h.device):
            if fast:
                patches = padded[:, :, windows[0], windows[1]].permute(0, 2, 1, 3, 4).flatten(2)  # (N, m, C*k*k)
                ctx = F.linear(patches, *kernels[0])  # (N, m, a): the mask-A conv at these m pixels only
                for buffer, kernel in zip(hidden, kernels[1:]):
                    buffer[:, :, rows + 1, cols + 1] = F.relu(ctx).transpose(1, 2).to(dtype)
                    patches = buffer[:, :, windows3[0], windows3[1]].permute(0, 2, 1, 3, 4).flatten(2)  # (N, m, a*9)
                    ctx = F.linear(patches, *kernel)  # (N, m, a): the next mask-B layer at these pixels
            else:
                ctx = self.ar_context(x)[:, :, rows, cols].transpose(1, 2)  # (N, m, a): the whole stack, then the pixels
            feats = h[:, :, rows, cols].transpose(1, 2) + ctx  # (N, m, a)
            out = F.linear(F.relu(F.linear(F.relu(feats), w1, b1)), w2, b2)  # (N, m, P)
            params = out.transpose(1, 2)[:, :, None, :]  # (N, P, 1, m)
            if on_step is not None:
                on_step(params)
            drawn = self._draw(params, uniforms[:, :, rows, cols][:, :, None, :], temperature)  # (N, C, 1, m)
            x[:, :, rows, cols] = drawn[:, :, 0]
        return x.clone()

    def _generation_plan(
        self, order: str, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor, tuple, tuple]]:
        """`generation_steps(order)` on `device`, each with the index grids (rows, cols) of its
        pixels' k x k windows (m, k, k) in the image padded by k // 2, and of their 3 x 3 windows
        (m, 3, 3) in a buffer padded by 1; computed once per (order, device)."""
        cache = self.__dict__.setdefault("_plans", {})
        key = (order, str(device))
        if key not in cache:
            plan = []
            for rows, cols in self.generation_steps(order):
                windows = [_window_grid(rows, cols, size, device) for size in (self.config.ar_kernel, 3)]
                plan.append((rows.to(device), cols.to(device), *windows))
            cache[key] = plan
        return cache[key]

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
        autoregressive decoder from leaving z unused. With `mean_mse_weight` w > 0 the tensor to
        differentiate adds w x the squared error of the mixture's (unclamped) mean image, summed over
        the subpixels ("mean_mse" in the stats is its per-subpixel mean). The returned stats are
        always the true negative ELBO and its terms; only the tensor to differentiate changes.
        """
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0 nats per latent dimension, got {free_bits}")
        params, mu, logvar = self(x, generator)
        rec = -self.log_likelihood(params, x)  # (B,)
        kl_dims = kl_divergence(mu, logvar, reduce=False)  # (B, D)
        kl = kl_dims.sum(-1)  # (B,)
        neg_elbo = (rec + kl).mean()
        objective = neg_elbo
        if free_bits > 0:
            objective = rec.mean() + kl_dims.mean(0).clamp(min=free_bits).sum()
        stats = {"loss": neg_elbo.detach(), "rec": rec.mean().detach(), "kl": kl.mean().detach()}
        if self.config.mean_mse_weight:  # per subpixel, summed over the image as the nats are
            mean_mse = F.mse_loss(self.pixel_likelihood.mean(params, clamp=False), x)
            objective = objective + self.config.mean_mse_weight * mean_mse * x[0].numel()
            stats["mean_mse"] = mean_mse.detach()
        return objective, stats

    # -- what the service serves (app/operations.py): images from images, latents and noise ---------

    def reconstruct_uniforms(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The fixed uniforms of `reconstruct`: one draw from `reconstruct_seed`, the same for every
        image, so a reconstruction depends on nothing but its input: (n, U, H, W)."""
        one = torch.rand(self.uniform_shape(1), generator=torch.Generator().manual_seed(self.config.reconstruct_seed))
        return one.expand(n, *one.shape[1:]).to(device)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """x (B, C, H, W) -> images decoded from z = mu (`decode_latents`): a factorized decoder's
        mean image; an autoregressive decoder's sample drawn with the fixed `reconstruct_seed` (the
        input is never shown to the decoder). `on_step`: see `generate`."""
        mu, _ = self.encode(x)
        return self.decode_latents(mu, on_step=on_step)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """z (B, D) -> images (B, C, H, W) in [0, 1]: `generate` with the fixed uniforms of
        `reconstruct_uniforms` (none for a factorized decoder), so the same z always gives the same image."""
        uniforms = self.reconstruct_uniforms(z.shape[0], z.device) if self.config.autoregressive else None
        return self.generate(z, uniforms=uniforms, on_step=on_step)

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise of n samples, drawn in this order from `generator` on the CPU: eps = randn(n, D),
        then the uniforms of the pixel draws rand(`uniform_shape(n)`) (U = 0 for a factorized
        decoder). `sample_from(eps, uniforms, temperature)` turns them into images."""
        eps = torch.randn(n, self.config.latent_dim, generator=generator)  # (n, D)
        return eps, torch.rand(self.uniform_shape(n), generator=generator)  # (n, U, H, W)

    @torch.no_grad()
    def sample_from(
        self,
        eps: torch.Tensor,
        uniforms: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        *,
        on_step: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Samples from given noise (`draw_noise`): z = eps * temperature, so z ~ N(0, temperature^2 I),
        decoded by `generate` with the pixel draws at the same temperature (a float, or one per image
        (N,)). Each image depends only on its own noise, so results do not depend on the batch."""
        t = temperature[:, None] if isinstance(temperature, torch.Tensor) and temperature.dim() else temperature  # (N, 1) or one
        return self.generate(eps * t, uniforms=uniforms, temperature=temperature, on_step=on_step)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n images from z ~ N(0, temperature^2 I) (or the given z) through `generate` (the pixel
        draws of an autoregressive decoder at the same temperature, which must then be > 0; a
        factorized decoder accepts 0, the decoded prior mean)."""
        if not isinstance(temperature, (int, float)) or not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        if z is None:
            device = next(self.parameters()).device
            z = torch.randn(n, self.config.latent_dim, generator=generator, device=device) * temperature
        return self.generate(z, generator=generator, temperature=temperature)

    def draw_score_noise(
        self, n: int, k: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The noise of `iwae_bound` for n images and k samples each: randn(k, n, D) drawn in that
        order from `generator`, as (n, k, D), a row per image (so the service can batch it)."""
        return torch.randn((k, n, self.config.latent_dim), generator=generator, device=device, dtype=dtype).transpose(0, 1)

    @torch.no_grad()
    def iwae_bound(self, x: torch.Tensor, k: int, chunk: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted bound on log p(x) (Burda et al. 2015, eq. 8), per image, float64:
        `iwae_bound_from` with the k x B noise vectors drawn at once (`draw_score_noise`)."""
        return self.iwae_bound_from(x, self.draw_score_noise(len(x), k, generator, x.device, x.dtype), chunk)

    @torch.no_grad()
    def iwae_bound_from(self, x: torch.Tensor, eps: torch.Tensor, chunk: int = 100) -> torch.Tensor:
        """log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i | x),  z_i = mu + eps_i * sigma ~ q(z | x), per
        image (B,), float64; eps (B, k, D) standard normal. The k samples are decoded `chunk` at a
        time, so memory stays at chunk * B decodes; log-weights are accumulated in float64 and
        combined with logsumexp. Each image depends only on its own row of eps."""
        mu, logvar = self.encode(x)  # (B, D)
        std = torch.exp(0.5 * logvar)
        noise = eps.transpose(0, 1)  # (k, B, D)
        k = noise.shape[0]
        log_w = []
        for start in range(0, k, chunk):
            e = noise[start : start + chunk]  # (m, B, D)
            z = mu + e * std  # (m, B, D)
            log_px_z = self.log_likelihood(self.decode(z, context=x), x).double()  # (m, B)
            log_pz = (-0.5 * (z.double() ** 2 + LOG_2PI)).sum(-1)
            log_qz = (-0.5 * (e.double() ** 2 + LOG_2PI) - 0.5 * logvar.double()).sum(-1)
            log_w.append(log_px_z + log_pz - log_qz)
        return self.iwae_from_log_weights(torch.cat(log_w, 0).T)  # (B, k) -> (B,)

    @staticmethod
    def iwae_from_log_weights(log_w: torch.Tensor) -> torch.Tensor:
        """The IWAE bound on log p(x) of each image from its k log importance weights (B, k):
        log (1/k) sum_i w_i = logsumexp - log k, (B,)."""
        return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])

    @staticmethod
    def importance_rows(x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (n, C, H, W) and their noise (n, k, D) as n k rows for `log_importance_weights`: each
        image repeated k times, (n k, C, H, W), and the noise (n k, D), image by image."""
        n, k = eps.shape[:2]
        return x[:, None].expand(n, k, *x.shape[1:]).reshape(n * k, *x.shape[1:]), eps.reshape(n * k, -1)

    @torch.no_grad()
    def log_importance_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One importance weight per row, log p(x, z) - log q(z | x) with z = mu + eps * sigma, float64
        (N,): x (N, C, H, W), eps (N, D). The IWAE bound of an image is logsumexp over its k rows
        minus log k (what `iwae_bound_from` computes for whole images), so the service can batch
        the k samples of any number of requests, whatever each request's k."""
        mu, logvar = self.encode(x)  # (N, D)
        z = mu + eps * torch.exp(0.5 * logvar)  # (N, D)
        log_px_z = self.log_likelihood(self.decode(z, context=x), x).double()  # (N,)
        log_pz = (-0.5 * (z.double() ** 2 + LOG_2PI)).sum(-1)
        log_qz = (-0.5 * (eps.double() ** 2 + LOG_2PI) - 0.5 * logvar.double()).sum(-1)
        return log_px_z + log_pz - log_qz

    @torch.no_grad()
    def nll_map(self, x: torch.Tensor) -> torch.Tensor:
        """Where an image is unlikely: -log p(x_ij | z = mu) per pixel (B, H, W) in nats, the
        decoder's term at the posterior mean (channels summed). It sums to -log p(x | mu), not to
        the IWAE bound, which does not split into pixels. A normalised likelihood only."""
        if self.pixel_likelihood is None:
            raise ValueError(
                "a per-pixel likelihood needs likelihood='logistic' (a probability of 8-bit images); "
                f"this model has likelihood={self.config.likelihood!r}"
            )
        mu, _ = self.encode(x)
        return -self.pixel_likelihood.log_prob_per_pixel(self.decode(mu, context=x), x)


def _window_grid(rows: torch.Tensor, cols: torch.Tensor, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index grids (m, size, size) of the size x size windows centred on pixels (rows, cols) (m,)
    of an image padded by size // 2 on each side."""
    offsets = torch.arange(size)
    rr = (rows[:, None, None] + offsets[None, :, None]).expand(-1, size, size)  # (m, size, size)
    cc = (cols[:, None, None] + offsets[None, None, :]).expand(-1, size, size)  # (m, size, size)
    return rr.to(device), cc.to(device)


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
        layers += [Linear(a, b), nn.ReLU()]
    return layers
