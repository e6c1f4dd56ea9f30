"""HTTP load test of the real server, dynamic batching ON vs OFF, side by side.

Starts two services (`python -m app`) on free ports over the same weights: "on" with the default
batching (GENSERVE_MAX_BATCH_SIZE=64), "off" with GENSERVE_MAX_BATCH_SIZE=1 (or, with --vs, the
same defaults plus other settings). The cells are interleaved (each scenario and concurrency: on,
then off), so a change in machine load hits both alike. Each cell is a closed loop of C workers,
one keep-alive connection each (harness.measure): --warmup seconds discarded, then --duration
seconds (or --requests). Every request has its own seed; uploads cycle through 16 Fashion-MNIST
test images (seeded noise without the data set). Scenarios, each on the first served model of its
kind (skipped when GET /models lacks it):

    reconstruct-vae | reconstruct-vqvae   POST /reconstruct?model=M, one 28x28 PNG
    sample-vae                            GET /sample?model=M&n=N&seed=S
    sample-<prior>                        GET /sample?model=<vqvae>&prior=P&n=N&seed=S (pixelcnn, gated, pixelcnnpp)

Per cell and server: requests/s and images/s of the 200s, their p50/p95/p99 latency (ms, as the
client sees it), errors by status or exception, the mean pass size of the scenario's batcher
(genserve_batch_size in /metrics before and after the window), and the CPU of client and server
(cores) in the progress lines; the table shows both servers and requests/s on/off. At the end the
cached prior sampler is timed against sample(mode="naive") in this process (--sampler-n grids;
benchmarks/sampling.py does it in detail).

    python -m benchmarks.load                                  # everything, 10 s per cell (~10 min)
    python -m benchmarks.load --quick                          # smoke run: 2 s per cell, C = 1 and 8
    python -m benchmarks.load --scenarios sample-vae sample-gated --concurrency 1 32 --threads 1
    python -m benchmarks.load --pad-batches false --markdown /tmp/load.md   # then paste into RESULTS.md
    python -m benchmarks.load --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio   # uvicorn[standard] vs plain
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.harness import (
    Cell, Server, bullets, describe_models, fmt_counts, fmt_ms, fmt_opt, machine_lines, measure, parse, parser,
    running, stop_on_sigterm, table, upload_images, write_markdown,
)  # fmt: skip

PRIORS = ("pixelcnn", "gated", "pixelcnnpp")
SCENARIOS = {"reconstruct-vae": ("vae", None), "reconstruct-vqvae": ("vqvae", None), "sample-vae": ("vae", None),
             **{f"sample-{p}": ("vqvae", p) for p in PRIORS}}  # name -> (model kind, prior)  # fmt: skip
CONCURRENCY = (1, 8, 32, 128)
QUICK = {"duration": 2.0, "warmup": 0.5, "concurrency": [1, 8]}
HEADERS = ["scenario", "C", "req/s on", "req/s off", "on/off", "img/s on", "img/s off", "p50/p95/p99 ms on",
           "p50/p95/p99 ms off", "batch on", "batch off", "errors on", "errors off"]  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A scenario bound to a served model."""

    scenario: str
    model: str
    n: int  # images per /sample request

    @property
    def op(self) -> str:
        return self.scenario.split("-")[0]

    @property
    def images_per_request(self) -> int:
        return self.n if self.op == "sample" else 1

    @property
    def batcher(self) -> str:
        """The batcher's label in /metrics: model:op, model:sample:prior."""
        prior = SCENARIOS[self.scenario][1]
        return f"{self.model}:{self.op}" + (f":{prior}" if prior else "")

    def request(self, client: httpx.AsyncClient, seed: int, png: bytes) -> httpx.Request:
        if self.op == "reconstruct":
            files = {"file": (f"{seed}.png", png, "image/png")}
            return client.build_request("POST", "/reconstruct", params={"model": self.model}, files=files)
        prior = SCENARIOS[self.scenario][1]
        params = {"model": self.model, "n": self.n, "seed": seed, **({"prior": prior} if prior else {})}
        return client.build_request("GET", "/sample", params=params)


def find_targets(models: list[dict], names: list[str], n: int) -> tuple[list[Target], list[str]]:
    """Each scenario on the first served model of its kind; and why the others were skipped."""
    first: dict[str, dict] = {}
    for entry in models:
        first.setdefault(entry["kind"], entry)
    targets, skipped = [], []
    for name in names:
        kind, prior = SCENARIOS[name]
        priors = [p["name"] for p in (first.get(kind) or {}).get("priors") or []]
        if kind not in first:
            skipped.append(f"{name}: no {kind} model is loaded")
        elif prior is not None and prior not in priors:
            skipped.append(f"{name}: prior {prior!r} is not loaded for {first[kind]['name']!r} (loaded: {priors})")
        else:
            targets.append(Target(name, first[kind]["name"], n))
    return targets, skipped


Results = dict[tuple[str, int], dict[str, Cell]]  # (scenario, concurrency) -> server label -> cell


async def run_all(servers: list[Server], targets: list[Target], args, pngs: list[bytes], results: Results) -> None:
    """Fill `results` cell by cell (an interrupted run keeps what it measured), printing progress."""
    seeds = itertools.count(args.seed)
    for target, concurrency in itertools.product(targets, args.concurrency):
        row = results.setdefault((target.scenario, concurrency), {})
        for server in servers:
            row[server.label] = cell = await measure(server, target.request, target.images_per_request, concurrency,
                                                     args, seeds, pngs, target.batcher)  # fmt: skip
            print(f"  {target.scenario:<18} C={concurrency:<4} {server.label:<3} {cell.requests_per_s:8.1f} req/s  "
                  f"p50 {fmt_ms(cell.latency_ms(50))} ms  batch {fmt_opt(cell.mean_batch, '.1f')}  errors "
                  f"{fmt_counts(cell.errors)}  cpu: client {cell.client_cpu:.2f}, server {fmt_opt(cell.server_cpu)}",
                  flush=True)  # fmt: skip


def table_rows(results: Results) -> list[list[str]]:
    rows = []
    for (scenario, concurrency), cells in results.items():
        if len(cells) < 2:
            continue  # interrupted half way
        on, off = cells["on"], cells["off"]
        ratio = f"{on.requests_per_s / off.requests_per_s:.2f}x" if off.requests_per_s else "-"
        rows.append([scenario, str(concurrency), f"{on.requests_per_s:.1f}", f"{off.requests_per_s:.1f}", ratio,
                     f"{on.images_per_s:.1f}", f"{off.images_per_s:.1f}",
                     *("/".join(fmt_ms(c.latency_ms(q)) for q in (50, 95, 99)) for c in (on, off)),
                     fmt_opt(on.mean_batch, ".1f"), fmt_opt(off.mean_batch, ".1f"),
                     fmt_counts(on.errors), fmt_counts(off.errors)])  # fmt: skip
    return rows


def sampler_lines(weights: Path, n: int, threads: int | None) -> list[str]:
    """The cached prior sampler (what the server runs) against mode="naive", in this process, on every prior."""
    import torch

    from benchmarks.sampling import time_samplers
    from models.io import load_model, read_metadata

    if threads is not None:
        torch.set_num_threads(threads)
    lines = [f"sampler timing in-process, n = {n}, {torch.get_num_threads()} thread(s), median of 3:"]
    for path in sorted(weights.glob("*.safetensors")):
        if read_metadata(path)["kind"] in ("pixelcnn", "gated_pixelcnn", "pixelcnnpp"):
            model, info = load_model(path)
            differing = [0, 0]
            t = time_samplers(model, n, repeats=3, seed=0, differing=differing)
            lines.append(f"sampler {info.name}: naive {t['naive']:.3f} s  cached {t['cached']:.3f} s  speed-up "
                         f"{t['naive'] / t['cached']:.1f}x ({differing[0]} of {differing[1]} grids differ)")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None):
    p = parser(__doc__, env="GENSERVE_MAX_WAIT_MS=2 (both servers)")
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), metavar="NAME",
                   help=f"default: all of {', '.join(SCENARIOS)}")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help=f"concurrent clients per cell (default {' '.join(map(str, CONCURRENCY))}; --quick: 1 8)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10; --quick: 2)")
    p.add_argument("--requests", type=int, default=None, help="measure this many requests per cell instead")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per cell first (default 2; --quick: 0.5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per cell, 0.5 s warm-up, C = 1 and 8")
    p.add_argument("--n", type=int, default=1, help="images per /sample request (default 1)")
    p.add_argument("--threads", type=int, default=None, help="GENSERVE_TORCH_THREADS for both servers")
    p.add_argument("--pad-batches", choices=["true", "false"], default=None, help="GENSERVE_PAD_BATCHES for both")
    p.add_argument("--vs", nargs="+", default=None, metavar="GENSERVE_KEY=VALUE",
                   help='compare settings instead of batching: "off" is the same server (batching on) with these, '
                        "e.g. --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio")  # fmt: skip
    p.add_argument("--sampler-n", type=int, default=64, help="after the load, time the cached prior sampler against "
                   "mode='naive' in this process for n grids; 0 skips it")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="first request seed; each request gets the next one")
    args = parse(p, "load", argv)
    defaults = QUICK if args.quick else {"duration": 10.0, "warmup": 2.0, "concurrency": list(CONCURRENCY)}
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.duration <= 0 or args.warmup < 0 or args.n < 1 or min(args.concurrency) < 1 or (args.requests or 1) < 1:
        p.error("--duration and --n must be positive, --warmup non-negative, --requests and --concurrency at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    pngs, image_source = upload_images(16, args.seed)
    settings = {"GENSERVE_WEIGHTS_DIR": str(args.weights.resolve()), **args.env,
                **({"GENSERVE_TORCH_THREADS": str(args.threads)} if args.threads else {}),
                **({"GENSERVE_PAD_BATCHES": args.pad_batches} if args.pad_batches else {})}  # fmt: skip
    off = dict(item.split("=", 1) for item in args.vs) if args.vs else {"GENSERVE_MAX_BATCH_SIZE": "1"}
    results: Results = {}
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="genserve-load-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        servers = [Server.app("on", log_dir, settings), Server.app("off", log_dir, {**settings, **off})]
        header = machine_lines()  # before the servers load the machine
        with running(servers, args.startup_timeout):
            models = servers[0].get_json("/models")
            targets, skipped = find_targets(models, args.scenarios, args.n)  # type: ignore[arg-type]
            keys = ("max_batch_size", "max_wait_ms", "pad_batches", "torch_threads", "precision", "max_queue")
            for server in servers:
                config = server.get_json("/config")
                header.append(f"server {server.label:<3}: device {config['resolved_device']}, "  # type: ignore[index]
                              + ", ".join(f"{k}={config.get(k)}" for k in keys))  # type: ignore[union-attr]
            window = f"{args.requests} requests" if args.requests else f"{args.duration:g} s"
            header += [describe_models(models), f"weights {args.weights}; uploads: {image_source}; /sample n={args.n}",
                       f"closed loop per cell: {args.warmup:g} s warm-up, then {window}; concurrency {args.concurrency}",
                       *(f"skipped {line}" for line in skipped)]  # type: ignore[arg-type]  # fmt: skip
            print("\n".join(header), flush=True)
            try:
                asyncio.run(run_all(servers, targets, args, pngs, results))
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: shutting the servers down; the table holds the finished cells", flush=True)
        problems = [f"server {s.label} log: {line}" for s in servers for line in s.log_errors()]
    examples = {(scenario, label, kind): text for (scenario, _), cells in results.items()
                for label, cell in cells.items() for kind, text in cell.error_examples.items()}  # fmt: skip
    problems[:0] = [f"{scenario} ({label}) {kind}: {text}" for (scenario, label, kind), text in examples.items()]
    notes = [
        "req/s and img/s count 200 answers over the measured window; latencies are the 200s' as the client sees them",
        "batch: mean items per forward pass of the scenario's batcher (server's genserve_batch_size histogram)",
        f"on: the server's defaults; off: the same with {' '.join(args.vs)} (batching on in both)" if args.vs
        else "on: the server's default batching (GENSERVE_MAX_BATCH_SIZE=64); off: GENSERVE_MAX_BATCH_SIZE=1",
    ]  # fmt: skip
    if args.sampler_n and not interrupted:
        notes += sampler_lines(args.weights, args.sampler_n, args.threads)
    rows = table_rows(results)
    print("\n" + table(HEADERS, rows) + "\n" + "\n".join(notes[3:]))
    if problems:
        print("\nerrors (first of each kind):\n" + "\n".join(f"  {line}" for line in problems))
    if args.markdown:
        title = f"the defaults (on) vs {' '.join(args.vs)} (off)" if args.vs else "dynamic batching on vs off"
        write_markdown(args.markdown, f"Load test: {title}", args.command, header,
                       [table(HEADERS, rows, markdown=True), bullets(notes + problems)])
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up: the servers are already stopped
        sys.exit(130)
