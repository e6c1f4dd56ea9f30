"""Start-up time of the service: `python -m app` until GET /ready answers 200, with every shipped
weight file, against the same start without the files whose names contain "cifar10" (the shipped
Fashion-MNIST files; the colour models' cost is the difference), measured alternately in one run on
the same machine.

Start-up is: the imports, loading every file (models.io.load_model), pairing the priors with their
VQ-VAE, the batch-invariance checks of every batcher (app/batching.py) and the first-touch work of
each model. Each start is a fresh process, so nothing is cached in memory between rounds (the page
cache holds the files after the first round; the first round is reported apart).

    python benchmarks/startup.py                   # weights/, 3 rounds
    python benchmarks/startup.py --rounds 5 --device cpu
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(weights: Path, device: str, timeout_s: float) -> tuple[float, int]:
    """Seconds from spawning `python -m app` to the first 200 from /ready; and the models it lists."""
    port = free_port()
    env = {**os.environ, "GENSERVE_WEIGHTS_DIR": str(weights), "GENSERVE_PORT": str(port), "GENSERVE_DEVICE": device,
           "GENSERVE_ACCESS_LOG": "false"}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty start-up cannot block on it
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the service exited with {proc.returncode}: {log.read()[-2000:]}")
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"not ready after {timeout_s} s")
                try:
                    if client.get("/ready").status_code == 200:
                        elapsed = time.perf_counter() - start
                        return elapsed, len(client.get("/models").json())
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    files = sorted(args.weights.glob("*.safetensors"))
    grey = [f for f in files if "cifar10" not in f.name]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp)
        for f in grey:
            (subset / f.name).symlink_to(f.resolve())
        sets = {"all shipped": (args.weights, files), "Fashion-MNIST only": (subset, grey)}
        print(f"{sys.executable}, torch threads default, device {args.device}, {os.cpu_count()} cores")
        for name, (_, fs) in sets.items():
            print(f"  {name}: {len(fs)} files, {sum(f.stat().st_size for f in fs) / 1e6:.1f} MB")
        times: dict[str, list[float]] = {name: [] for name in sets}
        for r in range(args.rounds + 1):  # round 0 warms the page cache and is reported apart
            order = list(sets.items()) if r % 2 else list(sets.items())[::-1]  # alternate which set starts first
            for name, (folder, _) in order:
                seconds, models = start_once(folder, args.device, args.timeout)
                print(f"round {r}: {name}: ready in {seconds:.2f} s ({models} models listed)"
                      + (" (cold, not counted)" if r == 0 else ""), flush=True)
                if r:
                    times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"median {name}: {m:.2f} s over {args.rounds} rounds")
    a, b = medians["all shipped"], medians["Fashion-MNIST only"]
    print(f"all shipped / Fashion-MNIST only: {a / b:.2f}x ({a - b:+.2f} s for the colour models)")


if __name__ == "__main__":
    main()
