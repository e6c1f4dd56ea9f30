"""CUDA graphs against eager, per operation and pass size, on the shipped weights: the speed-up and
a check that the replays give the outputs eager gives.

For every operation that the service records with GENSERVE_CUDA_GRAPHS (app/operations.py's
`capture`: the factorized decoders, the VQ-VAE's decoders, each prior's per-position step), at
each --sizes pass size, from the same seeded inputs:

- replay: the recorded function (app/graphs.py), as the service runs it with cuda_graphs;
- eager: the operation's function as the service runs it without (a prior: sampling mode "cached");
- same as recorded: the replay's outputs against the recorded function run eagerly (for a prior,
  sampling mode "stepped"), which must be bit-identical: a graph replays the kernels its
  recording launched. A difference fails the script.
- same as eager: the replay against the service's eager function; a prior's "stepped" and
  "cached" logits agree up to float rounding, so a code can flip where a uniform sits on a
  probability edge: reported as the share of differing output values, not failed.

Calls alternate, replay then eager, --repeats times after --warmup calls of each, with the device
synchronised around every call; the table shows the medians and eager / replay. On the CPU
nothing is recorded: the replay column is the static-buffer path without a graph (record=False),
which checks the bookkeeping and is no speed claim.

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
from benchmarks.harness import ROOT


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, inputs, device: torch.device) -> tuple[float, tuple]:
    synchronize(device)
    began = time.perf_counter()
    with torch.inference_mode():
        out = fn(*inputs)
    synchronize(device)
    return time.perf_counter() - began, out


def differing_share(a: tuple, b: tuple) -> float:
    total = sum(x.numel() for x in a)
    return sum(int((x != y).sum()) for x, y in zip(a, b)) / max(total, 1)


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
    registry = Registry.load(args.weights, device)
    header = (f"CUDA graphs vs eager on {torch.cuda.get_device_name(device) if record else 'the CPU (dry run: no graphs)'}, "
              f"torch {torch.__version__}, sizes {args.sizes}, median of {args.repeats}")
    rows = ["| operation | rows | replay ms | eager ms | eager / replay | same as recorded | same as eager |",
            "|---|---|---|---|---|---|---|"]
    print(f"## {header}\n\n" + "\n".join(rows), flush=True)
    notes, broken = [], []
    for entry in registry.entries.values():
        if args.models and entry.name not in args.models:
            continue
        for op in operations(entry):
            if op.capture is None:
                continue
            began = time.perf_counter()
            fn = op.capture(args.sizes, device, None, record)
            notes.append(f"- {op.key}: {describe(fn)}, recorded in {time.perf_counter() - began:.2f} s")
            for size in args.sizes:
                inputs = tuple(t.to(device) for t in op.example(size, torch.Generator().manual_seed(size)))
                for _ in range(args.warmup):
                    timed(fn, inputs, device), timed(op.fn, inputs, device)
                replay_s, eager_s = [], []
                for _ in range(args.repeats):
                    t, got = timed(fn, inputs, device)
                    replay_s.append(t)
                    t, eager = timed(op.fn, inputs, device)
                    eager_s.append(t)
                _, reference = timed(fn.reference, inputs, device)
                same = all(torch.equal(a, b) for a, b in zip(got, reference))
                graphed = size in (recorded_sizes(fn) or [])
                if graphed and not same:
                    broken.append(f"{op.key} at {size} rows")
                share = differing_share(got, eager)
                r, e = statistics.median(replay_s), statistics.median(eager_s)
                rows.append(f"| {op.key} | {size}{'' if graphed else ' (eager)'} | {r * 1000:.3f} | {e * 1000:.3f} | "
                            f"{e / r:.2f}x | {'yes' if same else '**no**'} | {'yes' if share == 0 else f'{share:.3%} differ'} |")
                print(rows[-1], flush=True)
                write(args.out, header, rows, notes, broken)  # after every row: a timeout keeps what was measured
    write(args.out, header, rows, notes, broken)
    print("\n".join(notes))
    if broken:
        print(f"Replays that differ from their recorded function: {', '.join(broken)}")
    return 1 if broken else 0


def write(out: Path | None, header: str, rows: list[str], notes: list[str], broken: list[str]) -> None:
    if out is None:
        return
    text = "\n".join([f"## {header}", "", *rows, "", *notes, ""])
    if broken:
        text += f"\n**Replays that differ from their recorded function:** {', '.join(broken)}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "graphs.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
