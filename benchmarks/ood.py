"""Out-of-distribution detection with the shipped Fashion-MNIST models (issue 25): AUROC and the
false-positive rate at 95% true-positive rate of each score, against sets made here.

In-distribution: the first --n images of Fashion-MNIST's test split. Out-of-distribution sets, --n
images each, made offline from what this machine has:
- cifar10-grey: --n images drawn at random from CIFAR-10's test split (the JPEG copy, extracted;
  --cifar10), turned grey (Pillow's "L") and resized to 28x28 (bilinear);
- digits: MNIST-like digits drawn here (`digits`: white strokes of Pillow's font on black, shifted and
  rotated at random), the set on which likelihoods are known to fail (Nalisnick et al. 2019 used MNIST);
- noise: uniform 8-bit noise, every pixel on its own;
- constant: one grey level per image, uniform over 0..255;
- flipped: the same Fashion-MNIST test images turned upside down (close to the data: the same
  strokes, textures and intensities in a layout the models never saw);
- inverted: the same test images as negatives, 255 - x.

Scores, each "higher is more unusual":
- bits/dim: the model's bound on -log2 p(x) per dimension (models' `iwae_bound` with --k samples /
  `VQVAE.nll` under the best prior, label marginalised), the raw likelihood;
- ratio: bits/dim of the model minus that of `vae_context`, the same autoregressive decoder without a
  latent (Ren et al. 2019's likelihood ratio, the background model knowing only local statistics);
- png / webp: bits/dim minus the codec's for the image alone (Serrà et al. 2020's input complexity).
- ratio+webp (`vae` only): bits/dim minus the mean of the two backgrounds' bits/dim, `vae_context`'s
  and WebP's, i.e. (ratio + webp) / 2: the latent's layout and the codec's complexity in one score.

AUROC: the probability that an out-of-distribution image scores above an in-distribution one (ties
half), by ranks. FPR@95: the threshold accepts 95% of the in-distribution images (its 95th
percentile); the fraction of the set's images it also accepts.

    python -m benchmarks.ood --cifar10 /tmp/data/cifar10 --n 1000 --k 20
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks.harness import ROOT, table
from models.complexity import codec_bits_per_dim
from models.io import load_model
from models.vae import VAE
from training.data import load_dataset
from training.ood import auroc, fpr_at_95

MODELS = ("vae", "vae_context", "vae_conv", "vae_mlp_logistic", "vqvae")


def sets(n: int, cifar10: Path | None, seed: int) -> dict[str, torch.Tensor]:
    """name -> uint8 images (n, 1, 28, 28); the first is in-distribution."""
    g = torch.Generator().manual_seed(seed)
    fashion = load_dataset("fashion-mnist", "test").images[:n]
    out = {"fashion-mnist": fashion}
    if cifar10 is not None:
        files = sorted((cifar10 / "test").glob("*/*.jpg"))
        if not files:
            raise SystemExit(f"no images under {cifar10 / 'test'}: extract the CIFAR-10 JPEG copy there first")
        chosen = [files[i] for i in torch.randperm(len(files), generator=g)[:n].tolist()]
        out["cifar10-grey"] = torch.stack([grey28(f) for f in chosen])
    out["digits"] = digits(n, g)
    out["noise"] = torch.randint(256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    out["constant"] = torch.randint(256, (n, 1, 1, 1), generator=g, dtype=torch.uint8).expand(n, 1, 28, 28).clone()
    out["flipped"] = fashion.flip(-2)
    out["inverted"] = 255 - fashion
    return out


def digits(n: int, g: torch.Generator) -> torch.Tensor:
    """MNIST-like images (n, 1, 28, 28) uint8: a digit 0-9 in white on black, drawn with Pillow's
    built-in scalable font at 18-24 px, stroke width 0-2, shifted by up to 3 pixels, rotated by up
    to 15 degrees (each draw from `g`)."""
    out = []
    for _ in range(n):
        digit, size, stroke, dx, dy = (int(v) for v in (torch.randint(10, (1,), generator=g), torch.randint(18, 25, (1,), generator=g),
                                                          torch.randint(0, 3, (1,), generator=g), torch.randint(-3, 4, (1,), generator=g),
                                                          torch.randint(-3, 4, (1,), generator=g)))
        angle = float(torch.rand(1, generator=g)) * 30 - 15
        image = Image.new("L", (28, 28))
        ImageDraw.Draw(image).text((14 + dx, 14 + dy), str(digit), fill=255, font=ImageFont.load_default(size=size),
                                   anchor="mm", stroke_width=stroke, stroke_fill=255)
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(image).copy())[None])
    return torch.stack(out)


def grey28(path: Path) -> torch.Tensor:
    """A colour image turned grey (Pillow's "L": ITU-R 601 luma) and resized to 28x28 (bilinear): (1, 28, 28) uint8."""
    with Image.open(path) as image:
        grey = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(grey).copy())[None]


@torch.inference_mode()
def bits_per_dim(name: str, images: torch.Tensor, k: int, seed: int, batch: int = 100) -> torch.Tensor:
    """The model's bound on -log2 p(x) per dimension for each image (n,), float64."""
    model, _ = load_model(ROOT / "weights" / f"{name}.safetensors")
    prior = None
    if name == "vqvae":
        prior, _ = load_model(ROOT / "weights" / "vqvae_gated.safetensors")
    g = torch.Generator().manual_seed(seed)
    nats = []
    for chunk in images.split(batch):
        x = chunk.float() / 255
        if isinstance(model, VAE):
            nats.append(-model.iwae_bound(x, k, chunk=k, generator=g))
        else:
            nats.append(model.nll_labelled(prior, x, torch.full((len(x),), -1))[0])
    return torch.cat(nats) / (images[0].numel() * math.log(2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__.splitlines()[0])
    p.add_argument("--cifar10", type=Path, help="the CIFAR-10 JPEG copy, extracted (cifar10/{train,test}/{class}/*.jpg)")
    p.add_argument("--n", type=int, default=1000, help="images per set")
    p.add_argument("--k", type=int, default=20, help="importance samples per image (VAEs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = sets(args.n, args.cifar10, args.seed)
    print(f"# {args.n} images per set, k={args.k}, seed {args.seed}, torch {torch.__version__}, {args.threads} thread(s)")
    codecs = {c: {s: codec_bits_per_dim(x, c) for s, x in data.items()} for c in ("png", "webp")}
    print(table(["set", "png bits/dim", "webp bits/dim"],
                [[s, f"{codecs['png'][s].mean():.3f}", f"{codecs['webp'][s].mean():.3f}"] for s in data]))
    bpd: dict[str, dict[str, torch.Tensor]] = {}
    for name in dict.fromkeys([*args.models, "vae_context"] if "vae" in args.models else args.models):
        start = time.perf_counter()
        bpd[name] = {s: bits_per_dim(name, x, args.k, args.seed) for s, x in data.items()}
        means = ", ".join(f"{s} {v.mean():.3f}" for s, v in bpd[name].items())
        print(f"{name}: mean bits/dim {means} ({time.perf_counter() - start:.0f} s)")
    rows = []
    inside = "fashion-mnist"
    for name in args.models:
        scores = {"bits/dim": bpd[name], **{c: {s: bpd[name][s] - codecs[c][s] for s in data} for c in ("png", "webp")}}
        if name == "vae" and "vae_context" in bpd:
            scores["ratio"] = {s: bpd["vae"][s] - bpd["vae_context"][s] for s in data}
            scores["ratio+webp"] = {s: (scores["ratio"][s] + scores["webp"][s]) / 2 for s in data}
        for score, values in scores.items():
            cells = [f"{auroc(values[inside], values[s]):.3f} / {fpr_at_95(values[inside], values[s]):.3f}" for s in data if s != inside]
            rows.append([name, score, *cells])
    print("\nAUROC / FPR@95 (in-distribution: Fashion-MNIST test; higher AUROC and lower FPR are better)")
    print(table(["model", "score", *[s for s in data if s != inside]], rows))


if __name__ == "__main__":
    main()
