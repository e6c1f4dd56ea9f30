"""What every benchmark shares: servers in their own process group on free ports, the wait for
/ready, a process group's CPU and RSS, closed-loop load, percentiles, tables and the markdown report.

The scripts beside it run as modules from the repository root (`python -m benchmarks.load`), so
they import `benchmarks.harness`, `app` and `models` as packages.
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
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
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
    """A server's processes (Linux /proc): the group it leads, which holds the workers it starts; when
    `pid` shares this script's group (a server of --url started beside it), only `pid` itself."""

    def __init__(self, pid: int) -> None:
        self.pid, self.pgid = pid, os.getpgid(pid)
        self.own_group = self.pgid != os.getpgrp()

    @staticmethod
    def _stats() -> Iterator[tuple[int, list[str]]]:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()  # fields 3 on

    def pids(self) -> list[int]:
        if not self.own_group:
            return [self.pid]
        return [pid for pid, fields in self._stats() if int(fields[2]) == self.pgid]  # pgrp (field 5)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time so far of every live process of the group."""
        ticks = [int(f[11]) + int(f[12]) for pid, f in self._stats() if int(f[2]) == self.pgid]  # utime, stime
        return sum(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None

    def rss(self, pids: list[int] | None = None) -> int | None:
        """Summed VmRSS in bytes; None when none of them is alive."""
        total = None
        for pid in self.pids() if pids is None else pids:
            with contextlib.suppress(OSError, StopIteration):
                text = Path(f"/proc/{pid}/status").read_text()
                kb = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:"))
                total = (total or 0) + kb * 1024
        return total

    def settled_rss(self, samples: int = 5, interval_s: float = 0.02) -> int | None:
        """The median of a few readings."""
        values = []
        for _ in range(samples):
            if (value := self.rss()) is not None:
                values.append(value)
            time.sleep(interval_s)
        return int(np.median(values)) if values else None


class Poller(threading.Thread):
    """A daemon thread that runs from entering its `with` block to leaving it (`run` checks `stopping`)."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.interval_s, self.stopping = interval_s, threading.Event()

    def __enter__(self):  # -> the subclass
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join()


class RssMonitor(Poller):
    """The peak RSS of a process group, polled every `interval_s` (its members re-listed every 0.5 s:
    reading all of /proc at every poll would cost too much)."""

    def __init__(self, group: ProcessGroup, interval_s: float = 0.01) -> None:
        super().__init__(interval_s)
        self.group, self.peak = group, None

    def run(self) -> None:
        listed = 0.0
        while not self.stopping.is_set():
            if time.monotonic() - listed > 0.5:
                pids, listed = self.group.pids(), time.monotonic()
            if (value := self.group.rss(pids)) is not None:
                self.peak = max(self.peak or 0, value)
            self.stopping.wait(self.interval_s)


@dataclass
class Server:
    """A server subprocess (`python -m app` unless `command` says otherwise) leading its own process
    group, its log in a file. Ready when GET `ready_path` answers 200."""

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
    def app(cls, label: str, log_dir: Path, settings: dict[str, str], cwd: Path = ROOT) -> Server:
        """`python -m app` on a free port of 127.0.0.1, without an access log, with `settings`."""
        port = free_port()
        env = {**shell_env(), "GENSERVE_HOST": "127.0.0.1", "GENSERVE_PORT": str(port), "GENSERVE_ACCESS_LOG": "false"}
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
        """SIGTERM (uvicorn drains, the lifespan shuts down), SIGKILL if it hangs or on a 2nd Ctrl-C,
        then SIGKILL to whatever is left of its group (workers it did not stop, such as LitServe's)."""
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
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(f"  [{self.label}] {line}" for line in text.splitlines()[-lines:])

    def log_errors(self, limit: int = 5) -> list[str]:
        """ERROR lines and tracebacks of its log (uvicorn's access lines are INFO)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        hits = [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]
        return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])

    def get_json(self, path: str) -> object:
        return httpx.get(f"{self.url}{path}", timeout=30).raise_for_status().json()


@contextlib.contextmanager
def running(servers: list[Server], startup_timeout_s: float, stop_timeout_s: float = 30.0) -> Iterator[None]:
    """Start every server, wait until all are ready (the service also until its pass size checks, which
    run after /ready, have settled: what follows measures the steady state); always stop all: SIGTERM to
    all at once, then each is waited for. Stopped before all were ready each gets 5 s at most."""
    ready = False
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(startup_timeout_s)
        for server in servers:
            if server.ready_path == "/ready":
                wait_settled(server.url, startup_timeout_s)
        ready = True
        yield
    finally:
        for server in servers:
            server.signal(signal.SIGCONT)
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            server.stop(stop_timeout_s if ready else min(stop_timeout_s, 5.0))


def wait_settled(url: str, timeout_s: float, interval_s: float = 0.1) -> dict:
    """GET /config once no batcher is left on its default pass size (its check has run after /ready)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        config = httpx.get(f"{url}/config", timeout=30).raise_for_status().json()
        if "default" not in (config.get("pass_size_sources") or {}).values() or time.perf_counter() > deadline:
            return config
        time.sleep(interval_s)


@contextlib.contextmanager
def serving(args: argparse.Namespace, settings: dict[str, str], prefix: str) -> Iterator[tuple[str, Server | None]]:
    """(url, server): a server of our own on --weights with --env (stopped at the end), or --url's (None)."""
    if getattr(args, "url", None):
        yield args.url.rstrip("/"), None
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        server = Server.app("server", log_dir, {"GENSERVE_WEIGHTS_DIR": str(args.weights.resolve()), **settings,
                                                **args.env})  # fmt: skip
        with running([server], args.startup_timeout):
            yield server.url, server


def stop_on_sigterm() -> None:
    """Let `kill` end a run as Ctrl-C does: asyncio.run turns SIGINT into a clean cancellation."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job of a shell: SIGINT is ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    else:
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def parser(doc: str, *, url: bool = False, env: str = "GENSERVE_MAX_QUEUE=256", env_alias: tuple[str, ...] = ()
           ) -> argparse.ArgumentParser:
    """The options every server benchmark takes; with `url`, also --url and --pid (a running server)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "weights", help="GENSERVE_WEIGHTS_DIR (default weights/)")
    p.add_argument("--env", *env_alias, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"extra environment for the service we start, e.g. {env} (other GENSERVE_* variables "
                        "of this shell are not passed on)")  # fmt: skip
    p.add_argument("--markdown", type=Path, default=None, help="also write the report as markdown to this file")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here (default: a temporary one)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for GET /ready")
    if url:
        p.add_argument("--url", default=None, help="use this running server instead of starting one")
        p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    return p


def parse(p: argparse.ArgumentParser, module: str, argv: list[str] | None) -> argparse.Namespace:
    """Parse, turn --env into a dict, check --weights, and keep the command line for the report."""
    p.prog = f"python -m benchmarks.{module}"
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])
    pairs = [pair.partition("=") for pair in args.env]
    if bad := [key + sep + value for key, sep, value in pairs if not key or not sep]:
        p.error(f"--env takes KEY=VALUE, got {bad[0]!r}")
    args.env = {key: value for key, _, value in pairs}
    if getattr(args, "pid", None) is not None and not args.url:
        p.error("--pid goes with --url (a server we start is measured anyway)")
    if not getattr(args, "url", None) and not args.weights.is_dir():
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
    """A client with one keep-alive connection, for one worker: one client shared by C workers does not
    scale (httpcore scans its pool at every request: at C=128 the client set the pace). verify=False: plain
    HTTP, no CA bundle to load. Accept-Encoding identity: LitServe adds a GZip middleware."""
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
class Cell:
    """What one server did over one measured window of a closed loop."""

    ok: int = 0
    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # of the 200s
    errors: Counter[str] = field(default_factory=Counter)  # status or exception -> count
    error_examples: dict[str, str] = field(default_factory=dict)  # the first answer of each kind
    mean_batch: float | None = None
    client_cpu: float = 0.0  # cores: CPU seconds over the window's wall seconds
    server_cpu: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


async def closed_loop(clients: list[httpx.AsyncClient], make: Callable[[httpx.AsyncClient, int, bytes], httpx.Request],
                      images_per_request: int, duration_s: float, max_requests: int | None, seeds: Iterator[int],
                      pngs: list[bytes]) -> Cell:  # fmt: skip
    """Each client sends make(client, seed, png) back to back until duration_s is over (or max_requests
    are sent); a request in flight then is awaited and counted: the window ends with the last answer."""
    cell, sent, end = Cell(), itertools.count(), time.perf_counter() + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while (time.perf_counter() < end) if max_requests is None else (next(sent) < max_requests):
            seed = next(seeds)
            answer = await timed(client, make(client, seed, pngs[seed % len(pngs)]))
            if answer.status == 200:
                cell.latencies_ms.append(answer.seconds * 1000)
                cell.ok += 1
                cell.images += images_per_request
                continue
            kind = str(answer.status) if answer.status is not None else answer.text.split(":")[0]
            cell.errors[kind] += 1
            cell.error_examples.setdefault(kind, answer.text)
            if answer.status is None:
                await asyncio.sleep(0.05)  # do not spin on a dead server

    start = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in clients))
    cell.seconds = time.perf_counter() - start
    return cell


async def batch_totals(client: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    """batcher -> (items, forward passes) so far, from the service's genserve_batch_size histogram."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).raise_for_status().text):
        for sample in family.samples if family.name == "genserve_batch_size" else []:
            if sample.name.endswith(("_sum", "_count")):
                totals.setdefault(sample.labels["batcher"], [0.0, 0.0])[sample.name.endswith("_count")] = sample.value
    return {name: (items, passes) for name, (items, passes) in totals.items()}


async def measure(server: Server, make: Callable[[httpx.AsyncClient, int, bytes], httpx.Request], images_per_request: int,
                  concurrency: int, args: argparse.Namespace, seeds: Iterator[int], pngs: list[bytes],
                  batcher: str | None = None) -> Cell:  # fmt: skip
    """--warmup seconds of the load, discarded, then one measured closed loop of --duration seconds (or
    --requests), with the CPU the client and the server's group used over it and, for `batcher`, its
    mean pass size over the window (from /metrics before and after)."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(worker_client(server.url)) for _ in range(concurrency)]
        if args.warmup > 0:
            await closed_loop(clients, make, images_per_request, args.warmup, None, seeds, pngs)
        before = await batch_totals(clients[0]) if batcher else {}
        group = server.group
        client_cpu, server_cpu = time.process_time(), group.cpu_seconds() if group else None
        cell = await closed_loop(clients, make, images_per_request, args.duration, getattr(args, "requests", None),
                                 seeds, pngs)  # fmt: skip
        cell.client_cpu = (time.process_time() - client_cpu) / cell.seconds
        if server_cpu is not None and (after_cpu := group.cpu_seconds()) is not None:  # type: ignore[union-attr]
            cell.server_cpu = (after_cpu - server_cpu) / cell.seconds
        if batcher:
            (items0, passes0), (items1, passes1) = before.get(batcher, (0, 0)), (await batch_totals(clients[0])).get(
                batcher, (0, 0))
            cell.mean_batch = (items1 - items0) / (passes1 - passes0) if passes1 > passes0 else None
    return cell


async def series(client: httpx.AsyncClient, make: MakeRequest, *, count: int | None = None, until: float | None = None,
                 every_s: float = 0.0, pause_s: float = 0.0) -> list[Answer]:  # fmt: skip
    """make(client, 0), make(client, 1), ... one at a time: each starts `every_s` after the one before
    started and `pause_s` after its answer; none starts once there are `count` or past `until`."""
    answers: list[Answer] = []
    next_at = time.perf_counter()
    while (count is None or len(answers) < count) and (until is None or next_at < until):
        await asyncio.sleep(next_at - time.perf_counter())
        start = time.perf_counter()
        answers.append(await timed(client, make(client, len(answers))))
        next_at = max(start + every_s, time.perf_counter() + pause_s)
    return answers


@dataclass
class Loop:
    """What clients sending requests back to back got, as it came."""

    start: float = field(default_factory=time.perf_counter)
    timed: list[tuple[float, Answer]] = field(default_factory=list)  # (clock at the answer, answer)

    @property
    def answers(self) -> list[Answer]:
        return [a for _, a in self.timed]

    def throughput(self, images: int) -> str:
        """The 200s, `images` each, per second from the start to the last answer."""
        ok = sum(a.status == 200 for a in self.answers)
        seconds = max((at for at, _ in self.timed), default=self.start) - self.start
        rate = f"{ok * images / seconds:.1f}" if seconds > 0 else "-"
        return f"{rate} images/s ({ok} answers of 200 in {seconds:.1f} s)"


@contextlib.asynccontextmanager
async def looping(clients: list[httpx.AsyncClient], make: MakeRequest) -> AsyncIterator[Loop]:
    """Every client sends make(client, i) back to back until the block ends, then finishes the request
    in hand: client k sends requests k, k + len(clients), k + 2 len(clients), ..."""
    loop, stop = Loop(), asyncio.Event()

    async def run(client: httpx.AsyncClient, first: int) -> None:
        for i in itertools.count(first, len(clients)):
            if stop.is_set():
                return
            answer = await timed(client, make(client, i))
            loop.timed.append((time.perf_counter(), answer))

    tasks = [asyncio.create_task(run(c, k)) for k, c in enumerate(clients)]
    try:
        yield loop
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def sample_request(model: str, prior: str | None, n: int) -> MakeRequest:
    """GET /sample of `model` (with `prior`), n images, seed = the request's number."""
    params = {"model": model, "n": n, **({"prior": prior} if prior else {})}
    return lambda client, i: client.build_request("GET", "/sample", params={**params, "seed": i})


@dataclass
class Slowdown:
    """One kind of request, sent one at a time on the quiet server and then beside a load."""

    who: str
    idle: list[Answer]
    busy: list[Answer]
    limit: float  # the target: its p50 beside the load at most this many times the idle p50

    @property
    def ratio(self) -> float | None:
        if not self.idle or not self.busy:
            return None
        return float(np.median([a.seconds for a in self.busy]) / np.median([a.seconds for a in self.idle]))

    @property
    def expected(self) -> str:
        return f"{self.who} all 200, p50 at most {self.limit:g}x idle"

    def met(self) -> bool:
        return self.ratio is not None and self.ratio <= self.limit and all(a.status == 200 for a in self.busy)

    def lines(self) -> list[str]:
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return [f"{self.who}, idle: {spread(self.idle)}", f"{self.who}, during: {spread(self.busy)}",
                f"{self.who}: p50 during / idle {ratio} (target <= {self.limit:g}x): {verdict(self.met())}"]  # fmt: skip

    def short(self) -> str:
        p50s = [fmt_ms(float(np.median([a.seconds * 1000 for a in x]))) if x else "-" for x in (self.idle, self.busy)]
        return f"{self.who} p50 {p50s[0]} -> {p50s[1]} ms ({'-' if self.ratio is None else f'{self.ratio:.1f}x'})"


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99, 100)) -> list[float | None]:
    """The `qs` percentiles of `values` (100: the maximum); None for each when there are none."""
    return [float(np.percentile(values, q)) for q in qs] if values else [None] * len(qs)


def spread(answers: list[Answer]) -> str:
    p50, p90, top = percentiles([a.seconds * 1000 for a in answers], (50, 90, 100))
    return f"p50 / p90 / max {fmt_ms(p50)} / {fmt_ms(p90)} / {fmt_ms(top)} ms over {len(answers)} ({statuses(answers)})"


def statuses(answers: list[Answer]) -> str:
    return fmt_counts(Counter("no answer" if a.status is None else str(a.status) for a in answers))


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f} MB"


def fmt_opt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_counts(counts: Counter[str], empty: str = "0") -> str:
    return " ".join(f"{kind}x{n}" for kind, n in sorted(counts.items())) or empty


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Text columns (the first left-aligned, the rest right), or a markdown table with `|` escaped."""
    if markdown:
        lines = [headers, ["---"] + ["--:"] * (len(headers) - 1), *rows]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def write_markdown(path: Path, title: str, command: str, header: list[str], body: list[str]) -> None:
    """A section for RESULTS.md: `## title`, the command and `header` as a code block, then `body`'s
    markdown blocks."""
    blocks = [f"## {title}", "\n".join(["```", f"$ {command}", *header, "```"]), *body]
    path.write_text("\n\n".join(block for block in blocks if block) + "\n")
    print(f"\nmarkdown written to {path}")


def bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def machine_lines() -> list[str]:
    """The machine, its load, and the software (with a warning when the machine is already busy)."""
    import torch  # only for its version and CUDA

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()
    lines = [f"machine: {cpu}, {os.cpu_count()} CPUs ({cores} usable), load average "
             + ", ".join(f"{x:.2f}" for x in load),
             f"python {platform.python_version()}, torch {torch.__version__}, CUDA "
             + (f"available: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "not available")]
    if load[0] > 0.5 * (os.cpu_count() or 1):
        lines.append(f"WARNING: load average {load[0]:.2f} on {os.cpu_count()} CPUs before the run: "
                     "other work will skew the numbers")  # fmt: skip
    return lines


def describe_models(models: list[dict]) -> str:
    """One line naming each served model (GET /models), its weight file and its priors."""
    parts = []
    for entry in models:
        priors = ", ".join(f"{p['name']} ({p['file']})" for p in entry.get("priors") or [])
        parts.append(f"{entry['name']} ({entry['file']}" + (f"; priors: {priors})" if priors else ")"))
    return "models: " + ("; ".join(parts) or "none")


def service_lines(args: argparse.Namespace, config: dict, models: list[dict], keys: tuple[str, ...]) -> list[str]:
    """The server measured (--url's, or ours with --env), its settings of `keys` (GET /config) and its models."""
    return ["server: " + (args.url or "python -m app" + "".join(f" {k}={v}" for k, v in args.env.items())),
            "config: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config), describe_models(models)]


def image_difference(a: list[bytes], b: list[bytes]) -> str:
    """How two answers (PNGs, image by image) differ: the share of differing pixel values and the largest difference."""
    if len(a) != len(b):
        return f"{len(a)} images vs {len(b)}"
    try:
        x = [np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in a]
        y = [np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in b]
    except Exception as err:  # noqa: BLE001 - not images: say so
        return f"not comparable ({err})"
    if any(p.shape != q.shape for p, q in zip(x, y)):
        return "images of different sizes"
    diff = np.concatenate([np.abs(p - q).reshape(-1) for p, q in zip(x, y)])
    return f"{(diff > 0).mean():.2%} of pixel values differ, largest by {int(diff.max())}/255"
