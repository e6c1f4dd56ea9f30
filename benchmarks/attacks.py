"""Attacks on the real server: what each costs in memory, and whether /health stays quick meanwhile.

Starts the service on the shipped weights (`python -m app` on a free port, in its own process
group, as benchmarks/load.py does, with every --env KEY=VALUE; or uses --url) and runs each
attack in turn, --pause seconds apart. During each one a thread polls the server's RSS every
10 ms (VmRSS summed over its process group, so every worker counts) and another thread sends
GET /health every 20 ms on a connection of its own, both until --linger seconds after the
attack's last answer. Per attack: the statuses and answer times, the peak RSS minus the RSS just
before, /health p50/p99/max, and "met"/"MISSED" against the targets: peak RSS growth at most
200 MB, /health p99 at most 100 ms (and every probe answered).

    1   Ten concurrent GET /sample?model=vqvae&prior=pixelcnn&n=1&seed=i, and among them one with
        temperature=1e-50. Expected: the ten innocent ones 200, the bad one 4xx.
    2a  POST /decode with a JSON body of --json-numbers numbers (5x10^7: ~95 MiB), streamed
        (chunked, no Content-Length) on a plain socket that writes and reads at the same time.
        Expected: 413 within 1 s, and the connection closed before the whole body was taken
        (reported: how much the client had written when the answer came, and whether the
        server then closed the connection or took the rest).
    2b  The same body with its Content-Length declared. Expected the same.
    3a  Six concurrent POST /reconstruct?model=vae_conv, each with four 4096x4096 RGBA PNGs
        (mostly flat: ~75 KB each, 64 MiB of pixels each once decoded). Statuses are reported.
    3b  One POST /reconstruct?model=vae_conv with max_files (GET /config) 1024x1024 RGBA PNGs.
    4   GET /sample?model=vqvae&prior=pixelcnnpp&n=256 abandoned after 0.3 s (the client closes
        its connection). Then: did the server count it as cancelled (GET /metrics: a
        status="499" sample of genserve_requests_total, or a metric with "cancel", "disconnect" or
        "abandon" in its name; what changed is printed), and how long it stayed busy: the time
        from the abandonment until a GET /sample?model=vqvae&prior=pixelcnnpp&n=1, sent one after
        another, answers in under 2x its idle latency (median of 5 on the idle server).

Attacks 5-10 come from the hostile review (issue 19; its item in brackets, and what it saw before
the fix). Where an innocent request or a victim is compared with itself on the quiet server, its
idle latency is --idle-requests of it sent one at a time just before the attack (after one that
warms up), and the ratio is of the p50s; "all 200" is part of the target.

    5a  [item 1] --strings-requests (2) concurrent POST /decode of {"model": "vae_mlp", "z": [["",
        "", ...]]}, as many empty strings as fit in max_json_bytes (GET /config; --strings-bytes).
        Before: 422 after 22.8 s, +478 MB, /health stalled 22.7 s. Expected: 422 within 1 s.
    5b  The same with {"model": "vqvae", "codes": [[["x", "x", ...]]]}. Expected the same.
    6a  [item 2] --bomb-requests (4) concurrent POST /reconstruct?model=vae_conv of one ICO whose
        directory says 16x16 but which holds a --bomb-side (12000) square RGBA PNG, mostly flat
        (~0.57 MiB; built once with Pillow). Expected: 400 or 413 within 1 s each.
    6b  --bomb-loopers (3) clients send it back to back for --bomb-loops (10) s while an innocent
        POST /reconstruct?model=vae_conv of a 28x28 PNG goes one at a time. Expected: the bombs
        4xx, the innocent all 200 with p50 at most 2x idle.
    7   [item 3] --slow-clients (upload_slots + 1 from GET /config, else 4) sockets each send a
        POST /reconstruct?model=vae_conv declaring a multipart body of --slow-length (100,000)
        bytes, its part headers, then 1 byte a second, for --slow-duration (35) s; meanwhile the
        innocent /reconstruct goes once a second. Reported: what each attacker got and when
        (before: 408 after 30 s). Before: the innocent waited 29 s, then 504. Expected: the
        innocent all 200 with p50 at most 2x idle.
    8   [item 4] --idle-conns (1050) sockets send `GET /health HTTP/1.1`, `Host: x` and never the
        blank line ending the headers, held for --idle-hold (40) s, while a fresh connection
        sends GET /health every second (is the server still accepting?). The server we start gets
        a soft RLIMIT_NOFILE of --server-nofile (1024, the common default and below --idle-conns;
        0 keeps this shell's): this script lowers its own before starting the server and raises it
        to the hard limit once the server runs. A server that raises its own limit escapes it.
        Reported: the server's limit (/proc/<pid>/limits), how many sockets the server closed and
        when (before: none after 40 s), the fresh connections' answers, and how much the server's
        log grew (before: 195 MB of "Too many open files" in 25 s). Expected: every fresh
        connection answered 200, log growth under 1 MB, and, where GET /config has
        header_timeout_s and --idle-hold outlasts it, every held socket closed by the server
        within it (+1 s) of its opening.
    9a  [item 9] --fair-loopers (8) clients send /sample?model=vqvae&prior=gated&n=--fair-n (256)
        back to back for --fair-duration (15) s while a victim sends the same with n=1, seeded,
        one at a time, --victim-pause (0.05) s apart. Before (4 loopers): p50 51 ms -> 2.5 s.
        Expected: the victim's p50 at most 3x idle. Also the loopers' images/s, to show what
        fairness costs.
    9b  The same with vqvae_cifar10 and prior pixelcnnpp. Before: 85 ms -> 7.3 s. Target 3x.
    9c  One looper on each of --fair-others (eight other batchers) with n=--fair-n, and the victim
        /sample?model=vae_mlp&n=1. Before: 2 ms -> 73 ms. Target 2x.
    10  [item 10] --encode-clients (4) clients send POST /encode?model=--encode-model
        (vqvae_cifar10)&include_z_e=true with max_files 28x28 PNGs (--encode-files; ~5 MB of JSON
        back) back to back for --encode-duration (15) s. Before: /health p99 553-769 ms.
        Expected: every answer 200 (and the /health target, as everywhere).

    python benchmarks/attacks.py                                 # every attack (several minutes)
    python benchmarks/attacks.py --attacks 1 3                   # some
    python benchmarks/attacks.py --attacks 5 6 7 8 9 10 --markdown /tmp/attacks.md   # the review's
    python benchmarks/attacks.py --json-numbers 5e6 --big-requests 2 --medium-files 16   # smoke run
    python benchmarks/attacks.py --attacks 5 6 7 8 9 10 --pause 0.5 --linger 0.5 --idle-requests 3 \
        --bomb-requests 2 --bomb-loopers 1 --bomb-loops 3 --slow-duration 5 --idle-hold 12 \
        --fair-loopers 2 --fair-n 64 --fair-duration 2 --encode-duration 2   # smoke run of 5-10
        # (attack 7's attackers see an answer only past request_timeout_s: --slow-duration 35;
        # attack 8 judges the closing only when --idle-hold outlasts header_timeout_s + 1 s)
    python benchmarks/attacks.py --env GENSERVE_DECODE_SLOTS=1 --markdown /tmp/attacks.md
    python benchmarks/attacks.py --url http://127.0.0.1:8000 --pid 12345   # a running server (RSS of --pid's group)
    python benchmarks/attacks.py --url http://127.0.0.1:8000 --pid 12345 --server-log /tmp/server.log --attacks 8

The server is stopped at the end, on Ctrl-C and on errors (load.py's `Server.stop`). An attack
that needs a model or prior the server does not have is skipped with the reason; a server that
dies ends the run with the tail of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import itertools
import math
import multiprocessing
import os
import re
import resource
import shlex
import struct
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (benchmarks/load.py, beside this script)
    CLIENT_TIMEOUT_S,
    ROOT,
    Server,
    busy_warning,
    cpu_model,
    describe_models,
    fmt_ms,
    upload_images,
)
from soak import (  # noqa: E402  (benchmarks/soak.py, beside this script)
    CONFIG_KEYS,
    MB,
    RssMonitor,
    ServerMemory,
    client_for,
    fmt_mb,
    markdown_table,
    parse_env,
    percentiles,
    serve_and_run,
    text_table,
    verdict,
)

ATTACKS = tuple(range(1, 11))
RSS_GROWTH_TARGET = 200 * 1000 * 1000  # bytes: peak RSS minus the RSS before the attack, at most 200 MB
HEALTH_P99_TARGET_MS = 100.0
QUICK_ANSWER_S = 1.0  # attacks 2, 5, 6: "4xx quickly"
LOG_GROWTH_TARGET = 1024 * 1024  # attack 8: bytes the server's log may grow by (1 MB, as fmt_mb counts)
CLOSE_SLACK_S = 1.0  # attack 8: a held socket counts as closed in time up to this long after header_timeout_s
FAIR_OTHERS = ("vae", "vae_conv", "vae_context", "vae_mlp_logistic", "vqvae:pixelcnn", "vqvae:gated",
               "vqvae:pixelcnnpp", "vqvae_cifar10:pixelcnn")  # attack 9c: MODEL or MODEL:PRIOR  # fmt: skip
CHUNK = 1024 * 1024  # attack 2: bytes per chunk of the streamed body
CANCEL_WORDS = re.compile(r"cancel|disconnect|abandon", re.IGNORECASE)


# -- what runs beside each attack ------------------------------------------------------------------


class HealthProber:
    """GET /health every `interval_s` on a connection of its own, in a thread, so that the attack's
    work in the event loop does not delay it. A probe that fails counts with the time it took."""

    def __init__(self, url: str, interval_s: float = 0.02, timeout_s: float = 10.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.latencies_ms: list[float] = []
        self.failures: Counter[str] = Counter()
        self.ready = threading.Event()  # set once the connection is open
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-prober", daemon=True)

    def _run(self) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(base_url=self.url, timeout=self.timeout_s, limits=limits) as client:
            with contextlib.suppress(httpx.HTTPError):
                client.get("/health")  # open the connection: not counted
            self.ready.set()
            next_at = time.perf_counter()
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures[str(status)] += 1
                except httpx.HTTPError as err:
                    self.failures[type(err).__name__] += 1
                self.latencies_ms.append((time.perf_counter() - start) * 1000)
                next_at = max(next_at + self.interval_s, time.perf_counter())
                self._stop.wait(next_at - time.perf_counter())

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Phase:
    """One measured attack: what the attack saw, and what the server's memory and /health did meanwhile."""

    key: str
    title: str
    lines: list[str] = field(default_factory=list)  # statuses, answer times, findings
    statuses: str = ""  # for the summary table
    answers: str = ""
    expected: str | None = None  # what the statuses should be, if stated
    expected_met: bool | None = None
    skipped: str | None = None
    seconds: float = 0.0
    rss_before: int | None = None
    rss_peak: int | None = None
    rss_after: int | None = None
    health_ms: list[float] = field(default_factory=list)
    health_failures: Counter[str] = field(default_factory=Counter)

    @property
    def growth(self) -> int | None:
        return None if self.rss_before is None or self.rss_peak is None else max(0, self.rss_peak - self.rss_before)

    def rss_met(self) -> bool | None:
        return None if self.growth is None else self.growth <= RSS_GROWTH_TARGET

    def health_met(self) -> bool | None:
        if not self.health_ms:
            return None
        return percentiles(self.health_ms)[2] <= HEALTH_P99_TARGET_MS and not self.health_failures  # type: ignore[operator]

    def health_text(self) -> str:
        if not self.health_ms:
            return "no probes"
        p50, _p90, p99, top = percentiles(self.health_ms)
        failed = f", failed: {fmt_counts(self.health_failures)}" if self.health_failures else ""
        return f"{fmt_ms(p50)} / {fmt_ms(p99)} / {fmt_ms(top)} ms ({len(self.health_ms)} probes{failed})"

    def report(self) -> list[str]:
        if self.skipped:
            return [f"[{self.key}] {self.title}: skipped ({self.skipped})"]
        out = [f"[{self.key}] {self.title} ({self.seconds:.1f} s)", *(f"  {line}" for line in self.lines)]
        if self.expected is not None:
            out.append(f"  expected: {self.expected}: {verdict(bool(self.expected_met))}")
        if self.growth is None:
            out.append("  server RSS: not measured (no server process: give --pid with --url)")
        else:
            out.append(f"  server RSS: {fmt_mb(self.rss_before)} before, peak growth {fmt_mb(self.growth)} "
                       f"(target <= {RSS_GROWTH_TARGET / 1e6:.0f} MB): {verdict(bool(self.rss_met()))}; "
                       f"{fmt_mb(self.rss_after)} after")  # fmt: skip
        met = self.health_met()
        out.append(f"  GET /health p50 / p99 / max: {self.health_text()} (target p99 <= {HEALTH_P99_TARGET_MS:g} ms, "
                   f"all answered): {'-' if met is None else verdict(met)}")  # fmt: skip
        return out

    def row(self) -> list[str]:
        def v(met: bool | None) -> str:
            return "-" if met is None else verdict(met)

        if self.skipped:
            return [self.key, self.title, f"skipped: {self.skipped}", *["-"] * 7]
        return [
            self.key, self.title, self.statuses, self.answers, fmt_mb(self.growth), v(self.rss_met()),
            self.health_text(), v(self.health_met()),
            "-" if self.expected is None else f"{self.expected}: {v(self.expected_met)}",
            fmt_mb(self.rss_before),
        ]  # fmt: skip


HEADERS = ["attack", "what", "statuses", "answers", "peak RSS growth", "RSS target", "/health p50/p99/max",
           "/health target", "expected", "RSS before"]  # fmt: skip
TEXT_COLUMNS = [0, 2, 3, 4, 5, 6, 7, 8]  # the printed summary leaves out the long titles


class ServerDied(Exception):
    pass


@dataclass
class Attacks:
    """The server under attack, and the phases measured so far."""

    url: str
    args: argparse.Namespace
    models: list[dict]
    config: dict
    server: Server | None
    memory: ServerMemory | None
    phases: list[Phase] = field(default_factory=list)

    def client(self) -> httpx.AsyncClient:
        return client_for(self.url, self.args.timeout)

    async def clients(self, stack: contextlib.AsyncExitStack, count: int) -> list[httpx.AsyncClient]:
        """`count` clients, closed with `stack`, each with its connection open already (so that what
        they send next really goes out at once)."""
        clients = [await stack.enter_async_context(self.client()) for _ in range(count)]
        await asyncio.gather(*(c.get("/health") for c in clients))
        return clients

    def has(self, model: str, prior: str | None = None) -> str | None:
        """None when the server serves `model` (and its `prior`), else why not."""
        entry = next((m for m in self.models if m["name"] == model), None)
        if entry is None:
            return f"model {model!r} is not served"
        if prior is not None and prior not in [p["name"] for p in entry.get("priors") or []]:
            return f"prior {prior!r} is not loaded for {model!r}"
        return None

    def skip(self, key: str, title: str, reason: str) -> None:
        phase = Phase(key, title, skipped=reason)
        self.phases.append(phase)
        print("\n".join(phase.report()), flush=True)

    def alive(self) -> bool:
        if self.server is not None and self.server.process is not None:
            return self.server.process.poll() is None
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    @contextlib.asynccontextmanager
    async def phase(self, key: str, title: str) -> AsyncIterator[Phase]:
        """Measure what runs inside and --linger seconds after it (the server may still be at work):
        RSS before (after --pause), its peak, and after; /health throughout."""
        phase = Phase(key, title)
        await asyncio.sleep(self.args.pause)
        if self.memory is not None:
            phase.rss_before = self.memory.settled()
        monitor = RssMonitor(self.memory, 0.01) if self.memory is not None else contextlib.nullcontext()
        prober = HealthProber(self.url)
        try:
            with monitor, prober:
                await asyncio.to_thread(prober.ready.wait, 10)
                start = time.perf_counter()
                try:
                    yield phase
                finally:
                    phase.seconds = time.perf_counter() - start
                await asyncio.sleep(self.args.linger)
        finally:
            phase.health_ms, phase.health_failures = prober.latencies_ms, prober.failures
            if self.memory is not None:
                phase.rss_peak = monitor.peak  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
                phase.rss_after = self.memory.settled()
            self.phases.append(phase)
            print("\n".join(phase.report()), flush=True)
        if not self.alive():
            raise ServerDied(f"the server died during attack {key}")


# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: no answer
    seconds: float
    text: str = ""
    size: int = 0  # bytes of the answer's body

    def show(self) -> str:
        what = "no answer" if self.status is None else str(self.status)
        return f"{what} in {self.seconds * 1000:.0f} ms" + (f": {self.text}" if self.text else "")


async def timed(client: httpx.AsyncClient, request: httpx.Request) -> Answer:
    start = time.perf_counter()
    try:
        response = await client.send(request)
    except httpx.HTTPError as err:
        return Answer(None, time.perf_counter() - start, f"{type(err).__name__}: {err}"[:160])
    text = "" if response.status_code == 200 else response.text[:160]
    return Answer(response.status_code, time.perf_counter() - start, text, len(response.content))


def fmt_counts(counts: Counter[str]) -> str:
    return " ".join(f"{k}x{n}" for k, n in sorted(counts.items()))


def count_statuses(answers: list[Answer]) -> str:
    return fmt_counts(Counter("no answer" if a.status is None else str(a.status) for a in answers))


def time_range(answers: list[Answer]) -> str:
    ms = sorted(a.seconds * 1000 for a in answers)
    return f"{fmt_ms(ms[0])} ms" if len(ms) == 1 else f"{fmt_ms(ms[0])}-{fmt_ms(ms[-1])} ms"


def rgba_png(side: int) -> bytes:
    """A side x side RGBA PNG, opaque, mostly flat with a grid of lines: compresses ~900x."""
    pixels = np.zeros((side, side, 4), np.uint8)  # (H, W, RGBA)
    pixels[:, :, 3] = 255
    pixels[::64, :, 0] = 200
    pixels[:, ::64, 1] = 120
    pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4, 2] = 90
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket to the server, for what httpx will not send (attacks 2, 7, 8)."""
    target = httpx.URL(url)
    return await asyncio.open_connection(target.host, target.port or 80)


MakeRequest = Callable[[httpx.AsyncClient, int], httpx.Request]  # (client, request number) -> the request


async def series(client: httpx.AsyncClient, make: MakeRequest, *, count: int | None = None, until: float | None = None,
                 every_s: float = 0.0, pause_s: float = 0.0) -> list[Answer]:  # fmt: skip
    """make(client, 0), make(client, 1), ... one at a time: each starts `every_s` after the one before
    started and `pause_s` after its answer; none starts once there are `count` or time.perf_counter()
    is past `until`."""
    answers: list[Answer] = []
    next_at = time.perf_counter()
    while (count is None or len(answers) < count) and (until is None or next_at < until):
        await asyncio.sleep(next_at - time.perf_counter())
        start = time.perf_counter()
        answers.append(await timed(client, make(client, len(answers))))
        next_at = max(start + every_s, time.perf_counter() + pause_s)
    return answers


async def idle_series(client: httpx.AsyncClient, make: MakeRequest, count: int, pause_s: float = 0.0) -> list[Answer]:
    """`count` requests one at a time on the quiet server, after one that warms up (not kept)."""
    return (await series(client, make, count=count + 1, pause_s=pause_s))[1:]


@dataclass
class Loop:
    """What clients sending requests back to back got, as it came."""

    start: float = field(default_factory=time.perf_counter)
    timed: list[tuple[float, Answer]] = field(default_factory=list)  # (time.perf_counter() at the answer, answer)

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
    """Every client sends make(client, i) back to back until the block ends, then finishes the
    request in hand: client k sends requests k, k + len(clients), k + 2 len(clients), ..."""
    loop = Loop()
    stop = asyncio.Event()

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


def _loop_in_a_process(url: str, timeout_s: float, loopers: list[tuple[str, str | None]], n: int, started: Any,
                       stop: Any, results: Any) -> None:  # fmt: skip
    """In a child process: one client per (model, prior) of `loopers` sending /sample of n images back
    to back, from when `started` is set until `stop` is; puts [(time.time() at the answer, status,
    seconds), ...] on `results`."""

    async def main() -> Loop:
        makes = [sample_request(m, p, n) for m, p in loopers]
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(client_for(url, timeout_s)) for _ in loopers]
            await asyncio.gather(*(c.get("/health") for c in clients))
            async with looping(clients, lambda c, i: makes[i % len(makes)](c, i)) as loop:  # looper k: makes[k]
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
            return loop

    loop = asyncio.run(main())
    offset = time.time() - time.perf_counter()
    results.put([(at + offset, a.status, a.seconds) for at, a in loop.timed])


@contextlib.asynccontextmanager
async def looping_elsewhere(url: str, timeout_s: float, loopers: list[tuple[str, str | None]], n: int) -> AsyncIterator[Loop]:
    """`looping` of /sample n=`n` on each (model, prior) of `loopers`, in a child process; the Loop
    yielded is filled when the block ends (its times are time.time())."""
    context = multiprocessing.get_context("spawn")
    started, stop, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_loop_in_a_process, args=(url, timeout_s, loopers, n, started, stop, results),
                            name="loopers", daemon=True)
    child.start()
    result = Loop()
    try:
        if not await asyncio.to_thread(started.wait, 60):
            raise RuntimeError("the loopers' process did not start within 60 s")
        result.start = time.time()
        yield result
    finally:
        stop.set()
        timed = await asyncio.to_thread(results.get, True, timeout_s + 60) if child.is_alive() else []
        await asyncio.to_thread(child.join, 10)
        result.timed = [(at, Answer(status, seconds)) for at, status, seconds in timed]


def spread(answers: list[Answer]) -> str:
    p50, p90, _p99, top = percentiles([a.seconds * 1000 for a in answers])
    return f"p50 / p90 / max {fmt_ms(p50)} / {fmt_ms(p90)} / {fmt_ms(top)} ms over {len(answers)} ({count_statuses(answers)})"


@dataclass
class Slowdown:
    """One kind of request, sent one at a time on the quiet server and then during an attack."""

    who: str
    idle: list[Answer]
    busy: list[Answer]
    limit: float  # the target: the p50 during the attack at most this many times the idle p50

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
                f"{self.who}: p50 during / idle {ratio} (target <= {self.limit:g}x)"]  # fmt: skip

    def short(self) -> str:
        def p50(answers: list[Answer]) -> str:
            return fmt_ms(float(np.median([a.seconds * 1000 for a in answers]))) if answers else "-"

        ratio = "-" if self.ratio is None else f"{self.ratio:.1f}x"
        return f"{self.who} p50 {p50(self.idle)} -> {p50(self.busy)} ms ({ratio})"


@dataclass
class Held:
    """A connection held open on purpose (attacks 7, 8), and what the server did with it."""

    writer: asyncio.StreamWriter
    opened: float  # time.perf_counter()
    status: int | None = None  # of the answer, if one came
    answered_s: float | None = None  # seconds from opening to the status line
    closed_s: float | None = None  # seconds from opening to the server closing it (EOF or reset)
    sent: int = 0  # bytes written after the head
    watching: asyncio.Task | None = None

    @classmethod
    async def open(cls, url: str, head: bytes) -> Held:
        reader, writer = await open_raw(url)
        writer.write(head)
        held = cls(writer, time.perf_counter())
        held.watching = asyncio.create_task(held._watch(reader))
        return held

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if line := await reader.readline():
                self.answered_s = time.perf_counter() - self.opened
                self.status = int(line.split()[1])
            while await reader.read(65536):
                pass
        self.closed_s = time.perf_counter() - self.opened

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.writer.write(data)
            await self.writer.drain()
            self.sent += len(data)

    def release(self) -> None:
        if self.watching is not None:
            self.watching.cancel()
        self.writer.close()

    def show(self) -> str:
        if self.status is not None:
            return f"{self.status} after {self.answered_s:.1f} s ({self.sent} bytes of body sent)"
        if self.closed_s is not None:
            return f"closed without an answer after {self.closed_s:.1f} s ({self.sent} bytes of body sent)"
        return f"no answer ({self.sent} bytes of body sent)"


def sample_request(model: str, prior: str | None, n: int) -> MakeRequest:
    """GET /sample of `model` (with `prior`), n images, seed = the request's number."""
    params = {"model": model, "n": n, **({"prior": prior} if prior else {})}
    return lambda client, i: client.build_request("GET", "/sample", params={**params, "seed": i})


def upload_request(path: str, model: str, pngs: list[bytes], name: str = "image.png", **params: str) -> MakeRequest:
    """POST `path`?model=`model` with every one of `pngs` as a file."""
    files = [("file", (name, png, "image/png")) for png in pngs]
    return lambda client, i: client.build_request("POST", path, params={"model": model, **params}, files=files)


@functools.cache
def ico_bomb(side: int) -> tuple[bytes, str]:
    """An ICO whose directory says 16x16 but which holds a `side` x `side` RGBA PNG, mostly flat
    (deflate packs flat rows ~1000x: 12000x12000, 576 MB of pixels, is ~0.57 MiB); and what it is.
    Checked by opening it with Pillow, which decodes the PNG inside `Image.open`: the bomb itself."""
    image = Image.new("RGBA", (side, side), (30, 60, 90, 255))
    image.paste((200, 0, 0, 255), (side // 4, side // 4, side // 2, side // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    del image
    png = buffer.getvalue()
    icondir = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 (icon), one image
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)  # 16x16, 32 bpp, its bytes and offset
    ico = icondir + entry + png
    # action="ignore": the DecompressionBombWarning, and "Image was not the expected size"
    with warnings.catch_warnings(action="ignore"), Image.open(io.BytesIO(ico)) as opened:
        if opened.format != "ICO":
            raise RuntimeError(f"the ICO bomb opens as {opened.format}, not ICO")
        what = (f"the ICO: {len(ico) / MB:.2f} MiB, its PNG {len(png) / MB:.2f} MiB, {side * side * 4 / 1e6:.0f} MB of "
                f"RGBA pixels; its directory says 16x16, Pillow opens it as an ICO of {opened.size[0]}x{opened.size[1]}")  # fmt: skip
    return ico, what


def rlimit_nofile(pid: int | None) -> str:
    """The soft and hard RLIMIT_NOFILE of `pid` (this process when None)."""
    if pid is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"{soft} soft, {hard} hard"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft} soft, {hard} hard"
    return "unknown"


def open_fds(pid: int | None) -> str:
    with contextlib.suppress(OSError):
        return "unknown" if pid is None else str(len(os.listdir(f"/proc/{pid}/fd")))
    return "unknown"


def log_growth(path: Path, offset: int) -> tuple[int, int]:
    """Bytes `path` grew by past `offset`, and how many of its new lines say "Too many open files"."""
    emfile = 0
    with open(path, "rb") as log:
        log.seek(offset)
        for line in log:
            emfile += b"Too many open files" in line
        return log.tell() - offset, emfile


def strings_body(model: str, name: str, depth: int, item: str, limit: int) -> tuple[bytes, int]:
    """{"model": model, name: [[...[item, item, ...]]]} (`depth` brackets) with as many items as fit
    in `limit` bytes, and how many that is."""
    head, tail = f'{{"model":"{model}","{name}":' + "[" * depth, "]" * depth + "}"
    count = (limit - len(head) - len(tail) + 1) // (len(item) + 1)
    return (head + ",".join([item] * count) + tail).encode(), count


async def at_once(ctx: Attacks, key: str, title: str, count: int, make: MakeRequest,
                  expected: tuple[str, Callable[[list[Answer]], bool]] | None = None, notes: list[str] | None = None) -> None:  # fmt: skip
    """`count` clients, each connected first, send make(client, i) at the same time: one phase.
    `expected`: what the answers should be, and the check of it."""
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, count)
        async with ctx.phase(key, title) as phase:
            answers = await asyncio.gather(*(timed(c, make(c, i)) for i, c in enumerate(clients)))
            phase.lines = [f"statuses: {count_statuses(answers)}; answered in {time_range(answers)}",
                           *(f"request {i}: {a.show()}" for i, a in enumerate(answers) if a.status != 200),
                           *(notes or [])]  # fmt: skip
            phase.statuses, phase.answers = count_statuses(answers), time_range(answers)
            if expected is not None:
                phase.expected, phase.expected_met = expected[0], expected[1](answers)


def quickly(*statuses: int) -> tuple[str, Callable[[list[Answer]], bool]]:
    """Expected: every answer one of `statuses`, within QUICK_ANSWER_S."""
    text = " or ".join(map(str, statuses)) + f" within {QUICK_ANSWER_S:g} s"
    return text, lambda answers: all(a.status in statuses and a.seconds <= QUICK_ANSWER_S for a in answers)


async def during(phase: Phase, slowdown: Slowdown, make: MakeRequest, client: httpx.AsyncClient,
                 seconds: float, **pacing: float) -> None:  # fmt: skip
    """The innocent request one at a time (`pacing`: series' every_s, pause_s) for `seconds`, into `slowdown.busy`;
    then the phase's expected outcome is the slowdown's."""
    slowdown.busy = await series(client, make, until=time.perf_counter() + seconds, **pacing)
    phase.expected, phase.expected_met = slowdown.expected, slowdown.met()


# -- the attacks -----------------------------------------------------------------------------------


async def attack_bad_batch_mate(ctx: Attacks) -> None:
    key, title = "1", "ten /sample?model=vqvae&prior=pixelcnn&n=1 and one with temperature=1e-50, at once"
    if reason := ctx.has("vqvae", "pixelcnn"):
        return ctx.skip(key, title, reason)
    innocent = [{"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": i} for i in range(10)]
    bad = {"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": 10, "temperature": "1e-50"}
    order = innocent[:5] + [bad] + innocent[5:]  # the first one starts a pass alone; the rest share the next
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, len(order))
        async with ctx.phase(key, title) as phase:
            requests = [c.build_request("GET", "/sample", params=p) for c, p in zip(clients, order)]
            answers = await asyncio.gather(*(timed(c, r) for c, r in zip(clients, requests)))
            good = [a for a, p in zip(answers, order) if p is not bad]
            worst = answers[order.index(bad)]
            phase.lines = [
                f"seeds 0-9: {count_statuses(good)}; answered in {time_range(good)}",
                *(f"seed {p['seed']}: {a.show()}" for a, p in zip(answers, order) if p is not bad and a.status != 200),
                f"temperature=1e-50: {worst.show()}",
            ]
            phase.statuses = f"innocent {count_statuses(good)}; bad {worst.status}"
            phase.answers = time_range(answers)
            phase.expected = "the ten innocent ones 200, the bad one 4xx"
            phase.expected_met = all(a.status == 200 for a in good) and worst.status is not None and 400 <= worst.status < 500


@dataclass
class RawPost:
    """What a POST written and read at the same time saw (attack 2)."""

    answer: Answer
    sent_at_answer: int  # body bytes written to the socket when the status line arrived
    sent: int  # body bytes written in all
    finished_s: float | None  # when the last byte was written, None if never
    send_error: str | None  # how writing ended early: the server closed the connection


async def raw_post(url: str, path: str, body: bytes, chunked: bool, timeout_s: float, drain_s: float) -> RawPost:
    """POST `body` on a plain socket, writing in 1 MiB chunks while reading the answer.

    httpx sends the whole body before it reads a byte of the answer, so an early 413 would look
    as slow as the upload. Here the answer's time is its own, and what happens to the rest of
    the body shows whether the server closed the connection or went on taking it (waited for
    up to `drain_s` seconds after the answer).
    """
    target = httpx.URL(url)
    reader, writer = await open_raw(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                 f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode())  # fmt: skip
    sent, finished, send_error = 0, None, None
    start = time.perf_counter()

    async def pump() -> None:
        nonlocal sent, finished, send_error
        view = memoryview(body)
        try:
            for offset in range(0, len(body), CHUNK):
                piece = view[offset : offset + CHUNK]
                if chunked:
                    writer.write(b"%x\r\n" % len(piece))
                writer.write(piece)
                if chunked:
                    writer.write(b"\r\n")
                await writer.drain()
                sent += len(piece)
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            finished = time.perf_counter() - start
        except OSError as err:  # ConnectionResetError, BrokenPipeError: the server closed it
            send_error = type(err).__name__

    writing = asyncio.create_task(pump())
    try:
        async with asyncio.timeout(timeout_s):
            status_line = await reader.readline()
            seconds, sent_at_answer = time.perf_counter() - start, sent
            if not status_line:
                answer = Answer(None, seconds, "the server closed the connection without an answer")
            else:
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                text = (await reader.readexactly(length)).decode(errors="replace") if length else ""
                answer = Answer(int(status_line.split()[1]), seconds, text[:160])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(writing), drain_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
        answer, sent_at_answer = Answer(None, time.perf_counter() - start, f"{type(err).__name__}: {err}"), sent
    finally:
        writing.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return RawPost(answer, sent_at_answer, sent, finished, send_error)


async def attack_big_json(ctx: Attacks) -> None:
    numbers, drain_s = ctx.args.json_numbers, 5.0
    model = next((m["name"] for m in ctx.models if m["name"] == "vae_conv"), None) or ctx.models[0]["name"]
    body = b'{"model":"' + model.encode() + b'","z":[[' + b"0," * (numbers - 1) + b"0]]}"  # ~2 bytes a number
    size, mib = f"{numbers:.3g} numbers, {len(body) / MB:.1f} MiB", len(body) / MB
    for key, chunked in (("2a", True), ("2b", False)):
        title = f"POST /decode, a JSON body of {size}, " + ("streamed (chunked)" if chunked else "Content-Length declared")
        async with ctx.phase(key, title) as phase:
            post = await raw_post(ctx.url, "/decode", body, chunked, ctx.args.timeout, drain_s)
            if post.send_error:
                rest = (f"then the server closed the connection: the client could write {post.sent / MB:.1f} MiB "
                        f"({post.send_error})")  # fmt: skip
            elif post.finished_s is not None:
                rest = f"then the server took the rest: all {mib:.1f} MiB written by {post.finished_s * 1000:.0f} ms"
            else:
                rest = (f"{drain_s:g} s after the answer the connection was open and the client still writing: "
                        f"{post.sent / MB:.1f} MiB written")  # fmt: skip
            took_all = post.finished_s is not None
            phase.lines = [
                f"answer: {post.answer.show()}",
                f"when the answer came the client had written {post.sent_at_answer / MB:.1f} of {mib:.1f} MiB "
                "(socket buffers hold a few MiB the server has not read); " + rest,
            ]
            phase.statuses = str(post.answer.status if post.answer.status is not None else "no answer")
            phase.answers = (f"{post.answer.seconds * 1000:.0f} ms; {post.sent_at_answer / MB:.0f} MiB written by then, "
                             f"{post.sent / MB:.0f} in all")  # fmt: skip
            phase.expected = f"413 within {QUICK_ANSWER_S:g} s, the connection closed before the whole body was taken"
            phase.expected_met = post.answer.status == 413 and post.answer.seconds <= QUICK_ANSWER_S and not took_all


async def attack_uploads(ctx: Attacks) -> None:
    args = ctx.args
    side = f"{args.big_side}x{args.big_side}"
    key, title = "3a", f"{args.big_requests} concurrent /reconstruct?model=vae_conv, {args.big_files} {side} RGBA PNGs each"
    if reason := ctx.has("vae_conv"):
        ctx.skip("3a", title, reason)
        return ctx.skip("3b", "one /reconstruct?model=vae_conv with many medium files", reason)
    big = rgba_png(args.big_side)
    max_pixels = int(ctx.config.get("max_pixels", 0))
    notes = []
    if max_pixels and args.big_side**2 > max_pixels:
        notes.append(f"note: {side} is over the server's max_pixels ({max_pixels}); "
                     f"--big-side {math.isqrt(max_pixels)} sends the largest it accepts")  # fmt: skip
    reconstruct = upload_request("/reconstruct", "vae_conv", [big] * args.big_files, "big.png")
    await at_once(ctx, key, title + f" ({len(big) / 1024:.0f} KiB each)", args.big_requests, reconstruct, notes=notes)

    count = args.medium_files or int(ctx.config.get("max_files", 64))
    medium = rgba_png(args.medium_side)
    side = f"{args.medium_side}x{args.medium_side}"
    title = f"one /reconstruct?model=vae_conv with {count} {side} RGBA PNGs ({len(medium) / 1024:.0f} KiB each)"
    await at_once(ctx, "3b", title, 1, upload_request("/reconstruct", "vae_conv", [medium] * count, "medium.png"))


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


async def scrape(client: httpx.AsyncClient) -> Scrape:
    """The /sample request counts and every cancel-like metric from GET /metrics."""
    response = await client.get("/metrics")
    response.raise_for_status()
    out: Scrape = {}
    for family in text_string_to_metric_families(response.text):
        wanted = CANCEL_WORDS.search(family.name) is not None
        for sample in family.samples:
            if wanted or (family.name.startswith("genserve_requests") and sample.name.endswith("_total")
                          and sample.labels.get("endpoint") == "/sample"):  # fmt: skip
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def show_sample(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


async def attack_disconnect(ctx: Attacks) -> None:
    args = ctx.args
    key = "4"
    title = f"/sample?model=vqvae&prior=pixelcnnpp&n={args.abandon_n} abandoned after {args.abandon_after:g} s"
    if reason := ctx.has("vqvae", "pixelcnnpp"):
        return ctx.skip(key, title, reason)
    probe = {"model": "vqvae", "prior": "pixelcnnpp", "n": 1}
    async with ctx.client() as client:
        idle = []
        for seed in range(6):  # the first one warms up
            answer = await timed(client, client.build_request("GET", "/sample", params={**probe, "seed": seed}))
            if answer.status != 200:
                return ctx.skip(key, title, f"the probe request failed on the idle server: {answer.show()}")
            idle.append(answer.seconds)
        idle_s = float(np.median(idle[1:]))
        before = await scrape(client)
        async with ctx.phase(key, title) as phase:
            abandoned = ctx.client()
            start = time.perf_counter()
            try:
                request = abandoned.build_request("GET", "/sample", params={**probe, "n": args.abandon_n, "seed": 0})
                response = await asyncio.wait_for(abandoned.send(request), args.abandon_after)
                ms = (time.perf_counter() - start) * 1000
                outcome = f"answered {response.status_code} after {ms:.0f} ms, before it could be abandoned"
            except TimeoutError:
                outcome = f"abandoned after {(time.perf_counter() - start) * 1000:.0f} ms (connection closed)"
            except httpx.HTTPError as err:
                outcome = f"failed before it could be abandoned: {type(err).__name__}: {err}"
            finally:
                await abandoned.aclose()
            gone = time.perf_counter()
            probes: list[tuple[float, Answer]] = []  # (seconds since the abandonment at the answer, answer)
            busy_s = None
            while time.perf_counter() - gone < args.busy_limit:
                answer = await timed(client, client.build_request("GET", "/sample", params={**probe, "seed": 100 + len(probes)}))
                probes.append((time.perf_counter() - gone, answer))
                if answer.status == 200 and answer.seconds < 2 * idle_s:
                    busy_s = probes[-1][0]
                    break
            after = await scrape(client)
            changes = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}
            changes = {k: v for k, v in changes.items() if v}
            probe_statuses = Counter(str(a.status) for _, a in probes)
            cancelled = any(
                v > 0 and (dict(labels).get("status") == "499" or CANCEL_WORDS.search(name))
                for (name, labels), v in changes.items()
            )
            left = {
                dict(labels).get("status"): v - probe_statuses.get(dict(labels).get("status"), 0)  # type: ignore[arg-type]
                for (name, labels), v in changes.items()
                if name.startswith("genserve_requests") and dict(labels).get("status")
            }
            recorded = [f"{status} x{v:g}" for status, v in left.items() if v]
            phase.lines = [
                f"idle latency of n=1: {idle_s * 1000:.0f} ms (median of 5); the n={args.abandon_n} request: {outcome}",
                "probes (n=1, one after another; seconds since the abandonment at each answer): "
                + ", ".join(f"{t:.2f} s ({a.status}, {a.seconds * 1000:.0f} ms)" for t, a in probes[:12])
                + (f", ... ({len(probes)} in all)" if len(probes) > 12 else ""),
                f"busy after the abandonment: {busy_s:.2f} s (until a probe answered in under 2x the idle latency)"
                if busy_s is not None
                else f"still busy after {args.busy_limit:g} s: no probe answered in under 2x the idle latency",
                "/metrics changes: " + ("; ".join(f"{show_sample(n, lb)} +{v:g}" for (n, lb), v in sorted(changes.items()))
                                        or "none"),
                "/sample answers recorded beyond the probes' (the abandoned request, as the server counted it): "
                + (", ".join(recorded) or "none"),
                f"counted as cancelled (a status=\"499\" sample or a cancel-like metric went up): {'yes' if cancelled else 'no'}",
            ]  # fmt: skip
            phase.statuses = f"cancelled counted: {'yes' if cancelled else 'no'}"
            phase.answers = f"busy {busy_s:.2f} s after" if busy_s is not None else f"busy > {args.busy_limit:g} s"


async def attack_strings(ctx: Attacks) -> None:
    args = ctx.args
    limit = args.strings_bytes or int(ctx.config.get("max_json_bytes", 0))
    for key, model, name, depth, item in (("5a", "vae_mlp", "z", 2, '""'), ("5b", "vqvae", "codes", 3, '"x"')):
        body, count = strings_body(model, name, depth, item, limit)
        title = (f"{args.strings_requests} concurrent POST /decode of {model!r} with {name} a list of {count:,} "
                 f"strings {item} ({len(body):,} bytes)")  # fmt: skip
        if reason := ctx.has(model) or ("" if limit else "GET /config has no max_json_bytes: give --strings-bytes"):
            ctx.skip(key, title, reason)
            continue
        headers = {"Content-Type": "application/json"}
        make: MakeRequest = lambda c, i: c.build_request("POST", "/decode", content=body, headers=headers)  # noqa: B023
        await at_once(ctx, key, title, args.strings_requests, make, quickly(422))


async def attack_ico_bomb(ctx: Attacks) -> None:
    args = ctx.args
    side = f"{args.bomb_side}x{args.bomb_side}"
    key, title = "6a", f"{args.bomb_requests} concurrent /reconstruct?model=vae_conv of a 16x16 ICO holding a {side} RGBA PNG"
    loops_title = (f"{args.bomb_loopers} clients looping on the ICO bomb for {args.bomb_loops:g} s, an innocent "
                   "/reconstruct?model=vae_conv (one 28x28 PNG) one at a time")  # fmt: skip
    if reason := ctx.has("vae_conv"):
        ctx.skip(key, title, reason)
        return ctx.skip("6b", loops_title, reason)
    ico, made = ico_bomb(args.bomb_side)
    bomb = upload_request("/reconstruct", "vae_conv", [ico], "bomb.ico")
    await at_once(ctx, key, title + f" ({len(ico) / MB:.2f} MiB)", args.bomb_requests, bomb, quickly(400, 413), [made])

    innocent = upload_request("/reconstruct", "vae_conv", upload_images(1, 0)[0])
    async with contextlib.AsyncExitStack() as stack:
        client, *loopers = await ctx.clients(stack, 1 + args.bomb_loopers)
        slowdown = Slowdown("innocent", await idle_series(client, innocent, args.idle_requests), [], 2.0)
        async with ctx.phase("6b", loops_title) as phase:
            async with looping(loopers, bomb) as bombs:
                await during(phase, slowdown, innocent, client, args.bomb_loops)
            answers = bombs.answers
            phase.lines = [*slowdown.lines(), f"bombs: {count_statuses(answers)}, {spread(answers)}"]
            phase.statuses = f"innocent {count_statuses(slowdown.busy)}; bombs {count_statuses(answers)}"
            phase.answers = slowdown.short()
            phase.expected += ", the bombs 4xx"
            phase.expected_met = phase.expected_met and all(a.status is not None and 400 <= a.status < 500 for a in answers)


SLOW_BOUNDARY = "genserve-slow-upload"


def slow_upload_head(url: str, length: int) -> bytes:
    """A POST /reconstruct?model=vae_conv declaring a multipart body of `length` bytes: the request's
    headers, then the part's, whose file's bytes are to follow one at a time."""
    host = httpx.URL(url).netloc.decode()
    part = (f"--{SLOW_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.png\"\r\n"
            "Content-Type: image/png\r\n\r\n")  # fmt: skip
    return (f"POST /reconstruct?model=vae_conv HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={SLOW_BOUNDARY}\r\nContent-Length: {length}\r\n\r\n{part}").encode()  # fmt: skip


async def attack_slow_uploads(ctx: Attacks) -> None:
    args = ctx.args
    count = args.slow_clients or (int(ctx.config["upload_slots"]) + 1 if "upload_slots" in ctx.config else 4)
    title = (f"{count} POST /reconstruct?model=vae_conv declaring {args.slow_length:,} bytes and sending 1 a second, "
             f"for {args.slow_duration:g} s; an innocent /reconstruct once a second")  # fmt: skip
    if reason := ctx.has("vae_conv"):
        return ctx.skip("7", title, reason)
    png = upload_images(1, 0)[0][0]
    innocent = upload_request("/reconstruct", "vae_conv", [png])
    async with ctx.client() as client:  # idle_series' first request opens its connection
        slowdown = Slowdown("innocent", await idle_series(client, innocent, args.idle_requests), [], 2.0)
        async with ctx.phase("7", title) as phase:
            head = slow_upload_head(ctx.url, args.slow_length)
            held = await asyncio.gather(*(Held.open(ctx.url, head) for _ in range(count)))

            async def trickle() -> None:
                for k in itertools.count():
                    await asyncio.gather(*(h.send(png[k % len(png) : k % len(png) + 1]) for h in held if h.closed_s is None))
                    await asyncio.sleep(1.0)

            trickling = asyncio.create_task(trickle())
            try:
                await during(phase, slowdown, innocent, client, args.slow_duration, every_s=1.0)
            finally:
                trickling.cancel()
                for h in held:
                    h.release()
            phase.lines = [*slowdown.lines(), *(f"attacker {i}: {h.show()}" for i, h in enumerate(held))]
            attackers = fmt_counts(Counter("no answer" if h.status is None else str(h.status) for h in held))
            phase.statuses = f"innocent {count_statuses(slowdown.busy)}; attackers {attackers}"
            phase.answers = slowdown.short()


async def hold_many(url: str, head: bytes, count: int, at_once: int = 64) -> tuple[list[Held], Counter[str]]:
    """`count` connections sending `head`, opened `at_once` at a time; and the failures, by exception."""
    opening = asyncio.Semaphore(at_once)

    async def hold() -> Held | str:
        async with opening:
            try:
                return await asyncio.wait_for(Held.open(url, head), 10.0)
            except (OSError, TimeoutError) as err:
                return type(err).__name__

    tries = await asyncio.gather(*(hold() for _ in range(count)))
    return [h for h in tries if isinstance(h, Held)], Counter(h for h in tries if isinstance(h, str))


def closing_text(held: list[Held]) -> str:
    closed = sorted(h.closed_s for h in held if h.closed_s is not None)
    answers = Counter(str(h.status) for h in held if h.status is not None)
    text = f"closed by the server: {len(closed)} of {len(held)}"
    if closed:
        text += f", after {closed[0]:.1f} s (first), {np.median(closed):.1f} s (median), {closed[-1]:.1f} s (last)"
    return text + (f"; answers on them: {fmt_counts(answers)}" if answers else "")


async def attack_idle_connections(ctx: Attacks) -> None:
    args = ctx.args
    title = (f"{args.idle_conns} connections sending the start of GET /health's headers and no more, held "
             f"{args.idle_hold:g} s; GET /health on a fresh connection every second")  # fmt: skip
    pid = ctx.memory.pid if ctx.memory is not None else None
    header_timeout = ctx.config.get("header_timeout_s")
    log = ctx.server.log_path if ctx.server is not None else args.server_log
    log_start = log.stat().st_size if log is not None else 0
    head = f"GET /health HTTP/1.1\r\nHost: {httpx.URL(ctx.url).host}\r\n".encode()
    health: MakeRequest = lambda c, i: c.build_request("GET", "/health")
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)  # every request on a new connection
    async with httpx.AsyncClient(base_url=ctx.url, timeout=5.0, limits=limits) as fresh, ctx.phase("8", title) as phase:
        start = time.perf_counter()
        held, failed = await hold_many(ctx.url, head, args.idle_conns)
        opened_s = time.perf_counter() - start
        await asyncio.sleep(1.0)
        fds = open_fds(pid)
        try:
            probes = await series(fresh, health, until=start + args.idle_hold, every_s=1.0)
        finally:
            for h in held:
                h.release()
        await asyncio.sleep(1.0)  # what the server logs as they close
        grown, emfile = log_growth(log, log_start) if log is not None else (None, 0)
        phase.lines = [
            (f"server RLIMIT_NOFILE: {rlimit_nofile(pid)} (pid {pid}); this client's: {rlimit_nofile(None)}; "
             f"GET /config header_timeout_s: {header_timeout}"),
            f"{len(held)} of {args.idle_conns} connections opened in {opened_s:.1f} s"
            + (f" (failed: {fmt_counts(failed)})" if failed else "") + f"; the server's open descriptors 1 s later: {fds}",
            closing_text(held),
            f"GET /health on a fresh connection every second: {spread(probes)}",
            *(f"fresh probe {i}: {a.show()}" for i, a in enumerate(probes) if a.status != 200),
            f"server log grew by {fmt_mb(grown)}, {emfile} lines saying 'Too many open files'" if log is not None
            else "server log: not measured (with --url, give --server-log)",
        ]  # fmt: skip
        closed = sum(h.closed_s is not None for h in held)
        phase.statuses = f"closed by server {closed}/{len(held)}; fresh /health {count_statuses(probes)}"
        phase.answers = f"log +{fmt_mb(grown)}"
        phase.expected = f"fresh /health all 200, log growth < {fmt_mb(LOG_GROWTH_TARGET)}"
        phase.expected_met = bool(probes) and all(a.status == 200 for a in probes) and (grown or 0) < LOG_GROWTH_TARGET
        if header_timeout is None:
            return
        deadline = float(header_timeout) + CLOSE_SLACK_S
        if args.idle_hold < deadline:
            phase.lines.append(f"not judged: which held sockets the server closes within header_timeout_s "
                               f"+{CLOSE_SLACK_S:g} s (--idle-hold is shorter)")  # fmt: skip
            return
        phase.expected += f", held sockets closed within header_timeout_s +{CLOSE_SLACK_S:g} s"
        phase.expected_met &= all(h.closed_s is not None and h.closed_s <= deadline for h in held)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """MODEL or MODEL:PRIOR."""
    model, _, prior = spec.partition(":")
    return model, prior or None


async def fairness_case(ctx: Attacks, key: str, loopers: list[tuple[str, str | None]], victim: tuple[str, str | None],
                        limit: float, notes: list[str] | None = None) -> None:  # fmt: skip
    """Loopers sending /sample of n=--fair-n on `loopers` (model, prior) back to back while the victim
    sends /sample n=1 of `victim`, one at a time: its slowdown, and the loopers' images/s."""
    args = ctx.args
    names = Counter(f"{m}:{p}" if p else m for m, p in loopers)
    title = (", ".join(f"{k} x{n}" if n > 1 else k for k, n in names.items()) + f" looping on /sample n={args.fair_n}; "
             f"the victim /sample?model={victim[0]}" + (f"&prior={victim[1]}" if victim[1] else "") + "&n=1")  # fmt: skip
    if reason := next(filter(None, (ctx.has(m, p) for m, p in [victim, *loopers])), None):
        return ctx.skip(key, title, reason)
    victim_make = sample_request(*victim, 1)
    async with contextlib.AsyncExitStack() as stack:
        (client,) = await ctx.clients(stack, 1)
        slowdown = Slowdown("victim", await idle_series(client, victim_make, args.idle_requests, args.victim_pause), [], limit)
        async with ctx.phase(key, title) as phase:
            # The loopers run in a process of their own: in this one, their event loop and the GIL
            # would delay the victim's answers on the client side and count it as the server's.
            async with looping_elsewhere(ctx.url, ctx.args.timeout, loopers, args.fair_n) as heavy:
                await during(phase, slowdown, victim_make, client, args.fair_duration, pause_s=args.victim_pause)
            answers, rate = heavy.answers, heavy.throughput(args.fair_n)
            phase.lines = [*slowdown.lines(), f"loopers: {rate}, {spread(answers)}", *(notes or [])]  # fmt: skip
            phase.statuses = f"victim {count_statuses(slowdown.busy)}; loopers {count_statuses(answers)}"
            phase.answers = f"{slowdown.short()}; loopers {rate.split(' (')[0]}"


async def attack_fairness(ctx: Attacks) -> None:
    args = ctx.args
    await fairness_case(ctx, "9a", [("vqvae", "gated")] * args.fair_loopers, ("vqvae", "gated"), 3.0)
    await fairness_case(ctx, "9b", [("vqvae_cifar10", "pixelcnnpp")] * args.fair_loopers, ("vqvae_cifar10", "pixelcnnpp"), 3.0)
    others = [parse_spec(s) for s in args.fair_others]
    served = [o for o in others if not ctx.has(*o)]
    left_out = [f"--fair-others left out: {ctx.has(*o)}" for o in others if ctx.has(*o)]
    await fairness_case(ctx, "9c", served, ("vae_mlp", None), 2.0, left_out)


async def attack_large_answers(ctx: Attacks) -> None:
    args = ctx.args
    model, files = args.encode_model, args.encode_files or int(ctx.config.get("max_files", 64))
    title = (f"{args.encode_clients} clients looping on /encode?model={model}&include_z_e=true with {files} 28x28 PNGs "
             f"for {args.encode_duration:g} s")  # fmt: skip
    if reason := ctx.has(model):
        return ctx.skip("10", title, reason)
    encode = upload_request("/encode", model, upload_images(files, 0)[0], include_z_e="true")
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, args.encode_clients)
        async with ctx.phase("10", title) as phase:
            async with looping(clients, encode) as encodes:
                await asyncio.sleep(args.encode_duration)
            answers = encodes.answers
            sizes = [a.size for a in answers if a.status == 200]
            phase.lines = [f"answers: {spread(answers)}; {encodes.throughput(files)}",
                           f"answer size: {fmt_mb(float(np.median(sizes))) if sizes else '-'} (median)"]  # fmt: skip
            phase.statuses, phase.answers = count_statuses(answers), time_range(answers)
            phase.expected, phase.expected_met = "every answer 200", bool(answers) and all(a.status == 200 for a in answers)


RUNNERS = {1: attack_bad_batch_mate, 2: attack_big_json, 3: attack_uploads, 4: attack_disconnect, 5: attack_strings,
           6: attack_ico_bomb, 7: attack_slow_uploads, 8: attack_idle_connections, 9: attack_fairness, 10: attack_large_answers}


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", type=int, nargs="+", choices=ATTACKS, default=list(ATTACKS), metavar="N",
                        help="which attacks to run (default: all of 1-10)")
    parser.add_argument("--url", default=None, help="attack this running server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--server-log", type=Path, default=None, help="with --url: the server's log file (attack 8)")
    parser.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server we start, e.g. GENSERVE_MAX_JSON_BYTES=1048576")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="GENSERVE_WEIGHTS_DIR (default weights/)")
    parser.add_argument("--json-numbers", type=lambda s: int(float(s)), default=50_000_000,
                        help="attack 2: numbers in the JSON body (default 5e7, ~95 MiB)")
    parser.add_argument("--big-requests", type=int, default=6, help="attack 3a: concurrent requests (default 6)")
    parser.add_argument("--big-files", type=int, default=4, help="attack 3a: files per request (default 4)")
    parser.add_argument("--big-side", type=int, default=4096, help="attack 3a: image side in pixels (default 4096)")
    parser.add_argument("--medium-files", type=int, default=None, help="attack 3b: files (default: the server's max_files)")
    parser.add_argument("--medium-side", type=int, default=1024, help="attack 3b: image side in pixels (default 1024)")
    parser.add_argument("--abandon-n", type=int, default=256, help="attack 4: n of the abandoned /sample (default 256)")
    parser.add_argument("--abandon-after", type=float, default=0.3, help="attack 4: seconds before abandoning (default 0.3)")
    parser.add_argument("--busy-limit", type=float, default=60.0, help="attack 4: stop probing after this many seconds")
    parser.add_argument("--idle-requests", type=int, default=10,
                        help="attacks 6b, 7, 9: innocent or victim requests timed on the quiet server first (default 10)")
    parser.add_argument("--strings-requests", type=int, default=2, help="attack 5: concurrent requests (default 2)")
    parser.add_argument("--strings-bytes", type=int, default=None,
                        help="attack 5: body size in bytes (default: GET /config's max_json_bytes)")
    parser.add_argument("--bomb-side", type=int, default=12000, help="attack 6: the embedded PNG's side (default 12000)")
    parser.add_argument("--bomb-requests", type=int, default=4, help="attack 6a: concurrent requests (default 4)")
    parser.add_argument("--bomb-loopers", type=int, default=3, help="attack 6b: clients looping on the bomb (default 3)")
    parser.add_argument("--bomb-loops", type=float, default=10.0, help="attack 6b: seconds of looping (default 10)")
    parser.add_argument("--slow-clients", type=int, default=None,
                        help="attack 7: slow uploads (default: GET /config's upload_slots + 1, else 4)")
    parser.add_argument("--slow-length", type=int, default=100_000,
                        help="attack 7: the Content-Length each declares (default 100000)")
    parser.add_argument("--slow-duration", type=float, default=35.0,
                        help="attack 7: seconds of trickling and innocent requests (default 35: the server's "
                             "request_timeout_s of 30 s shows)")
    parser.add_argument("--idle-conns", type=int, default=1050, help="attack 8: connections held (default 1050)")
    parser.add_argument("--idle-hold", type=float, default=40.0, help="attack 8: seconds they are held (default 40)")
    parser.add_argument("--server-nofile", type=int, default=1024,
                        help="the soft RLIMIT_NOFILE the server we start inherits (default 1024, as the review's "
                             "server had; 0: this shell's)")
    parser.add_argument("--fair-loopers", type=int, default=8, help="attacks 9a, 9b: looping clients (default 8)")
    parser.add_argument("--fair-n", type=int, default=256, help="attack 9: n of each looping /sample (default 256)")
    parser.add_argument("--fair-duration", type=float, default=15.0,
                        help="attack 9: seconds the victim is measured under load, per case (default 15)")
    parser.add_argument("--fair-others", nargs="+", default=list(FAIR_OTHERS), metavar="MODEL[:PRIOR]",
                        help=f"attack 9c: one looper each (default {' '.join(FAIR_OTHERS)})")
    parser.add_argument("--victim-pause", type=float, default=0.05,
                        help="attack 9: seconds between the victim's requests (default 0.05)")
    parser.add_argument("--encode-model", default="vqvae_cifar10",
                        help="attack 10: the VQ-VAE (default vqvae_cifar10: 5.1 MB answers for 64 files, vqvae 4.0 MB)")
    parser.add_argument("--encode-clients", type=int, default=4, help="attack 10: looping clients (default 4)")
    parser.add_argument("--encode-files", type=int, default=None, help="attack 10: files per request (default: max_files)")
    parser.add_argument("--encode-duration", type=float, default=15.0, help="attack 10: seconds of looping (default 15)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each attack (default 1)")
    parser.add_argument("--linger", type=float, default=1.0,
                        help="seconds each attack's measurement goes on after its last answer (default 1)")
    parser.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S,
                        help=f"client timeout per request in s (default {CLIENT_TIMEOUT_S:g})")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report as markdown to this file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the server's log here (default: a temporary directory)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for GET /ready")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/attacks.py", *(sys.argv[1:] if argv is None else argv)])
    args.env = parse_env(args.env, parser)
    args.attacks = sorted(set(args.attacks))
    counts = ("json_numbers", "big_requests", "big_files", "big_side", "medium_side", "abandon_n", "idle_requests",
              "strings_requests", "bomb_side", "bomb_requests", "bomb_loopers", "slow_length", "idle_conns",
              "fair_loopers", "fair_n", "encode_clients")  # fmt: skip
    if bad := [f"--{name.replace('_', '-')}" for name in counts if getattr(args, name) < 1]:
        parser.error(f"{', '.join(bad)} must be at least 1")
    if bad := [f"--{name.replace('_', '-')}" for name in ("bomb_loops", "slow_duration", "idle_hold", "fair_duration",
                                                          "encode_duration") if getattr(args, name) <= 0]:  # fmt: skip
        parser.error(f"{', '.join(bad)} must be positive")
    if (args.pid is not None or args.server_log is not None) and not args.url:
        parser.error("--pid and --server-log go with --url (a server we start is measured anyway)")
    if args.server_log is not None and not args.server_log.is_file():
        parser.error(f"--server-log {args.server_log} is not a file")
    if not args.url and not args.weights.is_dir():
        parser.error(f"--weights {args.weights} is not a directory")
    return args


def header_lines(args: argparse.Namespace, config: dict, models: list[dict], memory: ServerMemory | None) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({cores} usable)",
        "server: " + (args.url if args.url else "python -m app" + "".join(f" {k}={v}" for k, v in args.env.items())),
        "config: " + ", ".join(f"{k}={config[k]}" for k in CONFIG_KEYS if k in config),
        describe_models(models),
        f"targets per attack: peak RSS growth <= {RSS_GROWTH_TARGET / 1e6:.0f} MB (VmRSS of the server's process group "
        f"every 10 ms); GET /health every 20 ms on its own connection: p99 <= {HEALTH_P99_TARGET_MS:g} ms, all answered",
    ]
    if memory is None:
        lines.append("server RSS: not measured (no server process: give --pid with --url)")
    else:
        lines.append(f"server RLIMIT_NOFILE: {rlimit_nofile(memory.pid)}" + ("" if args.url or not args.server_nofile else
                     f" (started with a soft limit of {args.server_nofile}: --server-nofile)"))  # fmt: skip
    if warning := busy_warning():
        lines.append(warning)
    return lines


def write_markdown(path: Path, command: str, header: list[str], phases: list[Phase], notes: list[str]) -> None:
    text = ["## Attacks: memory and /health under hostile requests", "", "```", f"$ {command}", *header, "```", "",
            markdown_table(HEADERS, [p.row() for p in phases]), ""]  # fmt: skip
    for phase in phases:
        if not phase.skipped:
            text += [f"**{phase.key}. {phase.title}**", "", *(f"- {line}" for line in phase.lines), ""]
    text += [f"- {note}" for note in notes] + [""]
    path.write_text("\n".join(text))


async def run(args: argparse.Namespace, url: str, server: Server | None) -> int:
    models = httpx.get(f"{url}/models", timeout=30).raise_for_status().json()
    config = httpx.get(f"{url}/config", timeout=30).raise_for_status().json()
    pid = server.process.pid if server is not None and server.process is not None else args.pid
    memory = ServerMemory(pid) if pid is not None else None
    header = header_lines(args, config, models, memory)
    print("\n".join(header), flush=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # attack 8's many sockets: the server, not we, is the limit
    ctx = Attacks(url, args, models, config, server, memory)
    notes = []
    try:
        for number in args.attacks:
            print(flush=True)
            await RUNNERS[number](ctx)
    except ServerDied as err:
        notes.append(str(err))
        print(f"\n{err}" + (f":\n{server.log_tail()}" if server is not None else ""), flush=True)
    if server is not None:
        notes += [f"server log: {line}" for line in server.log_errors(10)]

    measured = [p for p in ctx.phases if not p.skipped]
    print("\nsummary (the attacks' titles above):")
    print(text_table([HEADERS[i] for i in TEXT_COLUMNS], [[p.row()[i] for i in TEXT_COLUMNS] for p in ctx.phases]))
    def tally(results: list[bool | None]) -> str:
        judged = [r for r in results if r is not None]
        return f"MISSED by {judged.count(False)} of {len(judged)}" if judged else "not measured"

    print(f"\nRSS target {tally([p.rss_met() for p in measured])}; /health target "
          f"{tally([p.health_met() for p in measured])}; expected outcome (where stated) "
          f"{tally([p.expected_met for p in measured])}")  # fmt: skip
    for note in notes:
        print(f"  {note}")
    if args.markdown:
        write_markdown(args.markdown, args.command, header, ctx.phases, notes)
        print(f"\nmarkdown written to {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.server_nofile and not args.url:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.server_nofile, hard), hard))  # the server inherits it
    return serve_and_run(args, run, "genserve-attacks-")


if __name__ == "__main__":
    sys.exit(main())
