"""`python -m training convert --dtype float16 weights/*.safetensors`: store weight files in another
dtype and re-measure every metric they report, on the weights as stored.

A file's metrics describe its tensors, so a file whose tensors are rounded to float16 gets its
metrics measured again on the rounded model (which computes in float32, as the service does):
the selection metric of its best epoch on validation and every test metric, with the same data,
split and evaluation settings as the run that trained it (read back from the file's `command`).
What is training history (epochs, the best epoch, training-set averages, codebook restarts) stays
as trained. The file's `command` gains this invocation, and `metrics["weights_dtype"]` names the
dtype the metrics were measured in.

A prior is measured on the codes of the VQ-VAE it models: the file of its `extra["vqvae"]` name
beside it (or --vqvae), converted first when both are given, and its codebook digest is updated
to that file's (the service pairs priors with VQ-VAEs by that digest). The VQ-VAE's float16
codebook can assign a few images other codes than the float32 one did; the prior's metrics are
measured on the codes the shipped VQ-VAE gives.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from models.io import STORAGE_DTYPES, WeightFileError, load_model, read_metadata, round_to_storage, save_model
from training.data import DataError

TRAINING_FAMILIES = ("vae", "vqvae", "prior")
KIND_FAMILY = {"vae": "vae", "vqvae": "vqvae", "pixelcnn": "prior", "gated_pixelcnn": "prior", "pixelcnnpp": "prior"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="weight files, rewritten in place")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), required=True,
                   help="the dtype the floating tensors are stored in (the model still computes in float32)")
    p.add_argument("--data", default=None, help="override the data set (or image folder) the training command used")
    p.add_argument("--data-root", default=None, help="override the data root the training command used")
    p.add_argument("--vqvae", type=Path, default=None,
                   help="priors: the VQ-VAE file whose codes they model (default: EXTRA_VQVAE.safetensors beside each)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="where the metrics are measured (cpu, cuda, ...)")


def training_args(command: str) -> argparse.Namespace:
    """The arguments of the last training invocation in a file's `command` chain (" && "-joined)."""
    from training.__main__ import build_parser

    for invocation in reversed(command.split(" && ")):
        words = shlex.split(invocation)
        if words[:3] == ["python", "-m", "training"] and len(words) > 3 and words[3] in TRAINING_FAMILIES:
            try:
                return build_parser().parse_args(words[3:])
            except SystemExit:  # argparse printed why
                raise ValueError(f"its training command no longer parses: {invocation[:200]!r}") from None
    raise ValueError(f"its command names no training run to re-measure with ({command[:200]!r})")


def _order(files: list[Path]) -> list[Path]:
    """VAEs and VQ-VAEs before priors, so that a prior is measured on its converted VQ-VAE."""
    return sorted(files, key=lambda f: KIND_FAMILY.get(read_metadata(f)["kind"]) == "prior")


def left_behind(files: list[Path]) -> list[str]:
    """Priors beside a VQ-VAE being converted that name it (by name and codebook digest) but are not
    being converted: the service would refuse them once their VQ-VAE's codebook changes."""
    chosen = {f.resolve() for f in files}
    missing = []
    for f in files:
        meta = read_metadata(f)
        if meta["kind"] != "vqvae":
            continue
        vqvae, _ = load_model(f)
        digest = vqvae.codebook_digest()
        for other in sorted(f.parent.glob("*.safetensors")):
            if other.resolve() in chosen:
                continue
            try:
                extra = json.loads(read_metadata(other).get("extra", "{}"))
            except (WeightFileError, ValueError):
                continue
            if isinstance(extra, dict) and extra.get("codebook_sha256") == digest:
                missing.append(f"{other} (a prior of {f})")
    return missing


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per numeric metric whose value changed: `key: before -> after (difference)`."""
    lines = []
    for key in sorted(after):
        old, new = before.get(key), after[key]
        if isinstance(new, bool) or not isinstance(new, (int, float)) or old == new:
            continue
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            lines.append(f"  {key}: {old:.6g} -> {new:.6g} ({new - old:+.3g})")
        else:
            lines.append(f"  {key}: (none) -> {new:.6g}")
    return lines


def convert(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Rewrite one file in `args.dtype` with re-measured metrics; returns the new metrics."""
    from training import prior, vae, vqvae
    from training.__main__ import load_splits

    dtype = STORAGE_DTYPES[args.dtype]
    overrides = [(flag, value) for flag, value in (("--data", args.data), ("--data-root", args.data_root),
                                                    ("--vqvae", args.vqvae)) if value is not None]
    invocation = shlex.join(["python", "-m", "training", "convert", "--dtype", args.dtype,
                             *(str(x) for pair in overrides for x in pair), str(path)])
    device = torch.device(args.device)
    model, info = load_model(path, device)
    family = KIND_FAMILY[info.kind]
    run_args = training_args(info.command)
    if args.data is not None:
        run_args.data = args.data
    if args.data_root is not None:
        run_args.data_root = args.data_root
    extra = dict(info.extra)
    if family == "prior":
        run_args.vqvae = str(args.vqvae or path.with_name(f"{info.extra.get('vqvae')}.safetensors"))
    train, val, test = load_splits(run_args)
    counts = round_to_storage(model, dtype)
    module = {"vae": vae, "vqvae": vqvae, "prior": prior}[family]
    # a file stopped early (--stop-after) has validation metrics only: its run has not touched the test split
    with_test = any(key.startswith("test_") for key in info.metrics)
    measured = module.remeasure(model, run_args, train, val, test, with_test=with_test)
    if family == "prior":
        vq_model, vq_info = prior.load_vqvae(run_args.vqvae, train, device)
        extra.update(prior.pairing(vq_model, vq_info))
    metrics = {**info.metrics, **measured, "weights_dtype": args.dtype}
    save_model(path, model, name=info.name, dataset=info.dataset, command=f"{info.command} && {invocation}",
               metrics=metrics, extra=extra, image_shape=info.image_shape, class_names=info.class_names, dtype=dtype)
    share = counts["changed"] / max(counts["values"], 1)
    print(f"{path}: {args.dtype}, {counts['changed']:,} of {counts['values']:,} values rounded ({share:.1%}), "
          f"{counts['flushed_to_zero']:,} to zero; metrics measured again:", flush=True)
    print("\n".join(changes(info.metrics, metrics)) or "  (none changed)", flush=True)
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    failed = 0
    try:
        files = _order(list(args.files))
        missing = left_behind(files)
    except WeightFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if missing:
        print(f"error: convert a VQ-VAE together with its priors, or the service refuses them: add {', '.join(missing)}",
              file=sys.stderr)
        return 2
    for path in files:
        try:
            convert(path, args)
        except (WeightFileError, ValueError, FileNotFoundError, DataError) as err:
            # this file is left as it was; a prior of a VQ-VAE that failed is measured on it unconverted
            print(f"error: {path}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0

