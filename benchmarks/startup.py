"""Start-up time of the service (`python -m app` until GET /ready answers 200, every file of --weights)
against an earlier commit's (default: before issue 21, when the checks ran before /ready).

Each round starts, alternating the order: `baseline` (a git worktree of that commit), `empty cache`
(this tree, an empty GENSERVE_CHECK_CACHE_DIR: a replica's first start) and `cached` (the cache that
start filled). Each: the first answer, /ready's 200, and every check settled (GET /config); the
imports alone too. Round 0 warms the page cache and is not counted. Target: ready in under 3 s.

    python -m benchmarks.startup                       # 3 rounds against 68c5327
    python -m benchmarks.startup --rounds 5 --baseline HEAD~3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, Server, wait_settled

BASELINE = "68c5327"  # main before issue 21: every check before /ready


def start_once(tree: Path, args, cache: str, log_dir: Path) -> dict[str, float]:
    """Seconds from spawning `python -m app` in `tree` to its first answer, /ready's 200, and every check settled."""
    server = Server.app("startup", log_dir, args.weights, {"GENSERVE_DEVICE": args.device, "GENSERVE_CHECK_CACHE_DIR": cache,
                                                           "GENSERVE_RELOAD_INTERVAL_S": "0"}, cwd=tree)  # fmt: skip
    server.start()
    try:
        ready = server.wait_ready(args.timeout, interval_s=0.01)
        config = wait_settled(server.url, args.timeout, interval_s=0.01)
        settled = time.perf_counter() - server.started if config.get("pass_size_sources") is not None else ready
        return {"first answer": server.first_answer_s or ready, "ready": ready, "settled": settled}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", default=BASELINE, help=f"the git commit to compare with (default {BASELINE})")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    files = sorted(args.weights.glob("*.safetensors"))
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "empty cache": [], "cached": []}
    imports: dict[str, list[float]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(base), args.baseline], cwd=ROOT, check=True)
        try:
            starts = {"baseline": lambda: start_once(base, args, "none", Path(tmp)),
                      "empty cache": lambda: start_once(ROOT, args, tempfile.mkdtemp(dir=tmp), Path(tmp)),
                      "cached": lambda: start_once(ROOT, args, str(Path(tmp) / "cache"), Path(tmp))}
            print(f"{sys.executable}, device {args.device}, {len(files)} weight files "
                  f"({sum(f.stat().st_size for f in files) / 1e6:.1f} MB); baseline {args.baseline}")
            for r in range(args.rounds + 1):  # round 0: page cache and check cache, not counted
                order = ["baseline", "cached", "empty cache"] if r == 0 else list(starts) if r % 2 else list(starts)[::-1]
                for name in order:  # in round 0 "cached" fills the cache
                    t = starts[name]()
                    print(f"round {r}: {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
                          + (" (not counted)" if r == 0 else ""), flush=True)
                    results[name] += [t] if r else []
                for name, tree in (("baseline", base), ("this tree", ROOT)) if r else ():
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-c", "import app.main"], cwd=tree, check=True)
                    imports[name].append(time.perf_counter() - start)
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
