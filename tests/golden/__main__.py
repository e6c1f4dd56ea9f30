"""python -m tests.golden [--write] [--weights DIR] [--out FILE]

Without --write: compute the shipped models' answers and compare them with tests/golden/shipped.json,
printing every difference (exit status 1 if any). With --write: store them there (or in --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.golden import GOLDEN, WEIGHTS, compare, compute, load, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[1])
    parser.add_argument("--write", action="store_true", help="store the answers as the new golden values")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="the weights directory (default: weights/)")
    parser.add_argument("--out", type=Path, default=GOLDEN, help="the golden file to write or compare with")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    actual = compute(args.weights)
    cases = sum(len(c) for m in actual["models"].values() for c in m["operations"].values())
    print(f"{len(actual['models'])} weight files, {cases} cases in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.write:
        write(actual, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    expected = load(args.out)
    lines = [line for file, model in expected["models"].items() for op in model["operations"]
             for line in compare(expected, actual, file, op)]
    lines += [f"{file}: served, but without golden values" for file in actual["models"] if file not in expected["models"]]
    print("\n".join(lines) or "every case answers as recorded")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
