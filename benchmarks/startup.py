"""Start-up time of the service: `python -m app` until GET /ready answers 200, with every weight file of
--weights, side by side with the same start of an earlier commit (by default the one before issue 21,
when the batch-invariance checks ran before the service was ready), alternating which starts first.

Three starts are timed in each round, each a fresh process on the same weights directory:
- `baseline`: the earlier commit's `python -m app`, from a git worktree of it;
- `empty cache`: this tree with an empty check cache (GENSERVE_CHECK_CACHE_DIR), as a replica's first
  start: ready before the checks, which then run in the background; "settled" is when GET /config
  shows no batcher left on its default pass size;
- `cached`: this tree with the cache its first start filled, as a replica that starts again.
For each: the first answer of any kind (the listener is open), /ready's 200, and when every check has
settled. The imports alone (`python -c "import app.main"`) are timed too. Round 0 warms the page cache
and fills the cache, and is not counted.

    python -m benchmarks.startup                       # 3 rounds against 68c5327
    python -m benchmarks.startup --rounds 5 --baseline HEAD~3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, Server, wait_settled

BASELINE = "68c5327"  # main before issue 21: every check before /ready


def start_once(tree: Path, weights: Path, device: str, cache: str, timeout_s: float, log_dir: Path) -> dict[str, float]:
    """Seconds from spawning `python -m app` in `tree` to its first answer, /ready's 200, and every check settled."""
    server = Server.app("startup", log_dir, {"GENSERVE_WEIGHTS_DIR": str(weights), "GENSERVE_DEVICE": device,
                                             "GENSERVE_CHECK_CACHE_DIR": cache, "GENSERVE_RELOAD_INTERVAL_S": "0"}, cwd=tree)
    server.start()
    try:
        ready = server.wait_ready(timeout_s, interval_s=0.01)
        config = wait_settled(server.url, timeout_s, interval_s=0.01)
        settled = time.perf_counter() - server.started if config.get("pass_size_sources") is not None else ready
        return {"first answer": server.first_answer_s or ready, "ready": ready, "settled": settled}
    finally:
        server.stop()


def imports_once(tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import app.main"], cwd=tree, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default=BASELINE, help=f"the git commit to compare with (default {BASELINE})")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    files, weights = sorted(args.weights.glob("*.safetensors")), args.weights.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.baseline], cwd=ROOT, check=True)
        try:
            start = functools.partial(start_once, weights=weights, device=args.device, timeout_s=args.timeout, log_dir=Path(tmp))
            starts = {"baseline": lambda: start(base, cache="none"),
                      "empty cache": lambda: start(ROOT, cache=tempfile.mkdtemp(dir=tmp)),
                      "cached": lambda: start(ROOT, cache=str(Path(tmp) / "cache"))}
            print(f"{sys.executable}, device {args.device}, {len(files)} weight files "
                  f"({sum(f.stat().st_size for f in files) / 1e6:.1f} MB); baseline {args.baseline}")
            results: dict[str, list[dict[str, float]]] = {name: [] for name in starts}
            imports: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for r in range(args.rounds + 1):  # round 0: page cache and check cache, not counted
                order = ["baseline", "cached", "empty cache"] if r == 0 else list(starts) if r % 2 else list(starts)[::-1]
                for name in order:  # in round 0 "cached" fills the cache
                    t = starts[name]()
                    print(f"round {r}: {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
                          + (" (not counted)" if r == 0 else ""), flush=True)
                    if r:
                        results[name].append(t)
                if r:
                    imports["baseline"].append(imports_once(base))
                    imports["this tree"].append(imports_once(ROOT))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"\nmedians over {args.rounds} rounds:")
    for name, ts in results.items():
        print(f"  {name:12s} " + ", ".join(f"{k} {statistics.median(t[k] for t in ts):.2f} s" for k in ts[0]))
    for name, ts in imports.items():
        print(f"  imports alone ({name}): {statistics.median(ts):.2f} s")
    ready = {name: statistics.median(t["ready"] for t in ts) for name, ts in results.items()}
    for name in ("empty cache", "cached"):
        print(f"ready: baseline / {name} = {ready['baseline'] / ready[name]:.2f}x "
              f"({ready['baseline']:.2f} s -> {ready[name]:.2f} s)")


if __name__ == "__main__":
    main()
