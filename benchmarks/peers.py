"""Side by side: this service vs LitServe 0.2.19 (both queue modes) vs a plain FastAPI endpoint.

LitServe is the `bench` extra (`pip install -e '.[bench]'`: litserve==0.2.19, which brings pyzmq and
uvicorn[standard]; then every server here, ours included, runs on uvloop and httptools: the header
says which). One run starts these on free ports, each in its own process group, all serving the
weight files of --weights through models.io.load_model:

    ours            python -m app (GENSERVE_DEVICE=--device plus --env; its own torch threads)
    plain           python -m benchmarks.peer_plain: FastAPI, no batching, one pass at a time (--plain-parallel)
    litserve        python -m benchmarks.peer_litserve: max_batch_size=32, batch_timeout=5 ms, one worker
    litserve-fast   the same with LitServer(fast_queue=True) (ZeroMQ responses)

Workloads (benchmarks/peer_workloads.py runs them for the peers with the service's model methods):

    sample-vae_conv-16     GET /sample?model=vae_conv&n=16&seed=S            (LitServe: POST /predict JSON)
    sample-pixelcnn-1      GET /sample?model=vqvae&prior=pixelcnn&n=1&seed=S (LitServe: POST /predict JSON)
    reconstruct-vae_conv   POST /reconstruct?model=vae_conv, one 28x28 PNG   (LitServe: POST /predict multipart)

First, for --seed and one upload, every server's PNG is compared with ours byte for byte (a
difference is reported with its pixel difference, not fatal). Then each cell is a closed loop of C
workers (harness.measure): --warmup s discarded, then --duration s; every server in turn per
(workload, C). An idle LitServe polls its queue (~0.13 core each on 2 cores: the header shows each
server's idle CPU), so both LitServe servers are paused (SIGSTOP to their group) while another
server's cell runs, unless --no-pause. Per (workload, C): req/s, p50 and p99 of the 200s (ms),
errors, client and server CPU (cores, the server's whole group), and the ratios against the targets:

    ours p50 / plain p50                          <= 1.2 at C=1
    ours req/s / the faster LitServe mode's req/s >= 1.5 at C=32, and ours p99 < that mode's p99

    python -m benchmarks.peers                                   # 3 workloads x C 1, 32 x 4 servers, 8 s cells
    python -m benchmarks.peers --duration 2 --warmup 0.5 --concurrency 1 4     # smoke run
    python -m benchmarks.peers --servers ours plain --workloads sample-pixelcnn-1 --env GENSERVE_TORCH_THREADS=2
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.harness import (
    Cell, Server, bullets, fmt_counts, fmt_ms, fmt_opt, free_port, image_difference, machine_lines,
    measure, parse, parser, running, shell_env, stop_on_sigterm, table, upload_images, verdict, worker_client, write_markdown,
)  # fmt: skip
from benchmarks.peer_workloads import SAMPLE_N, WORKLOADS

SERVERS = ("ours", "plain", "litserve", "litserve-fast")
LITSERVE = ("litserve", "litserve-fast")
OUR_BATCHERS = {"sample-vae_conv-16": "vae_conv:sample", "sample-pixelcnn-1": "vqvae:sample:pixelcnn",
                "reconstruct-vae_conv": "vae_conv:reconstruct"}  # as GET /config's pass_sizes names them
LATENCY_TARGET = (1, 1.2)  # at C=1: ours p50 / plain p50 <= 1.2
THROUGHPUT_TARGET = (32, 1.5)  # at C=32: ours req/s / best LitServe req/s >= 1.5, and ours p99 lower
HEADERS = ["server", "req/s", "p50 ms", "p99 ms", "errors", "client cpu", "server cpu"]


def request_for(label: str, workload: str):
    """(client, seed, png) -> the request of `workload` as server `label`'s API asks for it."""

    def make(client: httpx.AsyncClient, seed: int, png: bytes) -> httpx.Request:
        upload = {"file": (f"{seed}.png", png, "image/png")}
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
    weights = str(args.weights.resolve())
    servers = []
    for label in args.servers:
        if label == "ours":
            servers.append(Server.app("ours", log_dir, {"GENSERVE_WEIGHTS_DIR": weights, "GENSERVE_DEVICE": args.device,
                                                        **args.env}))  # fmt: skip
            continue
        port = free_port()
        module = "benchmarks.peer_plain" if label == "plain" else "benchmarks.peer_litserve"
        command = [sys.executable, "-m", module, "--port", str(port), "--weights", weights, "--threads",
                   str(args.threads), "--device", args.device,
                   *(["--parallel", str(args.plain_parallel)] if label == "plain" else []),
                   *(["--fast-queue"] if label == "litserve-fast" else [])]  # fmt: skip
        servers.append(Server(label, shell_env(), log_dir / f"server-{label}.log", port, command, ready_path="/health"))
    return servers


@contextlib.contextmanager
def awake(server: Server, pause: bool) -> Iterator[None]:
    """Run a LitServe server only while it is used (see the module docstring)."""
    pausable = pause and server.label in LITSERVE
    if pausable:
        server.signal(signal.SIGCONT)
    try:
        yield
    finally:
        if pausable:
            server.signal(signal.SIGSTOP)


async def check_bytes(servers: list[Server], workloads: list[str], seed: int, png: bytes, pause: bool) -> list[str]:
    """One request per server and workload; each server's PNG against ours (or the first server's)."""
    lines = []
    for workload in workloads:
        answers: dict[str, bytes | str] = {}
        for server in servers:
            with awake(server, pause):
                async with worker_client(server.url) as client:
                    try:
                        response = await client.send(request_for(server.label, workload)(client, seed, png))
                    except httpx.HTTPError as err:
                        answers[server.label] = f"no answer ({type(err).__name__}: {err})"
                        continue
            is_png = response.status_code == 200 and response.headers.get("content-type", "").startswith("image/png")
            answers[server.label] = response.content if is_png else f"status {response.status_code}: {response.text[:200]}"
        (reference, ref), *others = answers.items()
        parts = [f"{label}: cannot compare ({a if isinstance(a, str) else ref})" if isinstance(a, str) or isinstance(ref, str)
                 else f"{label} == {reference}" if a == ref
                 else f"{label} DIFFERS from {reference} ({image_difference([a], [ref])})" for label, a in others]
        lines.append(f"same bytes, {workload} seed {seed}: " + ("; ".join(parts) or f"only {reference} is running"))
    return lines


Results = dict[tuple[str, int], dict[str, Cell]]  # (workload, concurrency) -> server label -> cell


async def run_all(servers: list[Server], args, pngs: list[bytes], results: Results) -> None:
    """Fill `results` cell by cell (an interrupted run keeps what it measured), printing progress."""
    seeds = itertools.count(args.seed + 1)
    for workload, concurrency in itertools.product(args.workloads, args.concurrency):
        row = results.setdefault((workload, concurrency), {})
        for server in servers:
            with awake(server, args.pause):
                row[server.label] = cell = await measure(server, request_for(server.label, workload),
                                                         SAMPLE_N.get(workload, 1), concurrency, args, seeds, pngs)
            print(f"  {workload:<20} C={concurrency:<4} {server.label:<13} {cell.requests_per_s:8.1f} req/s  p50 "
                  f"{fmt_ms(cell.latency_ms(50)):>6} ms  p99 {fmt_ms(cell.latency_ms(99)):>6} ms  errors "
                  f"{fmt_counts(cell.errors)}  cpu: client {cell.client_cpu:.2f}, server {fmt_opt(cell.server_cpu)}",
                  flush=True)  # fmt: skip


def ratio_lines(concurrency: int, cells: dict[str, Cell]) -> tuple[list[str], list[str]]:
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
    modes = {label: cells[label] for label in LITSERVE if label in cells and cells[label].ok}
    if ours and modes:
        best_label, best = max(modes.items(), key=lambda item: item[1].requests_per_s)
        ratio, p99_ours, p99_best = ours.requests_per_s / best.requests_per_s, ours.latency_ms(99), best.latency_ms(99)
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


def report(results: Results, markdown: bool) -> str:
    blocks, summary = [], []
    for (workload, concurrency), cells in results.items():
        lines, judged = ratio_lines(concurrency, cells)
        summary += [f"{workload}, C={concurrency}: {j}" for j in judged]
        rows = [[label, f"{c.requests_per_s:.1f}", fmt_ms(c.latency_ms(50)), fmt_ms(c.latency_ms(99)),
                 fmt_counts(c.errors), f"{c.client_cpu:.2f}", fmt_opt(c.server_cpu)] for label, c in cells.items()]
        title, body = f"{workload}, C={concurrency}", table(HEADERS, rows, markdown)
        blocks.append(f"**{title}**\n\n{body}\n\n{bullets(lines)}" if markdown
                      else f"{title}\n{body}" + "".join(f"\n  {x}" for x in lines))  # fmt: skip
    if summary:
        blocks.append("targets:\n" + (bullets(summary) if markdown else "\n".join(f"  {x}" for x in summary)))
    return "\n\n".join(blocks)


def header_lines(servers: list[Server], args, idle: dict[str, float | None], image_source: str) -> list[str]:
    def version(name: str) -> str:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
        return "not installed"

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # what uvicorn's "auto" picks
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    labels = [s.label for s in servers]
    lines = [*machine_lines(), f"uvicorn {version('uvicorn')} (loop {loop}, http {http}), fastapi {version('fastapi')}, "
             f"litserve {version('litserve')}", f"settings: torch threads {args.threads} (the peers), device "
             f"{args.device}, weights {args.weights}"]  # fmt: skip
    if "ours" in labels:
        config: dict = servers[labels.index("ours")].get_json("/config")  # type: ignore[assignment]
        keys = ("resolved_device", "max_batch_size", "max_wait_ms", "max_inflight", "pad_batches", "torch_threads",
                "io_threads", "precision", "max_queue")  # fmt: skip
        lines.append("ours: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))
        sizes = config.get("pass_sizes") or {}
        padded = {b: sizes[b] for w in args.workloads if sizes.get(b := OUR_BATCHERS[w]) is not None}
        if padded:
            lines.append("ours pads each pass up to the next of: " + "; ".join(f"{b} {v}" for b, v in padded.items()))
        if args.env:
            lines.append("ours --env: " + " ".join(f"{k}={v}" for k, v in args.env.items()))
    if "plain" in labels:
        lines.append(f"plain: FastAPI + uvicorn, 1 process, no batching, {args.plain_parallel} forward pass(es) at once")
    if set(LITSERVE) & set(labels):
        lines.append("litserve: max_batch_size=32, batch_timeout=5 ms, 1 inference worker, 1 API server; "
                     "litserve-fast: the same with fast_queue=True")  # fmt: skip
    lines += ["idle cpu over 2 s (cores): " + ", ".join(f"{label} {fmt_opt(v)}" for label, v in idle.items())
              + ("; LitServe paused while idle" if args.pause and set(LITSERVE) & set(labels) else ""),
              f"uploads: {image_source}; closed loop per cell: {args.warmup:g} s warm-up, then {args.duration:g} s; "
              f"concurrency {args.concurrency}; servers measured in turn per (workload, C)"]  # fmt: skip
    return lines


def parse_args(argv: list[str] | None):
    p = parser(__doc__, env="GENSERVE_TORCH_THREADS=2 GENSERVE_PAD_BATCHES=false (ours)", env_alias=("--service-env",))
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
    p.add_argument("--no-pause", dest="pause", action="store_false", help="keep LitServe running between its cells")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL at the end")
    args = parse(p, "peers", argv)
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
    results: Results = {}
    interrupted, checks = False, []
    with tempfile.TemporaryDirectory(prefix="genserve-peers-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        servers = make_servers(args, log_dir)
        print(f"starting {', '.join(s.label for s in servers)} (logs in {log_dir})", flush=True)
        with running(servers, args.startup_timeout, args.stop_timeout):
            groups = {s.label: s.group for s in servers}
            before = {label: g.cpu_seconds() for label, g in groups.items()}  # type: ignore[union-attr]
            time.sleep(2.0)
            idle = {label: None if before[label] is None or (now := g.cpu_seconds()) is None  # type: ignore[union-attr]
                    else (now - before[label]) / 2.0 for label, g in groups.items()}  # type: ignore[operator]
            for server in servers:
                if args.pause and server.label in LITSERVE:
                    server.signal(signal.SIGSTOP)
            header = header_lines(servers, args, idle, image_source)
            print("\n".join(header), flush=True)
            try:
                png = pngs[args.seed % len(pngs)]
                checks = asyncio.run(check_bytes(servers, args.workloads, args.seed, png, args.pause))
                print("\n".join(checks), flush=True)
                asyncio.run(run_all(servers, args, pngs, results))
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: shutting the servers down; the tables hold the finished cells", flush=True)
        log_errors = [f"server {s.label} logged errors; its last lines:\n{s.log_tail(10)}"
                      for s in servers if s.log_errors()]
    notes = ["req/s counts 200 answers over the measured window; p50 / p99 are the 200s' latencies as the client sees them",
             "cpu: cores used over the window (1.0 = one core); a server's CPU sums every process of its group",
             *checks, *log_errors]  # fmt: skip
    print("\n" + report(results, markdown=False) + "\n\n" + "\n".join(notes[2:]))
    if args.markdown:
        write_markdown(args.markdown, "Peers: this service vs LitServe 0.2.19 vs plain FastAPI", args.command, header,
                       [report(results, markdown=True), bullets(notes)])
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during start-up: the servers are already stopped
        sys.exit(130)
    except RuntimeError as err:  # a server did not start (its log tail is in the message); all are stopped
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
