"""Start-up time of the service: `python -m app` until GET /ready answers 200, with every shipped
weight file, side by side with the same start of an earlier commit (by default the one before
issue 21, when the batch-invariance checks ran before the service was ready), in one run on the
same machine, alternating which starts first.

Three starts are timed in each round, each a fresh process on the same weights directory:
- `baseline`: the earlier commit's `python -m app`, from a git worktree of it;
- `empty cache`: this tree with an empty check cache (GENSERVE_CHECK_CACHE_DIR), as a replica's
  first start on a new machine: it is ready before the checks, which then run in the background;
  "settled" is when GET /config shows no batcher left on its default size;
- `cached`: this tree with the cache its first start filled, as a replica that starts again.
For each it reports the first answer of any kind (the listener is open), /ready's 200, and (this
tree) when every check has settled. The imports alone (`python -c "import app.main"`) are timed
too. Round 0 warms the page cache and fills the cache, and is reported apart.

    python benchmarks/startup.py                       # 3 rounds against 68c5327
    python benchmarks/startup.py --rounds 5 --baseline HEAD~3
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
BASELINE = "68c5327"  # main before issue 21: every check before /ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(tree: Path, weights: Path, device: str, cache: str, timeout_s: float) -> dict[str, float]:
    """Seconds from spawning `python -m app` in `tree` to its first answer, to /ready's 200 and (where
    /config says where pass sizes came from) to no batcher being left on its default size."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")},
           "GENSERVE_WEIGHTS_DIR": str(weights), "GENSERVE_PORT": str(port), "GENSERVE_DEVICE": device,
           "GENSERVE_ACCESS_LOG": "false", "GENSERVE_CHECK_CACHE_DIR": cache, "GENSERVE_RELOAD_INTERVAL_S": "0"}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty start-up cannot block on it
    times: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the service exited with {proc.returncode}: {log.read()[-2000:]}")
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"not settled after {timeout_s} s")
                try:
                    r = client.get("/ready")
                except httpx.TransportError:
                    time.sleep(0.01)
                    continue
                now = time.perf_counter() - start
                times.setdefault("first answer", now)
                if r.status_code == 200:
                    times.setdefault("ready", now)
                    sources = client.get("/config").json().get("pass_size_sources")
                    if sources is None or "default" not in sources.values():
                        times["settled"] = time.perf_counter() - start if sources is not None else times["ready"]
                        return times
                time.sleep(0.01)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def imports_once(tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import app.main"], cwd=tree, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default=BASELINE, help=f"the git commit to compare with (default {BASELINE})")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    files = sorted(args.weights.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.baseline], cwd=ROOT, check=True)
        try:
            cached = str(Path(tmp) / "cache")
            starts = {
                "baseline": lambda: start_once(base, args.weights.resolve(), args.device, "none", args.timeout),
                "empty cache": lambda: start_once(ROOT, args.weights.resolve(), args.device,
                                                  tempfile.mkdtemp(dir=tmp), args.timeout),
                "cached": lambda: start_once(ROOT, args.weights.resolve(), args.device, cached, args.timeout),
            }
            print(f"{sys.executable}, device {args.device}, {os.cpu_count()} cores, {len(files)} weight files "
                  f"({sum(f.stat().st_size for f in files) / 1e6:.1f} MB); baseline {args.baseline}")
            results: dict[str, list[dict[str, float]]] = {name: [] for name in starts}
            imports: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for r in range(args.rounds + 1):  # round 0: page cache and check cache, not counted
                order = list(starts) if r % 2 else list(starts)[::-1]
                if r == 0:
                    order = ["baseline", "cached", "empty cache"]  # "cached" fills the cache in round 0
                for name in order:
                    t = starts[name]()
                    shown = ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
                    print(f"round {r}: {name}: {shown}" + (" (not counted)" if r == 0 else ""), flush=True)
                    if r:
                        results[name].append(t)
                if r:
                    imports["baseline"].append(imports_once(base))
                    imports["this tree"].append(imports_once(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"\nmedians over {args.rounds} rounds:")
    for name, ts in results.items():
        keys = ts[0].keys()
        print(f"  {name:12s} " + ", ".join(f"{k} {statistics.median(t[k] for t in ts):.2f} s" for k in keys))
    for name, ts in imports.items():
        print(f"  imports alone ({name}): {statistics.median(ts):.2f} s")
    ready = {name: statistics.median(t["ready"] for t in ts) for name, ts in results.items()}
    for name in ("empty cache", "cached"):
        print(f"ready: baseline / {name} = {ready['baseline'] / ready[name]:.2f}x "
              f"({ready['baseline']:.2f} s -> {ready[name]:.2f} s)")


if __name__ == "__main__":
    main()
