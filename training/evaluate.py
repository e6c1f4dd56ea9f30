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
    - VQ-VAE: -log p(x | z_q(x)) - log P(z(x)). For any code grid z*, p(x) = sum_z P(z) p(x|z)
      >= P(z*) p(x|z*), so this bounds -log p(x) with z* the encoder's codes. P is `prior`: with
      `label_freqs` (Y,) the label is marginalised out, P(z) = sum_y p(y) P(z|y), and the result
      bounds -log p(x); a class-conditional prior without them is given each image's label, and
      the result bounds -log p(x | y) instead (lower on average: it is told the class). Without a
      prior, P is uniform over the K^(h w) grids (log K nats per code). `codes` (N, h, w): the code
      grids z* of `data` computed once elsewhere (the same z* must serve the decoder's and the prior's
      terms of one bound); by default the encoder's, computed here.
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
        z = model.encode_indices(x) if codes is None else codes[index].to(device)  # (B, h, w)
        nll = -model.log_likelihood(model.decode(model.quantizer.lookup(z)), x).double()  # (B,)
        if prior is None:
            nll = nll + z[0].numel() * math.log(model.config.codebook_size)
        elif label_freqs is not None:
            nll = nll - marginal_log_prob(prior, z, label_freqs)
        else:
            labels = y if getattr(prior.config, "num_classes", 0) else None
            nll = nll - prior.log_prob(z, labels).double()
        total += nll.sum().item()
    nats = total / len(data)
    dims = data.images[0].numel()
    return {"nll_nats": nats, "bits_per_dim": float(bits_per_dim(torch.tensor(nats, dtype=torch.float64), dims))}


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
