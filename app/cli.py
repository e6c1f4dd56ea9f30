"""The `genserve` command: the command line over the typed client (app/client.py).

    genserve models                                     # one line per served model (--json: the server's JSON)
    genserve sample --model vae -n 16 --seed 1 -o grid.png
    genserve reconstruct --model vae a.png b.png -o recon.png
    genserve encode --model vae a.png -o enc.json && genserve decode enc.json -o dec.png
    genserve interpolate --model vae a.png b.png --steps 8 --method slerp -o strip.png

`.venv/bin/genserve` (pyproject.toml's [project.scripts]), `python -m app.cli` and `python -m app.client`
run it. Images come back as PNG files: -o writes one grid (the server's layout), --out-dir one file
per image. The service's URL is --url, else $GENSERVE_URL, else http://127.0.0.1:8000. Errors print
one line, `genserve: error STATUS: DETAIL`, and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

# client.Client is looked up when a command runs, so that tests can swap it for a fake
from app import client
from app.client import (DEFAULT_MAX_RETRY_WAIT_S, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, DEFAULT_URL, MAX_RETRIES, APIError,
                        UnexpectedResponse, grid)


class CLIError(Exception):
    """A mistake the command line reports in one line (a file it cannot read, a bad JSON file)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genserve",
        description="Command line client of the genserve API. Images come back as PNG files: -o writes "
        "one grid (the server's layout), --out-dir one file per image.",
        epilog="Errors print one line, 'genserve: error STATUS: DETAIL', and exit with status 1.",
    )
    p.add_argument("--url", default=os.environ.get("GENSERVE_URL", DEFAULT_URL),
                   help=f"the service's base URL (default: $GENSERVE_URL, else {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request (default %(default)s)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help="repeats of an idempotent request answered 503 with Retry-After (default %(default)s, "
                   f"at most {MAX_RETRIES})")
    p.add_argument("--max-retry-wait", type=float, default=DEFAULT_MAX_RETRY_WAIT_S,
                   help="the most seconds spent waiting between retries of one request (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                         help="one of the following; `genserve COMMAND --help` lists its options")

    def output(cmd: argparse.ArgumentParser) -> None:
        group = cmd.add_mutually_exclusive_group(required=True)
        group.add_argument("-o", "--output", type=Path, help="write the images as one PNG grid to this file")
        group.add_argument("--out-dir", type=Path, help="write one PNG per image into this folder (created if needed)")

    models = sub.add_parser("models", help="list the served models", description="GET /models: one line per model.")
    models.add_argument("--json", action="store_true", help="print the server's JSON instead of one line per model")

    sample = sub.add_parser("sample", help="draw images from a model", description="GET /sample; prints the seed used.")
    sample.add_argument("--model", required=True, help="a VAE or VQ-VAE name (see `genserve models`)")
    sample.add_argument("-n", type=int, default=16, help="number of images (default %(default)s)")
    sample.add_argument("--seed", type=int, help="same seed, same images; random if absent (then not retried)")
    sample.add_argument("--temperature", type=float, default=1.0, help="in [0.001, 10]; 1 is the model's own (default)")
    sample.add_argument("--prior", help="VQ-VAE only: pixelcnn, gated or pixelcnnpp (default: the best loaded)")
    sample.add_argument("--label",
                        help="for a class-conditional prior only: a class index, or a class name as `genserve models "
                        "--json` lists it in the prior's class_names (quote names with spaces)")
    output(sample)

    recon = sub.add_parser("reconstruct", help="reconstruct images", description="POST /reconstruct.")
    recon.add_argument("--model", required=True, help="a VAE or VQ-VAE name")
    recon.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    output(recon)

    enc = sub.add_parser("encode", help="encode images to latents or codes",
                         description="POST /encode; writes the server's JSON ({model, kind, items}), "
                         "which `genserve decode` reads back.")
    enc.add_argument("--model", required=True, help="a VAE or VQ-VAE name")
    enc.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    enc.add_argument("--include-z-e", action="store_true", help="VQ-VAE: also return the encoder output z_e")
    enc.add_argument("-o", "--output", type=Path, help="write the JSON to this file (default: print it)")

    dec = sub.add_parser("decode", help="decode latents or codes from a JSON file",
                         description="POST /decode. FILE holds {\"model\", \"z\": [[...], ...]} or "
                         "{\"model\", \"codes\": [[[...]], ...]}, or the output of `genserve encode` "
                         "(its mu or codes are decoded); '-' reads standard input.")
    dec.add_argument("file", metavar="FILE", help="the JSON file, or - for standard input")
    dec.add_argument("--model", help="the model to decode with (default: the file's \"model\")")
    output(dec)

    interp = sub.add_parser("interpolate", help="interpolate between two images", description="POST /interpolate.")
    interp.add_argument("--model", required=True, help="a VAE or VQ-VAE name")
    interp.add_argument("a", metavar="A", help="the first end (an image file)")
    interp.add_argument("b", metavar="B", help="the last end (an image file)")
    interp.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included (default %(default)s)")
    interp.add_argument("--method", choices=("slerp", "lerp"), default="slerp", help="default %(default)s")
    output(interp)

    score = sub.add_parser("score", help="how likely images are under a model",
                           description="POST /score: per image, an upper bound on -log p(x) in bits/dim, each codec's "
                           "bits/dim and the complexity score (bits/dim minus the codec's); --json prints the answer.")
    score.add_argument("--model", required=True, help="a model whose likelihood is a probability of 8-bit images")
    score.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    score.add_argument("--prior", help="VQ-VAE: pixelcnn, gated, pixelcnnpp or none (default: the best)")
    score.add_argument("--label", help="a class-conditional prior: score -log p(x | y) for this class (index or name)")
    score.add_argument("-k", type=int, default=100, help="VAE: importance samples per image (default %(default)s)")
    score.add_argument("--seed", type=int, default=0, help="VAE: seed of the importance samples (default %(default)s)")
    score.add_argument("--codec", action="append", choices=("png", "webp"), help="lossless codecs to compare with "
                       "(repeat for both; default png)")
    score.add_argument("--background", metavar="MODEL", help="a second model of the same image shape (e.g. vae_context): "
                       "adds the likelihood-ratio score, bits/dim minus its bits/dim")
    score.add_argument("--heat-maps", metavar="PNG", help="write the heat maps of bits per subpixel (black 0, pale yellow "
                       "8) to this file, one per image in a grid")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    return p


def _write(images: list[Image.Image], args: argparse.Namespace, nrow: int | None = None) -> str:
    if args.output is not None:
        grid(images, nrow).save(args.output, format="PNG")
        return f"wrote {args.output} ({len(images)} image{'s' if len(images) != 1 else ''})"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(args.out_dir / f"{args.command}_{i:03d}.png", format="PNG")
    return f"wrote {len(images)} PNG file{'s' if len(images) != 1 else ''} to {args.out_dir}"


def _decode_body(args: argparse.Namespace) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        body = json.loads(text)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read {args.file}: {err}") from None
    if not isinstance(body, dict):
        raise CLIError(f"{args.file} must hold a JSON object")
    if "items" in body:  # the output of `genserve encode`
        key = "mu" if body.get("kind") == "vae" else "codes"
        items = body["items"]
        if not isinstance(items, list) or not all(isinstance(item, dict) and key in item for item in items):
            raise CLIError(f"{args.file}: \"items\" must be a list of objects with {key!r} "
                           f"(the output of `genserve encode` for a {'VAE' if key == 'mu' else 'VQ-VAE'})")
        body = {"model": body.get("model"), ("z" if key == "mu" else "codes"): [item[key] for item in items]}
    model = args.model or body.get("model")
    if not model:
        raise CLIError(f"{args.file} names no model: add --model")
    return {"model": model, "z": body.get("z"), "codes": body.get("codes")}


def _run(api: client.Client, args: argparse.Namespace) -> str:
    if args.command == "models":
        entries = api.models()
        if args.json:
            return json.dumps([e.model_dump(mode="json", exclude_unset=True) for e in entries], indent=2)
        lines = []
        for e in entries:
            line = f"{e.name}\t{e.kind}\t{'x'.join(map(str, e.image_shape))}\t{e.dataset}"
            if e.priors:
                line += "\tpriors: " + ", ".join(f"{p.name}{' (default)' if p.default else ''}" for p in e.priors)
            lines.append(line)
        return "\n".join(lines)
    if args.command == "sample":
        s = api.sample(args.model, n=args.n, seed=args.seed, temperature=args.temperature, prior=args.prior,
                          label=args.label)
        return f"{_write(s.images, args)}, seed {s.seed}" + (f", prior {s.prior}" if s.prior else "")
    if args.command == "reconstruct":
        return _write(api.reconstruct(args.model, _paths(args.images)), args)
    if args.command == "encode":
        encodings = api.encode(args.model, _paths(args.images), include_z_e=args.include_z_e)
        kind = "vae" if encodings[0].mu is not None else "vqvae"
        items = [{"file": e.file, **{k: getattr(e, k).tolist() for k in ("mu", "logvar", "codes", "z_e")
                                     if getattr(e, k) is not None}} for e in encodings]
        text = json.dumps({"model": args.model, "kind": kind, "items": items})
        if args.output is None:
            return text
        args.output.write_text(text + "\n")
        return f"wrote {args.output} ({len(items)} item{'s' if len(items) != 1 else ''})"
    if args.command == "decode":
        return _write(api.decode(**_decode_body(args)), args)
    if args.command == "interpolate":
        images = api.interpolate(args.model, _path(args.a), _path(args.b), steps=args.steps, method=args.method)
        return _write(images, args, nrow=len(images))
    if args.command == "score":
        codecs = args.codec or ["png"]
        scores = api.score(args.model, _paths(args.images), prior=args.prior, label=args.label, k=args.k, seed=args.seed,
                           codecs=codecs, heat_map=bool(args.heat_maps), background=args.background)
        if args.heat_maps:
            if any(s.heat_map is None for s in scores):
                raise CLIError("the server sent no heat maps (map_png): it predates them")
            grid([s.heat_map for s in scores]).save(args.heat_maps, format="PNG")
        if args.json:
            return json.dumps([{k: v for k, v in vars(s).items() if k not in ("map", "heat_map") and v is not None}
                               for s in scores], indent=2)
        ratio = args.background is not None
        lines = [f"# {scores[0].bound}", *([f"# background {scores[0].background_bound}"] if ratio else []),
                 "file\tbits/dim\t" + "\t".join(f"{c} bits/dim\tcomplexity ({c})" for c in codecs)
                 + ("\tratio" if ratio else "") + "\tverdict"]
        for s in scores:
            verdict = "-" if s.verdict is None else (
                f"{'unusual' if s.verdict['unusual'] else 'typical'} ({s.verdict['score']} {s.verdict['value']:+.4f} "
                f"vs {s.verdict['threshold']:+.4f})")
            lines.append(f"{s.file}\t{s.bits_per_dim:.4f}\t" + "\t".join(
                f"{s.codec_bits_per_dim.get(c, float('nan')):.4f}\t{s.complexity_score.get(c, float('nan')):+.4f}"
                for c in codecs) + (f"\t{s.ratio_score:+.4f}" if ratio else "") + f"\t{verdict}")
        return "\n".join(lines)
    raise AssertionError(args.command)


def _path(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise CLIError(f"no such file: {name}")
    return path


def _paths(names: list[str]) -> list[Path]:
    return [_path(n) for n in names]


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise CLIError(f"invalid --url {url!r}: {err}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CLIError(f"invalid --url {url!r}: give the service's address as http://HOST:PORT")


def main(argv: Sequence[str] | None = None) -> int:
    """The `genserve` command: 0 on success, 1 on any error (one line on stderr), 2 for bad usage."""
    args = _parser().parse_args(argv)
    try:
        _check_url(args.url)
        with client.Client(args.url, timeout=args.timeout, retries=args.retries, max_retry_wait=args.max_retry_wait) as api:
            print(_run(api, args))
        return 0
    except APIError as err:
        message = f"error {err}"
    except httpx.TimeoutException:
        message = f"error: no answer from {args.url} within {args.timeout:g} s"
    except httpx.TransportError as err:
        message = f"error: cannot reach {args.url}: {err}"
    except (CLIError, UnexpectedResponse, httpx.InvalidURL, OSError, ValueError) as err:
        message = f"error: {err}"
    print(f"genserve: {client.shorten(message, 1000)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
