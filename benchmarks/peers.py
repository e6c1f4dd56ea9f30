"""Side by side: this service vs LitServe 0.2.19 (both queue modes) vs a plain FastAPI endpoint.

Servers of --weights (all through models.io.load_model), each in its own process group: `ours`
(python -m app, GENSERVE_DEVICE=--device plus --env), and those of benchmarks/peer.py: `plain` (no
batching, --plain-parallel passes at once), `litserve` and `litserve-fast` (LitServe, max_batch_size=32,
batch_timeout=5 ms; fast_queue=True), on the workloads of peer.py
(sample-vae_conv-16, sample-pixelcnn-1, reconstruct-vae_conv). LitServe is the `bench` extra. First
every server's PNG for --seed is compared with ours byte for byte; then each cell is a closed loop
of C workers (harness.measure), the servers in turn, LitServe paused (SIGSTOP) while idle: it polls
its queue. Per cell: req/s, p50 and p99 (ms), errors, client and server CPU (cores), and the targets:

    ours p50 / plain p50                          <= 1.2 at C=1
    ours req/s / the faster LitServe mode's req/s >= 1.5 at C=32, and ours p99 < that mode's p99

    python -m benchmarks.peers                                   # 3 workloads x C 1, 32 x 4 servers, 8 s cells
    python -m benchmarks.peers --servers ours plain --duration 2 --warmup 0.5 --concurrency 1 4   # smoke run
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.harness import (
    Cells, Loop, Server, fmt, fmt_ms, free_port, image_difference, machine_lines, parse, parser, run_cells, serving,
    shell_env, stop_on_sigterm, table, timed, upload_images, verdict, worker_client,
)  # fmt: skip
from benchmarks.peer import SAMPLE_N, WORKLOADS

SERVERS = ("ours", "plain", "litserve", "litserve-fast")
LITSERVE = ("litserve", "litserve-fast")
OUR_BATCHERS = {"sample-vae_conv-16": "vae_conv:sample", "sample-pixelcnn-1": "vqvae:sample:pixelcnn",
                "reconstruct-vae_conv": "vae_conv:reconstruct"}  # as GET /config's pass_sizes names them
LATENCY_TARGET = (1, 1.2)  # at C=1: ours p50 / plain p50 <= 1.2
THROUGHPUT_TARGET = (32, 1.5)  # at C=32: ours req/s / best LitServe req/s >= 1.5, and ours p99 lower
HEADERS = ["server", "req/s", "p50 ms", "p99 ms", "errors", "client cpu", "server cpu"]


def request_for(label: str, workload: str, pngs: list[bytes]):
    """(client, seed) -> the request of `workload` as server `label`'s API asks for it."""

    def make(client: httpx.AsyncClient, seed: int) -> httpx.Request:
        upload = {"file": (f"{seed}.png", pngs[seed % len(pngs)], "image/png")}
        if label in LITSERVE:
            if workload == "reconstruct-vae_conv":
                return client.build_request("POST", "/predict", data={"workload": workload}, files=upload)
            return client.build_request("POST", "/predict", json={"workload": workload, "seed": seed})
        if workload == "reconstruct-vae_conv":
            return client.build_request("POST", "/reconstruct", params={"model": "vae_conv"}, files=upload)
        model = {"model": "vae_conv"} if workload == "sample-vae_conv-16" else {"model": "vqvae", "prior": "pixelcnn"}
        return client.build_request("GET", "/sample", params={**model, "n": SAMPLE_N[workload], "seed": seed})

    return make


def make_servers(args, log_dir: Path) -> list[Server]:
    servers = []
    for label in args.servers:
        if label == "ours":
            servers.append(Server.app("ours", log_dir, args.weights, {"GENSERVE_DEVICE": args.device, **args.env}))
            continue
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.peer", "--port", str(port), "--weights", str(args.weights.resolve()),
                   "--threads", str(args.threads), "--device", args.device, "--parallel", str(args.plain_parallel),
                   *(["--litserve"] if label in LITSERVE else []), *(["--fast-queue"] if label == "litserve-fast" else [])]
        servers.append(Server(label, shell_env(), log_dir / f"server-{label}.log", port, command, ready_path="/health"))
    return servers


@contextlib.contextmanager
def awake(server: Server) -> Iterator[None]:
    """Run a LitServe server only while it is used (see the module docstring)."""
    if pausing := server.label in LITSERVE:
        server.signal(signal.SIGCONT)
    try:
        yield
    finally:
        if pausing:
            server.signal(signal.SIGSTOP)


async def check_bytes(servers: list[Server], workloads: list[str], seed: int, pngs: list[bytes]) -> list[str]:
    """One request per server and workload; each server's PNG against ours (or the first server's)."""
    lines = []
    for workload in workloads:
        answers = {}
        for server in servers:
            with awake(server):
                async with worker_client(server.url) as client:
                    answers[server.label] = await timed(client, request_for(server.label, workload, pngs)(client, seed), True)
        (reference, ref), *others = answers.items()
        parts = [f"{label}: cannot compare ({a.show()}; {ref.show()})" if 200 != a.status or 200 != ref.status
                 else f"{label} == {reference}" if a.body == ref.body
                 else f"{label} DIFFERS from {reference} ({image_difference([a.body], [ref.body])})" for label, a in others]
        lines.append(f"same bytes, {workload} seed {seed}: " + ("; ".join(parts) or f"only {reference} is running"))
    return lines


def ratio_lines(concurrency: int, cells: dict[str, Loop]) -> tuple[list[str], list[str]]:
    """The ratios for one (workload, C), and the targets judged at this C ("met" / "MISSED")."""
    lines, judged = [], []
    ours, plain = cells.get("ours"), cells.get("plain")
    if ours and plain and ours.latency_ms(50) and plain.latency_ms(50):
        ratio = ours.latency_ms(50) / plain.latency_ms(50)  # type: ignore[operator]
        (c, limit), line = LATENCY_TARGET, f"ours p50 / plain p50 = {ratio:.2f}"
        if concurrency == c:
            judged.append(f"{line} (<= {limit}): {verdict(ratio <= limit)}")
            line += f"  (target <= {limit} at C={c}: {verdict(ratio <= limit)})"
        lines.append(line)
    modes = {label: cells[label] for label in LITSERVE if label in cells and cells[label].rate()}
    if ours and modes:
        best_label, best = max(modes.items(), key=lambda item: item[1].rate())
        ratio, p99_ours, p99_best = ours.rate() / best.rate(), ours.latency_ms(99), best.latency_ms(99)
        lower = p99_ours is not None and p99_best is not None and p99_ours < p99_best
        line = f"ours req/s / {best_label} req/s (the faster LitServe mode) = {ratio:.2f}x"
        p99_line = (f"ours p99 {fmt_ms(p99_ours)} ms vs {best_label} p99 {fmt_ms(p99_best)} ms: "
                    f"ours {'lower' if lower else 'NOT lower'}")  # fmt: skip
        c, limit = THROUGHPUT_TARGET
        if concurrency == c:
            judged += [f"ours / {best_label} req/s = {ratio:.2f}x (>= {limit}): {verdict(ratio >= limit)}",
                       f"ours p99 < {best_label} p99 ({fmt_ms(p99_ours)} vs {fmt_ms(p99_best)} ms): {verdict(lower)}"]
            line += f"  (target >= {limit} at C={c}: {verdict(ratio >= limit)})"
            p99_line += f"  (target at C={c}: {verdict(lower)})"
        lines += [line, p99_line]
    return lines, judged


def report(results: Cells) -> str:
    blocks, summary = [], []
    for (workload, concurrency), cells in results.items():
        lines, judged = ratio_lines(concurrency, cells)
        summary += [f"- {workload}, C={concurrency}: {j}" for j in judged]
        rows = [[label, f"{c.rate():.1f}", fmt_ms(c.latency_ms(50)), fmt_ms(c.latency_ms(99)), c.errors(),
                 f"{c.client_cpu:.2f}", fmt(c.server_cpu)] for label, c in cells.items()]  # fmt: skip
        blocks.append(f"**{workload}, C={concurrency}**\n\n{table(HEADERS, rows)}\n\n" + "\n".join(f"- {x}" for x in lines))
    return "\n\n".join(blocks + (["targets:\n" + "\n".join(summary)] if summary else []))


def header_lines(servers: list[Server], args, idle: dict[str, float | None], image_source: str) -> list[str]:
    version = lambda name: importlib.metadata.version(name) if importlib.util.find_spec(name) else "not installed"  # noqa: E731
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # what uvicorn's "auto" picks
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    labels, lines = [s.label for s in servers], machine_lines()
    lines += [f"uvicorn {version('uvicorn')} (loop {loop}, http {http}), fastapi {version('fastapi')}, litserve "
              f"{version('litserve')}", f"settings: torch threads {args.threads} (the peers), device {args.device}, "
              f"weights {args.weights}"]  # fmt: skip
    if "ours" in labels:
        config: dict = servers[labels.index("ours")].get_json("/config")
        keys = ("resolved_device", "max_batch_size", "max_wait_ms", "pad_batches", "torch_threads", "io_threads",
                "precision", "max_queue")  # fmt: skip
        sizes = config.get("pass_sizes") or {}
        padded = "; ".join(f"{b} {sizes[b]}" for w in args.workloads if sizes.get(b := OUR_BATCHERS[w]) is not None)
        lines += ["ours: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config)
                  + "".join(f" {k}={v}" for k, v in args.env.items()) + (f"; pads each pass up to the next of: {padded}"
                                                                         if padded else "")]  # fmt: skip
    if "plain" in labels:
        lines.append(f"plain: FastAPI + uvicorn, 1 process, no batching, {args.plain_parallel} forward pass(es) at once")
    if set(LITSERVE) & set(labels):
        lines.append("litserve: max_batch_size=32, batch_timeout=5 ms, 1 inference worker, 1 API server; "
                     "litserve-fast: the same with fast_queue=True; LitServe paused while idle")  # fmt: skip
    return lines + ["idle cpu over 2 s (cores): " + ", ".join(f"{label} {fmt(v)}" for label, v in idle.items()),
                    f"uploads: {image_source}; closed loop per cell: {args.warmup:g} s warm-up, then {args.duration:g} s; "
                    f"concurrency {args.concurrency}; servers measured in turn per (workload, C)"]  # fmt: skip


def parse_args(argv: list[str] | None):
    p = parser(__doc__, "peers", env="GENSERVE_TORCH_THREADS=2 GENSERVE_PAD_BATCHES=false (ours)",
               env_alias=("--service-env",))  # fmt: skip
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), metavar="NAME",
                   help=f"default: all of {', '.join(SERVERS)}")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="NAME",
                   help=f"default: all of {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="clients per cell (default 1 32)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every peer (default 2)")
    p.add_argument("--device", default="auto", help="every server's device: auto (cuda when available), cpu, cuda")
    p.add_argument("--plain-parallel", type=int, default=1, help="forward passes plain may run at once (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the same-bytes check; requests use the next ones")
    args = parse(p, argv)
    args.servers = [s for s in SERVERS if s in args.servers]  # a fixed order, deduplicated
    args.workloads = list(dict.fromkeys(args.workloads))
    if args.duration <= 0 or args.warmup < 0 or min(args.threads, args.plain_parallel, *args.concurrency) < 1:
        p.error("--duration must be positive, --warmup non-negative, --threads, --plain-parallel and every "
                "--concurrency at least 1")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    pngs, image_source = upload_images(16, args.seed)
    with serving(args, lambda log_dir: make_servers(args, log_dir)) as servers:
        before = {s.label: s.group.cpu_seconds() for s in servers}  # type: ignore[union-attr]
        time.sleep(2.0)
        idle = {s.label: None if before[s.label] is None or (now := s.group.cpu_seconds()) is None  # type: ignore[union-attr]
                else (now - before[s.label]) / 2.0 for s in servers}  # type: ignore[operator]
        for server in servers:
            if server.label in LITSERVE:
                server.signal(signal.SIGSTOP)
        print("\n".join(header_lines(servers, args, idle, image_source)), flush=True)
        checks = asyncio.run(check_bytes(servers, args.workloads, args.seed, pngs))  # Ctrl-C here: 130, no tables
        print("\n".join(checks), flush=True)
        cases = {w: lambda server, w=w: (request_for(server.label, w, pngs), None) for w in args.workloads}
        results, interrupted = run_cells(servers, cases, args, args.seed + 1, awake)
        logs = "".join(f"server {s.label} logged errors; its last lines:\n{s.log_tail(10)}\n" for s in servers if s.log_errors())
    print("\n" + report(results) + "\n\n- req/s counts 200 answers over the measured window; p50 / p99 are the 200s' "
          "latencies as the client sees them\n- cpu: cores used over the window (1.0 = one core); a server's CPU sums "
          "every process of its group\n" + "".join(f"- {line}\n" for line in checks) + logs)
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up: the servers are already stopped
        sys.exit(130)
    except RuntimeError as err:  # a server did not start (its log tail is in the message); all are stopped
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
