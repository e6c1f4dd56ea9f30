"""Is a cheap model stuck behind a slow one? Latency of a cheap request, idle and beside heavy load.

Starts the service (`python -m app`, the same way as benchmarks/load.py) and measures, one
request at a time, `GET /sample?model=<cheap>&n=1` with a short pause between requests: first
on an idle server, then while --heavy-clients clients send `GET /sample?model=<slow>&n=<heavy-n>`
back to back (the autoregressive `vae` drawing 256 images by default). Prints p50/p95/max of
both phases and the busy/idle ratio of the p50s. Target: at most 2x.

    python benchmarks/fairness.py
    python benchmarks/fairness.py --cheap vae_conv --slow vae --heavy-n 256 --heavy-clients 4 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import ROOT, Server, free_port  # noqa: E402  (benchmarks/load.py, beside this script)


async def probe(client: httpx.AsyncClient, model: str, count: int, pause_s: float) -> list[float]:
    """`count` sequential cheap requests -> their latencies in ms."""
    latencies = []
    for seed in range(count):
        start = time.perf_counter()
        response = await client.get("/sample", params={"model": model, "n": 1, "seed": seed})
        response.raise_for_status()
        latencies.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(pause_s)
    return latencies


async def run(url: str, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await probe(client, args.cheap, 5, 0)  # warm the connection
        idle = await probe(client, args.cheap, args.requests, args.pause)
        stop = asyncio.Event()
        heavy_done = 0

        async def heavy() -> None:
            nonlocal heavy_done
            async with httpx.AsyncClient(base_url=url, timeout=600) as own:
                while not stop.is_set():
                    r = await own.get("/sample", params={"model": args.slow, "n": args.heavy_n, "seed": 1})
                    r.raise_for_status()
                    heavy_done += 1

        tasks = [asyncio.create_task(heavy()) for _ in range(args.heavy_clients)]
        await asyncio.sleep(args.settle)  # let the heavy passes start
        busy = await probe(client, args.cheap, args.requests, args.pause)
        stop.set()
        await asyncio.gather(*tasks)
    return idle, busy, heavy_done


def summary(latencies: list[float]) -> str:
    p50, p95 = np.percentile(latencies, [50, 95])
    return f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  max {max(latencies):6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cheap", default="vae_conv", help="the cheap model (default vae_conv)")
    parser.add_argument("--slow", default="vae", help="the slow model (default vae, autoregressive)")
    parser.add_argument("--heavy-n", type=int, default=256, help="images per slow request (default 256)")
    parser.add_argument("--heavy-clients", type=int, default=4, help="concurrent slow clients (default 4)")
    parser.add_argument("--requests", type=int, default=50, help="cheap requests per phase (default 50)")
    parser.add_argument("--pause", type=float, default=0.01, help="seconds between cheap requests (default 0.01)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of heavy load before measuring")
    parser.add_argument("--threads", type=int, default=None, help="GENSERVE_TORCH_THREADS (default: the service's own)")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="more GENSERVE_* settings")
    args = parser.parse_args()

    port = free_port()
    env = {
        **os.environ,
        "GENSERVE_WEIGHTS_DIR": str(args.weights.resolve()),
        "GENSERVE_PORT": str(port),
        "GENSERVE_HOST": "127.0.0.1",
        "GENSERVE_ACCESS_LOG": "false",
        **({"GENSERVE_TORCH_THREADS": str(args.threads)} if args.threads else {}),
        **dict(item.split("=", 1) for item in args.env),
    }
    with tempfile.TemporaryDirectory(prefix="genserve-fairness-") as log_dir:
        server = Server("service", port, env, Path(log_dir) / "server.log")
        server.start()
        try:
            server.wait_ready(300)
            idle, busy, heavy_done = asyncio.run(run(server.url, args))
        finally:
            server.stop()
    settings = " ".join(args.env) or "defaults"
    print(f"# {args.cheap} n=1, one at a time; beside it {args.heavy_clients} clients of {args.slow} n={args.heavy_n} "
          f"({heavy_done} answered); torch threads {args.threads}; settings: {settings}")
    print(f"idle: {summary(idle)}")
    print(f"busy: {summary(busy)}")
    ratio = float(np.percentile(busy, 50) / np.percentile(idle, 50))
    print(f"busy / idle p50: {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
