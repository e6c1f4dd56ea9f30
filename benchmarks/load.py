"""HTTP load test of the real server, dynamic batching ON vs OFF, side by side.

Starts two servers the way the README does (`python -m app`, uvicorn) on free ports with
GENSERVE_* settings: "on" with the default batching (GENSERVE_MAX_BATCH_SIZE=64) and "off"
with GENSERVE_MAX_BATCH_SIZE=1. Both load the same weights directory and stay up for the whole
run; the cells are interleaved (for each scenario and concurrency: on, then off), so a change
in machine load hits both sides alike and the ratio stays fair.

Each cell is a closed loop: C workers each send one request, wait for the answer and send the
next, for --duration seconds (or --requests in all) after --warmup seconds of the same load,
whose results are discarded. Every request has its own seed; uploads cycle through a few
Fashion-MNIST test images (seeded noise when the data set is not installed). Scenarios:

    reconstruct-vae     POST /reconstruct?model=<vae>            one 28x28 PNG
    reconstruct-vqvae   POST /reconstruct?model=<vqvae>          one 28x28 PNG
    sample-vae          GET  /sample?model=<vae>&n=N&seed=S
    sample-<prior>      GET  /sample?model=<vqvae>&prior=<prior>&n=N&seed=S   (pixelcnn, gated, pixelcnnpp)

A scenario whose model or prior is not in GET /models is skipped. Per cell and server: requests/s,
images/s, p50/p95/p99 latency of the 200s (ms, as the client sees it), errors by status (or
exception; the first answer of each kind is printed at the end), and the mean batch size from
the server's genserve_batch_size histogram (the difference of /metrics before and after the
measured window). The table shows both servers side by side with the ratio of requests/s on/off.

The client runs on the same machine and shares its cores; each worker has its own connection
(see `worker_client`). The progress lines show the CPU used by the client and by the server
during each cell (1.0 = one core): a client near a full core means the client sets the pace.
On a small CPU box, --threads 1 keeps torch's threads from fighting the client and event loop.
At the end, in this same process, the cached prior sampler (`sample`, what the server runs) is
timed against `sample(mode="naive")` for --sampler-n grids on every prior in the weights
directory, with the count of grids whose codes differ (float32 rounding at cumulative-probability
edges only); benchmarks/sampling.py does the same in more detail.

    python benchmarks/load.py                                  # everything, 10 s per cell (~10 min)
    python benchmarks/load.py --quick                          # smoke run: 2 s per cell, C = 1 and 8
    python benchmarks/load.py --scenarios sample-vae sample-gated --concurrency 1 32 --threads 1
    python benchmarks/load.py --pad-batches false --markdown /tmp/load.md   # then paste into RESULTS.md
    python benchmarks/load.py --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio   # uvicorn[standard] vs plain
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

PRIORS = ("pixelcnn", "gated", "pixelcnnpp")
MODES = {"on": None, "off": 1}  # server label -> GENSERVE_MAX_BATCH_SIZE (None: the server's default, 64)
CONCURRENCY = (1, 8, 32, 128)
QUICK = {"duration": 2.0, "warmup": 0.5, "concurrency": [1, 8]}
CLIENT_TIMEOUT_S = 120.0  # above the server's request_timeout_s (30 s), so the server's 504 is what we see


# -- scenarios ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # the model kind it needs: "vae" or "vqvae"
    op: str  # "reconstruct" or "sample"
    prior: str | None = None


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("reconstruct-vae", "vae", "reconstruct"),
        Scenario("reconstruct-vqvae", "vqvae", "reconstruct"),
        Scenario("sample-vae", "vae", "sample"),
        *(Scenario(f"sample-{p}", "vqvae", "sample", p) for p in PRIORS),
    )
}


@dataclass(frozen=True)
class Target:
    """A scenario bound to a served model: knows how to build its requests."""

    scenario: Scenario
    model: str
    n: int  # images per /sample request

    @property
    def images_per_request(self) -> int:
        return self.n if self.scenario.op == "sample" else 1

    @property
    def batcher(self) -> str:
        """The server's batcher label in /metrics (app/service.py: f"{model}:{op}")."""
        op = self.scenario.op if self.scenario.prior is None else f"sample:{self.scenario.prior}"
        return f"{self.model}:{op}"

    def request(self, client: httpx.AsyncClient, seed: int, png: bytes) -> httpx.Request:
        if self.scenario.op == "reconstruct":
            files = {"file": (f"{seed}.png", png, "image/png")}
            return client.build_request("POST", "/reconstruct", params={"model": self.model}, files=files)
        params: dict[str, str | int] = {"model": self.model, "n": self.n, "seed": seed}
        if self.scenario.prior is not None:
            params["prior"] = self.scenario.prior
        return client.build_request("GET", "/sample", params=params)


def find_targets(models: list[dict], names: list[str], n: int) -> tuple[list[Target], list[str]]:
    """Bind each scenario to the first served model of its kind; also return why others were skipped."""
    first = {}
    for entry in models:
        first.setdefault(entry["kind"], entry)
    targets, skipped = [], []
    for name in names:
        scenario = SCENARIOS[name]
        entry = first.get(scenario.kind)
        if entry is None:
            skipped.append(f"{name}: no {scenario.kind} model is loaded")
            continue
        priors = [p["name"] for p in entry.get("priors") or []]
        if scenario.prior is not None and scenario.prior not in priors:
            skipped.append(f"{name}: prior {scenario.prior!r} is not loaded for {entry['name']!r} (loaded: {priors})")
            continue
        targets.append(Target(scenario, entry["name"], n))
    return targets, skipped


def describe_models(models: list[dict]) -> str:
    """One line naming each served model, its weight file and its priors."""
    parts = []
    for entry in models:
        priors = [f"{p['name']} ({p['file']})" for p in entry.get("priors") or []]
        parts.append(f"{entry['name']} ({entry['file']}" + (f"; priors: {', '.join(priors)})" if priors else ")"))
    return "models: " + ("; ".join(parts) or "none")


# -- test images -------------------------------------------------------------------------------------


def upload_images(count: int, seed: int) -> tuple[list[bytes], str]:
    """`count` 28x28 grayscale PNGs: Fashion-MNIST test images, or seeded noise without the data set."""
    try:
        from training.data import DataError, load_dataset

        pixels = load_dataset("fashion-mnist", "test").images[:count, 0].numpy()  # (count, 28, 28) uint8
        source = "Fashion-MNIST test images"
    except (ImportError, DataError, OSError):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        source = f"seeded noise (seed {seed}; Fashion-MNIST not found)"
    pngs = []
    for array in pixels:  # (28, 28) uint8: mode L
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, f"{count} {source}"


# -- servers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One server subprocess, `python -m app` unless `command` says otherwise; its log goes to a file,
    shown when something goes wrong. It is ready when GET `ready_path` answers 200."""

    label: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "app"])
    ready_path: str = "/ready"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            # Own session: Ctrl-C reaches only this script, which then shuts the server down in order.
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"server {self.label!r} exited during startup:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{self.ready_path}", timeout=5).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"server {self.label!r} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (uvicorn drains and runs the lifespan's shutdown), then SIGKILL if it hangs or on a 2nd Ctrl-C.

        Then SIGKILL to what is left of its process group (start_new_session made the server the
        leader): worker processes it started and did not stop, such as LitServe's.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time so far of the server and the live processes of its group (Linux /proc), None
        where unknown. The group holds the worker processes a server starts (LitServe's, uvicorn's)."""
        if self.process is None:
            return None
        ticks, found = 0, False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended meanwhile
            if int(fields[2]) == self.process.pid:  # pgrp (field 5)
                ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
                found = True
        return ticks / os.sysconf("SC_CLK_TCK") if found else None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(f"  [{self.label}] {line}" for line in text.splitlines()[-lines:])

    def log_errors(self, limit: int = 5) -> list[str]:
        """ERROR lines and tracebacks in the server's log (uvicorn's access lines are INFO)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        hits = [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]
        return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])

    def get_json(self, path: str) -> object:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()


@contextlib.contextmanager
def running_servers(settings: dict[str, str], log_dir: Path, startup_timeout_s: float,
                    vs: dict[str, str] | None = None) -> Iterator[dict[str, Server]]:
    """Start the "on" and "off" servers together, wait until both are ready, always stop both.
    With `vs`, "off" keeps the default batching and takes these settings instead (--vs)."""
    base = {k: v for k, v in os.environ.items() if k != "GENSERVE_MAX_BATCH_SIZE"}
    servers = {}
    for label, max_batch_size in MODES.items():
        port = free_port()
        env = {**base, **settings, "GENSERVE_HOST": "127.0.0.1", "GENSERVE_PORT": str(port)}
        if vs and label == "off":
            env.update(vs)
        elif max_batch_size is not None:
            env["GENSERVE_MAX_BATCH_SIZE"] = str(max_batch_size)
        servers[label] = Server(label, port, env, log_dir / f"server-{label}.log")
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(startup_timeout_s)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


# -- load generation ---------------------------------------------------------------------------------


@dataclass
class Cell:
    """What one server did for one scenario at one concurrency, over the measured window."""

    ok: int = 0
    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)  # error kind -> its first answer or exception
    mean_batch: float | None = None
    client_cpu: float = 0.0  # CPU seconds over wall seconds of the window: 1.0 = one core busy
    server_cpu: float | None = None

    def add_error(self, kind: str, example: str) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, example[:200])

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


def worker_client(url: str) -> httpx.AsyncClient:
    """A client with one keep-alive connection, for one worker.

    One client shared by C workers does not scale: httpcore's pool scans every connection for
    every request, and at C=128 the client, not the server, set the pace (/health fell from
    ~650 req/s at C=8 to ~50 at C=128 on a 2-core box). verify=False: plain HTTP, and it spares
    loading the CA bundle for each of the C clients.
    """
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits, verify=False)


async def closed_loop(
    clients: list[httpx.AsyncClient],
    target: Target,
    duration_s: float,
    max_requests: int | None,
    seeds: Iterator[int],
    pngs: list[bytes],
) -> Cell:
    """One worker per client sends requests back to back until duration_s is over (or max_requests are sent).

    A request in flight when the time is up is awaited and counted; the window ends with the last answer.
    """
    cell = Cell()
    sent = itertools.count()
    end = time.perf_counter() + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            if (time.perf_counter() >= end) if max_requests is None else (next(sent) >= max_requests):
                return
            seed = next(seeds)
            request = target.request(client, seed, pngs[seed % len(pngs)])
            start = time.perf_counter()
            try:
                response = await client.send(request)
            except httpx.HTTPError as err:
                cell.add_error(type(err).__name__, str(err))
                await asyncio.sleep(0.05)  # do not spin on a dead server
                continue
            if response.status_code == 200:
                cell.latencies_ms.append((time.perf_counter() - start) * 1000)
                cell.ok += 1
                cell.images += target.images_per_request
            else:
                cell.add_error(str(response.status_code), response.text)

    start = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    cell.seconds = time.perf_counter() - start
    return cell


BatchTotals = dict[str, tuple[float, float]]  # batcher -> (items, forward passes)


async def batch_totals(client: httpx.AsyncClient) -> BatchTotals:
    """batcher -> (items, forward passes) so far, from the genserve_batch_size histogram."""
    response = await client.get("/metrics")
    response.raise_for_status()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != "genserve_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                sums[sample.labels["batcher"]] = sample.value
            elif sample.name.endswith("_count"):
                counts[sample.labels["batcher"]] = sample.value
    return {name: (sums.get(name, 0.0), counts.get(name, 0.0)) for name in sums.keys() | counts.keys()}


def mean_batch(before: BatchTotals, after: BatchTotals, batcher: str) -> float | None:
    items0, passes0 = before.get(batcher, (0.0, 0.0))
    items1, passes1 = after.get(batcher, (0.0, 0.0))
    return (items1 - items0) / (passes1 - passes0) if passes1 > passes0 else None


async def measure(
    server: Server, target: Target, concurrency: int, args: argparse.Namespace, seeds: Iterator[int], pngs: list[bytes]
) -> Cell:
    """Warm up, then one measured closed loop, with the server's batch sizes over that window."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(worker_client(server.url)) for _ in range(concurrency)]
        if args.warmup > 0:
            await closed_loop(clients, target, args.warmup, None, seeds, pngs)
        before = await batch_totals(clients[0])
        client_cpu, server_cpu = time.process_time(), server.cpu_seconds()
        cell = await closed_loop(clients, target, args.duration, args.requests, seeds, pngs)
        cell.client_cpu = (time.process_time() - client_cpu) / cell.seconds
        if server_cpu is not None and (server_cpu_after := server.cpu_seconds()) is not None:
            cell.server_cpu = (server_cpu_after - server_cpu) / cell.seconds
        cell.mean_batch = mean_batch(before, await batch_totals(clients[0]), target.batcher)
    return cell


Results = dict[tuple[str, int], dict[str, Cell]]  # (scenario, concurrency) -> server label -> cell


async def run_all(
    servers: dict[str, Server], targets: list[Target], args: argparse.Namespace, pngs: list[bytes], results: Results
) -> None:
    """Fill `results` cell by cell (so an interrupted run keeps what it measured), printing progress."""
    seeds = itertools.count(args.seed)
    for target in targets:
        for concurrency in args.concurrency:
            row = results.setdefault((target.scenario.name, concurrency), {})
            for label, server in servers.items():
                row[label] = cell = await measure(server, target, concurrency, args, seeds, pngs)
                print(
                    f"  {target.scenario.name:<18} C={concurrency:<4} {label:<3} {cell.requests_per_s:8.1f} req/s  "
                    f"p50 {fmt_ms(cell.latency_ms(50))} ms  batch {fmt_batch(cell.mean_batch)}  "
                    f"errors {fmt_errors(cell.errors)}  "
                    f"cpu: client {cell.client_cpu:.2f}, server {fmt_cpu(cell.server_cpu)}",
                    flush=True,
                )


# -- report ------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def fmt_batch(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_errors(errors: Counter[str]) -> str:
    return " ".join(f"{kind}x{count}" for kind, count in sorted(errors.items())) or "0"


def fmt_ratio(on: Cell, off: Cell) -> str:
    if off.requests_per_s == 0:
        return "-"
    return f"{on.requests_per_s / off.requests_per_s:.2f}x"


HEADERS = [
    "scenario", "C", "req/s on", "req/s off", "on/off", "img/s on", "img/s off",
    "p50/p95/p99 ms on", "p50/p95/p99 ms off", "batch on", "batch off", "errors on", "errors off",
]


def table_rows(results: Results) -> list[list[str]]:
    rows = []
    for (scenario, concurrency), cells in results.items():
        if set(cells) != set(MODES):
            continue  # interrupted half way
        on, off = cells["on"], cells["off"]

        def latency(cell: Cell) -> str:
            return "/".join(fmt_ms(cell.latency_ms(q)) for q in (50, 95, 99))

        rows.append([
            scenario, str(concurrency),
            f"{on.requests_per_s:.1f}", f"{off.requests_per_s:.1f}", fmt_ratio(on, off),
            f"{on.images_per_s:.1f}", f"{off.images_per_s:.1f}",
            latency(on), latency(off),
            fmt_batch(on.mean_batch), fmt_batch(off.mean_batch),
            fmt_errors(on.errors), fmt_errors(off.errors),
        ])  # fmt: skip
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(HEADERS), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(rows: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(HEADERS) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [HEADERS, align, *rows])


def error_examples(results: Results) -> list[str]:
    """The first answer to each kind of error, once per scenario and server."""
    seen: dict[tuple[str, str, str], str] = {}
    for (scenario, _concurrency), cells in results.items():
        for label, cell in cells.items():
            for kind, example in cell.error_examples.items():
                seen.setdefault((scenario, label, kind), example)
    return [f"{scenario} ({label}) {kind}: {example}" for (scenario, label, kind), example in seen.items()]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_lines(servers: dict[str, Server]) -> list[str]:
    import torch  # only for its version and CUDA; the servers import it anyway

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({cores} usable), load average {load}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
    ]
    for label, server in servers.items():
        config = server.get_json("/config")
        keys = ("max_batch_size", "max_wait_ms", "pad_batches", "torch_threads", "precision", "max_queue")
        settings = ", ".join(f"{k}={config.get(k)}" for k in keys)
        lines.append(f"server {label:<3}: device {config.get('resolved_device')}, {settings}")
    return lines


def busy_warning() -> str | None:
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        return f"WARNING: load average {load:.2f} on {cores} CPUs before the run: other work will skew the numbers"
    return None


def write_markdown(path: Path, command: str, header: list[str], rows: list[list[str]], notes: list[str],
                   title: str = "dynamic batching on vs off") -> None:
    text = [
        f"## Load test: {title}",
        "",
        "```",
        f"$ {command}",
        *header,
        "```",
        "",
        markdown_table(rows),
        "",
        *(f"- {note}" for note in notes),
        "",
    ]
    path.write_text("\n".join(text))


# -- main --------------------------------------------------------------------------------------------


def sampler_lines(weights: Path, n: int, threads: int | None) -> list[str]:
    """Fast (cached) vs naive prior sampling, in this process, on every prior in `weights`."""
    import torch

    from models.io import load_model, read_metadata
    from sampling import time_samplers  # benchmarks/sampling.py, beside this script

    if threads is not None:
        torch.set_num_threads(threads)
    lines = [f"sampler timing in-process, n = {n}, {torch.get_num_threads()} thread(s), median of 3:"]
    for path in sorted(weights.glob("*.safetensors")):
        if read_metadata(path)["kind"] not in ("pixelcnn", "gated_pixelcnn", "pixelcnnpp"):
            continue
        model, info = load_model(path)
        differing = [0, 0]
        t = time_samplers(model, n, repeats=3, seed=0, differing=differing)
        lines.append(f"sampler {info.name}: naive {t['naive']:.3f} s  cached {t['cached']:.3f} s  "
                     f"speed-up {t['naive'] / t['cached']:.1f}x ({differing[0]} of {differing[1]} grids differ)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), metavar="NAME",
                        help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help=f"concurrent clients per cell (default {' '.join(map(str, CONCURRENCY))}; --quick: 1 8)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per cell (default 10; --quick: 2)")
    parser.add_argument("--requests", type=int, default=None,
                        help="measure this many requests per cell instead of a fixed duration")
    parser.add_argument("--warmup", type=float, default=None,
                        help="unmeasured seconds before each cell (default 2; --quick: 0.5)")
    parser.add_argument("--n", type=int, default=1, help="images per /sample request (default 1)")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights",
                        help="GENSERVE_WEIGHTS_DIR (default weights/)")
    parser.add_argument("--threads", type=int, default=None, help="GENSERVE_TORCH_THREADS for both servers")
    parser.add_argument("--sampler-n", type=int, default=64,
                        help="after the load test, time the cached prior sampler against mode='naive' in this "
                             "process for n grids (benchmarks/sampling.py does it in detail); 0 skips it")
    parser.add_argument("--pad-batches", choices=["true", "false"], default=None,
                        help="GENSERVE_PAD_BATCHES for both servers (default: the server's default)")
    parser.add_argument("--seed", type=int, default=0, help="first request seed; each request gets the next one")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown to this file")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for GET /ready")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per cell, 0.5 s warm-up, C = 1 and 8")
    parser.add_argument("--vs", nargs="+", default=None, metavar="GENSERVE_KEY=VALUE",
                        help='compare settings instead of batching: "off" is the same server (batching on) with these '
                             "settings, e.g. --vs GENSERVE_HTTP=h11 GENSERVE_LOOP=asyncio")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/load.py", *(sys.argv[1:] if argv is None else argv)])
    defaults = QUICK if args.quick else {"duration": 10.0, "warmup": 2.0, "concurrency": list(CONCURRENCY)}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration <= 0 or args.warmup < 0 or args.n < 1 or min(args.concurrency) < 1:
        parser.error("--duration and --n must be positive, --warmup non-negative, every --concurrency at least 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if not args.weights.is_dir():
        parser.error(f"--weights {args.weights} is not a directory")
    return args


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    settings = {"GENSERVE_WEIGHTS_DIR": str(args.weights.resolve()), "GENSERVE_ACCESS_LOG": "false"}
    if args.threads is not None:
        settings["GENSERVE_TORCH_THREADS"] = str(args.threads)
    if args.pad_batches is not None:
        settings["GENSERVE_PAD_BATCHES"] = args.pad_batches
    return settings


def stop_on_sigterm() -> None:
    """Let `kill` end the run as Ctrl-C does: asyncio.run turns SIGINT into a clean cancellation."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job of a shell: SIGINT is ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    else:
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    pngs, image_source = upload_images(16, args.seed)
    results: Results = {}
    interrupted = False
    warning = busy_warning()
    with tempfile.TemporaryDirectory(prefix="genserve-load-") as log_dir:
        vs = dict(item.split("=", 1) for item in args.vs) if args.vs else None
        with running_servers(server_settings(args), Path(log_dir), args.startup_timeout, vs) as servers:
            models = servers["on"].get_json("/models")
            targets, skipped = find_targets(models, args.scenarios, args.n)  # type: ignore[arg-type]
            window = f"{args.requests} requests" if args.requests else f"{args.duration:g} s"
            header = [
                *machine_lines(servers),
                describe_models(models),  # type: ignore[arg-type]
                f"weights {args.weights}; uploads: {image_source}; /sample n={args.n}",
                f"closed loop per cell: {args.warmup:g} s warm-up, then {window}; concurrency {args.concurrency}",
                *([warning] if warning else []),
                *(f"skipped {line}" for line in skipped),
            ]
            print("\n".join(header), flush=True)
            try:
                asyncio.run(run_all(servers, targets, args, pngs, results))
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: shutting the servers down; the table holds the finished cells", flush=True)
        log_errors = [f"server {label} log: {line}" for label, s in servers.items() for line in s.log_errors()]

    rows = table_rows(results)
    notes = [
        "req/s and img/s count 200 answers over the measured window; latencies are the 200s' as the client sees them",
        "batch: mean items per forward pass of the scenario's batcher (server's genserve_batch_size histogram)",
        "on: the server's default batching (GENSERVE_MAX_BATCH_SIZE=64); off: GENSERVE_MAX_BATCH_SIZE=1"
        if not args.vs else f"on: the server's defaults; off: the same with {' '.join(args.vs)} (batching on in both)",
    ]
    problems = error_examples(results) + log_errors
    if args.sampler_n and not interrupted:
        notes += sampler_lines(args.weights, args.sampler_n, args.threads)
    print()
    print(text_table(rows))
    print("\n".join(notes[3:]))
    if problems:
        print("\nerrors (first of each kind):\n" + "\n".join(f"  {line}" for line in problems))
    if args.markdown:
        title = f"the defaults (on) vs {' '.join(args.vs)} (off)" if args.vs else "dynamic batching on vs off"
        write_markdown(args.markdown, args.command, header, rows, notes + problems, title)
        print(f"\nmarkdown written to {args.markdown}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during startup: the servers are already stopped
        sys.exit(130)
