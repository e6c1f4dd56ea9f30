"""Drawing speed of the autoregressive models in this process: the served fast path against the slow one.

- priors: sample(mode=) "naive" (the whole prior per code position) vs "cropped" vs "cached" (served).
  Bar: cached at least 3x naive at n=64.
- the autoregressive VAE: wavefront order (served: 136 steps at 28x28) vs raster order (784), the
  factorized decoder as the yardstick. Targets on the 2-core CPU, for the 28x28 one-layer `vae`: 1 image
  <= 40 ms, 64 <= 150 ms (the 32x32 colour `vae_cifar10_ar`, 3 layers, takes several times that).

Every path draws from the same seeded uniforms; the tables show the median of --repeats runs (raster:
one) and count what a fast path drew differently (float32 rounding at a bin edge; in float64 they are
identical, as the tests check). Models: seeded random ones at the shipped configs, or --weights files.

    python -m benchmarks.sampling --threads 1
    python -m benchmarks.sampling --weights weights/vqvae_pixelcnn.safetensors weights/vae.safetensors --n 1 64
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import table
from models.io import load_model
from models.pixelcnn import GatedPixelCNN, PixelCNN
from models.pixelcnnpp import PixelCNNpp
from models.vae import VAE, VAEConfig

SAMPLERS = ("naive", "cropped", "cached")  # the modes of sample(..., mode=)


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def prior_table(priors: dict[str, nn.Module], args) -> str:
    """Each mode in turn at each repeat, from the same seed; counts the grids a fast mode drew differently."""
    rows, differing, compared = [], 0, 0
    for name, model in priors.items():
        labels = lambda n: torch.arange(n) % model.config.num_classes if model.config.num_classes else None  # noqa: B023
        for n in args.n:
            times: dict[str, list[float]] = {mode: [] for mode in SAMPLERS}
            for _ in range(args.repeats):
                codes = {}
                for mode in SAMPLERS:
                    start = time.perf_counter()
                    codes[mode] = model.sample(n, labels(n), generator=torch.Generator().manual_seed(args.seed), mode=mode)
                    times[mode].append(time.perf_counter() - start)
                differing += sum(int((codes[m] != codes["naive"]).flatten(1).any(1).sum()) for m in SAMPLERS[1:])
                compared += n * (len(SAMPLERS) - 1)
            t = {mode: statistics.median(ts) for mode, ts in times.items()}
            rows.append([name, str(n), *(f"{t[s]:.3f}" for s in SAMPLERS), *(f"{t['naive'] / t[s]:.1f}x" for s in SAMPLERS[1:])])
    return (table(["prior", "n", "naive s", "cropped s", "cached s", "cropped x", "cached x"], rows) +
            f"\ncodes: {differing} of {compared} grids drawn by a fast mode differ from the naive mode's")


def vae_table(ar: VAE, args) -> str:
    factorized, cfg = VAE(dataclasses.replace(ar.config, decoder="factorized")).eval(), ar.config
    rows = []
    for n in args.n:
        g = torch.Generator().manual_seed(args.seed)
        z = torch.randn(n, cfg.latent_dim, generator=g)
        u = torch.rand(ar.uniform_shape(n), generator=g)
        ar.generate(z, uniforms=u)  # warm-up (and the cached plan)
        wave, fast = median_time(lambda: ar.generate(z, uniforms=u), args.repeats)  # noqa: B023
        fact, _ = median_time(lambda: factorized.generate(z), args.repeats)  # noqa: B023
        cols = ["-", "-", "-"]
        if n <= args.raster_max_n:
            raster, reference = median_time(lambda: ar.generate(z, uniforms=u, order="raster"), 1)  # noqa: B023
            cols = [f"{raster:.3f}", f"{raster / wave:.1f}x", f"{int((fast != reference).any(1).sum())} of {fast[:, 0].numel()}"]
        rows.append([str(n), cols[0], f"{wave:.4f}", f"{fact:.4f}", *cols[1:]])
    return (f"likelihood={cfg.likelihood}, ar_kernel={cfg.ar_kernel}, ar_layers={cfg.ar_layers}, image "
            f"{list(ar.image_shape)}; steps: raster {len(ar.generation_steps('raster'))}, wavefront "
            f"{len(ar.generation_steps('wavefront'))}\n" + table(["n", "raster s", "wavefront s", "factorized s",
                                                                   "raster / wavefront", "differing pixels"], rows))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 64], help="grids or images per call (default 1 16 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown (default 3)")
    parser.add_argument("--raster-max-n", type=int, default=64, help="skip the (slow) raster order above this n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, nargs="*", default=[],
                        help="prior and autoregressive VAE weight files instead of random models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    priors, vaes = {}, {}
    for path in args.weights:
        model, info = load_model(path)
        if info.kind in (PixelCNN.KIND, GatedPixelCNN.KIND, PixelCNNpp.KIND):
            priors[f"{info.kind}:{info.name}"] = model
        elif info.kind == "vae" and model.config.autoregressive:
            vaes[str(path)] = model
        else:
            parser.error(f"{path} is neither a prior nor an autoregressive VAE")
    if not args.weights:
        for cls in (PixelCNN, GatedPixelCNN, PixelCNNpp):
            torch.manual_seed(args.seed)
            priors[cls.KIND] = cls(cls.config_class(codebook_size=256, code_shape=(7, 7), hidden_channels=64)).eval()
        torch.manual_seed(args.seed)
        vaes[f"seeded random weights (seed {args.seed})"] = VAE(VAEConfig(
            arch="conv", latent_dim=32, fc_dim=512, decoder="autoregressive", likelihood="logistic")).eval()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    with torch.inference_mode():
        if priors:
            source = "--weights" if args.weights else f"seeded random weights (seed {args.seed})"
            print(f"\npriors, {source}:\n" + prior_table(priors, args), flush=True)
        for source, ar in vaes.items():
            print(f"\nautoregressive VAE, {source}: " + vae_table(ar, args), flush=True)


if __name__ == "__main__":
    main()
