"""Sampling speed of the priors: sample(mode=) "naive" vs "cropped" vs "cached", side by side.

Each prior is built at the default serving config (codebook_size=256, hidden_channels=64, 7x7
codes, the default layer counts, unconditional) with seeded random weights, or loaded from
trained weight files with --weights. For each n, every sampler draws from the same seeded
uniforms; the table shows the median wall time of --repeats runs under torch.inference_mode()
and the speed-up over "naive", and counts the grids a fast mode drew differently (float32
rounding where a uniform sits on a cumulative-probability edge; in float64 they are identical).

    python -m benchmarks.sampling --threads 1
    python -m benchmarks.sampling --weights weights/vqvae_pixelcnn.safetensors --n 1 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from models.io import load_model
from models.pixelcnn import GatedPixelCNN, PixelCNN
from models.pixelcnnpp import PixelCNNpp

SAMPLERS = ("naive", "cropped", "cached")  # the modes of sample(..., mode=)


def default_priors(seed: int) -> dict[str, nn.Module]:
    priors = {}
    for cls in (PixelCNN, GatedPixelCNN, PixelCNNpp):
        torch.manual_seed(seed)
        priors[cls.KIND] = cls(cls.config_class(codebook_size=256, code_shape=(7, 7), hidden_channels=64)).eval()
    return priors


def time_samplers(model: nn.Module, n: int, repeats: int, seed: int, differing: list[int]) -> dict[str, float]:
    """Median seconds per call of each mode for n grids. Adds to differing[0] the grids a fast mode drew
    differently from the naive one, and to differing[1] the grids compared."""
    num_classes = model.config.num_classes
    labels = torch.arange(n) % num_classes if num_classes else None
    times: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    with torch.inference_mode():
        for _ in range(repeats):
            codes = {}
            for name in SAMPLERS:
                generator = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                codes[name] = model.sample(n, labels, generator=generator, mode=name)
                times[name].append(time.perf_counter() - start)
            for name in SAMPLERS[1:]:
                differing[0] += int((codes[name] != codes["naive"]).flatten(1).any(1).sum())
                differing[1] += n
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16, 64], help="grids per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sampler; the median is shown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, nargs="*", default=[], help="prior weight files instead of random ones")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.weights:
        priors = {f"{info.kind}:{info.name}": model for model, info in map(load_model, args.weights)}
        source = ", ".join(map(str, args.weights))
    else:
        priors = default_priors(args.seed)
        source = f"seeded random weights (seed {args.seed}), codebook_size=256, hidden_channels=64, 7x7"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}; {source}")
    header = f"{'prior':<16} {'n':>4} {'naive s':>9} {'cropped s':>10} {'cached s':>9} {'cropped x':>10} {'cached x':>9}"
    print(header + "\n" + "-" * len(header))
    differing = [0, 0]
    for name, model in priors.items():
        for n in args.n:
            t = time_samplers(model, n, args.repeats, args.seed, differing)
            print(f"{name:<16} {n:>4} {t['naive']:>9.3f} {t['cropped']:>10.3f} {t['cached']:>9.3f} "
                  f"{t['naive'] / t['cropped']:>9.1f}x {t['naive'] / t['cached']:>8.1f}x", flush=True)
    print(f"codes: {differing[0]} of {differing[1]} grids drawn by a fast mode differ from the naive mode's "
          "(float32 rounding at cumulative-probability edges; in float64 they are identical)")


if __name__ == "__main__":
    main()
