"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017, arXiv 1711.00937).

A convolutional encoder maps an image to a grid of D-dimensional vectors z_e; each
vector is replaced by its nearest codebook entry (eq. 1-2), giving z_q and a grid of
integer codes; a convolutional decoder maps z_q back to the image. Gradients skip
the non-differentiable lookup with the straight-through estimator (sec. 3.2) and the
loss is eq. 3: reconstruction + codebook loss + beta * commitment loss. With
`ema=True` the codebook is instead an exponential moving average of the encoder
outputs assigned to each code (appendix A.1) and the codebook loss term is dropped.

Two practical additions, both config fields: the codebook is initialised from the
first training batch (k-means by default), and a code that no batch has used for
`dead_code_steps` training steps is re-seeded from a recent encoder output (the
random restarts of Dhariwal et al. 2020, "Jukebox", sec. 2.2).

The reconstruction term is a config choice (`likelihood`): "mse", the paper's Gaussian with a
fixed variance (not a likelihood of 8-bit images), or "logistic", the discretized logistic
mixture of PixelCNN++ (models/likelihood.py), a normalised probability of the 8-bit image
given the codes, so that -log p(x | z_q(x)) - log p_prior(z(x)) bounds -log p(x)
(training/evaluate.py, `nll_bound`). Images shown (`decode_indices`) are the decoder's mean.

The architecture is the paper's image model (sec. 4.1): two 4x4 stride-2
convolutions, residual 3x3 blocks (ReLU, 3x3 conv, ReLU, 1x1 conv), and the mirror
image with transposed convolutions in the decoder, so the code grid is H/4 x W/4.

What the service serves (app/operations.py's table) are methods here: `reconstruct(x)`,
`encode_nearest(x)` (z_e and its codes), `decode_indices(codes)`, `decode_nearest(z_e)`, and
`sample_from(prior, uniforms, temperature, labels)` of the noise the prior's `draw_noise` draws;
`on_step` sees what precedes each discrete step (the distances of the nearest-code search, a
prior's logits).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.likelihood import DiscretizedLogisticMixture, check_mean_mse_weight
from models.prior import marginal_log_prob

INITS = ("kmeans", "random_batch", "uniform")
LIKELIHOODS = ("mse", "logistic")


@dataclass(frozen=True)
class VQVAEConfig:
    in_channels: int = 1  # 1 or 3
    image_size: int = 28  # 28 -> 7x7 codes, 32 -> 8x8 codes (two stride-2 downsamplings)
    hidden_channels: int = 128
    res_channels: int = 32  # width inside each residual block
    n_res_blocks: int = 2
    codebook_size: int = 512  # K
    embedding_dim: int = 64  # D
    beta: float = 0.25  # commitment weight (paper eq. 3)
    ema: bool = True  # EMA codebook updates (appendix A.1) instead of the codebook loss
    ema_decay: float = 0.99  # gamma in appendix A.1
    ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    init: str = "kmeans"  # "kmeans" | "random_batch" (from the first training batch) | "uniform" (no data)
    kmeans_iters: int = 10
    dead_code_steps: int = 100  # a code unused this many training steps in a row is re-seeded; 0 disables
    likelihood: str = "mse"  # "mse" (the paper's fixed-variance Gaussian) or "logistic" (discretized logistic mixture)
    num_mixtures: int = 5  # logistic: mixture components per pixel
    # logistic, training only: weight of an auxiliary MSE between the mixture's mean image and x, added
    # to -log p(x | z_q) per subpixel. On colour data the RGB coupling (PixelCNN++ eq. 3) lets the loss
    # fall while the red mean, and so the whole mean image, lags for epochs; this term makes the decoder
    # learn its means early. The likelihood is unchanged: every bits/dim stays a bound of the data.
    mean_mse_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(
                f"image_size must be a positive multiple of 4 (two stride-2 stages), got {self.image_size}"
            )
        if self.hidden_channels < 2 or self.hidden_channels % 2:
            raise ValueError(
                f"hidden_channels must be an even number >= 2 (the first stage uses half), got {self.hidden_channels}"
            )
        if self.res_channels < 1:
            raise ValueError(f"res_channels must be >= 1, got {self.res_channels}")
        if self.n_res_blocks < 0:
            raise ValueError(f"n_res_blocks must be >= 0, got {self.n_res_blocks}")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        check_mean_mse_weight(self.mean_mse_weight, self.likelihood)
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (the paper uses 0.25), got {self.beta}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (the paper uses 0.99), got {self.ema_decay}")
        if self.ema_epsilon <= 0:
            raise ValueError(f"ema_epsilon must be > 0 (e.g. 1e-5), got {self.ema_epsilon}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.kmeans_iters < 1:
            raise ValueError(
                f"kmeans_iters must be >= 1 (use init='random_batch' for no iterations), got {self.kmeans_iters}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.num_mixtures < 1:
            raise ValueError(f"num_mixtures must be >= 1, got {self.num_mixtures}")
        if self.dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0 (0 disables restarts), got {self.dead_code_steps}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared L2 distances as ||z||^2 - 2 z.e + ||e||^2 (one matmul)."""
    return z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1)


def kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on (N, D) points -> centres (k, D), cluster sizes (k,).

    Seeded with k-means++ (Arthur & Vassilvitskii 2007): each next centre is drawn with
    probability proportional to its squared distance from the nearest centre so far, so
    well-separated clusters each get a centre. A cluster that empties keeps its centre.
    Uses the global torch RNG.
    """
    n = x.shape[0]
    centres = x.new_empty(k, x.shape[1])
    centres[0] = x[torch.randint(n, (1,), device=x.device)[0]]
    d2 = (x - centres[0]).pow(2).sum(1)  # (N,) distance to the nearest centre so far
    for i in range(1, k):
        # The floor keeps the draw valid (uniform) when every point already is a centre.
        j = torch.multinomial(d2.clamp_min(1e-20), 1)[0]
        centres[i] = x[j]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(1))
    for _ in range(iters):
        assign = squared_distances(x, centres).argmin(1)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        sums = x.new_zeros(k, x.shape[1]).index_add_(0, assign, x)  # (k, D)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    counts = torch.bincount(squared_distances(x, centres).argmin(1), minlength=k).to(x.dtype)
    return centres, counts


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup into a K x D codebook with a straight-through gradient.

    State (all persistent, so a resumed run continues exactly): `embedding` (K, D), a
    Parameter when `ema=False` and a buffer when `ema=True`; with EMA also `cluster_size`
    (K,) and `embed_avg` (K, D), the N_i and m_i of appendix A.1; `initialized` (whether
    the data-dependent init has run), `steps_unused` (K,) and `restarts` (1,).

    In training mode a forward pass also updates the codebook (first-batch init, EMA,
    dead-code restarts); in eval mode it changes nothing. `last_stats` describes the
    codes this process's last forward used.
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.codebook_size, config.embedding_dim
        # Plain random init, also the placeholder until a data-dependent init runs.
        embedding = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if config.ema:
            self.register_buffer("embedding", embedding)
            # N_i = 1 and m_i = e_i make e_i = m_i / N_i hold before the first update.
            self.register_buffer("cluster_size", torch.ones(k))
            self.register_buffer("embed_avg", embedding.clone())
        else:
            self.embedding = nn.Parameter(embedding)
        self.register_buffer("initialized", torch.tensor(config.init == "uniform"))
        self.register_buffer("steps_unused", torch.zeros(k, dtype=torch.long))
        # Shape (1,), not a scalar: models.io hashes tensors as bytes, which a 0-dim int64 refuses.
        self.register_buffer("restarts", torch.zeros(1, dtype=torch.long))
        self.last_stats: dict[str, float] = {}
        self.last_counts = torch.zeros(config.codebook_size)

    def nearest(self, z_e: torch.Tensor, on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """(B, D, H, W) -> indices (B, H, W) of the nearest codes (paper eq. 1). Never updates anything.
        `on_step(distances)`, when given, sees what the argmin is taken of, (B, H*W*K) in float32."""
        b, d, h, w = z_e.shape
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
        distances = squared_distances(flat, self.embedding.detach().float())  # (B*H*W, K)
        if on_step is not None:
            on_step(distances.view(b, -1))
        return distances.argmin(1).view(b, h, w)

    def lookup(self, indices: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Codebook vectors of indices (B, H, W) -> (B, D, H, W). `check=False` skips the range check
        (which reads values back to the host) for indices already checked, as a CUDA graph needs."""
        if indices.dtype not in (torch.long, torch.int):
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        k = self.config.codebook_size
        if check and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(
                f"indices must lie in [0, {k - 1}], got values in [{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2)  # (B, D, H, W)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, D, H, W) -> z_q (B, D, H, W) with straight-through gradient, indices (B, H, W), loss."""
        cfg = self.config
        b, d, h, w = z_e.shape
        if d != cfg.embedding_dim:
            raise ValueError(f"z_e has {d} channels, the codebook has embedding_dim={cfg.embedding_dim}")
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*H*W
        if self.training and not bool(self.initialized):
            self._data_init(flat)

        indices = squared_distances(flat, self.embedding.detach().float()).argmin(1)  # (N,)
        z_q = F.embedding(indices, self.embedding).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, H, W)
        indices = indices.view(b, h, w)

        # Paper eq. 3: L = rec + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2, as means over elements.
        loss = cfg.beta * F.mse_loss(z_e, z_q.detach())
        if not cfg.ema:
            loss = loss + F.mse_loss(z_q, z_e.detach())
        # Straight-through estimator (sec. 3.2): forward is z_q, backward copies dL/dz_q to z_e.
        z_q_st = z_e + (z_q - z_e).detach()

        counts = torch.bincount(indices.flatten(), minlength=cfg.codebook_size).float()  # (K,)
        restarted = 0
        if self.training:
            with torch.no_grad():
                restarted = self._update(flat, indices.flatten(), counts)
        self._record_stats(counts, restarted)
        return z_q_st, indices, loss

    @torch.no_grad()
    def _data_init(self, flat: torch.Tensor) -> None:
        """Initialise the codebook from the first training batch; rank 0's choice is broadcast."""
        cfg = self.config
        k = cfg.codebook_size
        if _is_rank0():
            if cfg.init == "kmeans":
                codes, sizes = kmeans(flat, k, cfg.kmeans_iters)
            else:  # "random_batch": K encoder outputs, drawn with replacement only if the batch is smaller
                pick = torch.randperm(flat.shape[0], device=flat.device)[:k]
                if pick.numel() < k:
                    pick = torch.randint(flat.shape[0], (k,), device=flat.device)
                codes = flat[pick]
                sizes = torch.bincount(squared_distances(flat, codes).argmin(1), minlength=k).float()
        else:
            codes, sizes = flat.new_empty(k, flat.shape[1]), flat.new_empty(k)
        if _distributed():
            dist.broadcast(codes, src=0)
            dist.broadcast(sizes, src=0)
        self.embedding.data.copy_(codes)
        if cfg.ema:
            # The EMA starts as if it had seen the init batch; an empty cluster counts as size 1
            # so that e_i = m_i / N_i stays put instead of collapsing towards zero.
            sizes = sizes.clamp_min(1.0)
            self.cluster_size.copy_(sizes)
            self.embed_avg.copy_(codes * sizes[:, None])
        self.initialized.fill_(True)

    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> int:
        """One training step of codebook bookkeeping: EMA (appendix A.1), then dead-code restarts."""
        cfg = self.config
        counts = counts.clone()
        if cfg.ema:
            sums = flat.new_zeros(cfg.codebook_size, cfg.embedding_dim).index_add_(0, indices, flat)  # (K, D)
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            g = cfg.ema_decay
            # Appendix A.1: N_i <- g N_i + (1-g) n_i;  m_i <- g m_i + (1-g) sum_j z_ij;  e_i = m_i / N_i.
            self.cluster_size.mul_(g).add_(counts, alpha=1 - g)
            self.embed_avg.mul_(g).add_(sums, alpha=1 - g)
            # Laplace smoothing keeps N_i > 0, so codes with no assignments never divide by zero.
            n = self.cluster_size.sum()
            eps = cfg.ema_epsilon
            smoothed = (self.cluster_size + eps) / (n + cfg.codebook_size * eps) * n  # (K,)
            self.embedding.copy_(self.embed_avg / smoothed[:, None])
        if cfg.dead_code_steps == 0:
            return 0
        if not cfg.ema and _distributed():
            dist.all_reduce(counts)
        # `counts` is global here, so every replica sees the same dead codes.
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= cfg.dead_code_steps).nonzero().flatten()  # (n_dead,)
        n_dead = dead.numel()
        if n_dead == 0:
            return 0
        # Re-seed from this batch's encoder outputs (without replacement when there are enough).
        if _is_rank0():
            pick = torch.randperm(flat.shape[0], device=flat.device)[:n_dead]
            if pick.numel() < n_dead:
                pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
            fresh = flat[pick]  # (n_dead, D)
        else:
            fresh = flat.new_empty(n_dead, flat.shape[1])
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.embedding.data[dead] = fresh.to(self.embedding.dtype)
        if cfg.ema:
            self.cluster_size[dead] = 1.0
            self.embed_avg[dead] = fresh
        self.steps_unused[dead] = 0
        self.restarts.add_(n_dead)
        return n_dead

    def _record_stats(self, counts: torch.Tensor, restarted: int) -> None:
        p = counts / counts.sum().clamp_min(1)  # (K,) code frequencies in this batch
        perplexity = torch.exp(-torch.special.xlogy(p, p).sum())  # exp(-sum p log p), 0 log 0 = 0
        self.last_counts = counts.detach()  # (K,) for callers that track usage over an epoch
        self.last_stats = {
            "perplexity": float(perplexity),
            "codes_used": float((counts > 0).sum()),
            "restarts": float(self.restarts.item()),  # cumulative over training
            "restarts_last": float(restarted),  # in this forward pass
        }


class ResidualBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))): the paper's residual block (sec. 4.1)."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, 1, 1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class VQVAE(nn.Module):
    KIND: ClassVar[str] = "vqvae"
    config_class: ClassVar[type] = VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c, hid, d = config.in_channels, config.hidden_channels, config.embedding_dim
        self.pixel_likelihood = (
            DiscretizedLogisticMixture(c, config.num_mixtures) if config.likelihood == "logistic" else None
        )
        out = c if self.pixel_likelihood is None else self.pixel_likelihood.num_params
        res = [ResidualBlock(hid, config.res_channels) for _ in range(config.n_res_blocks)]
        self.encoder = nn.Sequential(
            nn.Conv2d(c, hid // 2, 4, 2, 1), nn.ReLU(),  # (B, hid/2, H/2, W/2)
            nn.Conv2d(hid // 2, hid, 4, 2, 1), nn.ReLU(),  # (B, hid, H/4, W/4)
            nn.Conv2d(hid, hid, 3, 1, 1),
            *res, nn.ReLU(),
            nn.Conv2d(hid, d, 1),  # (B, D, H/4, W/4): z_e
        )
        self.quantizer = VectorQuantizer(config)
        res = [ResidualBlock(hid, config.res_channels) for _ in range(config.n_res_blocks)]
        self.decoder = nn.Sequential(
            nn.Conv2d(d, hid, 3, 1, 1),  # (B, hid, H/4, W/4)
            *res, nn.ReLU(),
            nn.ConvTranspose2d(hid, hid // 2, 4, 2, 1), nn.ReLU(),  # (B, hid/2, H/2, W/2)
            nn.ConvTranspose2d(hid // 2, out, 4, 2, 1),  # (B, C or P, H, W): the image or the mixture's parameters
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    @property
    def code_shape(self) -> tuple[int, int]:
        s = self.config.image_size // 4
        return (s, s)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.embedding_dim, *self.code_shape)

    @property
    def has_latent(self) -> bool:
        """Always: the code grid is all the decoder sees (models/vae.py's VAE.has_latent may be False)."""
        return True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> z_e (B, D, H/4, W/4)."""
        return self.encoder(x - 0.5)  # centre the pixels; a fixed data convention, not a tunable

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e -> (z_q, indices (B, h, w), vq_loss); see VectorQuantizer.forward."""
        return self.quantizer(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, h, w) -> "mse": x_hat (B, C, H, W), unbounded, the target is x in [0, 1];
        "logistic": the mixture's parameters (B, P, H, W)."""
        return self.decoder(z_q)

    def log_likelihood(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z_q) per image in nats (B,), for likelihood="logistic" (x on the grid k / 255)."""
        if self.pixel_likelihood is None:
            raise ValueError(
                "this VQ-VAE was trained with likelihood='mse', which is not a probability of 8-bit images; "
                "train with --likelihood logistic for a likelihood"
            )
        return self.pixel_likelihood.log_prob(params, x)

    def image(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> the image it shows (B, C, H, W) in [0, 1]: x_hat clamped, or the mixture's mean."""
        if self.pixel_likelihood is None:
            return out.clamp(0, 1)
        return self.pixel_likelihood.mean(out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_q, indices, vq_loss = self.quantize(self.encode(x))
        return self.decode(z_q), indices, vq_loss

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paper eq. 3: reconstruction + the quantiser's loss. The reconstruction term is the MSE
        (a Gaussian decoder), or -log p(x | z_q) in nats per subpixel (the mixture). With
        `mean_mse_weight` w > 0 the tensor to differentiate adds w x the MSE of the mixture's
        (unclamped) mean image; the stats' "loss" stays eq. 3 and "mean_mse" reports the extra term."""
        out, _, vq_loss = self(x)
        if self.pixel_likelihood is None:
            rec = F.mse_loss(out, x)
        else:
            rec = -self.log_likelihood(out, x).mean() / x[0].numel()
        loss = rec + vq_loss
        objective, extra = loss, {}
        if self.config.mean_mse_weight:
            mean_mse = F.mse_loss(self.pixel_likelihood.mean(out, clamp=False), x)
            objective = loss + self.config.mean_mse_weight * mean_mse
            extra["mean_mse"] = mean_mse.detach()
        stats = self.quantizer.last_stats
        return objective, {
            "loss": loss.detach(),
            "rec": rec.detach(),
            "vq": vq_loss.detach(),
            **extra,
            "perplexity": torch.tensor(stats["perplexity"]),
            "codes_used": torch.tensor(stats["codes_used"]),
            "restarts": torch.tensor(stats["restarts"]),
        }

    # -- the likelihood of an image -----------------------------------------------------------

    @torch.no_grad()
    def nll(
        self,
        x: torch.Tensor,
        prior: nn.Module | None = None,
        labels: torch.Tensor | None = None,
        label_freqs: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An upper bound on -log p(x) per image (B,), float64 nats, and where it comes from, per pixel
        (B, H, W) nats, summing to it: -log p(x | z_q(x)) - log P(z(x)).

        For any code grid z*, p(x) = sum_z P(z) p(x|z) >= P(z*) p(x|z*), so this bounds -log p(x),
        with z* the encoder's codes (or `codes` (B, h, w), computed once elsewhere). P is `prior`:
        with `label_freqs` (Y,) the label is marginalised out, P(z) = sum_y p(y) P(z|y), and the result
        bounds -log p(x); with `labels` (B,) it bounds -log p(x | y) instead (lower on average: the
        model is told the class). Without a prior, P is uniform over the K^(h w) grids.
        The map: each pixel's decoder term, plus each code's -log P(z_i | z_<i) spread evenly over
        the pixels of its patch; with the label marginalised (no per-code split) the prior's term is
        spread over the whole image."""
        z = self.encode_indices(x) if codes is None else codes  # (B, h, w)
        nats, pixel = self._decoder_nll(x, z)
        h, w = z.shape[-2:]
        if prior is None:
            prior_nats = torch.full((len(z),), h * w * math.log(self.config.codebook_size), dtype=torch.float64, device=z.device)
            per_code = (prior_nats / (h * w))[:, None, None].expand(-1, h, w)  # (B, h, w)
        elif label_freqs is not None:
            prior_nats = -marginal_log_prob(prior, z, label_freqs)  # (B,)
            per_code = (prior_nats / (h * w))[:, None, None].expand(-1, h, w)  # (B, h, w), even
        else:
            logits = prior(z, labels if getattr(prior.config, "num_classes", 0) else None)  # (B, K, h, w)
            per_code32 = F.cross_entropy(logits, z.long(), reduction="none")  # (B, h, w): -log P(z_i | z_<i)
            prior_nats, per_code = per_code32.sum((1, 2)).double(), per_code32.double()
        return nats + prior_nats, pixel.double() + _spread(per_code, x.shape[-2:])

    @torch.no_grad()
    def nll_labelled(
        self, prior: nn.Module | None, x: torch.Tensor, labels: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`nll` with a label per image (B,), as the service scores: a class-conditional prior is
        given the labels >= 0 and marginalises the rows labelled -1 over equally likely labels (as
        in this project's data sets: p(y) is not stored with a prior); other priors ignore labels.
        Every row is computed under every label, so a row never depends on its batch-mates' labels.
        `on_step` sees the distances the codes are the argmin of (`VectorQuantizer.nearest`), then each
        label's -log P(z_i | z_<i, y) (B, h, w) after its prior pass: the service stops there a pass that
        nobody waits for any more (Y passes of a large prior take seconds)."""
        z = self.quantizer.nearest(self.encode(x), on_step)  # (B, h, w)
        num_labels = int(getattr(prior.config, "num_classes", 0)) if prior is not None else 0
        if not num_labels:
            return self.nll(x, prior, codes=z)
        nats, pixel = self._decoder_nll(x, z)
        h, w = z.shape[-2:]
        per_label = []
        for y in range(num_labels):
            per_label.append(F.cross_entropy(prior(z, torch.full_like(labels, y)), z.long(), reduction="none"))  # (B, h, w)
            if on_step is not None:
                on_step(per_label[-1])
        per_code_y = torch.stack(per_label, 1)  # (B, Y, h, w): -log P(z_i | z_<i, y)
        log_p = -per_code_y.sum((2, 3)).double()  # (B, Y): log P(z | y)
        marginal = torch.logsumexp(log_p - math.log(num_labels), 1)  # (B,): log sum_y P(z | y) / Y
        rows = torch.arange(len(z), device=z.device)
        given = labels >= 0
        label = labels.clamp(min=0)
        prior_nats = torch.where(given, -log_p[rows, label], -marginal)  # (B,)
        per_code = torch.where(
            given[:, None, None], per_code_y[rows, label].double(), (-marginal / (h * w))[:, None, None].expand(-1, h, w)
        )  # (B, h, w)
        return nats + prior_nats, pixel.double() + _spread(per_code, x.shape[-2:])

    def _decoder_nll(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p(x | z_q) per image (B,) float64 and per pixel (B, H, W) float32, codes z (B, h, w)."""
        params = self.decode(self.quantizer.lookup(z))
        if self.pixel_likelihood is None:
            self.log_likelihood(params, x)  # raises: not a probability of 8-bit images
        pixel = -self.pixel_likelihood.log_prob_per_pixel(params, x)  # (B, H, W)
        return pixel.flatten(1).sum(1).double(), pixel

    # -- what the service serves (app/operations.py): images from images, codes and a prior's noise --

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] -> codes (B, h, w) long. Never updates the codebook."""
        return self.quantizer.nearest(self.encode(x))

    @torch.no_grad()
    def encode_nearest(
        self, x: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> z_e (B, D, h, w) and its nearest codes (B, h, w); `on_step`
        sees the distances the codes are the argmin of (`VectorQuantizer.nearest`)."""
        z_e = self.encode(x)
        return z_e, self.quantizer.nearest(z_e, on_step)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, check: bool = True) -> torch.Tensor:
        """codes (B, h, w) -> images (B, C, H, W) in [0, 1] (see `image`); `check`: see `lookup`."""
        return self.image(self.decode(self.quantizer.lookup(indices, check)))

    @torch.no_grad()
    def decode_nearest(self, z_e: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Encoder outputs z_e (B, D, h, w), e.g. a blend of two images', -> the images of their
        nearest codes (B, C, H, W). The codes are in range by construction: no range check (no
        value read back to the host, so a CUDA graph can record it)."""
        return self.decode_indices(self.quantizer.nearest(z_e, on_step), check=False)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """x -> its reconstruction through the codebook (`image` of the nearest codes). Never updates the codebook."""
        return self.decode_nearest(self.encode(x), on_step=on_step)

    @torch.no_grad()
    def sample_from(
        self,
        prior: nn.Module,
        uniforms: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
        labels: torch.Tensor | None = None,
        *,
        on_step: Callable[[torch.Tensor], None] | None = None,
        mode: str = "cached",
    ) -> torch.Tensor:
        """Images of code grids a prior over this VQ-VAE's codes draws from given noise: uniforms
        (B, h, w) (`prior.draw_noise`), a temperature (a float or (B,)), labels (B,) for a
        class-conditional prior. `on_step(logits)` sees each position's logits (B, K) before its
        draw (mode "stepped": right after it); `mode`: see `AutoregressivePrior.sample`."""
        codes = prior.sample(
            uniforms.shape[0], labels=labels, temperature=temperature, uniforms=uniforms, mode=mode,
            on_logits=None if on_step is None else lambda r, c, logits: on_step(logits),
        )  # (B, h, w)
        return self.decode_indices(codes)

    def codebook_digest(self) -> str:
        """sha256 of the codebook's float32 bytes; a prior records it to name the VQ-VAE it models."""
        codebook = self.quantizer.embedding.detach().float().cpu().contiguous()
        return hashlib.sha256(codebook.numpy().tobytes()).hexdigest()


def _spread(per_code: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Each code's nats (B, h, w) spread evenly over the pixels of its patch of the image: (B, H, W)."""
    h, w = per_code.shape[-2:]
    patch = size[0] * size[1] / (h * w)
    return F.interpolate(per_code[:, None], size=tuple(size), mode="nearest")[:, 0] / patch
