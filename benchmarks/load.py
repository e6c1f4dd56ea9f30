"""HTTP load test of the real server, dynamic batching ON vs OFF, side by side.

Two services over the same weights: "on" with the default batching, "off" with
GENSERVE_MAX_BATCH_SIZE=1 (or, with --vs, the defaults plus other settings). Each scenario, on the
first served model of its kind (reconstruct-vae, reconstruct-vqvae: one 28x28 PNG; sample-vae,
sample-<prior>: n=--n, seeded), at each concurrency: a closed loop of C workers, on then off. Per
cell and server: requests/s and images/s of the 200s, p50/p95/p99 (ms), errors, the mean pass size
of the scenario's batcher (/metrics), client and server CPU. Bar: batching on at least 3x off's
requests/s for prior sampling at C=32. (The in-process sampler speed-up: benchmarks/sampling.py.)

    python -m benchmarks.load                                  # everything, 10 s per cell (~10 min)
    python -m benchmarks.load --quick                          # smoke run: 2 s per cell, C = 1 and 8
    python -m benchmarks.load --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio   # uvicorn[standard] vs plain
"""

from __future__ import annotations

import sys

from benchmarks.harness import (
    Cells, Server, fmt, fmt_ms, machine_lines, parse, parser, run_cells, service_lines, serving, stop_on_sigterm, table,
    upload_images,
)  # fmt: skip

SCENARIOS = {"reconstruct-vae": ("vae", None), "reconstruct-vqvae": ("vqvae", None), "sample-vae": ("vae", None),
             **{f"sample-{p}": ("vqvae", p) for p in ("pixelcnn", "gated", "pixelcnnpp")}}  # name -> (kind, prior)
CONCURRENCY = (1, 8, 32, 128)
QUICK = {"duration": 2.0, "warmup": 0.5, "concurrency": [1, 8]}
HEADERS = ["scenario", "C", "req/s on", "req/s off", "on/off", "img/s on", "img/s off", "p50/p95/p99 ms on",
           "p50/p95/p99 ms off", "batch on", "batch off", "errors on", "errors off"]  # fmt: skip
CONFIG_KEYS = ("resolved_device", "max_batch_size", "max_wait_ms", "pad_batches", "torch_threads", "precision", "max_queue")


def targets(models: list[dict], names: list[str], n: int, pngs: list[bytes]) -> tuple[list[tuple], list[str]]:
    """(scenario, images per request, batcher label in /metrics, make request) for each scenario on the first
    served model of its kind; and why the others were skipped."""
    first: dict[str, dict] = {}
    for entry in models:
        first.setdefault(entry["kind"], entry)
    found, skipped = [], []
    for name in names:
        (kind, prior), op = SCENARIOS[name], name.split("-")[0]
        entry = first.get(kind) or {}
        if not entry or (prior and prior not in [p["name"] for p in entry.get("priors") or []]):
            skipped.append(f"{name}: no {kind} model" + (f" with a {prior} prior" if prior else "") + " is loaded")
            continue
        params = {"model": entry["name"], **({"prior": prior, "n": n} if prior else {"n": n} if op == "sample" else {})}
        make = ((lambda c, seed, p=params: c.build_request("GET", "/sample", params={**p, "seed": seed})) if op == "sample"
                else lambda c, seed, p=params: c.build_request("POST", "/reconstruct", params=p, files={
                    "file": (f"{seed}.png", pngs[seed % len(pngs)], "image/png")}))  # fmt: skip
        found.append((name, params.get("n", 1), f"{entry['name']}:{op}" + (f":{prior}" if prior else ""), make))
    return found, skipped


def table_rows(results: Cells, found: list[tuple]) -> list[list[str]]:
    images = {scenario: n for scenario, n, _, _ in found}
    rows = []
    for (scenario, concurrency), cells in results.items():
        if len(cells) < 2:
            continue  # interrupted half way
        on, off = cells["on"], cells["off"]
        rows.append([scenario, str(concurrency), f"{on.rate():.1f}", f"{off.rate():.1f}",
                     f"{on.rate() / off.rate():.2f}x" if off.rate() else "-",
                     *(f"{c.rate(images[scenario]):.1f}" for c in (on, off)),
                     *("/".join(fmt_ms(c.latency_ms(q)) for q in (50, 95, 99)) for c in (on, off)),
                     *(fmt(c.mean_batch, ".1f") for c in (on, off)), on.errors(), off.errors()])  # fmt: skip
    return rows


def parse_args(argv: list[str] | None):
    p = parser(__doc__, "load", env="GENSERVE_MAX_WAIT_MS=2 (both servers)")
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), metavar="NAME",
                   help=f"default: all of {', '.join(SCENARIOS)}")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help=f"concurrent clients per cell (default {' '.join(map(str, CONCURRENCY))}; --quick: 1 8)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10; --quick: 2)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per cell first (default 2; --quick: 0.5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per cell, 0.5 s warm-up, C = 1 and 8")
    p.add_argument("--n", type=int, default=1, help="images per /sample request (default 1)")
    p.add_argument("--threads", type=int, default=None, help="GENSERVE_TORCH_THREADS for both servers")
    p.add_argument("--pad-batches", choices=["true", "false"], default=None, help="GENSERVE_PAD_BATCHES for both")
    p.add_argument("--vs", nargs="+", default=None, metavar="GENSERVE_KEY=VALUE",
                   help='compare settings instead of batching: "off" is the same server (batching on) with these, '
                        "e.g. --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="first request seed; each request gets the next one")
    args = parse(p, argv)
    defaults = QUICK if args.quick else {"duration": 10.0, "warmup": 2.0, "concurrency": list(CONCURRENCY)}
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.duration <= 0 or args.warmup < 0 or args.n < 1 or min(args.concurrency) < 1:
        p.error("--duration and --n must be positive, --warmup non-negative, --concurrency at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    pngs, image_source = upload_images(16, args.seed)
    settings = {**args.env, **({"GENSERVE_TORCH_THREADS": str(args.threads)} if args.threads else {}),
                **({"GENSERVE_PAD_BATCHES": args.pad_batches} if args.pad_batches else {})}  # fmt: skip
    off = dict(item.split("=", 1) for item in args.vs) if args.vs else {"GENSERVE_MAX_BATCH_SIZE": "1"}
    header = machine_lines()  # before the servers load the machine
    with serving(args, lambda log_dir: [Server.app("on", log_dir, args.weights, settings),
                                        Server.app("off", log_dir, args.weights, {**settings, **off})]) as servers:
        models = servers[0].get_json("/models")
        found, skipped = targets(models, args.scenarios, args.n, pngs)
        for server in servers:
            header.append(f"server {server.label:<3}: " + service_lines({}, server.get_json("/config"), [], CONFIG_KEYS)[1])
        header += [service_lines({}, {}, models, ())[2], f"weights {args.weights}; uploads: {image_source}; /sample n={args.n}",
                   f"closed loop per cell: {args.warmup:g} s warm-up, then {args.duration:g} s; concurrency "
                   f"{args.concurrency}", *(f"skipped {line}" for line in skipped)]  # fmt: skip
        print("\n".join(header), flush=True)
        cases = {name: lambda server, m=make, b=batcher: (m, b) for name, _, batcher, make in found}
        results, interrupted = run_cells(servers, cases, args, args.seed)
        problems = [f"server {s.label} log: {line}" for s in servers for line in s.log_errors()]
    examples = {(scenario, label, a.kind): a.text for (scenario, _), cells in results.items()
                for label, cell in cells.items() for a in reversed(cell.answers) if a.status != 200}  # fmt: skip
    problems[:0] = [f"{scenario} ({label}) {kind}: {text}" for (scenario, label, kind), text in examples.items()]
    print("\n" + table(HEADERS, table_rows(results, found)))
    print(f"on: the server's defaults; off: the same with {' '.join(args.vs)} (batching on in both)" if args.vs
          else "on: the server's default batching (GENSERVE_MAX_BATCH_SIZE=64); off: GENSERVE_MAX_BATCH_SIZE=1")
    if problems:
        print("\nerrors (first of each kind):\n" + "\n".join(f"  {line}" for line in problems))
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up: the servers are already stopped
        sys.exit(130)
