"""`python -m training card`: write weights/README.md, the model card, from the weight files themselves.

Every number in the card is read from a weight file's metadata (written by the training command
that produced it), and every picture is drawn from the shipped weights with a fixed seed, so the
card cannot drift from what the service loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.io import ModelInfo, load_model
from training.data import DATASETS
from training.visuals import grid_image

PRIOR_KINDS = ("pixelcnn", "gated_pixelcnn", "pixelcnnpp")
MARKER = "## Generated from the weight files"
PER_CLASS = 8  # a class-conditional prior's samples per class (one row each) in the card's grid
FOLDER_NOTE = ("an image folder: bits/dim of those image files as stored. The shipped CIFAR-10 files were trained "
               "and tested on a JPEG copy (about quality 75), so their bits/dim are not comparable with published "
               "CIFAR-10 numbers")


def from_folder(dataset: str) -> bool:
    """A data set read from an image folder (training/data.py names them by the folder), not a reader's."""
    return dataset not in DATASETS or dataset.endswith("(image folder)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="weights", help="folder of .safetensors files")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample grids")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _table(models: list[tuple[Path, torch.nn.Module, ModelInfo]]) -> list[str]:
    keys: list[str] = []
    for _, _, info in models:
        keys += [k for k in info.metrics if k not in keys]
    lines = ["| metric | " + " | ".join(f"`{p.name}`" for p, _, _ in models) + " |",
             "|---|" + "---|" * len(models)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(info.metrics.get(k, "")) for _, _, info in models) + " |")
    return lines


@torch.inference_mode()
def sample_grid(
    model: torch.nn.Module, info: ModelInfo, vqvaes: dict[str, torch.nn.Module], seed: int, temperature: float = 1.0
) -> tuple[torch.Tensor, int | None] | None:
    """(images, images per row) of a file's sample grid, or None. A class-conditional prior's grid has
    one row per class, PER_CLASS samples each, in label order. `temperature` (priors only) divides the
    logits of every draw, as /sample's does."""
    g = torch.Generator().manual_seed(seed)
    if info.kind == "vae":
        return model.sample(64, generator=g), None
    if info.kind in PRIOR_KINDS and info.extra.get("vqvae") in vqvaes:
        classes = model.config.num_classes
        labels = torch.arange(classes).repeat_interleave(PER_CLASS) if classes else None  # (classes * PER_CLASS,)
        n = classes * PER_CLASS if classes else 64
        codes = model.sample(n, labels=labels, temperature=temperature, generator=g)  # (n, h, w)
        images = vqvaes[info.extra["vqvae"]].decode_indices(codes)
        return images, (PER_CLASS if classes else None)
    return None


def _describe(model: torch.nn.Module, info: ModelInfo) -> str:
    c = model.config
    if info.kind == "vae":
        use = "" if c.use_latent else ", context only (z unused)"
        return f"VAE, {c.arch}, {c.decoder} decoder, {c.likelihood}{use}"
    if info.kind == "vqvae":
        return f"VQ-VAE, {c.likelihood} decoder"
    return f"{info.kind} prior over `{info.extra.get('vqvae')}`"


def likelihood_table(models: list[tuple[Path, torch.nn.Module, ModelInfo]]) -> list[str]:
    """One row per likelihood a file reports: test NLL (an upper bound) in bits/dim and nats per image.
    Files whose numbers are grey-pixel BCE get a row that says so, with no bits/dim."""
    lines = ["| file | model | data | upper bound, test split | bits/dim | nats/image | test images |",
             "|---|---|---|---|---|---|---|"]
    for path, model, info in models:
        m = info.metrics
        name, what = f"`{path.name}`", _describe(model, info)
        data = info.dataset + (" (*)" if from_folder(info.dataset) else "")
        images = m.get("iwae_images", m.get("test_images", ""))
        rows = []
        if info.kind == "vae" and "test_bits_per_dim" in m:
            rows.append((f"IWAE-{m.get('iwae_k')}", m["test_bits_per_dim"], m["test_nll_nats"]))
        elif info.kind == "vae" and "test_iwae_grey_bce" in m:
            lines.append(f"| {name} | {what} | {data} | IWAE-{m.get('iwae_k')} grey-pixel BCE {m['test_iwae_grey_bce']:.2f} nats: "
                         f"the tutorial's loss, not a likelihood of 8-bit images | - | - | {images} |")
        elif info.kind == "vqvae" and "test_uniform_prior_bits_per_dim" in m:
            rows.append(("-log p(x given z_q) + uniform prior (log K per code)",
                         m["test_uniform_prior_bits_per_dim"], m["test_uniform_prior_nll_nats"]))
        elif "test_bits_per_dim" in m:
            if "test_marginal_bits_per_dim" in m:
                rows.append(("-log p(x given z_q) - log P(z), P(z) = sum_y p(y) P(z given y): the label marginalised out",
                             m["test_marginal_bits_per_dim"], m["test_marginal_nll_nats"]))
            if m.get("conditional"):
                rows.append(("-log p(x given z_q) - log P(z given y): a bound on -log p(x given y), **not** on "
                             "-log p(x) (the class is given)", m["test_bits_per_dim"], m["test_nll_nats"]))
            else:
                rows.append(("-log p(x given z_q) - log P(z), unconditional prior", m["test_bits_per_dim"], m["test_nll_nats"]))
        for bound, bits, nats in rows:
            lines.append(f"| {name} | {what} | {data} | {bound} | {bits:.4f} | {nats:.2f} | {images} |")
    return lines if len(lines) > 2 else []


def _frames_note(gifs: list[Path], info: ModelInfo) -> str:
    """How a run's shipped GIFs sample its epochs (small_gif may keep only some, evenly spaced)."""
    from PIL import Image

    frames = 0
    for gif in gifs:
        with Image.open(gif) as im:
            frames = max(frames, im.n_frames)  # identical frames (fixed inputs) are merged: the most is the count
    epochs = info.metrics.get("epochs_trained")
    if epochs is None or frames >= epochs:
        return "one frame per epoch"
    return f"{frames} of its {epochs} epochs, evenly spaced, the first and the last among them"


def run(args: argparse.Namespace) -> Path:
    folder = Path(args.weights)
    models = [(p, *load_model(p)) for p in sorted(folder.glob("*.safetensors"))]
    vqvaes = {info.name: m for _, m, info in models if info.kind == "vqvae"}
    (folder / "samples").mkdir(exist_ok=True)
    out = folder / "README.md"
    # Hand-written prose above the marker is kept; everything below it is regenerated.
    kept = out.read_text().split(MARKER)[0].rstrip() if out.is_file() else ""
    lines = [kept + "\n"] if kept else []
    lines += [MARKER, "",
              "Regenerate with `python -m training card`. Numbers are the metadata of each file; pictures are "
              f"samples drawn with seed {args.seed}: 64 for a VAE or an unconditional prior, {PER_CLASS} per class (one "
              "row each, in label order) for a class-conditional prior.", ""]
    table = likelihood_table(models)
    if table:
        lines += ["### Test NLL in bits/dim, every model in one table", "",
                  "Computed by one function, `training.evaluate.nll_bound`, on the test split of each file's data "
                  "set; lower is better. Each is an upper bound on -log p(x) of the 8-bit images, except the rows "
                  "marked as bounds on -log p(x given y), which are told each image's class.", "",
                  *table, ""]
        if any(from_folder(info.dataset) for _, _, info in models):
            lines += [f"(*) {FOLDER_NOTE}.", ""]
    for title, kinds in (("VAE", ("vae",)), ("VQ-VAE", ("vqvae",)), ("Priors over the VQ-VAE codes", PRIOR_KINDS)):
        group = [m for m in models if m[2].kind in kinds]
        if not group:
            continue
        lines += [f"### {title}", "", *_table(group), ""]
        for path, model, info in group:
            lines += [f"- `{path.name}` ({info.kind}, name `{info.name}`, {sum(p.numel() for p in model.parameters()):,} "
                      f"parameters, {path.stat().st_size / 1e6:.1f} MB, trained on {info.dataset}):",
                      f"  `{info.command}`"]
            if info.extra:
                lines.append(f"  extra: `{json.dumps(info.extra)}`")
        lines.append("")
        for path, model, info in group:
            drawn = sample_grid(model, info, vqvaes, args.seed)
            if drawn is not None:
                images, nrow = drawn
                png = folder / "samples" / f"{path.stem}.png"
                grid_image(images, nrow=nrow).save(png)
                rows = f" (rows: {', '.join(info.class_names)})" if nrow and info.class_names else ""
                lines += [f"`{path.stem}` samples{rows}:", "", f"![{path.stem} samples](samples/{png.name})", ""]
            gifs = sorted((folder / "samples").glob(f"{path.stem}__*.gif"))
            if gifs:  # the training run's per-epoch frames, copied from its run directory
                lines += [f"`{path.stem}` during training, {_frames_note(gifs, info)} (fixed inputs and fixed noise):", "",
                          " ".join(f"![{g.stem.split('__', 1)[1]}](samples/{g.name})" for g in gifs),
                          "", "; ".join(f"{g.stem.split('__', 1)[1]}" for g in gifs) + " (left to right)", ""]
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")
    return out
