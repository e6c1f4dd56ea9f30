"""Decoding speed of the VAE: autoregressive (windowed, as served) vs autoregressive (naive) vs factorized.

The autoregressive decoder generates pixel by pixel. `VAE.decode(z)` runs the masked-conv context
on a small window around each pixel (all that pixel can read); the naive way reruns it on the
whole image at every step. Both must give the same image; the factorized decoder of the same
encoder and z path is the yardstick. Models are built at the shipped configs with seeded random
weights, or loaded from weight files with --weights (pass one autoregressive file; the factorized
column then uses a random model of the same size).

    python benchmarks/vae_decoding.py --threads 1
    python benchmarks/vae_decoding.py --weights weights/vae.safetensors --n 1 16 64 256
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.io import load_model  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402


def naive_generate(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """The reference: decode z's features once, then rerun the masked-conv context and the head on
    the whole image once per pixel and keep that pixel's logits."""
    c, hh, ww = model.image_shape
    h = model.decoder(z)  # (N, ar_channels, H, W)
    x = z.new_zeros(z.shape[0], c, hh, ww)
    logits = torch.empty_like(x)
    for r in range(hh):
        for col in range(ww):
            out = model.ar_head(h + model.ar_context(x))[:, :, r, col]  # (N, C)
            logits[:, :, r, col] = out
            x[:, :, r, col] = torch.sigmoid(out)
    return logits


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 64], help="images per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument("--naive-max-n", type=int, default=64, help="skip the (slow) naive decoder above this n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=None, help="an autoregressive VAE weight file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    if args.weights:
        ar, info = load_model(args.weights)
        if not ar.config.autoregressive:
            parser.error(f"{args.weights} has a factorized decoder; pass an autoregressive VAE")
        source = str(args.weights)
    else:
        ar = VAE(VAEConfig(arch="conv", latent_dim=32, fc_dim=512, decoder="autoregressive"))
        source = f"seeded random weights (seed {args.seed})"
    factorized = VAE(dataclasses.replace(ar.config, decoder="factorized"))
    ar.eval(), factorized.eval()
    cfg = ar.config
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} (naive: one run); {source}; "
          f"ar_channels={cfg.ar_channels}, ar_kernel={cfg.ar_kernel}, ar_layers={cfg.ar_layers}, "
          f"image {list(ar.image_shape)}")
    header = f"{'n':>4} {'naive AR s':>11} {'windowed AR s':>14} {'factorized s':>13} {'window x':>9} {'AR / factorized':>16}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    with torch.inference_mode():
        for n in args.n:
            z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(args.seed))
            windowed, logits = median_time(lambda: ar.decode(z), args.repeats)
            fact, _ = median_time(lambda: factorized.decode(z), args.repeats)
            if n <= args.naive_max_n:
                naive, reference = median_time(lambda: naive_generate(ar, z), 1)
                # the same image up to float rounding (summation order differs in the window)
                worst = max(worst, (torch.sigmoid(logits) - torch.sigmoid(reference)).abs().max().item())
                assert worst < 1e-4, f"n={n}: windowed and naive images differ by {worst}"
                naive_s, speedup = f"{naive:>11.3f}", f"{naive / windowed:>8.1f}x"
            else:
                naive_s, speedup = f"{'-':>11}", f"{'-':>9}"
            print(f"{n:>4} {naive_s} {windowed:>14.3f} {fact:>13.4f} {speedup} {windowed / fact:>15.0f}x", flush=True)
    print(f"images: windowed and naive decoders agree to {worst:.1e} (max abs pixel difference) wherever both ran")


if __name__ == "__main__":
    main()
