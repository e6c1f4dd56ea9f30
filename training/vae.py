"""`python -m training vae`: train a VAE, keep the best epoch by validation negative ELBO, then evaluate it on test."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.io import load_model, save_model
from models.vae import VAE, VAEConfig
from training.data import ImageData
from training.evaluate import active_units, reconstruction_quality, vae_iwae, vae_neg_elbo
from training.loop import FitConfig, fit
from training.visuals import save_frame

GRID = 64  # images in each per-epoch picture


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=("mlp", "conv"), default="conv")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 128], help="MLP layer widths")
    p.add_argument("--conv-channels", type=int, nargs=2, default=[32, 64], help="conv stage channels")
    p.add_argument("--fc-dim", type=int, default=256, help="conv dense layer width")
    p.add_argument(
        "--decoder", choices=("factorized", "autoregressive"), default="factorized",
        help="conv: factorized p(x|z), or autoregressive p(x_i|z, x_<i) (PixelVAE-style masked conv)",
    )
    p.add_argument("--ar-channels", type=int, default=32, help="autoregressive decoder width")
    p.add_argument("--ar-kernel", type=int, default=7, help="autoregressive decoder mask-A kernel (odd)")
    p.add_argument("--ar-layers", type=int, default=1, help="mask-A layer plus (n - 1) 3x3 mask-B layers")
    p.add_argument(
        "--free-bits", type=float, default=0.0,
        help="training only: count each latent dimension's KL as at least this many nats (Kingma et al. 2016)",
    )
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples for the final IWAE bound")
    p.add_argument("--iwae-images", type=int, default=None, help="test images for the IWAE bound (default: all)")


def run(
    args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, device: torch.device, rank: int, world: int
) -> None:
    if args.free_bits < 0:
        raise ValueError(f"free_bits must be >= 0 nats per latent dimension, got {args.free_bits}")
    c, h, w = train.image_shape
    config = VAEConfig(
        arch=args.arch, in_channels=c, image_size=h, latent_dim=args.latent_dim,
        hidden_dims=tuple(args.hidden_dims), channels=tuple(args.conv_channels), fc_dim=args.fc_dim,
        decoder=args.decoder, ar_channels=args.ar_channels, ar_kernel=args.ar_kernel, ar_layers=args.ar_layers,
    )
    model = VAE(config).to(device)
    fixed_x, _ = val.batch(torch.arange(min(GRID, len(val))), device)
    fixed_z = torch.randn(GRID, config.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def loss_fn(m: VAE, index: torch.Tensor):
        x, _ = train.batch(index, device)
        return m.loss(x, free_bits=args.free_bits)

    def evaluate(m: VAE) -> dict[str, float]:
        return {"val_neg_elbo": vae_neg_elbo(m, val)["neg_elbo"]}  # selection never looks at test

    def save_best(m: VAE, metrics: dict) -> None:
        save_model(args.out, m, name=args.name, dataset=train.name, command=args.command, metrics=metrics)

    def pictures(m: VAE, epoch: int) -> None:
        with torch.inference_mode():
            save_frame(args.run_dir, "inputs", epoch, fixed_x)
            save_frame(args.run_dir, "reconstructions", epoch, m.reconstruct(fixed_x))
            save_frame(args.run_dir, "samples", epoch, m.sample(GRID, z=fixed_z))

    fit_config = FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        run_dir=Path(args.run_dir), resume=args.resume, best_key="val_neg_elbo", progress=not args.quiet,
    )
    state = fit(model, fit_config, n_train=len(train), loss_fn=loss_fn, evaluate=evaluate,
                save_best=save_best, on_epoch_end=pictures, rank=rank, world=world, desc=f"vae-{args.arch}")
    if rank != 0:
        return
    best, info = load_model(args.out, device)
    iwae_data = test.subset(args.iwae_images)
    elbo = vae_neg_elbo(best, test)
    metrics = {
        **info.metrics,
        "test_neg_elbo": elbo["neg_elbo"], "test_rec": elbo["rec"], "test_kl": elbo["kl"],
        "test_iwae_nll": vae_iwae(best, iwae_data, k=args.iwae_k),
        "iwae_k": args.iwae_k, "iwae_images": len(iwae_data),
        "active_units": active_units(best, test), "latent_dim": config.latent_dim,
        "epochs_trained": state["epoch"], "best_epoch": state["best_epoch"],
        "train_images": len(train), "val_images": len(val), "test_images": len(test),
        **{f"test_{k}": v for k, v in reconstruction_quality(best, test).items()},
    }
    save_model(args.out, best, name=args.name, dataset=train.name, command=args.command, metrics=metrics)
    print(
        f"{args.out}: test -ELBO {metrics['test_neg_elbo']:.2f} nats, IWAE-{args.iwae_k} bound on NLL "
        f"{metrics['test_iwae_nll']:.2f} nats ({len(iwae_data)} images), active units "
        f"{metrics['active_units']}/{config.latent_dim}, best epoch {state['best_epoch']}"
    )
