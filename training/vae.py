"""`python -m training vae`: train a VAE, keep the best epoch by validation negative ELBO, then evaluate it on test.

With `--likelihood logistic` the test metric is the IWAE-k bound on -log p(x) in bits/dim
(training/evaluate.py, `nll_bound`); with the tutorial's Bernoulli loss on grey pixels the
numbers are grey-pixel BCE, which is not a likelihood of 8-bit images, and are named so."""

from __future__ import annotations

import argparse

import torch

from models.vae import LIKELIHOODS, VAE, VAEConfig
from training.data import ImageData
from training.evaluate import active_units, nll_bound, reconstruction_quality, vae_iwae, vae_neg_elbo
from training.loop import FitConfig, best_saver, finish, fit, stopped_early
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
        "--likelihood", choices=LIKELIHOODS, default="logistic",
        help="logistic: discretized logistic mixture, a likelihood of 8-bit images (bits/dim); "
        "bernoulli: the tutorial's BCE on grey pixels, not a likelihood of 8-bit images",
    )
    p.add_argument("--num-mixtures", type=int, default=5, help="logistic: mixture components per pixel")
    p.add_argument(
        "--mean-mse-weight", type=float, default=0.0,
        help="logistic: add this times the squared error of the mixture's mean image (per subpixel) to the "
             "objective, so the decoder learns its means early (colour data); the bounds stay the model's",
    )
    p.add_argument(
        "--no-latent", action="store_true",
        help="the context-only baseline: the decoder is fed z = 0 (use with --decoder autoregressive)",
    )
    p.add_argument(
        "--free-bits", type=float, default=0.0,
        help="training only: count each latent dimension's KL as at least this many nats (Kingma et al. 2016)",
    )
    p.add_argument("--iwae-k", type=int, default=100, help="importance samples for the final IWAE bound")
    p.add_argument("--iwae-images", type=int, default=None, help="test images for the IWAE bound (default: all)")
    p.add_argument("--psnr-images", type=int, default=None,
                   help="test images whose reconstructions give the PSNR (default: all). An autoregressive decoder "
                        "draws its reconstructions pixel by pixel: about 18 ms a CIFAR-10 image in batches of 64 on two "
                        "CPU cores with a 3-layer context (benchmarks/RESULTS.md), about 3 minutes for 10,000, estimated")


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
        likelihood=args.likelihood, num_mixtures=args.num_mixtures, use_latent=not args.no_latent,
        mean_mse_weight=args.mean_mse_weight,
    )
    model = VAE(config).to(device)
    fixed_x, _ = val.batch(torch.arange(min(GRID, len(val))), device)
    fixed_noise = torch.Generator().manual_seed(args.seed)  # the same z and pixel draws every epoch
    fixed_z = torch.randn(GRID, config.latent_dim, generator=fixed_noise).to(device)
    fixed_u = torch.rand(model.uniform_shape(GRID), generator=fixed_noise).to(device)

    def loss_fn(m: VAE, index: torch.Tensor):
        x, _ = train.batch(index, device)
        return m.loss(x, free_bits=args.free_bits)

    def evaluate(m: VAE) -> dict[str, float]:
        return val_metrics(m, val)

    def pictures(m: VAE, epoch: int) -> None:
        with torch.inference_mode():
            save_frame(args.run_dir, "inputs", epoch, fixed_x)
            save_frame(args.run_dir, "reconstructions", epoch, m.reconstruct(fixed_x))
            save_frame(args.run_dir, "samples", epoch, m.generate(fixed_z, uniforms=fixed_u))

    fit_config = FitConfig.from_args(args, best_key="val_neg_elbo")
    state = fit(model, fit_config, n_train=len(train), loss_fn=loss_fn, evaluate=evaluate,
                save_best=best_saver(args, train.name, class_names=train.class_names), on_epoch_end=pictures,
                rank=rank, world=world, desc=f"vae-{args.arch}")
    if rank != 0 or stopped_early(args, state):
        return
    _, metrics = finish(args, state, device, train.name, lambda best: measure_test(best, args, train, val, test),
                        class_names=train.class_names)
    iwae_data = test.subset(args.iwae_images)
    if config.likelihood == "logistic":
        bound = f"IWAE-{args.iwae_k} bound {metrics['test_bits_per_dim']:.4f} bits/dim ({metrics['test_nll_nats']:.2f} nats)"
    else:
        bound = f"IWAE-{args.iwae_k} grey-pixel BCE {metrics['test_iwae_grey_bce']:.2f} nats (not a likelihood of 8-bit images)"
    print(
        f"{args.out}: test -ELBO {metrics['test_neg_elbo']:.2f} nats, {bound} on {len(iwae_data)} test images, "
        f"active units {metrics['active_units']}/{config.latent_dim}, best epoch {state['best_epoch']}"
    )


def remeasure(
    model: VAE, args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, with_test: bool = True
) -> dict:
    """Every metric measured on data that a VAE's file reports: its best epoch's validation metric and
    the test metrics (`python -m training convert` re-measures a file with it); with_test=False for a
    file stopped early, whose run has not touched the test split yet."""
    return {**val_metrics(model, val), **(measure_test(model, args, train, val, test) if with_test else {})}


def val_metrics(model: VAE, val: ImageData) -> dict[str, float]:
    """What picks the best epoch: the validation negative ELBO (selection never looks at test)."""
    return {"val_neg_elbo": vae_neg_elbo(model, val)["neg_elbo"]}


def measure_test(model: VAE, args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData) -> dict:
    """Every test-split metric a VAE's file reports (`args`: the run's --iwae-k, --iwae-images and
    --psnr-images; the bounds are on all test images unless those limit them)."""
    iwae_data = test.subset(args.iwae_images)
    psnr_data = test.subset(getattr(args, "psnr_images", None))
    elbo = vae_neg_elbo(model, test)
    metrics = {
        "test_neg_elbo": elbo["neg_elbo"], "test_rec": elbo["rec"], "test_kl": elbo["kl"],
        "iwae_k": args.iwae_k, "iwae_images": len(iwae_data),
        "active_units": active_units(model, test), "latent_dim": model.config.latent_dim,
        "train_images": len(train), "val_images": len(val), "test_images": len(test),
        **{f"test_{k}": v for k, v in reconstruction_quality(model, psnr_data).items()}, "psnr_images": len(psnr_data),
    }
    if model.config.likelihood == "logistic":
        bound = nll_bound(model, iwae_data, k=args.iwae_k)
        metrics.update(test_nll_nats=bound["nll_nats"], test_bits_per_dim=bound["bits_per_dim"])
    else:  # grey-pixel BCE: the tutorial's loss, not a likelihood of 8-bit images
        metrics["test_iwae_grey_bce"] = vae_iwae(model, iwae_data, k=args.iwae_k)
    return metrics
