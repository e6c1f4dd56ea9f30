"""Side by side: this service vs LitServe 0.2.19 (both queue modes) vs a plain FastAPI endpoint.

Bench-only dependencies, the `bench` extra of pyproject.toml (`pip install -e '.[bench]'`):

    litserve==0.2.19    (brings pyzmq, and uvicorn[standard]: uvloop and httptools)

Installing it changes every server here, ours included: uvicorn's default ("auto") event loop and
HTTP parser become uvloop and httptools once they are installed. The header says which are in use.

One run starts these servers on free ports, each in its own process group, all serving the same
weight files of --weights through models.io.load_model, with --threads torch threads:

    ours            python -m app (GENSERVE_WEIGHTS_DIR, _PORT, _HOST=127.0.0.1, _ACCESS_LOG=false,
                    _DEVICE, plus every --service-env KEY=VALUE; its torch threads are its own
                    default, the cores divided among its workers, unless --service-env sets them; other GENSERVE_*
                    variables of this shell are not passed on); ready at GET /ready
    plain           benchmarks/peer_plain.py: FastAPI, no batching, one pass at a time (--plain-parallel)
    litserve        benchmarks/peer_litserve.py: max_batch_size=32, batch_timeout=5 ms, one worker
    litserve-fast   the same with LitServer(fast_queue=True) (ZeroMQ responses)

Workloads (benchmarks/peer_workloads.py computes them for the peers as app/ does):

    sample-vae_conv-16     GET /sample?model=vae_conv&n=16&seed=S            (LitServe: POST /predict JSON)
    sample-pixelcnn-1      GET /sample?model=vqvae&prior=pixelcnn&n=1&seed=S (LitServe: POST /predict JSON)
    reconstruct-vae_conv   POST /reconstruct?model=vae_conv, multipart `file`: one 28x28 PNG
                           (LitServe: POST /predict, multipart `file` and `workload`)

First, for one seed (--seed) and one upload per workload, every server's PNG is fetched and its
bytes compared with ours (a difference is reported with its largest pixel difference, not fatal).
Then each cell is a closed loop of C workers, one keep-alive connection each (load.py's
`closed_loop`): --warmup seconds discarded, then --duration seconds measured. The cells are
interleaved, every server in turn for each (workload, C), so drift in machine load hits all
alike. Each request has its own seed; uploads cycle through 16 Fashion-MNIST test images
(seeded noise without the data set). The client sends Accept-Encoding: identity to every server
(LitServe adds a GZip middleware; Starlette skips image/png, but older versions did not).

An idle LitServe server is not idle: its worker polls the request queue every millisecond through
the Manager process, about 0.13 of a core per server on the 2-core box (the header shows each
server's idle CPU over 2 s). So while another server's cell runs, both LitServe servers are
paused (SIGSTOP to their process group; SIGCONT before their own cells and before shutdown).
--no-pause keeps them running.

Per (workload, C) the table shows req/s, p50 and p99 latency of the 200s (ms, as the client sees
them), errors, and client / server CPU (cores; a server's CPU counts every process of its group),
then the ratios against the targets:

    ours p50 / plain p50                          <= 1.2 at C=1
    ours req/s / the faster LitServe mode's req/s >= 1.5 at C=32, and ours p99 < that mode's p99

    python benchmarks/peers.py                                   # 3 workloads x C 1, 32 x 4 servers, 8 s cells
    python benchmarks/peers.py --duration 2 --warmup 0.5 --concurrency 1 4     # smoke run
    python benchmarks/peers.py --servers ours plain --workloads sample-pixelcnn-1 --service-env GENSERVE_TORCH_THREADS=2
    python benchmarks/peers.py --markdown /tmp/peers.md          # then paste into RESULTS.md

Every server is stopped at the end, on Ctrl-C (a second one SIGKILLs) and on errors: SIGTERM,
SIGKILL after --stop-timeout seconds, then SIGKILL to whatever is left of its process group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from load import (
    ROOT,
    Cell,
    Server,
    busy_warning,
    closed_loop,
    cpu_model,
    fmt_cpu,
    fmt_errors,
    fmt_ms,
    free_port,
    stop_on_sigterm,
    upload_images,
    worker_client,
)
from peer_workloads import SAMPLE_N, WORKLOADS

SERVERS = ("ours", "plain", "litserve", "litserve-fast")
LITSERVE = ("litserve", "litserve-fast")  # paused while idle (see the module docstring)
OUR_BATCHERS = {  # workload -> the batcher that runs it in ours, as GET /config's pass_sizes names it
    "sample-vae_conv-16": "vae_conv:sample",
    "sample-pixelcnn-1": "vqvae:sample:pixelcnn",
    "reconstruct-vae_conv": "vae_conv:reconstruct",
}
CONCURRENCY = (1, 32)
LATENCY_TARGET = (1, 1.2)  # at C=1: ours p50 / plain p50 <= 1.2
THROUGHPUT_TARGET = (32, 1.5)  # at C=32: ours req/s / best LitServe req/s >= 1.5, and ours p99 lower


# -- requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerTarget:
    """One workload as one server's API asks for it; what load.closed_loop needs of a target."""

    workload: str
    api: str  # "genserve" (ours and plain: the service's routes) or "litserve" (POST /predict)

    @property
    def images_per_request(self) -> int:
        return SAMPLE_N.get(self.workload, 1)

    def request(self, client: httpx.AsyncClient, seed: int, png: bytes) -> httpx.Request:
        upload = {"file": (f"{seed}.png", png, "image/png")}
        if self.api == "litserve":
            if self.workload == "reconstruct-vae_conv":
                return client.build_request("POST", "/predict", data={"workload": self.workload}, files=upload)
            return client.build_request("POST", "/predict", json={"workload": self.workload, "seed": seed})
        if self.workload == "reconstruct-vae_conv":
            return client.build_request("POST", "/reconstruct", params={"model": "vae_conv"}, files=upload)
        params: dict[str, str | int] = {"n": SAMPLE_N[self.workload], "seed": seed}
        if self.workload == "sample-vae_conv-16":
            params["model"] = "vae_conv"
        else:
            params.update(model="vqvae", prior="pixelcnn")
        return client.build_request("GET", "/sample", params=params)


def target_for(label: str, workload: str) -> PeerTarget:
    return PeerTarget(workload, "litserve" if label in LITSERVE else "genserve")


def client_for(url: str) -> httpx.AsyncClient:
    client = worker_client(url)
    client.headers["Accept-Encoding"] = "identity"
    return client


# -- servers -----------------------------------------------------------------------------------------


def make_servers(args: argparse.Namespace, log_dir: Path) -> dict[str, Server]:
    weights = str(args.weights.resolve())
    peer_args = ["--weights", weights, "--threads", str(args.threads), "--device", args.device]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    servers = {}
    for label in args.servers:
        port = free_port()
        log_path = log_dir / f"server-{label}.log"
        if label == "ours":
            env = {
                **base,
                "GENSERVE_WEIGHTS_DIR": weights,
                "GENSERVE_PORT": str(port),
                "GENSERVE_HOST": "127.0.0.1",
                "GENSERVE_ACCESS_LOG": "false",
                # No GENSERVE_TORCH_THREADS: ours divides the cores among its workers itself
                # (torch threads = cores / 2); --service-env can set it.
                "GENSERVE_DEVICE": args.device,
                **args.service_env,
            }
            servers[label] = Server(label, port, env, log_path)
            continue
        script = "peer_plain.py" if label == "plain" else "peer_litserve.py"
        command = [sys.executable, str(ROOT / "benchmarks" / script), "--port", str(port), *peer_args]
        if label == "plain":
            command += ["--parallel", str(args.plain_parallel)]
        if label == "litserve-fast":
            command.append("--fast-queue")
        servers[label] = Server(label, port, dict(base), log_path, command=command, ready_path="/health")
    return servers


def signal_group(server: Server, signum: int) -> None:
    if server.process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.process.pid, signum)


@contextlib.contextmanager
def running_servers(servers: dict[str, Server], startup_timeout_s: float, stop_timeout_s: float) -> Iterator[None]:
    """Start every server, wait until all are ready; always stop all: SIGCONT (a paused group cannot act on
    SIGTERM), SIGTERM to all at once, then each is waited for (Server.stop: SIGKILL after the timeout).

    Stopped before all were ready (Ctrl-C, a server that failed), each gets 5 s at most: uvicorn
    finishes a lifespan's startup before it acts on SIGTERM, and there is nothing to drain.
    """
    ready = False
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(startup_timeout_s)
        ready = True
        yield
    finally:
        for server in servers.values():
            signal_group(server, signal.SIGCONT)
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
        for server in servers.values():
            server.stop(stop_timeout_s if ready else min(stop_timeout_s, 5.0))


@contextlib.contextmanager
def awake(server: Server, pause: bool) -> Iterator[None]:
    """Run a LitServe server only while it is used (see the module docstring)."""
    pausable = pause and server.label in LITSERVE
    if pausable:
        signal_group(server, signal.SIGCONT)
    try:
        yield
    finally:
        if pausable:
            signal_group(server, signal.SIGSTOP)


def idle_cpu(servers: dict[str, Server], seconds: float = 2.0) -> dict[str, float | None]:
    """Cores each server uses while nobody calls it."""
    before = {label: s.cpu_seconds() for label, s in servers.items()}
    time.sleep(seconds)
    after = {label: s.cpu_seconds() for label, s in servers.items()}
    return {
        label: None if before[label] is None or after[label] is None else (after[label] - before[label]) / seconds
        for label in servers
    }


# -- same bytes? -------------------------------------------------------------------------------------


def pixel_difference(a: bytes, b: bytes) -> str:
    """How two PNGs differ: size, or the largest pixel difference and how many pixels differ."""
    try:
        x, y = (np.asarray(Image.open(io.BytesIO(data))).astype(np.int16) for data in (a, b))
    except Exception as err:  # not a PNG at all: say so
        return f"not comparable as images ({type(err).__name__})"
    if x.shape != y.shape:
        return f"image shapes differ: {x.shape} vs {y.shape}"
    diff = np.abs(x - y)
    return f"max pixel difference {int(diff.max())}/255 in {int((diff > 0).sum())} of {diff.size} pixels"


async def check_bytes(
    servers: dict[str, Server], workloads: list[str], seed: int, png: bytes, pause: bool
) -> list[str]:
    """One request per server and workload; each server's PNG against ours (or the first server's)."""
    reference = "ours" if "ours" in servers else next(iter(servers))
    lines = []
    for workload in workloads:
        answers: dict[str, bytes | str] = {}
        for label, server in servers.items():
            with awake(server, pause):
                async with client_for(server.url) as client:
                    try:
                        response = await client.send(target_for(label, workload).request(client, seed, png))
                    except httpx.HTTPError as err:
                        answers[label] = f"no answer ({type(err).__name__}: {err})"
                        continue
            if response.status_code == 200 and response.headers.get("content-type", "").startswith("image/png"):
                answers[label] = response.content
            else:
                answers[label] = f"status {response.status_code}: {response.text[:200]}"
        ref = answers[reference]
        parts = []
        for label, answer in answers.items():
            if label == reference:
                continue
            if isinstance(answer, str) or isinstance(ref, str):
                parts.append(f"{label}: cannot compare ({answer if isinstance(answer, str) else ref})")
            elif answer == ref:
                parts.append(f"{label} == {reference}")
            else:
                parts.append(f"{label} DIFFERS from {reference} ({pixel_difference(answer, ref)})")
        lines.append(f"same bytes, {workload} seed {seed}: " + ("; ".join(parts) or f"only {reference} is running"))
    return lines


# -- load --------------------------------------------------------------------------------------------


async def measure(
    server: Server,
    target: PeerTarget,
    concurrency: int,
    args: argparse.Namespace,
    seeds: Iterator[int],
    pngs: list[bytes],
) -> Cell:
    """Warm up, then one measured closed loop, with the CPU the client and the server used over it."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(server.url)) for _ in range(concurrency)]
        if args.warmup > 0:
            await closed_loop(clients, target, args.warmup, None, seeds, pngs)  # type: ignore[arg-type]
        client_cpu, server_cpu = time.process_time(), server.cpu_seconds()
        cell = await closed_loop(clients, target, args.duration, None, seeds, pngs)  # type: ignore[arg-type]
        cell.client_cpu = (time.process_time() - client_cpu) / cell.seconds
        if server_cpu is not None and (server_cpu_after := server.cpu_seconds()) is not None:
            cell.server_cpu = (server_cpu_after - server_cpu) / cell.seconds
    return cell


Results = dict[tuple[str, int], dict[str, Cell]]  # (workload, concurrency) -> server label -> cell


async def run_all(servers: dict[str, Server], args: argparse.Namespace, pngs: list[bytes], results: Results) -> None:
    """Fill `results` cell by cell (so an interrupted run keeps what it measured), printing progress."""
    seeds = itertools.count(args.seed + 1)
    for workload in args.workloads:
        for concurrency in args.concurrency:
            row = results.setdefault((workload, concurrency), {})
            for label, server in servers.items():
                with awake(server, args.pause):
                    row[label] = cell = await measure(
                        server, target_for(label, workload), concurrency, args, seeds, pngs
                    )
                print(
                    f"  {workload:<20} C={concurrency:<4} {label:<13} {cell.requests_per_s:8.1f} req/s  "
                    f"p50 {fmt_ms(cell.latency_ms(50)):>6} ms  p99 {fmt_ms(cell.latency_ms(99)):>6} ms  "
                    f"errors {fmt_errors(cell.errors)}  "
                    f"cpu: client {cell.client_cpu:.2f}, server {fmt_cpu(cell.server_cpu)}",
                    flush=True,
                )


# -- report ------------------------------------------------------------------------------------------

HEADERS = ["server", "req/s", "p50 ms", "p99 ms", "errors", "client cpu", "server cpu"]


def cell_rows(cells: dict[str, Cell]) -> list[list[str]]:
    return [
        [label, f"{c.requests_per_s:.1f}", fmt_ms(c.latency_ms(50)), fmt_ms(c.latency_ms(99)), fmt_errors(c.errors),
         f"{c.client_cpu:.2f}", fmt_cpu(c.server_cpu)]
        for label, c in cells.items()
    ]  # fmt: skip


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def ratio_lines(concurrency: int, cells: dict[str, Cell]) -> tuple[list[str], list[str]]:
    """The ratios for one (workload, C), and the targets judged at this C ("met" / "MISSED")."""
    lines, judged = [], []
    ours, plain = cells.get("ours"), cells.get("plain")
    if ours and plain and ours.latency_ms(50) and plain.latency_ms(50):
        ratio = ours.latency_ms(50) / plain.latency_ms(50)  # type: ignore[operator]
        line = f"ours p50 / plain p50 = {ratio:.2f}"
        c, limit = LATENCY_TARGET
        if concurrency == c:
            judged.append(f"ours p50 / plain p50 = {ratio:.2f} (<= {limit}): {verdict(ratio <= limit)}")
            line += f"  (target <= {limit} at C={c}: {verdict(ratio <= limit)})"
        lines.append(line)
    modes = {label: cells[label] for label in LITSERVE if label in cells and cells[label].ok}
    if ours and modes:
        best_label, best = max(modes.items(), key=lambda item: item[1].requests_per_s)
        ratio = ours.requests_per_s / best.requests_per_s
        p99_ours, p99_best = ours.latency_ms(99), best.latency_ms(99)
        lower = p99_ours is not None and p99_best is not None and p99_ours < p99_best
        line = f"ours req/s / {best_label} req/s (the faster LitServe mode) = {ratio:.2f}x"
        p99_line = (
            f"ours p99 {fmt_ms(p99_ours)} ms vs {best_label} p99 {fmt_ms(p99_best)} ms: "
            f"ours {'lower' if lower else 'NOT lower'}"
        )
        c, limit = THROUGHPUT_TARGET
        if concurrency == c:
            judged.append(f"ours / {best_label} req/s = {ratio:.2f}x (>= {limit}): {verdict(ratio >= limit)}")
            judged.append(
                f"ours p99 < {best_label} p99 ({fmt_ms(p99_ours)} vs {fmt_ms(p99_best)} ms): {verdict(lower)}"
            )
            line += f"  (target >= {limit} at C={c}: {verdict(ratio >= limit)})"
            p99_line += f"  (target at C={c}: {verdict(lower)})"
        lines += [line, p99_line]
    return lines, judged


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *rows])


def report(results: Results, markdown: bool) -> str:
    blocks, summary = [], []
    for (workload, concurrency), cells in results.items():
        lines, judged = ratio_lines(concurrency, cells)
        title = f"{workload}, C={concurrency}"
        summary += [f"{title}: {j}" for j in judged]
        if markdown:
            blocks.append(
                f"**{title}**\n\n{markdown_table(HEADERS, cell_rows(cells))}\n" + "".join(f"\n- {x}" for x in lines)
            )
        else:
            blocks.append(f"{title}\n{text_table(HEADERS, cell_rows(cells))}" + "".join(f"\n  {x}" for x in lines))
    if summary:
        blocks.append("targets:" + "".join(f"\n{'- ' if markdown else '  '}{line}" for line in summary))
    return "\n\n".join(blocks)


def installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header_lines(
    servers: dict[str, Server], args: argparse.Namespace, idle: dict[str, float | None], image_source: str
) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # what uvicorn's "auto" picks
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({cores} usable), load average {load}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
        f"uvicorn {installed('uvicorn')} (loop {loop}, http {parser}), "
        f"fastapi {installed('fastapi')}, litserve {installed('litserve')}",
        f"settings: torch threads {args.threads}, device {args.device}, weights {args.weights}",
    ]
    if "ours" in servers:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            config = servers["ours"].get_json("/config")
            keys = ("resolved_device", "max_batch_size", "max_wait_ms", "max_inflight", "pad_batches",
                    "torch_threads", "io_threads", "precision", "max_queue")  # fmt: skip
            lines.append("ours: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))  # type: ignore[index]
            sizes = config.get("pass_sizes") or {}  # type: ignore[union-attr]
            padded = {b: sizes[b] for w in args.workloads if sizes.get(b := OUR_BATCHERS[w]) is not None}
            if padded:
                lines.append(
                    "ours pads each pass up to the next of: " + "; ".join(f"{b} {v}" for b, v in padded.items())
                )
        if args.service_env:
            lines.append("ours --service-env: " + " ".join(f"{k}={v}" for k, v in args.service_env.items()))
    if "plain" in servers:
        lines.append(
            f"plain: FastAPI + uvicorn, 1 process, no batching, {args.plain_parallel} forward pass(es) at once"
        )
    if set(LITSERVE) & set(servers):
        lines.append("litserve: max_batch_size=32, batch_timeout=5 ms, 1 inference worker, 1 API server; "
                     "litserve-fast: the same with fast_queue=True")  # fmt: skip
    lines.append("idle cpu over 2 s (cores): " + ", ".join(f"{label} {fmt_cpu(v)}" for label, v in idle.items())
                 + ("; LitServe paused while idle" if args.pause and set(LITSERVE) & set(servers) else ""))  # fmt: skip
    lines.append(f"uploads: {image_source}; closed loop per cell: {args.warmup:g} s warm-up, then {args.duration:g} s; "
                 f"concurrency {args.concurrency}; servers measured in turn per (workload, C)")  # fmt: skip
    return lines


def write_markdown(path: Path, command: str, header: list[str], body: str, notes: list[str]) -> None:
    text = [
        "## Peers: this service vs LitServe 0.2.19 vs plain FastAPI",
        "",
        "```",
        f"$ {command}",
        *header,
        "```",
        "",
        body,
        "",
        *(f"- {note}" for note in notes),
        "",
    ]
    path.write_text("\n".join(text))


# -- main --------------------------------------------------------------------------------------------


def parse_env(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--service-env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        metavar="NAME",
        help=f"default: all of {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS,
        default=list(WORKLOADS),
        metavar="NAME",
        help=f"default: all of {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(CONCURRENCY),
        help=f"concurrent clients per cell (default {' '.join(map(str, CONCURRENCY))})",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every server (default 2)")
    parser.add_argument("--device", default="auto", help="every server's device: auto (cuda when available), cpu, cuda")
    parser.add_argument(
        "--weights", type=Path, default=ROOT / "weights", help="the weights directory (default weights/)"
    )
    parser.add_argument(
        "--plain-parallel",
        type=int,
        default=1,
        help="forward passes plain may run at once (default 1; see benchmarks/peer_plain.py)",
    )
    parser.add_argument(
        "--service-env",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for ours, e.g. GENSERVE_TORCH_THREADS=2 GENSERVE_PAD_BATCHES=false",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the seed of the same-bytes check; requests use the next ones"
    )
    parser.add_argument(
        "--no-pause",
        dest="pause",
        action="store_false",
        help="keep LitServe running between its cells (it polls its queue while idle)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the header and tables as markdown here")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="keep the servers' logs here (default: a temporary directory)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds to wait for every server to be ready"
    )
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL at the end")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)])
    args.service_env = parse_env(args.service_env, parser)
    args.servers = [s for s in SERVERS if s in args.servers]  # a fixed order, deduplicated
    args.workloads = list(dict.fromkeys(args.workloads))
    if args.duration <= 0 or args.warmup < 0 or min(args.threads, args.plain_parallel, *args.concurrency) < 1:
        parser.error(
            "--duration must be positive, --warmup non-negative, --threads, --plain-parallel and every "
            "--concurrency at least 1"
        )
    if not args.weights.is_dir():
        parser.error(f"--weights {args.weights} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    pngs, image_source = upload_images(16, args.seed)
    results: Results = {}
    interrupted = False
    warning = busy_warning()
    with tempfile.TemporaryDirectory(prefix="genserve-peers-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        servers = make_servers(args, log_dir)
        print(f"starting {', '.join(servers)} (logs in {log_dir})", flush=True)
        with running_servers(servers, args.startup_timeout, args.stop_timeout):
            idle = idle_cpu(servers)
            if args.pause:
                for label in set(LITSERVE) & set(servers):
                    signal_group(servers[label], signal.SIGSTOP)
            header = [*header_lines(servers, args, idle, image_source), *([warning] if warning else [])]
            print("\n".join(header), flush=True)
            checks: list[str] = []
            try:
                checks = asyncio.run(
                    check_bytes(servers, args.workloads, args.seed, pngs[args.seed % len(pngs)], args.pause)
                )
                print("\n".join(checks), flush=True)
                asyncio.run(run_all(servers, args, pngs, results))
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: shutting the servers down; the tables hold the finished cells", flush=True)
        log_errors = [
            f"server {label} logged errors; its last lines:\n{server.log_tail(10)}"
            for label, server in servers.items()
            if server.log_errors()
        ]

    notes = [
        "req/s counts 200 answers over the measured window; p50 / p99 are the 200s' latencies as the client sees them",
        "cpu: cores used over the window (1.0 = one core); a server's CPU sums every process of its group",
        *checks,
        *log_errors,
    ]
    print()
    print(report(results, markdown=False))
    print("\n" + "\n".join(notes[2:]))
    if args.markdown:
        write_markdown(args.markdown, args.command, header, report(results, markdown=True), notes)
        print(f"\nmarkdown written to {args.markdown}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during startup: the servers are already stopped
        sys.exit(130)
    except RuntimeError as err:  # a server did not start (its log tail is in the message); all are stopped
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
