"""What zlib's level costs and saves on the PNGs the service writes (GENSERVE_PNG_COMPRESSION).

Answers of the shipped models (seeded samples and reconstructions, as /sample and /reconstruct
return them: one grid), encoded by app/imaging.py's grid_png at each --levels, in this process on
one thread: the median encode time of --repeats, the bytes, and both against Pillow's default 6.

    python -m benchmarks.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.imaging import grid_png
from benchmarks.harness import ROOT, table
from models.io import load_model

CASES = (("vae_conv", 1), ("vae_conv", 16), ("vae_cifar10", 16), ("vqvae", 64))  # (model, images)


def answer(name: str, n: int) -> torch.Tensor:
    """n seeded images (B, C, H, W) as the model serves them: a VQ-VAE's reconstructions, a VAE's samples."""
    model, _ = load_model(ROOT / "weights" / f"{name}.safetensors")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if name.startswith("vqvae"):
            return model.reconstruct(torch.rand(n, *model.image_shape, generator=g))
        return model.sample(n, g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.png", description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 3, 6, 9], choices=range(10))
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, n in CASES:
        images = answer(name, n)
        measured = {}
        for level in sorted({*args.levels, 6}):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                png = grid_png(images, None, level)
                times.append(time.perf_counter() - start)
            measured[level] = statistics.median(times), len(png)
        t6, b6 = measured[6]
        rows += [[f"{name} n={n}", str(level), f"{t * 1e6:.0f}", str(size), f"{t6 / t:.2f}x", f"{size / b6:.2f}x"]
                 for level, (t, size) in measured.items() if level in args.levels]
    print(table(["answer", "level", "encode us", "bytes", "speed vs 6", "bytes vs 6"], rows))


if __name__ == "__main__":
    main()
