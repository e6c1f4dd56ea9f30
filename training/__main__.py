"""Command line: python -m training {vae,vqvae,prior,card,convert,threshold} [options]. See README.md, "Training your own model"."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

from training.data import DATASETS, DataError, ImageData, load_dataset
from training.loop import LR_SCHEDULES, cleanup_distributed, setup_distributed


def _common(p: argparse.ArgumentParser, default_name: str, default_epochs: int, default_lr: float, default_batch: int) -> None:
    p.add_argument("--data", default="fashion-mnist", help=f"one of {', '.join(DATASETS)} or a folder of images")
    p.add_argument("--data-root", default=None, help="folder holding the data set's files")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST/CIFAR-10 (needs internet)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="image folders: crop and resize to N x N (default: train/test folders keep their own size, others 28)")
    p.add_argument("--image-channels", type=int, choices=(1, 3), default=None, help="image folders: 1 (L) or 3 (RGB)")
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--batch-size", type=int, default=default_batch, help="per process")
    p.add_argument("--lr", type=float, default=default_lr)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="cosine: anneal from --lr at the first step to --min-lr at the last step of --epochs")
    p.add_argument("--min-lr", type=float, default=0.0, help="the cosine schedule's final learning rate")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="end after this epoch, on the learning-rate schedule of --epochs; continue with --resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--name", default=default_name, help="the model's name in the service")
    p.add_argument("--out", default=None, help=f"weight file (default weights/{default_name}.safetensors)")
    p.add_argument("--run-dir", default=None, help="where GIFs and the resume checkpoint go (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.safetensors")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument(
        "--val-size", type=int, default=None,
        help="validation images carved from the end of the training set, for choosing the best epoch "
        "(default: min(5000, a tenth of the training images)); the test split is only used at the end",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_splits(args: argparse.Namespace) -> tuple[ImageData, ImageData, ImageData]:
    """(train, validation, test) as a run's arguments name them: validation is the last --val-size
    training images (default min(5000, a tenth)), so a run's command always rebuilds the same split."""
    kwargs = dict(root=args.data_root, download=args.download, image_size=args.image_size, channels=args.image_channels)
    train = load_dataset(args.data, "train", **kwargs).subset(args.limit_train)
    test = load_dataset(args.data, "test", **kwargs).subset(args.limit_test)
    val_size = args.val_size if args.val_size is not None else min(5000, max(1, len(train) // 10))
    train, val = train.split_last(val_size)
    return train, val, test


def build_parser() -> argparse.ArgumentParser:
    from training import card, convert, prior, threshold, vae, vqvae

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="family", required=True)
    p = sub.add_parser("vae", help="train a VAE (MLP or conv)")
    _common(p, "vae", 20, 1e-3, 128)
    vae.add_arguments(p)
    p = sub.add_parser("vqvae", help="train a VQ-VAE")
    _common(p, "vqvae", 15, 2e-4, 128)
    vqvae.add_arguments(p)
    p = sub.add_parser("prior", help="train an autoregressive prior over a VQ-VAE's codes")
    _common(p, "prior", 20, 1e-3, 64)
    prior.add_arguments(p)
    p = sub.add_parser("card", help="write weights/README.md from the weight files' metadata")
    card.add_arguments(p)
    p = sub.add_parser("convert", help="store weight files in another dtype (float16) and re-measure their metrics")
    convert.add_arguments(p)
    p = sub.add_parser("threshold", help="store an out-of-distribution score's threshold, set on validation, in weight files")
    threshold.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.family == "card":
        from training import card

        card.run(args)
        return 0
    if args.family == "convert":
        from training import convert

        return convert.run(args)
    if args.family == "threshold":
        from training import threshold

        return threshold.run(args)
    if not (math.isfinite(args.lr) and args.lr > 0) or not 0 <= args.min_lr <= args.lr:
        print(f"error: need --lr > 0 and 0 <= --min-lr <= --lr, got --lr {args.lr} --min-lr {args.min_lr}", file=sys.stderr)
        return 2
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        print(f"error: --stop-after {args.stop_after} must be between 1 and --epochs {args.epochs}", file=sys.stderr)
        return 2
    args.command = "python -m training " + shlex.join(argv)
    args.out = args.out or f"weights/{args.name}.safetensors"
    args.run_dir = args.run_dir or f"runs/{args.name}"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from training import prior, vae, vqvae

    module = {"vae": vae, "vqvae": vqvae, "prior": prior}[args.family]
    try:
        rank, world, device = setup_distributed(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train, val, test = load_splits(args)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"{args.family}: {train.name} {len(train)} train / {len(val)} validation / {len(test)} test images "
              f"of shape {train.image_shape}, device {device}, {world} process(es)", flush=True)
    start = time.time()
    torch.manual_seed(args.seed)  # model initialisation is part of the run's reproducibility
    try:
        module.run(args, train, val, test, device, rank, world)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if rank == 0:
        print(f"done in {time.time() - start:.0f} s; weights in {args.out}, pictures in {Path(args.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
