"""Test-split evaluation. Every number here is computed on held-out data, per image, in nats
unless it says otherwise, and is what the weight files' metadata and weights/README.md report."""

from __future__ import annotations

import math

import torch

from models.likelihood import bits_per_dim
from models.vae import VAE, kl_divergence
from models.vqvae import VQVAE
from training.data import ImageData


@torch.inference_mode()
def vae_neg_elbo(model: VAE, data: ImageData, batch_size: int = 500, seed: int = 0) -> dict[str, float]:
    """Test negative ELBO (one z sample per image, seeded), with its two terms, in nats per image."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    rec_sum = kl_sum = 0.0
    for index in torch.arange(len(data)).split(batch_size):
        x, _ = data.batch(index, device)
        mu, logvar = model.encode(x)
        z = model.reparameterize(mu, logvar, g)
        rec_sum += -model.log_likelihood(model.decode(z, context=x), x).double().sum().item()
        kl_sum += kl_divergence(mu, logvar).double().sum().item()
    n = len(data)
    return {"neg_elbo": (rec_sum + kl_sum) / n, "rec": rec_sum / n, "kl": kl_sum / n}


@torch.inference_mode()
def vae_iwae(
    model: VAE, data: ImageData, k: int = 1000, batch_size: int = 50, chunk: int = 100, seed: int = 0
) -> float:
    """Mean importance-weighted bound on test NLL (-log p(x) <= this), nats per image, float64."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for index in torch.arange(len(data)).split(batch_size):
        x, _ = data.batch(index, device)
        total += -model.iwae_bound(x, k, chunk=chunk, generator=g).sum().item()
    return total / len(data)


@torch.inference_mode()
def nll_bound(
    model: VAE | VQVAE,
    data: ImageData,
    *,
    k: int = 100,
    prior: torch.nn.Module | None = None,
    label_freqs: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    batch_size: int = 50,
    chunk: int = 25,
    seed: int = 0,
) -> dict[str, float]:
    """The one likelihood metric of the project: an upper bound on -log p(x) over `data`, in nats
    per image and in bits/dim (nats / (C H W ln 2)), float64. The model's pixel likelihood must
    be a normalised probability of 8-bit images (likelihood="logistic").

    - VAE: the IWAE-k bound (Burda et al. 2015, eq. 8), `VAE.iwae_bound`.
    - VQ-VAE: -log p(x | z_q(x)) - log P(z(x)), `VQVAE.nll` (which says why it is a bound). With
      `label_freqs` (Y,) a class-conditional prior's label is marginalised out; without them it is
      given each image's label, and the result bounds -log p(x | y) instead. Without a prior, P is
      uniform over the K^(h w) grids. `codes` (N, h, w): the code grids z* of `data` computed once
      elsewhere (the same z* must serve the decoder's and the prior's terms of one bound); by
      default the encoder's, computed here.
    """
    if getattr(model.config, "likelihood", None) != "logistic":
        raise ValueError(
            f"nll_bound needs a model whose likelihood is a probability of 8-bit images (likelihood='logistic'); "
            f"this one has likelihood={getattr(model.config, 'likelihood', None)!r}"
        )
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for index in torch.arange(len(data)).split(batch_size):
        x, y = data.batch(index, device)
        if isinstance(model, VAE):
            total += -model.iwae_bound(x, k, chunk=chunk, generator=g).sum().item()
            continue
        z = None if codes is None else codes[index].to(device)  # (B, h, w)
        labels = y if prior is not None and label_freqs is None and getattr(prior.config, "num_classes", 0) else None
        nll, _ = model.nll(x, prior, labels, label_freqs, z)  # (B,)
        total += nll.sum().item()
    nats = total / len(data)
    dims = data.images[0].numel()
    return {"nll_nats": nats, "bits_per_dim": float(bits_per_dim(torch.tensor(nats, dtype=torch.float64), dims))}


@torch.inference_mode()
def active_units(model: VAE, data: ImageData, threshold: float = 0.01, batch_size: int = 1000) -> int:
    """Latent dimensions whose posterior mean varies across inputs: Var_x(E_q[z_d]) > threshold
    (Burda et al. 2015, sec. 5.2)."""
    device = next(model.parameters()).device
    mus = [model.encode(data.batch(index, device)[0])[0].double() for index in torch.arange(len(data)).split(batch_size)]
    variance = torch.cat(mus).var(dim=0)  # (D,)
    return int((variance > threshold).sum().item())


def psnr(mse: float, peak: float = 1.0) -> float:
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf


@torch.inference_mode()
def reconstruction_quality(model: torch.nn.Module, data: ImageData, batch_size: int = 500) -> dict[str, float]:
    """Mean squared error per pixel of `model.reconstruct` on [0, 1] images, and the PSNR of that MSE.

    The same function scores the VAE (decoded from z = mu: a factorized decoder's mean image, an
    autoregressive decoder's sample with its fixed seed) and the VQ-VAE (decoded through the
    codebook), so the numbers are comparable.
    """
    device = next(model.parameters()).device
    se = 0.0
    for index in torch.arange(len(data)).split(batch_size):
        x, _ = data.batch(index, device)
        se += (model.reconstruct(x).clamp(0, 1) - x).double().pow(2).sum().item()
    mse = se / (len(data) * x[0].numel())
    return {"mse": mse, "psnr_db": psnr(mse)}


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity exp(-sum p log p) of a code histogram, codes used, and its entropy in bits."""
    p = counts.double() / counts.sum()
    nz = p[p > 0]
    entropy = -(nz * nz.log()).sum().item()
    return {"perplexity": math.exp(entropy), "codes_used": int((counts > 0).sum().item()), "entropy_bits": entropy / math.log(2)}
