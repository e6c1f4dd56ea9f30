"""`python -m training prior --vqvae weights/vqvae.safetensors --arch gated`: fit an autoregressive
prior to the codes a frozen VQ-VAE assigns to the training images; report test NLL in bits per code."""

from __future__ import annotations

import argparse
import math

import torch

from models.io import ModelInfo, load_model
from models.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig
from models.prior import marginal_log_prob, per_label_log_prob
from models.vqvae import VQVAE
from training.data import ImageData
from training.evaluate import nll_bound, usage_stats
from training.loop import FitConfig, best_saver, finish, fit, stopped_early
from training.visuals import save_frame

ARCHS = {
    "pixelcnn": (PixelCNN, PixelCNNConfig),
    "gated": (GatedPixelCNN, GatedPixelCNNConfig),
    "pixelcnnpp": (PixelCNNpp, PixelCNNppConfig),
}
GRID = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vqvae", required=True, help="the frozen VQ-VAE weight file whose codes the prior models")
    p.add_argument("--arch", choices=sorted(ARCHS), default="gated")
    p.add_argument("--hidden-channels", type=int, default=None, help="default: the architecture's config default")
    p.add_argument("--n-layers", type=int, default=None, help="default: the architecture's config default")
    p.add_argument("--dropout", type=float, default=None, help="pixelcnnpp only")
    p.add_argument("--unconditional", action="store_true", help="ignore the data set's class labels")


@torch.inference_mode()
def encode_codes(vqvae: VQVAE, data: ImageData, batch_size: int = 500) -> torch.Tensor:
    """The VQ-VAE's code grid for every image: (N, h, w) long, on the CPU."""
    device = next(vqvae.parameters()).device
    return torch.cat([vqvae.encode_indices(data.batch(i, device)[0]).cpu() for i in torch.arange(len(data)).split(batch_size)])


@torch.inference_mode()
def code_nats(
    prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor | None = None,
    label_freqs: torch.Tensor | None = None, batch_size: int = 500,
) -> dict[str, torch.Tensor]:
    """-log P(z) of each grid (N, h, w) in nats, float64 (N,): "given", P(z | y) with each grid's own
    `labels` (None: an unconditional prior's P(z); absent for a conditional prior given only
    label_freqs); and with `label_freqs` (Y,) "marginal",
    -log sum_y p(y) P(z | y), the label marginalised out over those frequencies (logsumexp). With
    label_freqs the prior runs once per label and both come from those passes."""
    device = next(prior.parameters()).device
    given, marginal = [], []
    for index in torch.arange(len(codes)).split(batch_size):
        z = codes[index].to(device)  # (b, h, w)
        y = None if labels is None else labels[index].to(device)  # (b,)
        if label_freqs is None:
            given.append(-prior.log_prob(z, y).double().cpu())
            continue
        per_label = per_label_log_prob(prior, z, len(label_freqs))  # (b, Y)
        if y is not None:
            given.append(-per_label.gather(1, y[:, None]).squeeze(1).cpu())
        marginal.append(-marginal_log_prob(prior, z, label_freqs, per_label).cpu())
    out = {"given": torch.cat(given)} if given else {}
    if marginal:
        out["marginal"] = torch.cat(marginal)
    return out


def nll_bits_per_code(prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Mean -log2 P(z | y) per code (the label given; unconditional: -log2 P(z))."""
    return code_nats(prior, codes, labels)["given"].sum().item() / (codes.numel() * math.log(2))


def unigram_cross_entropy_bits(train_counts: torch.Tensor, test_codes: torch.Tensor) -> float:
    """Bits per code of the best position-independent model (the train histogram, add-one smoothed)."""
    p = (train_counts.double() + 1) / (train_counts.sum() + train_counts.numel())
    return -p.log2()[test_codes.flatten()].mean().item()


def run(
    args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, device: torch.device, rank: int, world: int
) -> None:
    vqvae, vq_info = load_vqvae(args.vqvae, train, device)
    conditional = not args.unconditional and train.labels is not None and train.num_classes > 0
    cls, config_cls = ARCHS[args.arch]
    overrides = {k: v for k, v in (("hidden_channels", args.hidden_channels), ("n_layers", args.n_layers),
                                    ("dropout", args.dropout)) if v is not None}
    config = config_cls(codebook_size=vqvae.config.codebook_size, code_shape=tuple(vqvae.code_shape),
                        num_classes=train.num_classes if conditional else 0, **overrides)
    prior = cls(config).to(device)

    if rank == 0:
        print(f"encoding {len(train)} + {len(val)} + {len(test)} images with {args.vqvae} ...", flush=True)
    train_codes, val_codes, test_codes = (encode_codes(vqvae, d) for d in (train, val, test))  # (N, h, w)
    train_labels = train.labels if conditional else None
    val_labels = val.labels if conditional else None
    baseline = baseline_metrics(train_codes, test_codes, config.codebook_size)
    label_gen = torch.Generator().manual_seed(args.seed)
    fixed_labels = torch.arange(GRID) % config.num_classes if conditional else None
    fixed_uniforms = torch.rand(GRID, *config.code_shape, generator=label_gen)

    def loss_fn(m: torch.nn.Module, index: torch.Tensor):
        y = None if train_labels is None else train_labels[index].to(device)
        loss = m.loss(train_codes[index].to(device), y)
        return loss, {"nats_per_code": loss.detach()}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:  # selection never looks at test
        return val_metrics(m, val_codes, val_labels)

    extra = pairing(vqvae, vq_info)

    save_to_file = best_saver(args, train.name, extra=extra, image_shape=vqvae.image_shape,
                              class_names=train.class_names)

    def save_best(m: torch.nn.Module, metrics: dict, command: str) -> None:
        save_to_file(m, {**baseline, **metrics}, command)

    def pictures(m: torch.nn.Module, epoch: int) -> None:
        with torch.inference_mode():
            y = None if fixed_labels is None else fixed_labels.to(device)
            codes = m.sample(GRID, labels=y, uniforms=fixed_uniforms.to(device))
            save_frame(args.run_dir, "samples", epoch, vqvae.decode_indices(codes))

    fit_config = FitConfig.from_args(args, best_key="val_bits_per_code")
    state = fit(prior, fit_config, n_train=len(train_codes), loss_fn=loss_fn, evaluate=evaluate, save_best=save_best,
                on_epoch_end=pictures, rank=rank, world=world, desc=f"prior-{args.arch}")
    if rank != 0 or stopped_early(args, state):
        return
    _, metrics = finish(args, state, device, train.name,
                        lambda best: measure_test(best, vqvae, train, test, train_codes, test_codes, conditional), extra=extra, image_shape=vqvae.image_shape,
                        class_names=train.class_names)
    shown = f" ({metrics['test_marginal_bits_per_code']:.3f} with the label marginalised out)" if conditional else ""
    if "test_bits_per_dim" in metrics:
        shown += f"; image NLL bound {metrics['test_bits_per_dim']:.4f} bits/dim"
    print(f"{args.out}: test NLL {metrics['test_bits_per_code']:.3f} bits/code{shown}; unigram entropy "
          f"{baseline['unigram_entropy_bits']:.3f}, log2 K {baseline['log2_K']:.3f}")


def load_vqvae(path: str, data: ImageData, device: torch.device) -> tuple[VQVAE, ModelInfo]:
    """The frozen VQ-VAE a prior models, checked against the data's image shape."""
    vqvae, info = load_model(path, device)
    if info.kind != "vqvae":
        raise ValueError(f"--vqvae {path} holds a {info.kind!r} model, not a VQ-VAE")
    if tuple(data.image_shape) != tuple(vqvae.image_shape):
        raise ValueError(f"the data's image shape {data.image_shape} differs from the VQ-VAE's {vqvae.image_shape}")
    for p in vqvae.parameters():
        p.requires_grad_(False)
    return vqvae, info


def pairing(vqvae: VQVAE, info: ModelInfo) -> dict[str, str]:
    """A prior file's `extra`: the VQ-VAE it models, by name and codebook digest (how the service pairs them)."""
    return {"vqvae": info.name, "codebook_sha256": vqvae.codebook_digest()}


def baseline_metrics(train_codes: torch.Tensor, test_codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """What a prior must beat: log2 K, the test codes' unigram entropy and the train histogram's cross-entropy."""
    train_counts = torch.bincount(train_codes.flatten(), minlength=codebook_size)
    return {
        "log2_K": math.log2(codebook_size),
        "unigram_entropy_bits": usage_stats(torch.bincount(test_codes.flatten(), minlength=codebook_size))["entropy_bits"],
        "unigram_cross_entropy_bits": unigram_cross_entropy_bits(train_counts, test_codes),
    }


def val_metrics(prior: torch.nn.Module, val_codes: torch.Tensor, val_labels: torch.Tensor | None) -> dict[str, float]:
    """What picks the best epoch: validation bits per code (selection never looks at test)."""
    return {"val_bits_per_code": nll_bits_per_code(prior, val_codes, val_labels)}


def measure_test(
    prior: torch.nn.Module, vqvae: VQVAE, train: ImageData, test: ImageData, train_codes: torch.Tensor,
    test_codes: torch.Tensor, conditional: bool,
) -> dict:
    """Every test-split metric a prior's file reports. Each test grid's -log P(z) is computed once: given
    its label, and (conditional) with the label marginalised out over the training set's class
    frequencies; the image bounds reuse them."""
    test_labels = test.labels if conditional else None
    freqs = torch.bincount(train.labels, minlength=prior.config.num_classes) if conditional else None
    nats_of = code_nats(prior, test_codes, test_labels, freqs)  # {"given": (N,), "marginal": (N,) if conditional}
    per_code = test_codes[0].numel() * math.log(2)
    metrics = {"test_bits_per_code": nats_of["given"].mean().item() / per_code,
               "conditional": conditional, "train_codes": int(train_codes.numel()), "test_images": len(test)}
    if conditional:
        metrics["test_marginal_bits_per_code"] = nats_of["marginal"].mean().item() / per_code
    if vqvae.config.likelihood == "logistic":
        # -log p(x|z_q(x)) - log P(z(x)), a bound on -log p(x) (on -log p(x|y) with the label given):
        # nll_bound's uniform-prior bound on the same code grids, less its log K per code, is the
        # decoder's term, to which each prior's code term adds (the mean of a sum is the sum of the means)
        uniform = nll_bound(vqvae, test, codes=test_codes)["nll_nats"]
        rec_nats = uniform - test_codes[0].numel() * math.log(vqvae.config.codebook_size)
        dims = test.images[0].numel()
        for key, prefix in (("given", "test_"), ("marginal", "test_marginal_")):
            if key in nats_of:
                nats = rec_nats + nats_of[key].mean().item()
                metrics[f"{prefix}nll_nats"] = nats
                metrics[f"{prefix}bits_per_dim"] = nats / (dims * math.log(2))
    return metrics


def remeasure(
    prior: torch.nn.Module, args: argparse.Namespace, train: ImageData, val: ImageData, test: ImageData, with_test: bool = True
) -> dict:
    """Every metric measured on data that a prior's file reports (`python -m training convert`): the
    baselines, its best epoch's validation bits per code and the test metrics, on the codes of the
    VQ-VAE file `args.vqvae`; with_test=False for a file stopped early, whose run has not touched the
    test split yet."""
    device = next(prior.parameters()).device
    vqvae, _ = load_vqvae(args.vqvae, train, device)
    conditional = prior.config.num_classes > 0
    train_codes, val_codes, test_codes = (encode_codes(vqvae, d) for d in (train, val, test))  # (N, h, w)
    return {
        **baseline_metrics(train_codes, test_codes, prior.config.codebook_size),
        **val_metrics(prior, val_codes, val.labels if conditional else None),
        **(measure_test(prior, vqvae, train, test, train_codes, test_codes, conditional) if with_test else {}),
    }
