"""Drawing speed of the autoregressive VAE: wavefront order (as served) vs raster order vs factorized.

The autoregressive decoder draws every pixel from its distribution and feeds the drawn value back.
Raster order draws one pixel a step and reruns the masked context stack on the whole image (784
steps at 28x28). The wavefront order draws at once every pixel with the same col + (r + 1) row, r
the context's reach, and computes the context at those pixels only (136 steps at 28x28, r = 3).
From the same uniforms both must draw the same pixels; the script counts the pixels that differ
(float32 can flip a draw where a uniform sits on a bin edge; tests/models/test_vae.py checks exact
equality in float64). The factorized decoder of the same z path is the yardstick. Models are built
at the shipped config with seeded random weights, or loaded with --weights (an autoregressive
file; the factorized column then uses a random model of the same size).

    python -m benchmarks.vae_decoding
    python -m benchmarks.vae_decoding --weights weights/vae.safetensors --n 1 16 64 256
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from models.io import load_model
from models.vae import VAE, VAEConfig


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_decoding", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 64], help="images per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is shown")
    parser.add_argument("--raster-max-n", type=int, default=64, help="skip the (slow) raster order above this n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=None, help="an autoregressive VAE weight file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.weights:
        ar, _ = load_model(args.weights)
        if not ar.config.autoregressive:
            parser.error(f"{args.weights} has a factorized decoder; pass an autoregressive VAE")
    else:
        ar = VAE(VAEConfig(arch="conv", latent_dim=32, fc_dim=512, decoder="autoregressive", likelihood="logistic"))
    factorized = VAE(dataclasses.replace(ar.config, decoder="factorized")).eval()
    ar.eval()
    cfg = ar.config
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} (raster: one "
          f"run); {args.weights or f'seeded random weights (seed {args.seed})'}; likelihood={cfg.likelihood}, "
          f"ar_kernel={cfg.ar_kernel}, ar_layers={cfg.ar_layers}, image {list(ar.image_shape)}; steps: raster "
          f"{len(ar.generation_steps('raster'))}, wavefront {len(ar.generation_steps('wavefront'))}")
    header = f"{'n':>4} {'raster s':>9} {'wavefront s':>12} {'factorized s':>13} {'raster / wavefront':>19} {'differing pixels':>17}"
    print(header + "\n" + "-" * len(header))
    with torch.inference_mode():
        for n in args.n:
            g = torch.Generator().manual_seed(args.seed)
            z = torch.randn(n, cfg.latent_dim, generator=g)
            u = torch.rand(ar.uniform_shape(n), generator=g)
            ar.generate(z, uniforms=u)  # warm-up (and the cached plan)
            wave, fast = median_time(lambda: ar.generate(z, uniforms=u), args.repeats)
            fact, _ = median_time(lambda: factorized.generate(z), args.repeats)
            cols = f"{'-':>9}", f"{'-':>19}", f"{'-':>17}"
            if n <= args.raster_max_n:
                raster, reference = median_time(lambda: ar.generate(z, uniforms=u, order="raster"), 1)
                differ = int((fast != reference).any(1).sum())
                cols = f"{raster:>9.3f}", f"{raster / wave:>18.1f}x", f"{differ:>8} of {n * fast[0, 0].numel()}"
            print(f"{n:>4} {cols[0]} {wave:>12.4f} {fact:>13.4f} {cols[1]} {cols[2]}", flush=True)


if __name__ == "__main__":
    main()
