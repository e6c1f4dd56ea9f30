"""`python -m training threshold --score webp weights/vae.safetensors weights/vqvae_gated.safetensors`: store
in each weight file the out-of-distribution threshold of a score, set on the validation split.

The score of an image is "higher is more unusual" (benchmarks/ood.py measures how well each works):
- `bits`: the model's bound on -log2 p(x) per dimension (raw likelihood; known to fail on simple images);
- `png` / `webp`: that bound minus a lossless codec's bits/dim for the image alone (input complexity,
  Serrà et al. 2020), the best of the three on every set benchmarks/ood.py measured but one.
The bound is what POST /score computes: a VAE's IWAE-k (`--k` samples from `--seed`), a prior's
-log p(x | z_q) - log P(z) with its VQ-VAE (the file named by the prior's `extra["vqvae"]` beside it),
the label marginalised over equally likely classes.

The threshold is the `--accept` quantile (default 0.95) of the scores of the validation split the
file was trained with (its command's data and --val-size: the last images of the training split),
never the test split. It goes into the file's `extra["ood"]` with the score's definition, and the
file's `command` gains this invocation; tensors and metrics are unchanged (the file is rewritten in
the dtype it was stored in). GET /models shows it, and POST /score answers a verdict against it.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from models.complexity import codec_bits_per_dim
from models.io import STORAGE_DTYPES, WeightFileError, load_model, save_model
from models.vae import VAE
from training.data import DataError, ImageData
from training.ood import threshold_at

SCORES = ("bits", "png", "webp")
DEFINITIONS = {
    "bits": "bits_per_dim: the bound on -log2 p(x) per dimension",
    "png": "complexity_score.png: bits_per_dim minus PNG's (zlib level 9) bits/dim for the image alone",
    "webp": "complexity_score.webp: bits_per_dim minus WebP lossless's (method 6, quality 100) bits/dim for the image alone",
}


ROWS_PER_BATCH = 1000  # a VAE's importance samples decoded at once, by default


def default_batch_size(model: torch.nn.Module, k: int) -> int:
    """Images a batch: a VAE's batch holds at most ROWS_PER_BATCH importance samples (one image where k is more)."""
    return max(1, ROWS_PER_BATCH // k) if isinstance(model, VAE) else 100


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="VAE or prior weight files, rewritten in place")
    p.add_argument("--score", choices=SCORES, default="webp", help="default %(default)s")
    p.add_argument("--accept", type=float, default=0.95, help="share of validation images at or under the threshold")
    p.add_argument("--k", type=int, default=100, help="VAE: importance samples per image (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="VAE: seed of the importance samples")
    p.add_argument("--data-root", default=None, help="folder holding the data set's files (default: as trained)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"images a batch (default: a VAE max(1, {ROWS_PER_BATCH} // k), so that a batch holds at most "
                        f"{ROWS_PER_BATCH} rows of importance samples, or one image where k is more; a prior 100)")
    p.add_argument("--threads", type=int, default=None)


@torch.inference_mode()
def scores(model: torch.nn.Module, prior: torch.nn.Module | None, data: ImageData, score: str, k: int, seed: int,
           batch_size: int | None = None) -> torch.Tensor:
    """Each image's score (n,) float64, as POST /score computes it (its bits_per_dim, or its complexity_score):
    a VAE's IWAE bound from the same noise (`draw_score_noise`, a batch at a time), by `iwae_bound_from`, which
    reads an autoregressive decoder's context once per image where /score's rows read it once per sample (the
    two agree to float rounding: tests/app/test_score.py).
    `batch_size` images a batch; by default a VAE's batch holds at most ROWS_PER_BATCH rows (images x k): a
    batch of 100 images x k = 100 decodes 10,000 images at once and runs out of the caches (ten times slower)."""
    batch_size = default_batch_size(model, k) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    nats = []
    for index in torch.arange(len(data)).split(batch_size):
        x, _ = data.batch(index, torch.device("cpu"))
        if isinstance(model, VAE):  # the k samples of a batch decoded at once: at most ROWS_PER_BATCH rows by default
            nats.append(-model.iwae_bound_from(x, model.draw_score_noise(len(x), k, g), chunk=k))
        else:
            nats.append(model.nll_labelled(prior, x, torch.full((len(x),), -1))[0])
    bits = torch.cat(nats) / (data.images[0].numel() * math.log(2))
    return bits if score == "bits" else bits - codec_bits_per_dim(data.images, score)


def set_threshold(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from training.__main__ import load_splits
    from training.convert import training_args

    model, info = load_model(path)
    prior = None
    if info.kind in ("pixelcnn", "gated_pixelcnn", "pixelcnnpp"):
        vq_path = path.with_name(f"{info.extra.get('vqvae')}.safetensors")
        prior, model = model, load_model(vq_path)[0]
        if model.codebook_digest() != info.extra.get("codebook_sha256"):
            raise ValueError(f"{vq_path.name}'s codebook is not the one this prior was trained on (codebook_sha256): "
                             "its scores would be of other codes")
    elif info.kind == "vae" and getattr(model.config, "likelihood", None) != "logistic":
        raise ValueError("its likelihood is not a probability of 8-bit images (likelihood='logistic'): it has no score")
    elif info.kind == "vqvae":
        raise ValueError("a VQ-VAE is scored under a prior: set the threshold on the prior's file")
    run_args = training_args(info.command)
    if args.data_root is not None:
        run_args.data_root = args.data_root
    _, val, _ = load_splits(run_args)
    vae = isinstance(model, VAE)
    batch = args.batch_size or default_batch_size(model, args.k)  # a VAE's noise is drawn a batch at a time: recorded
    values = scores(model, prior, val, args.score, args.k, args.seed, batch)
    ood = {
        "score": args.score,
        "definition": DEFINITIONS[args.score],
        "threshold": threshold_at(values, args.accept),
        "accept": args.accept,
        "split": f"validation: the last {len(val)} images of {val.name}'s training split, as trained",
        **({"k": args.k, "seed": args.seed} if vae else {}),
        "validation_scores": {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())},
    }
    extra = {**info.extra, "ood": ood}
    invocation = shlex.join(["python", "-m", "training", "threshold", "--score", args.score, "--accept", str(args.accept),
                             *(["--k", str(args.k), "--seed", str(args.seed), "--batch-size", str(batch)] if vae else []),
                             str(path)])
    dtype = STORAGE_DTYPES.get(info.metrics.get("weights_dtype", "float32"))
    stored = prior if prior is not None else model
    save_model(path, stored, name=info.name, dataset=info.dataset, command=f"{info.command} && {invocation}",
               metrics=info.metrics, extra=extra, image_shape=info.image_shape, class_names=info.class_names, dtype=dtype)
    return ood


def run(args: argparse.Namespace) -> int:
    if not 0 < args.accept < 1 or args.k < 1:
        print(f"error: need 0 < --accept < 1 and --k >= 1, got {args.accept} and {args.k}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    failed = 0
    for path in args.files:
        try:
            ood = set_threshold(path, args)
        except (ValueError, DataError, WeightFileError, FileNotFoundError) as err:
            print(f"{path}: not changed: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: {ood['score']} threshold {ood['threshold']:.4f} ({ood['accept']:.0%} of {ood['split']})", flush=True)
    return 1 if failed else 0
