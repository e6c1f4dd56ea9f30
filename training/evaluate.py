"""Test-split evaluation. Every number here is computed on held-out data, per image, in nats
unless it says otherwise, and is what the weight files' metadata and weights/README.md report."""

from __future__ import annotations

import math

import torch

from models.vae import VAE, kl_divergence, reconstruction_nll
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
        rec_sum += reconstruction_nll(model.decode(z, context=x), x).double().sum().item()
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

    The same function scores the VAE (Bernoulli means decoded from z = mu) and the VQ-VAE
    (decoded through the codebook), so the two numbers are comparable.
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
