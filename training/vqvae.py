"""`python -m training vqvae`: train a VQ-VAE, keep the best epoch by validation reconstruction loss,
report codebook health and, with `--likelihood logistic`, the test NLL bound in bits/dim under a
uniform prior over the codes (the priors' files report it with each prior)."""

from __future__ import annotations

import argparse
import math

import torch

from models.vqvae import LIKELIHOODS, VQVAE, VQVAEConfig
from training.data import ImageData
from training.evaluate import nll_bound, reconstruction_quality, usage_stats
from training.loop import FitConfig, best_saver, finish, fit, stopped_early
from training.visuals import save_frame

GRID = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden-channels", type=int, default=128)
    p.add_argument("--res-channels", type=int, default=32)
    p.add_argument("--n-res-blocks", type=int, default=2)
    p.add_argument("--codebook-size", type=int, default=512, help="K")
    p.add_argument("--embedding-dim", type=int, default=64, help="D")
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--no-ema", action="store_true", help="learn the codebook by its loss instead of EMA updates")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--init", choices=("kmeans", "random_batch", "uniform"), default="kmeans")
    p.add_argument("--dead-code-steps", type=int, default=100, help="restart codes unused this many steps (0: never)")
    p.add_argument(
        "--likelihood", choices=LIKELIHOODS, default="logistic",
        help="logistic: discretized logistic mixture (a likelihood of 8-bit images); mse: the paper's Gaussian",
    )
    p.add_argument("--num-mixtures", type=int, default=5, help="logistic: mixture components per pixel")
    p.add_argument(
        "--select-by", choices=("likelihood", "mse"), default=None,
        help="the validation metric that picks the best epoch: likelihood (bits/dim, the default for the logistic "
             "decoder) or mse (the reconstruction's squared error, so PSNR; the only choice for --likelihood mse)",
    )
    p.add_argument(
        "--mean-mse-weight", type=float, default=0.0,
        help="logistic: add this times the MSE of the mixture's mean image to the loss, so the decoder learns "
             "its means early (colour data); bits/dim stay a bound",
    )


@torch.inference_mode()
def code_histogram(model: VQVAE, data: ImageData, batch_size: int = 500) -> torch.Tensor:
    device = next(model.parameters()).device
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    for index in torch.arange(len(data)).split(batch_size):
        codes = model.encode_indices(data.batch(index, device)[0])
        counts += torch.bincount(codes.flatten().cpu(), minlength=counts.numel())
    return counts


def run(
    args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, device: torch.device, rank: int, world: int
) -> None:
    c, h, _ = train.image_shape
    config = VQVAEConfig(
        in_channels=c, image_size=h, hidden_channels=args.hidden_channels, res_channels=args.res_channels,
        n_res_blocks=args.n_res_blocks, codebook_size=args.codebook_size, embedding_dim=args.embedding_dim,
        beta=args.beta, ema=not args.no_ema, ema_decay=args.ema_decay, init=args.init,
        dead_code_steps=args.dead_code_steps, likelihood=args.likelihood, num_mixtures=args.num_mixtures,
        mean_mse_weight=args.mean_mse_weight,
    )
    model = VQVAE(config).to(device)
    fixed_x, _ = val.batch(torch.arange(min(GRID, len(val))), device)
    epoch_counts = torch.zeros(config.codebook_size, dtype=torch.long)

    def loss_fn(m: VQVAE, index: torch.Tensor):
        x, _ = train.batch(index, device)
        loss, stats = m.loss(x)
        epoch_counts.add_(m.quantizer.last_counts.long().cpu())
        return loss, stats

    def evaluate(m: VQVAE) -> dict[str, float]:  # on validation images: selection never looks at test
        metrics = {
            **val_metrics(m, val),
            "train_epoch_codes_used_share": int((epoch_counts > 0).sum()) / config.codebook_size,
            "restarts_total": int(m.quantizer.restarts.item()),
        }
        epoch_counts.zero_()
        return metrics

    def pictures(m: VQVAE, epoch: int) -> None:
        with torch.inference_mode():
            save_frame(args.run_dir, "inputs", epoch, fixed_x)
            save_frame(args.run_dir, "reconstructions", epoch, m.reconstruct(fixed_x))

    select_by = args.select_by or ("likelihood" if config.likelihood == "logistic" else "mse")
    if select_by == "likelihood" and config.likelihood != "logistic":
        raise ValueError("--select-by likelihood needs --likelihood logistic (mse has no likelihood); use --select-by mse")
    fit_config = FitConfig.from_args(
        args, best_key="val_rec_bits_per_dim" if select_by == "likelihood" else "val_mse",
        show=("perplexity", "codes_used", "restarts"), running_totals=("restarts",),
    )
    state = fit(model, fit_config, n_train=len(train), loss_fn=loss_fn, evaluate=evaluate,
                save_best=best_saver(args, train.name, class_names=train.class_names), on_epoch_end=pictures,
                rank=rank, world=world, desc="vqvae")
    if rank != 0 or stopped_early(args, state):
        return

    _, metrics = finish(args, state, device, train.name, lambda best: measure_test(best, train, val, test),
                        class_names=train.class_names)
    shown = (f", NLL bound with a uniform prior {metrics['test_uniform_prior_bits_per_dim']:.4f} bits/dim"
             if config.likelihood == "logistic" else "")
    print(
        f"{args.out}: test MSE {metrics['test_mse']:.5f}, PSNR {metrics['test_psnr_db']:.2f} dB, perplexity "
        f"{metrics['test_perplexity']:.1f}, codes used {metrics['test_codes_used']}/{config.codebook_size}{shown}"
    )


def quality(model: VQVAE, data: ImageData, split: str) -> dict[str, float]:
    """Reconstruction error and codebook use on `data`, keys prefixed by `split`."""
    q, usage = reconstruction_quality(model, data), usage_stats(code_histogram(model, data))
    return {f"{split}_mse": q["mse"], f"{split}_psnr_db": q["psnr_db"],
            f"{split}_perplexity": usage["perplexity"], f"{split}_codes_used": usage["codes_used"]}


def uniform_code_bits(model: VQVAE) -> float:
    """Bits per image dimension that a uniform prior over the codes costs: log2 K per code."""
    h, w = model.code_shape
    return h * w * math.log2(model.config.codebook_size) / math.prod(model.image_shape)


def val_metrics(model: VQVAE, val: ImageData) -> dict[str, float]:
    """What picks the best epoch (val_rec_bits_per_dim or val_mse), with the rest of the validation quality."""
    metrics = quality(model, val, "val")
    if model.config.likelihood == "logistic":
        metrics["val_rec_bits_per_dim"] = nll_bound(model, val)["bits_per_dim"] - uniform_code_bits(model)
    return metrics


def measure_test(model: VQVAE, train: ImageData, val: ImageData, test: ImageData) -> dict:
    """Every test-split metric a VQ-VAE's file reports."""
    metrics = {**quality(model, test, "test"), "codebook_size": model.config.codebook_size,
               "code_shape": list(model.code_shape), "train_images": len(train), "val_images": len(val),
               "test_images": len(test)}
    if model.config.likelihood == "logistic":  # -log p(x|z_q) - log P(z) with a uniform P: log K nats per code
        bound = nll_bound(model, test)
        metrics.update(test_uniform_prior_nll_nats=bound["nll_nats"],
                       test_uniform_prior_bits_per_dim=bound["bits_per_dim"],
                       test_rec_bits_per_dim=bound["bits_per_dim"] - uniform_code_bits(model))
    return metrics


def remeasure(
    model: VQVAE, args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, with_test: bool = True
) -> dict:
    """Every metric measured on data that a VQ-VAE's file reports, its best epoch's validation metrics
    and the test metrics (`python -m training convert`); with_test=False for a file stopped early, whose
    run has not touched the test split yet."""
    return {**val_metrics(model, val), **(measure_test(model, train, val, test) if with_test else {})}
