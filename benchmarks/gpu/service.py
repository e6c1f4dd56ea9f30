"""The service on the shipped weights on one device: start-up time, every endpoint once, and the
batch-invariance verdicts (GET /config's pass_sizes), as JSON and markdown.

Starts `python -m app` (harness.Server) with GENSERVE_DEVICE, times spawn-to-ready, then calls, through
the typed client (app/client.py), every endpoint of every served model: /sample (each prior of a
VQ-VAE), /reconstruct, /encode, /decode (from /encode's answer), /interpolate, and the service's own /,
/health, /ready, /config, /models, /models/problems, /metrics, /docs, /openapi.json. Each call's status,
seconds and a short note go into the report.

With --graphs it starts a second service with GENSERVE_CUDA_GRAPHS=true and asks it the same seeded
questions: the answers of its graphed operations are compared byte for byte, and where they differ the
share of differing pixels and the largest difference are reported (a prior's recorded step is sampling
mode "stepped", whose logits equal the eager "cached" mode's up to float rounding, so a code can flip
where a uniform sits on a probability edge).

    python -m benchmarks.gpu.service --device cuda --graphs --out runs/gpu
    python -m benchmarks.gpu.service --device cpu --out /tmp/svc     # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.client import Client
from benchmarks.harness import ROOT, Server, image_difference, png_bytes, upload_images, wait_settled

__all__ = ["image_difference"]  # tests/test_gpu_check.py checks the comparison through this module


def start(label: str, device: str, weights: Path, log_dir: Path, extra: dict[str, str],
          timeout_s: float) -> tuple[Server, float]:
    """A started service and its seconds from spawn to the first 200 of GET /ready."""
    server = Server.app(label, log_dir, {"GENSERVE_WEIGHTS_DIR": str(weights), "GENSERVE_DEVICE": device,
                                         "GENSERVE_CHECK_CACHE_DIR": "none", "GENSERVE_RELOAD_INTERVAL_S": "0", **extra})
    server.start()
    try:
        return server, server.wait_ready(timeout_s, interval_s=0.02)
    except BaseException:
        server.stop()
        raise


class Calls:
    """Runs named calls, recording status, seconds and a note; a failure is recorded, not raised."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.answers: dict[str, list[bytes]] = {}

    def run(self, name: str, fn: Any) -> Any:
        began = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - reported, and the next call runs
            self.rows.append({"call": name, "ok": False, "seconds": time.perf_counter() - began,
                              "note": f"{type(err).__name__}: {str(err)[:300]}"})
            return None
        self.rows.append({"call": name, "ok": True, "seconds": time.perf_counter() - began, "note": _note(result)})
        return result


def _note(result: Any) -> str:
    if isinstance(result, list) and result and isinstance(result[0], Image.Image):
        return f"{len(result)} images {result[0].size[0]}x{result[0].size[1]} {result[0].mode}"
    if hasattr(result, "images"):
        return f"{len(result.images)} images, seed {result.seed}"
    if isinstance(result, httpx.Response):
        return f"HTTP {result.status_code}, {len(result.content)} bytes"
    return f"{len(result)} items" if isinstance(result, list) else type(result).__name__


def every_endpoint(url: str, models: list[Any], upload: bytes, calls: Calls) -> None:
    """Every endpoint once per model (and per prior) that the model offers (GET /models' operations); the
    images' bytes kept in calls.answers, image by image."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in ("/", "/health", "/ready", "/config", "/models", "/models/problems", "/metrics", "/docs", "/openapi.json"):
            calls.run(f"GET {path}", lambda: http.get(path).raise_for_status())
    with Client(url, timeout=300) as client:
        for m in models:
            offers = set(m.operations)  # a model without a latent (vae_context) only samples: the rest is a 422
            for prior in ([p.name for p in (m.priors or [])] or [None]) if "sample" in offers else []:
                label = f"sample {m.name}" + (f" prior={prior}" if prior else "")
                if (s := calls.run(label, lambda: client.sample(m.name, n=16, seed=1, prior=prior))) is not None:
                    calls.answers[label] = [png_bytes(img) for img in s.images]
            if not {"reconstruct", "encode", "decode", "interpolate"} <= offers:
                continue  # the image routes go together: a model has a latent or not
            image = Image.open(io.BytesIO(upload))
            if (rec := calls.run(f"reconstruct {m.name}", lambda: client.reconstruct(m.name, [image, image]))) is not None:
                calls.answers[f"reconstruct {m.name}"] = [png_bytes(img) for img in rec]
            if enc := calls.run(f"encode {m.name}", lambda: client.encode(m.name, [image, image])):
                given = {"z": [list(map(float, e.mu)) for e in enc]} if m.kind == "vae" else {
                    "codes": [np.asarray(e.codes).tolist() for e in enc]}
                if (dec := calls.run(f"decode {m.name}", lambda: client.decode(m.name, **given))) is not None:
                    calls.answers[f"decode {m.name}"] = [png_bytes(img) for img in dec]
            calls.run(f"interpolate {m.name}", lambda: client.interpolate(m.name, image, image, steps=4))


def markdown(report: dict[str, Any]) -> str:
    lines = [f"## Service on {report['device']}: start-up {report['startup_s']:.2f} s to /ready, "
             f"{report['settled_s']:.2f} s until every pass size check had run, {report['models']} models", "",
             "| call | ok | ms | note |", "|---|---|---|---|"]
    lines += [f"| {r['call']} | {'yes' if r['ok'] else '**no**'} | {r['seconds'] * 1000:.1f} | {r['note']} |"
              for r in report["calls"]]
    lines += ["", "### Batch invariance: the pass sizes whose rows are bit-identical to a full pass (GET /config)", "",
              "| batcher | pass sizes kept |", "|---|---|"]
    sources = report.get("pass_size_sources") or {}
    lines += [f"| {k} | {v}{' (' + sources[k] + ')' if sources.get(k, 'checked') != 'checked' else ''} |"
              for k, v in sorted(report["pass_sizes"].items())]
    if "graphs" in report:
        g = report["graphs"]
        lines += ["", f"### The same questions to a service with GENSERVE_CUDA_GRAPHS=true (start-up {g['startup_s']:.2f} s)",
                  "", "| answer | same bytes | difference |", "|---|---|---|"]
        lines += [f"| {k} | {'yes' if v['same'] else 'no'} | {v['difference']} |" for k, v in sorted(g["compared"].items())]
        lines += [f"| {r['call']} (failed with graphs) | no | {r['note']} |" for r in g["failed_calls"]]
        lines += ["", "Graph sizes per batcher: " + json.dumps(g["graph_sizes"])]
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
    upload, weights = upload_images(1, 0)[0][0], args.weights.resolve()
    report: dict[str, Any] = {"device": args.device}
    with tempfile.TemporaryDirectory(prefix="genserve-gpu-") as tmp:
        server, report["startup_s"] = start("eager", args.device, weights, Path(tmp), {}, args.startup_timeout)
        try:
            with Client(server.url) as client:
                models = client.models()
            report["models"], calls = len(models), Calls()
            every_endpoint(server.url, models, upload, calls)
            config = wait_settled(server.url, args.startup_timeout)  # the pass size checks run after /ready
            report.update(calls=calls.rows, settled_s=time.perf_counter() - server.started,
                          resolved_device=config["resolved_device"], pass_sizes=config["pass_sizes"],
                          pass_size_sources=config.get("pass_size_sources"))
        finally:
            server.stop()
        write(args.out, report)  # now, so that a later step running out of time loses nothing of this one
        if args.graphs:
            graphs_on = {"GENSERVE_CUDA_GRAPHS": "true"}
            graphed, startup = start("graphs", args.device, weights, Path(tmp), graphs_on, args.startup_timeout)
            try:
                other = Calls()
                every_endpoint(graphed.url, models, upload, other)
                sizes = graphed.get_json("/config")["graph_sizes"]  # type: ignore[index]
            finally:
                graphed.stop()
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
