"""What every benchmark shares: servers in their own process group on free ports, the wait for
/ready, a process group's CPU and RSS, closed-loop load, percentiles and one table format.

The scripts run as modules from the repository root (`python -m benchmarks.load`) and start the
`python -m app` of the tree they run in: to measure another commit, run them from a worktree of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
CLIENT_TIMEOUT_S = 120.0  # above the server's request_timeout_s (30 s), so the server's 504 is what we see


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell_env() -> dict[str, str]:
    """This shell's environment without its GENSERVE_* variables: a benchmark states the settings it runs with."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}


class ProcessGroup:
    """A server's processes (Linux /proc): the group it leads, with the workers it starts."""

    def __init__(self, pid: int) -> None:
        self.pid, self.pgid = pid, os.getpgid(pid)

    def _stats(self) -> Iterator[tuple[int, list[str]]]:
        """(pid, /proc/PID/stat's fields from the 3rd on) of every live process of the group."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((fields := stat.read_text().rsplit(")", 1)[1].split())[2]) == self.pgid:  # pgrp (field 5)
                    yield int(stat.parent.name), fields

    def pids(self) -> list[int]:
        return [pid for pid, _ in self._stats()]

    def cpu_seconds(self) -> float | None:
        """User + system CPU time so far of every live process of the group."""
        ticks = [int(f[11]) + int(f[12]) for _, f in self._stats()]  # utime, stime
        return sum(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None

    def rss(self, pids: list[int] | None = None) -> int | None:
        """Their summed resident set size (VmRSS) in bytes; None when none of them is alive."""
        pages = []
        for pid in self.pids() if pids is None else pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                pages.append(int(Path(f"/proc/{pid}/statm").read_text().split()[1]))
        return sum(pages) * os.sysconf("SC_PAGE_SIZE") if pages else None

    def settled_rss(self, samples: int = 5, interval_s: float = 0.02) -> int | None:
        """The median of a few readings."""
        values = []
        for _ in range(samples):
            if (value := self.rss()) is not None:
                values.append(value)
            time.sleep(interval_s)
        return int(np.median(values)) if values else None


class Poller(threading.Thread):
    """Calls `poll` every `interval_s` in a daemon thread, from entering its `with` block to leaving it."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.interval_s, self.stopping = interval_s, threading.Event()

    def run(self) -> None:  # the subclass has poll()
        next_at = time.perf_counter()
        while not self.stopping.is_set():
            self.poll()  # type: ignore[attr-defined]
            next_at = max(next_at + self.interval_s, time.perf_counter())
            self.stopping.wait(next_at - time.perf_counter())

    def __enter__(self):  # -> the subclass
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join()


class RssMonitor(Poller):
    """A process group's peak RSS (its members re-listed every 0.5 s: all of /proc at each poll costs too much)."""

    def __init__(self, group: ProcessGroup, interval_s: float = 0.01) -> None:
        super().__init__(interval_s)
        self.group, self.peak, self.listed, self.members = group, None, 0.0, []

    def poll(self) -> None:
        if time.monotonic() - self.listed > 0.5:
            self.listed, self.members = time.monotonic(), self.group.pids()
        if (value := self.group.rss(self.members)) is not None:
            self.peak = max(self.peak or 0, value)


@dataclass
class Server:
    """A server subprocess (`python -m app` by default) leading its own process group, its log in a file."""

    label: str
    env: dict[str, str]
    log_path: Path
    port: int
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "app"])
    ready_path: str = "/ready"
    cwd: Path = ROOT
    process: subprocess.Popen | None = None
    started: float = 0.0  # time.perf_counter() at start()
    first_answer_s: float | None = None  # seconds from start() to its first HTTP answer of any kind

    @classmethod
    def app(cls, label: str, log_dir: Path, weights: Path, settings: dict[str, str], cwd: Path = ROOT) -> Server:
        """`python -m app` serving `weights` on a free port of 127.0.0.1, without an access log, with `settings`."""
        port = free_port()
        env = {**shell_env(), "GENSERVE_HOST": "127.0.0.1", "GENSERVE_PORT": str(port), "GENSERVE_ACCESS_LOG": "false",
               "GENSERVE_WEIGHTS_DIR": str(weights.resolve())}  # fmt: skip
        return cls(label, {**env, **settings}, log_dir / f"server-{label}.log", port, cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def group(self) -> ProcessGroup | None:
        return None if self.process is None else ProcessGroup(self.process.pid)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:  # its own session: Ctrl-C reaches only us, and we stop it in order
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.started = time.perf_counter()

    def wait_ready(self, timeout_s: float, interval_s: float = 0.25) -> float:
        """Seconds from start() to the first 200 of GET ready_path."""
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.perf_counter() - self.started < timeout_s:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"server {self.label!r} exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    status = client.get(self.ready_path).status_code
                    now = time.perf_counter() - self.started
                    self.first_answer_s = self.first_answer_s or now
                    if status == 200:
                        return now
                time.sleep(interval_s)
        raise RuntimeError(f"server {self.label!r} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        """To its whole group (SIGSTOP / SIGCONT pause and wake every process of it)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, SIGKILL if it hangs or on a 2nd Ctrl-C, then SIGKILL to what is left of its group (LitServe's)."""
        if self.process is None:
            return
        self.signal(signal.SIGCONT)  # a paused group cannot act on SIGTERM
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                self.process.kill()
                self.process.wait()
        self.signal(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"  [{self.label}] {line}" for line in self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_errors(self, limit: int = 5) -> list[str]:
        """ERROR lines and tracebacks of its log (uvicorn's access lines are INFO)."""
        text = self.log_path.read_text(errors="replace").splitlines()
        hits = [line for line in text if " ERROR " in line or line.startswith("Traceback")]
        return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])

    def get_json(self, path: str):  # -> the JSON
        return httpx.get(f"{self.url}{path}", timeout=30).raise_for_status().json()


def wait_settled(url: str, timeout_s: float, interval_s: float = 0.1) -> dict:
    """GET /config once no batcher is left on its default pass size (its check has run after /ready)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        config = httpx.get(f"{url}/config", timeout=30).raise_for_status().json()
        if "default" not in (config.get("pass_size_sources") or {}).values() or time.perf_counter() > deadline:
            return config
        time.sleep(interval_s)


@contextlib.contextmanager
def serving(args: argparse.Namespace, make: Callable[[Path], list[Server]]) -> Iterator[list[Server]]:
    """make(a folder for logs)'s servers, yielded once ready (the service: its checks after /ready settled too: what
    follows measures the steady state); always stopped, SIGTERM to all at once (5 s each at most if never ready)."""
    with tempfile.TemporaryDirectory(prefix="genserve-bench-") as log_dir:
        servers, ready = make(Path(log_dir)), False
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait_ready(args.startup_timeout)
                if server.ready_path == "/ready":
                    wait_settled(server.url, args.startup_timeout)
            ready = True
            yield servers
        finally:
            for server in servers:
                server.signal(signal.SIGCONT)
                if server.process is not None and server.process.poll() is None:
                    server.process.terminate()
            for server in servers:
                server.stop(30.0 if ready else 5.0)


def stop_on_sigterm() -> None:
    """Let `kill` end a run as Ctrl-C does: asyncio.run turns SIGINT into a clean cancellation."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job of a shell: SIGINT is ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    else:
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def on_one_server(args: argparse.Namespace, run: Callable[[argparse.Namespace, Server], Awaitable[int]]) -> int:
    """run(args, the service: `python -m app` on --weights with --env, no drain delay) in an event loop."""
    stop_on_sigterm()
    settings = {"GENSERVE_DRAIN_DELAY_S": "0", **args.env}
    try:
        with serving(args, lambda log_dir: [Server.app("server", log_dir, args.weights, settings)]) as (server,):
            return asyncio.run(run(args, server))
    except KeyboardInterrupt:
        print("\ninterrupted: the server is stopped", flush=True)
        return 130


def parser(doc: str, module: str, env: str = "GENSERVE_MAX_QUEUE=256", env_alias: tuple[str, ...] = ()
           ) -> argparse.ArgumentParser:  # fmt: skip
    """The options every server benchmark takes."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "weights", help="GENSERVE_WEIGHTS_DIR (default weights/)")
    p.add_argument("--env", *env_alias, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"extra environment for the service we start, e.g. {env} (other GENSERVE_* variables "
                        "of this shell are not passed on)")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for GET /ready")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, turn --env into a dict and check --weights."""
    args = p.parse_args(argv)
    pairs = [pair.partition("=") for pair in args.env]
    if bad := [key + sep + value for key, sep, value in pairs if not key or not sep]:
        p.error(f"--env takes KEY=VALUE, got {bad[0]!r}")
    args.env = {key: value for key, _, value in pairs}
    if not args.weights.is_dir():
        p.error(f"--weights {args.weights} is not a directory")
    return args


def upload_images(count: int, seed: int) -> tuple[list[bytes], str]:
    """`count` 28x28 grayscale PNGs: Fashion-MNIST test images, or seeded noise without the data set."""
    try:
        from training.data import DataError, load_dataset

        pixels = load_dataset("fashion-mnist", "test").images[:count, 0].numpy()  # (count, 28, 28) uint8
        source = "Fashion-MNIST test images"
    except (ImportError, DataError, OSError):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        source = f"seeded noise (seed {seed}; Fashion-MNIST not found)"
    return [png_bytes(Image.fromarray(array)) for array in pixels], f"{count} {source}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def worker_client(url: str, timeout_s: float = CLIENT_TIMEOUT_S) -> httpx.AsyncClient:
    """One worker's client, one keep-alive connection (a shared pool set the pace at C=128), no CA bundle to
    load, no gzip (LitServe adds a GZip middleware)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, verify=False,
                             headers={"Accept-Encoding": "identity"})  # fmt: skip


@dataclass
class Answer:
    status: int | None  # None: no answer (connection error, timeout)
    seconds: float
    text: str = ""  # the start of a non-200 answer, or the exception
    size: int = 0  # bytes of the body
    body: bytes | None = None  # kept when asked for

    @property
    def kind(self) -> str:
        """The status, or the exception's name."""
        return str(self.status) if self.status is not None else self.text.split(":")[0]

    def show(self) -> str:
        what = "no answer" if self.status is None else str(self.status)
        return f"{what} in {self.seconds * 1000:.0f} ms" + (f": {self.text}" if self.text else "")


async def timed(client: httpx.AsyncClient, request: httpx.Request, keep_body: bool = False) -> Answer:
    start = time.perf_counter()
    try:
        response = await client.send(request)
    except httpx.HTTPError as err:
        return Answer(None, time.perf_counter() - start, f"{type(err).__name__}: {err}"[:200])
    image = response.headers.get("content-type", "").startswith("image/")
    text = "" if response.status_code == 200 or image else response.text[:200]
    return Answer(response.status_code, time.perf_counter() - start, text, len(response.content),
                  response.content if keep_body else None)  # fmt: skip


MakeRequest = Callable[[httpx.AsyncClient, int], httpx.Request]  # (client, request number or seed) -> the request


@dataclass
class Loop:
    """What clients sending requests back to back got (looping), as it came; measure() adds CPU and pass size."""

    start: float = field(default_factory=time.perf_counter)
    timed: list[tuple[float, Answer]] = field(default_factory=list)  # (clock at the answer, answer)
    client_cpu: float = 0.0  # cores: CPU seconds over the window's wall seconds
    server_cpu: float | None = None
    mean_batch: float | None = None

    @property
    def answers(self) -> list[Answer]:
        return [a for _, a in self.timed]

    @property
    def seconds(self) -> float:
        """From the start to the last answer."""
        return max((at for at, _ in self.timed), default=self.start) - self.start

    def rate(self, images: int = 1) -> float:
        """The 200s, `images` each, per second."""
        ok = sum(a.status == 200 for a in self.answers)
        return ok * images / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float | None:
        return percentiles([a.seconds * 1000 for a in self.answers if a.status == 200], (q,))[0]

    def errors(self) -> str:
        return statuses([a for a in self.answers if a.status != 200])


@contextlib.asynccontextmanager
async def looping(clients: list[httpx.AsyncClient], make: MakeRequest, seeds: Iterator[int] | None = None
                  ) -> AsyncIterator[Loop]:  # fmt: skip
    """Every client sends make(client, the next seed) back to back until the block ends, then finishes the one in hand."""
    loop, stop, seeds = Loop(), asyncio.Event(), seeds or itertools.count()

    async def run(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            answer = await timed(client, make(client, next(seeds)))
            loop.timed.append((time.perf_counter(), answer))
            if answer.status is None:
                await asyncio.sleep(0.05)  # do not spin on a dead server

    tasks = [asyncio.create_task(run(c)) for c in clients]
    try:
        yield loop
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def measure(server: Server, make: MakeRequest, concurrency: int, args: argparse.Namespace,
                  seeds: Iterator[int], batcher: str | None = None) -> Loop:  # fmt: skip
    """A closed loop of `concurrency` clients, one connection each: --warmup s discarded, then --duration s (the
    window ends with the last answer), with the CPU of client and server group and `batcher`'s mean pass size."""

    async def passes() -> tuple[float, float]:
        text = (await clients[0].get("/metrics")).raise_for_status().text
        found = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == "genserve_batch_size"
                 for s in f.samples if s.labels.get("batcher") == batcher}  # fmt: skip
        return found.get("genserve_batch_size_sum", 0.0), found.get("genserve_batch_size_count", 0.0)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(worker_client(server.url)) for _ in range(concurrency)]
        if args.warmup > 0:
            async with looping(clients, make, seeds):
                await asyncio.sleep(args.warmup)
        items0, passes0 = await passes() if batcher else (0.0, 0.0)
        group, wall, cpu = server.group, time.perf_counter(), time.process_time()
        server_cpu = group.cpu_seconds() if group else None
        async with looping(clients, make, seeds) as loop:
            await asyncio.sleep(args.duration)
        wall = time.perf_counter() - wall
        loop.client_cpu = (time.process_time() - cpu) / wall
        if server_cpu is not None and (after := group.cpu_seconds()) is not None:  # type: ignore[union-attr]
            loop.server_cpu = (after - server_cpu) / wall
        if batcher:
            items1, passes1 = await passes()
            loop.mean_batch = (items1 - items0) / (passes1 - passes0) if passes1 > passes0 else None
    return loop


Cells = dict[tuple[str, int], dict[str, Loop]]  # (case, concurrency) -> server label -> what measure() got


def run_cells(servers: list[Server], cases: dict[str, Callable[[Server], tuple[MakeRequest, str | None]]],
              args: argparse.Namespace, seed: int, awake: Callable[[Server], contextlib.AbstractContextManager] = (
                  lambda server: contextlib.nullcontext())) -> tuple[Cells, bool]:  # fmt: skip
    """Every case (server -> its request, the batcher to read) at every --concurrency, the servers in turn (inside
    awake(server)), seeds from `seed`: the cells, and whether Ctrl-C ended the run early (keeping them)."""
    cells: Cells = {}
    seeds = itertools.count(seed)

    async def run() -> None:
        for (name, case), concurrency in itertools.product(cases.items(), args.concurrency):
            for server in servers:
                make, batcher = case(server)
                with awake(server):
                    cell = await measure(server, make, concurrency, args, seeds, batcher)
                cells.setdefault((name, concurrency), {})[server.label] = cell
                print(f"  {name:<20} C={concurrency:<4} {server.label:<13} {cell.rate():8.1f} req/s  p50 "
                      f"{fmt_ms(cell.latency_ms(50)):>6} ms  p99 {fmt_ms(cell.latency_ms(99)):>6} ms  batch "
                      f"{fmt(cell.mean_batch, '.1f')}  errors {cell.errors()}  cpu: client {cell.client_cpu:.2f}, server "
                      f"{fmt(cell.server_cpu)}", flush=True)  # fmt: skip

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        print("\ninterrupted: shutting the servers down; the tables hold the finished cells", flush=True)
        return cells, True
    return cells, False


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99, 100)) -> list[float | None]:
    """The `qs` percentiles of `values` (100: the maximum); None for each when there are none."""
    return [float(np.percentile(values, q)) for q in qs] if values else [None] * len(qs)


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def fmt_ms(value: float | None) -> str:
    return fmt(value, ".0f" if value is not None and value >= 100 else ".1f")


def fmt_mb(value: float | None) -> str:
    return fmt(None if value is None else value / MB, ".1f", " MB")


def fmt_counts(counts: Counter[str], empty: str = "0") -> str:
    return " ".join(f"{kind}x{n}" for kind, n in sorted(counts.items())) or empty


def statuses(answers: list[Answer]) -> str:
    """How many answers of each status (an exception's name where none came): "200x9 422x1"; "0" for none."""
    return fmt_counts(Counter(a.kind for a in answers))


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """An aligned markdown table, to read here and to paste into RESULTS.md: numbers to the right."""
    cells = [[c.replace("|", "\\|") for c in row] for row in [headers, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]
    right = [i > 0 and all(r[i][:1].isdigit() or r[i] == "-" for r in cells[1:]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"

    return "\n".join([line(cells[0]), line(["-" * (w - r) + ":" * r for w, r in zip(widths, right)]), *map(line, cells[1:])])


def machine_lines() -> list[str]:
    """The machine, its load, and the software (with a warning when the machine is already busy)."""
    import torch  # only for its version and CUDA

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()
    cuda = f"available: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "not available"
    lines = [f"machine: {cpu}, {os.cpu_count()} CPUs ({cores} usable), load average " + ", ".join(f"{x:.2f}" for x in load),
             f"python {platform.python_version()}, torch {torch.__version__}, CUDA {cuda}"]  # fmt: skip
    if load[0] > 0.5 * (os.cpu_count() or 1):
        lines.append(f"WARNING: load average {load[0]:.2f} on {os.cpu_count()} CPUs before the run: "
                     "other work will skew the numbers")  # fmt: skip
    return lines


def service_lines(env: dict[str, str], config: dict, models: list[dict], keys: tuple[str, ...]) -> list[str]:
    """The server measured (`python -m app` with `env`), its settings of `keys` (GET /config), and each model
    it serves (GET /models) with its weight file and priors."""
    priors = [", ".join(f"{p['name']} ({p['file']})" for p in m.get("priors") or []) for m in models]
    return ["server: python -m app" + "".join(f" {k}={v}" for k, v in env.items()),
            "config: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config), "models: " + "; ".join(
                f"{m['name']} ({m['file']}" + (f"; priors: {p})" if p else ")") for m, p in zip(models, priors))]


def image_difference(a: list[bytes], b: list[bytes]) -> str:
    """How two answers (PNGs, image by image) differ: the share of differing pixel values and the largest difference."""
    if len(a) != len(b):
        return f"{len(a)} images vs {len(b)}"
    try:
        x, y = ([np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in answer] for answer in (a, b))
    except Exception as err:  # noqa: BLE001 - not images: say so
        return f"not comparable ({err})"
    if any(p.shape != q.shape for p, q in zip(x, y)):
        return "images of different sizes"
    diff = np.concatenate([np.abs(p - q).reshape(-1) for p, q in zip(x, y)])
    return f"{(diff > 0).mean():.2%} of pixel values differ, largest by {int(diff.max())}/255"
