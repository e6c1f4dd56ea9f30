"""The service on the shipped weights on one device: start-up time, every endpoint once, and the
batch-invariance verdicts (GET /config's pass_sizes), as JSON and markdown.

Starts `python -m app` (benchmarks/load.py's Server) with GENSERVE_DEVICE, times spawn-to-ready,
then calls, through the typed client (app/client.py), every endpoint of every served model:
/sample (each prior of a VQ-VAE), /reconstruct, /encode, /decode (from /encode's answer),
/interpolate, and the service's own /, /health, /ready, /config, /models, /models/problems,
/metrics, /docs, /openapi.json. Each call's status, seconds and a short note go into the report.

With --graphs it starts a second service with GENSERVE_CUDA_GRAPHS=true beside it and asks both
the same seeded questions: the answers of its graphed operations are compared byte for byte, and
where they differ the share of differing pixels and the largest difference are reported (a
prior's recorded step is sampling mode "stepped", whose logits equal the eager "cached" mode's
up to float rounding, so a code can flip where a uniform sits on a probability edge).

    python benchmarks/gpu/service.py --device cuda --graphs --out runs/gpu
    python benchmarks/gpu/service.py --device cpu --out /tmp/svc     # a dry run on the CPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: app.client

from load import ROOT, Server, free_port, upload_images  # noqa: E402

from app.client import Client  # noqa: E402


def start(label: str, device: str, weights: Path, log_dir: Path, extra: dict[str, str], timeout_s: float) -> tuple[Server, float]:
    """A started service and its seconds from spawn to the first 200 of GET /ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    env.update(GENSERVE_WEIGHTS_DIR=str(weights), GENSERVE_DEVICE=device, GENSERVE_HOST="127.0.0.1",
               GENSERVE_ACCESS_LOG="false", GENSERVE_CHECK_CACHE_DIR="none", GENSERVE_RELOAD_INTERVAL_S="0", **extra)
    server = Server(label, free_port(), env, log_dir / f"{label}.log")
    env["GENSERVE_PORT"] = str(server.port)
    began = time.perf_counter()
    server.start()
    deadline = began + timeout_s
    while True:  # Server.wait_ready polls every 0.25 s; start-up time wants finer
        if server.process.poll() is not None:
            raise RuntimeError(f"{label} exited during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server, time.perf_counter() - began
        except httpx.HTTPError:
            pass
        if time.perf_counter() > deadline:
            server.stop()
            raise RuntimeError(f"{label} not ready after {timeout_s:g} s:\n{server.log_tail()}")
        time.sleep(0.02)


def settled(server: Server, timeout_s: float) -> dict[str, Any]:
    """GET /config once no batcher is left on its default pass size (its check has run)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        config = server.get_json("/config")
        if "default" not in (config.get("pass_size_sources") or {}).values() or time.perf_counter() > deadline:
            return config
        time.sleep(0.1)


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
    if isinstance(result, list):
        return f"{len(result)} items"
    return type(result).__name__


def pngs(images: list[Image.Image]) -> list[bytes]:
    """Each image as PNG bytes (the answers are compared image by image)."""
    out = []
    for img in images:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def every_endpoint(url: str, models: list[Any], upload: bytes, calls: Calls) -> None:
    """Every endpoint once per model (and per prior) that the model offers (GET /models' operations); the
    images' bytes kept in calls.answers."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in ("/", "/health", "/ready", "/config", "/models", "/models/problems", "/metrics", "/docs", "/openapi.json"):
            calls.run(f"GET {path}", lambda: http.get(path).raise_for_status())
    with Client(url, timeout=300) as client:
        for m in models:
            offers = set(m.operations)  # a model without a latent (vae_context) only samples: the rest is a 422
            priors = [p.name for p in (m.priors or [])] or [None]
            for prior in priors if "sample" in offers else []:
                label = f"sample {m.name}" + (f" prior={prior}" if prior else "")
                s = calls.run(label, lambda: client.sample(m.name, n=16, seed=1, prior=prior))
                if s is not None:
                    calls.answers[label] = pngs(s.images)
            if not {"reconstruct", "encode", "decode", "interpolate"} <= offers:
                continue  # the image routes go together: a model has a latent or not
            image = Image.open(io.BytesIO(upload))
            rec = calls.run(f"reconstruct {m.name}", lambda: client.reconstruct(m.name, [image, image]))
            if rec is not None:
                calls.answers[f"reconstruct {m.name}"] = pngs(rec)
            enc = calls.run(f"encode {m.name}", lambda: client.encode(m.name, [image, image]))
            if enc:
                if m.kind == "vae":
                    z = [list(map(float, e.mu)) for e in enc]
                    dec = calls.run(f"decode {m.name}", lambda: client.decode(m.name, z=z))
                else:
                    codes = [np.asarray(e.codes).tolist() for e in enc]
                    dec = calls.run(f"decode {m.name}", lambda: client.decode(m.name, codes=codes))
                if dec is not None:
                    calls.answers[f"decode {m.name}"] = pngs(dec)
            calls.run(f"interpolate {m.name}", lambda: client.interpolate(m.name, image, image, steps=4))


def image_difference(a: list[bytes], b: list[bytes]) -> str:
    """How two answers (PNGs, image by image) differ: the share of differing pixel values and the largest difference."""
    if len(a) != len(b):
        return f"{len(a)} images vs {len(b)}"
    try:
        x = [np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in a]
        y = [np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in b]
    except Exception as err:  # noqa: BLE001
        return f"not comparable ({err})"
    if any(p.shape != q.shape for p, q in zip(x, y)):
        return "images of different sizes"
    diff = np.concatenate([np.abs(p - q).reshape(-1) for p, q in zip(x, y)])
    return f"{(diff > 0).mean():.2%} of pixel values differ, largest by {int(diff.max())}/255"


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--graphs", action="store_true", help="also a GENSERVE_CUDA_GRAPHS=true service, compared")
    p.add_argument("--out", type=Path, required=True, help="folder for service.json and service.md")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    upload = upload_images(1, 0)[0][0]
    report: dict[str, Any] = {"device": args.device}
    with tempfile.TemporaryDirectory(prefix="genserve-gpu-") as tmp:
        began = time.perf_counter()
        server, report["startup_s"] = start("eager", args.device, args.weights, Path(tmp), {}, args.startup_timeout)
        try:
            with Client(server.url) as client:
                models = client.models()
            report["models"] = len(models)
            calls = Calls()
            every_endpoint(server.url, models, upload, calls)
            report["calls"] = calls.rows
            config = settled(server, args.startup_timeout)  # the pass size checks run after /ready
            report["settled_s"] = time.perf_counter() - began
            report["resolved_device"] = config["resolved_device"]
            report["pass_sizes"] = config["pass_sizes"]
            report["pass_size_sources"] = config.get("pass_size_sources")
        finally:
            server.stop()
        write(args.out, report)  # now, so that a later step running out of time loses nothing of this one
        if args.graphs:
            graphed, startup = start("graphs", args.device, args.weights, Path(tmp), {"GENSERVE_CUDA_GRAPHS": "true"},
                                     args.startup_timeout)
            try:
                other = Calls()
                every_endpoint(graphed.url, models, upload, other)
                sizes = graphed.get_json("/config")["graph_sizes"]
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
