"""The service on the shipped weights on one device: start-up time, every endpoint once, and the
batch-invariance verdicts (GET /config's pass_sizes), as JSON and markdown.

Times `python -m app` from spawn to /ready, then calls through the typed client (app/client.py) every
endpoint of every served model (and of the service: /, /health, /ready, /config, /models, ...): status,
seconds, a note. With --graphs, a second service with GENSERVE_CUDA_GRAPHS=true gets the same seeded
questions, its answers compared byte for byte (where they differ: the share of differing pixels and
the largest difference; a prior's recorded "stepped" step can flip a code at a probability edge).

    python -m benchmarks.gpu.service --device cuda --graphs --out runs/gpu
    python -m benchmarks.gpu.service --device cpu --out /tmp/svc     # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.client import Client
from benchmarks.harness import ROOT, Server, image_difference, png_bytes, table, upload_images, wait_settled

__all__ = ["image_difference"]  # tests/test_gpu_check.py checks the comparison through this module


@contextlib.contextmanager
def started(label: str, args, log_dir: Path, extra: dict[str, str]) -> Iterator[tuple[Server, float]]:
    """A service, and its seconds from spawn to the first 200 of GET /ready; stopped at the end."""
    server = Server.app(label, log_dir, args.weights, {"GENSERVE_DEVICE": args.device, "GENSERVE_CHECK_CACHE_DIR": "none",
                                                       "GENSERVE_RELOAD_INTERVAL_S": "0", **extra})  # fmt: skip
    server.start()
    try:
        yield server, server.wait_ready(args.startup_timeout, interval_s=0.02)
    finally:
        server.stop()


class Calls:
    """Runs named calls, recording status, seconds and a note; a failure is recorded, not raised."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.answers: dict[str, list[bytes]] = {}

    def run(self, name: str, fn: Any, keep: bool = False) -> Any:
        """fn(); with `keep`, its images' PNG bytes kept in `answers`, image by image."""
        began, result, note = time.perf_counter(), None, ""
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - reported, and the next call runs
            note = f"{type(err).__name__}: {str(err)[:300]}"
        ok, seconds = not note, time.perf_counter() - began
        self.rows.append({"call": name, "ok": ok, "seconds": seconds, "note": _note(result) if ok else note})
        if keep and result is not None:
            self.answers[name] = [png_bytes(image) for image in getattr(result, "images", result)]
        return result


def _note(result: Any) -> str:
    if isinstance(images := getattr(result, "images", result), list) and images and isinstance(images[0], Image.Image):
        return f"{len(images)} images {images[0].size[0]}x{images[0].size[1]} {images[0].mode}"
    if isinstance(result, httpx.Response):
        return f"HTTP {result.status_code}, {len(result.content)} bytes"
    return f"{len(result)} items" if isinstance(result, list) else type(result).__name__


def every_endpoint(url: str, models: list[Any], upload: bytes, calls: Calls) -> None:
    """Every endpoint once per model (and per prior) that the model offers (GET /models' operations)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in ("/", "/health", "/ready", "/config", "/models", "/models/problems", "/metrics", "/docs", "/openapi.json"):
            calls.run(f"GET {path}", lambda: http.get(path).raise_for_status())
    with Client(url, timeout=300) as client:
        for m in models:
            offers = set(m.operations)  # a model without a latent (vae_context) only samples: the rest is a 422
            for prior in ([p.name for p in (m.priors or [])] or [None]) if "sample" in offers else []:
                calls.run(f"sample {m.name}" + (f" prior={prior}" if prior else ""),
                          lambda: client.sample(m.name, n=16, seed=1, prior=prior), keep=True)
            if not {"reconstruct", "encode", "decode", "interpolate"} <= offers:
                continue  # the image routes go together: a model has a latent or not
            image = Image.open(io.BytesIO(upload))
            calls.run(f"reconstruct {m.name}", lambda: client.reconstruct(m.name, [image, image]), keep=True)
            if enc := calls.run(f"encode {m.name}", lambda: client.encode(m.name, [image, image])):
                given = {"z": [list(map(float, e.mu)) for e in enc]} if m.kind == "vae" else {
                    "codes": [np.asarray(e.codes).tolist() for e in enc]}
                calls.run(f"decode {m.name}", lambda: client.decode(m.name, **given), keep=True)
            calls.run(f"interpolate {m.name}", lambda: client.interpolate(m.name, image, image, steps=4))


def markdown(report: dict[str, Any]) -> str:
    calls = [[r["call"], "yes" if r["ok"] else "**no**", f"{r['seconds'] * 1000:.1f}", r["note"]] for r in report["calls"]]
    sources = report.get("pass_size_sources") or {}
    sizes = [[k, f"{v}" + (f" ({sources[k]})" if sources.get(k, "checked") != "checked" else "")]
             for k, v in sorted(report["pass_sizes"].items())]  # fmt: skip
    lines = [f"## Service on {report['device']}: start-up {report['startup_s']:.2f} s to /ready, "
             f"{report['settled_s']:.2f} s until every pass size check had run, {report['models']} models", "",
             table(["call", "ok", "ms", "note"], calls), "",
             "### Batch invariance: the pass sizes whose rows are bit-identical to a full pass (GET /config)", "",
             table(["batcher", "pass sizes kept"], sizes)]
    if "graphs" in report:
        g = report["graphs"]
        compared = [[k, "yes" if v["same"] else "no", v["difference"]] for k, v in sorted(g["compared"].items())]
        compared += [[f"{r['call']} (failed with graphs)", "no", r["note"]] for r in g["failed_calls"]]
        lines += ["", f"### The same questions to a service with GENSERVE_CUDA_GRAPHS=true (start-up {g['startup_s']:.2f} s)",
                  "", table(["answer", "same bytes", "difference"], compared), "",
                  "Graph sizes per batcher: " + json.dumps(g["graph_sizes"])]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    (out / "service.json").write_text(json.dumps(report, indent=1))
    (out / "service.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.service", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--graphs", action="store_true", help="also a GENSERVE_CUDA_GRAPHS=true service, compared")
    p.add_argument("--out", type=Path, required=True, help="folder for service.json and service.md")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    upload, report = upload_images(1, 0)[0][0], {"device": args.device}
    with tempfile.TemporaryDirectory(prefix="genserve-gpu-") as tmp:
        with started("eager", args, Path(tmp), {}) as (server, report["startup_s"]):
            with Client(server.url) as client:
                models = client.models()
            report["models"], calls = len(models), Calls()
            every_endpoint(server.url, models, upload, calls)
            config = wait_settled(server.url, args.startup_timeout)  # the pass size checks run after /ready
            report.update(calls=calls.rows, settled_s=time.perf_counter() - server.started,
                          resolved_device=config["resolved_device"], pass_sizes=config["pass_sizes"],
                          pass_size_sources=config.get("pass_size_sources"))
        write(args.out, report)  # now, so that a later step running out of time loses nothing of this one
        if args.graphs:
            with started("graphs", args, Path(tmp), {"GENSERVE_CUDA_GRAPHS": "true"}) as (graphed, startup):
                other = Calls()
                every_endpoint(graphed.url, models, upload, other)
                sizes = graphed.get_json("/config")["graph_sizes"]
            compared = {k: {"same": other.answers.get(k) == v,
                            "difference": "" if other.answers.get(k) == v else image_difference(v, other.answers.get(k, []))}
                        for k, v in calls.answers.items()}
            report["graphs"] = {"startup_s": startup, "compared": compared, "graph_sizes": sizes,
                                "failed_calls": [r for r in other.rows if not r["ok"]]}
    write(args.out, report)
    failed = [r["call"] for r in report["calls"] if not r["ok"]]
    failed += [f"{r['call']} (with graphs)" for r in report.get("graphs", {}).get("failed_calls", [])]
    print(markdown(report))
    print(f"{len(report['calls']) - len(failed)} of {len(report['calls'])} calls answered"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
