"""CUDA graphs against eager, per operation and pass size, on the shipped weights: the speed-up, and
that a replay gives the outputs eager gives.

Every operation the service records with GENSERVE_CUDA_GRAPHS (app/operations.py's `capture`), at each
--sizes pass size, from the same seeded inputs: "replay" (app/graphs.py) against "eager" (a prior:
mode "cached"), alternating, --repeats times after --warmup, the device synchronised; medians and
eager / replay. A replay must be bit-identical to its recorded function run eagerly (a prior: mode
"stepped"), or the script fails; against eager, a prior's code can flip where a uniform sits on a
probability edge (logits equal up to float rounding): the share that differs is reported. On the CPU
nothing is recorded ("replay" is the static-buffer path: no speed claim).

    python -m benchmarks.gpu.graphs --device cuda --out runs/gpu
    python -m benchmarks.gpu.graphs --device cpu --sizes 1 4 --repeats 3 --out /tmp/graphs   # dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from app.graphs import describe, recorded_sizes
from app.operations import operations
from app.registry import Registry
from benchmarks.harness import ROOT, table

HEADERS = ["operation", "rows", "replay ms", "eager ms", "eager / replay", "same as recorded", "same as eager"]


def timed(fn, inputs, device: torch.device) -> tuple[float, tuple]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode():
        out = fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, out


def write(out: Path | None, header: str, rows: list[list[str]], notes: list[str], broken: list[str]) -> str:
    text = "\n".join([f"## {header}", "", table(HEADERS, rows), "", *notes, ""])
    text += f"\n**Replays that differ from their recorded function:** {', '.join(broken)}\n" if broken else ""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "graphs.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.graphs", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", nargs="*", default=None, help="only these models (default: every one)")
    p.add_argument("--out", type=Path, default=None, help="write graphs.md here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    record = device.type == "cuda"
    header = (f"CUDA graphs vs eager on {torch.cuda.get_device_name(device) if record else 'the CPU (dry run: no graphs)'}, "
              f"torch {torch.__version__}, sizes {args.sizes}, median of {args.repeats}")
    rows, notes, broken = [], [], []
    for entry in Registry.load(args.weights, device).entries.values():
        for op in operations(entry) if not args.models or entry.name in args.models else []:
            if op.capture is None:
                continue
            began = time.perf_counter()
            fn = op.capture(args.sizes, device, None, record)
            notes.append(f"- {op.key}: {describe(fn)}, recorded in {time.perf_counter() - began:.2f} s")
            for size in args.sizes:
                inputs = tuple(t.to(device) for t in op.example(size, torch.Generator().manual_seed(size)))
                runs = [(timed(fn, inputs, device), timed(op.fn, inputs, device)) for _ in range(args.warmup + args.repeats)]
                (_, got), (_, eager) = runs[-1]  # replay, then eager, each time; the --warmup first ones not counted
                same = all(torch.equal(a, b) for a, b in zip(got, timed(fn.reference, inputs, device)[1]))
                graphed = size in (recorded_sizes(fn) or [])
                if graphed and not same:
                    broken.append(f"{op.key} at {size} rows")
                share = sum(int((x != y).sum()) for x, y in zip(got, eager)) / max(sum(x.numel() for x in got), 1)
                r, e = (statistics.median(run[k][0] for run in runs[args.warmup :]) for k in (0, 1))
                rows.append([str(op.key), f"{size}{'' if graphed else ' (eager)'}", f"{r * 1000:.3f}", f"{e * 1000:.3f}",
                             f"{e / r:.2f}x", "yes" if same else "**no**", "yes" if share == 0 else f"{share:.3%} differ"])
                print(" | ".join(rows[-1]), flush=True)
                write(args.out, header, rows, notes, broken)  # after every row: a timeout keeps what was measured
    print("\n" + write(args.out, header, rows, notes, broken))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
