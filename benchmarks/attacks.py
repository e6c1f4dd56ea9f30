"""Attacks on the real server: what each costs in memory, and whether /health stays quick meanwhile.

Starts the service (`python -m app` on a free port, in its own process group, with --env) and runs
the attacks in turn, --pause s apart. During each, a thread polls the server's RSS every 10 ms
(VmRSS summed over its process group) and another sends GET /health every 20 ms on a connection of
its own, until --linger s after the attack's last answer. Targets of every attack: peak RSS growth
at most 200 MB, /health p99 at most 100 ms with every probe answered, and its expected outcome
(below). "N x idle": an innocent request's or a victim's p50 during the attack over its p50 on the
quiet server (--idle-requests of it just before, after one that warms up), every answer 200.

    1   ten concurrent /sample?model=vqvae&prior=pixelcnn&n=1 and one with temperature=1e-50: the ten 200, it 4xx
    2a  POST /decode of --json-numbers numbers (5e7: ~95 MiB), chunked, written while the answer is read:
        413 within 1 s, the connection closed before the whole body was taken
    2b  the same with Content-Length declared
    3a  --big-requests concurrent /reconstruct?model=vae_conv of --big-files --big-side RGBA PNGs (mostly flat)
    3b  one /reconstruct?model=vae_conv of --medium-files --medium-side RGBA PNGs
    4   /sample?model=vqvae&prior=pixelcnnpp&n=--abandon-n abandoned after 0.3 s: whether /metrics
        counts it cancelled (status 499), and how long the server stays busy (until an n=1 probe answers in
        under 2x its idle latency)
    5a  --strings-requests concurrent /decode of {"model": "vae_mlp", "z": [["", ...]]} filling max_json_bytes:
        422 within 1 s; 5b the same with {"model": "vqvae", "codes": [[["x", ...]]]}
    6a  --bomb-requests concurrent /reconstruct?model=vae_conv of a 16x16 ICO holding a --bomb-side RGBA PNG
        (~0.57 MiB): 400 or 413 within 1 s; 6b --bomb-loopers clients looping on it for --bomb-loops s: the
        bombs 4xx, an innocent 28x28 /reconstruct one at a time at most 2x idle
    7   upload_slots + 1 sockets declaring a 100 kB multipart /reconstruct and sending 1 byte a second for
        --slow-duration s: an innocent /reconstruct once a second at most 2x idle
    8   --idle-conns sockets sending part of GET /health's headers, held --idle-hold s (the server's soft
        RLIMIT_NOFILE: --server-nofile): GET /health on a fresh connection every second all 200, the log
        growing under 1 MB, every held socket closed within header_timeout_s + 1 s (if --idle-hold outlasts it)
    9   clients looping on /sample of --fair-n images (in a process of their own) for --fair-duration s, a
        victim /sample n=1 one at a time, 0.05 s apart: 9a --fair-loopers on vqvae with gated, the
        victim the same (at most 3x idle); 9b the same on vqvae_cifar10 with pixelcnnpp (3x); 9c one looper
        on each of --fair-others, the victim vae_mlp (2x); 9d four on the autoregressive vae, the victim
        vae_conv (2x: a cheap model beside a slow one)
    10  --encode-clients looping on /encode?model=vqvae_cifar10&include_z_e=true with max_files PNGs
        (~5 MB of JSON back) for --encode-duration s: every answer 200

    python -m benchmarks.attacks                                 # every attack (several minutes)
    python -m benchmarks.attacks --json-numbers 5e6 --big-requests 2 --medium-files 16 --bomb-loops 3 \\
        --slow-duration 5 --idle-hold 12 --fair-n 64 --fair-duration 2 --encode-duration 2   # a smoke run
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
import re
import resource
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import (
    CLIENT_TIMEOUT_S, MB, Answer, Loop, MakeRequest, Poller, ProcessGroup, RssMonitor, Server, fmt, fmt_counts,
    fmt_mb, fmt_ms, looping, machine_lines, on_one_server, parse, parser, percentiles, png_bytes, service_lines, statuses,
    table, timed, upload_images, verdict, worker_client,
)  # fmt: skip

RSS_GROWTH_TARGET = 200 * 1000 * 1000  # bytes: peak RSS minus the RSS before the attack, at most 200 MB
HEALTH_P99_TARGET_MS = 100.0
QUICK_ANSWER_S = 1.0  # attacks 2, 5, 6: "4xx quickly"
LOG_GROWTH_TARGET = 1024 * 1024  # attack 8: bytes the server's log may grow by (1 MB, as fmt_mb counts)
CLOSE_SLACK_S = 1.0  # attack 8: a held socket counts as closed in time up to this long after header_timeout_s
FAIR_OTHERS = ("vae", "vae_conv", "vae_context", "vae_mlp_logistic", "vqvae:pixelcnn", "vqvae:gated",
               "vqvae:pixelcnnpp", "vqvae_cifar10:pixelcnn")  # attack 9c: MODEL or MODEL:PRIOR
CONFIG_KEYS = ("resolved_device", "max_batch_size", "max_queue", "request_timeout_s", "max_n", "max_files",
               "max_upload_bytes", "max_pixels", "max_json_bytes", "upload_slots", "header_timeout_s", "max_connections")
HEADERS = ["attack", "statuses", "answers", "peak RSS growth", "RSS", "/health p50/p99/max", "/health", "expected"]


class HealthProber(Poller):
    """GET /health every `interval_s` on a connection of its own, opened first (that probe not counted), in
    a thread: the attack's work in the event loop does not delay it. A failed probe counts with its time."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        super().__init__(interval_s)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.client, self.latencies_ms, self.failures = httpx.Client(base_url=url, timeout=10.0, limits=limits), [], Counter()
        with contextlib.suppress(httpx.HTTPError):
            self.client.get("/health")

    def poll(self) -> None:
        start = time.perf_counter()
        try:
            if (status := self.client.get("/health").status_code) != 200:
                self.failures[str(status)] += 1
        except httpx.HTTPError as err:
            self.failures[type(err).__name__] += 1
        self.latencies_ms.append((time.perf_counter() - start) * 1000)

    def run(self) -> None:
        super().run()
        self.client.close()


@dataclass
class Phase:
    """One measured attack: what the attack saw, and what the server's memory and /health did meanwhile."""

    key: str
    title: str
    lines: list[str] = field(default_factory=list)  # findings beside the summary's columns
    statuses: str = ""
    answers: str = ""
    expected: str | None = None  # what the outcome should be, if stated
    expected_met: bool | None = None
    skipped: str | None = None
    seconds: float = 0.0
    rss: dict[str, int | None] = field(default_factory=dict)  # before, peak, after
    health_ms: list[float] = field(default_factory=list)
    health_failures: Counter[str] = field(default_factory=Counter)

    def expect(self, text: str, met: bool, also: bool = False) -> None:
        """The expected outcome; with `also`, one more part of the outcome already stated."""
        if also and self.expected is not None:
            text, met = f"{self.expected}, {text}", bool(self.expected_met) and met
        self.expected, self.expected_met = text, met

    @property
    def growth(self) -> int | None:
        before, peak = self.rss.get("before"), self.rss.get("peak")
        return None if before is None or peak is None else max(0, peak - before)

    def verdicts(self) -> tuple[bool | None, bool | None, bool | None]:
        """RSS, /health, the expected outcome: met or not (None: not measured or not stated)."""
        p99 = percentiles(self.health_ms, (99,))[0]
        return (None if self.growth is None else self.growth <= RSS_GROWTH_TARGET,
                None if p99 is None else p99 <= HEALTH_P99_TARGET_MS and not self.health_failures, self.expected_met)

    def row(self) -> list[str]:
        if self.skipped:
            return [self.key, f"skipped: {self.skipped}", *["-"] * 6]
        (rss, health, outcome), v = self.verdicts(), lambda met: "-" if met is None else verdict(met)
        failed = f", failed: {fmt_counts(self.health_failures)}" if self.health_failures else ""
        probes = (" / ".join(map(fmt_ms, percentiles(self.health_ms, (50, 99, 100))))
                  + f" ms ({len(self.health_ms)} probes{failed})")
        return [self.key, self.statuses, self.answers, fmt_mb(self.growth), v(rss), probes, v(health),
                "-" if self.expected is None else f"{self.expected}: {v(outcome)}"]

    def report(self) -> str:
        row, rss = self.row(), self.rss
        return f"[{self.key}] {self.title}: skipped ({self.skipped})" if self.skipped else "\n".join(
            [f"[{self.key}] {self.title} ({self.seconds:.1f} s)", *(f"  {line}" for line in self.lines),
             f"  -> {row[1]}; {row[2]}; peak RSS growth {row[3]}: {row[4]} ({fmt_mb(rss.get('before'))} before, "
             f"{fmt_mb(rss.get('after'))} after); /health {row[5]}: {row[6]}; expected {row[7]}"])  # fmt: skip


class ServerDied(Exception):
    """The server's process is gone."""


@dataclass
class Attacks:
    """The server under attack, and the phases measured so far."""

    url: str
    args: argparse.Namespace
    models: list[dict]
    config: dict
    server: Server
    group: ProcessGroup
    phases: list[Phase] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def clients(self, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
        """`count` clients, each connected already (what they send next goes out at once)."""
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(worker_client(self.url)) for _ in range(count)]
            await asyncio.gather(*(c.get("/health") for c in clients))
            yield clients

    def has(self, model: str, prior: str | None = None) -> str | None:
        """None when the server serves `model` (and its `prior`), else why not."""
        entry = next((m for m in self.models if m["name"] == model), None)
        if entry is None:
            return f"model {model!r} is not served"
        if prior is not None and prior not in [p["name"] for p in entry.get("priors") or []]:
            return f"prior {prior!r} is not loaded for {model!r}"
        return None

    def skip(self, key: str, title: str, reason: str) -> None:
        self.phases.append(phase := Phase(key, title, skipped=reason))
        print(phase.report(), flush=True)

    @contextlib.asynccontextmanager
    async def phase(self, key: str, title: str) -> AsyncIterator[Phase]:
        """Measure what runs inside and --linger s after it (the server may still be at work): RSS
        before (after --pause), its peak and after; /health throughout."""
        phase = Phase(key, title)
        await asyncio.sleep(self.args.pause)
        phase.rss["before"] = self.group.settled_rss()
        monitor, prober = RssMonitor(self.group), HealthProber(self.url)
        try:
            with monitor, prober:
                start = time.perf_counter()
                try:
                    yield phase
                finally:
                    phase.seconds = time.perf_counter() - start
                await asyncio.sleep(self.args.linger)
        finally:
            phase.health_ms, phase.health_failures, phase.rss["peak"] = prober.latencies_ms, prober.failures, monitor.peak
            await asyncio.sleep(0.5)
            phase.rss["after"] = self.group.settled_rss()
            self.phases.append(phase)
            print(phase.report(), flush=True)
        if self.server.process is None or self.server.process.poll() is not None:
            raise ServerDied(f"the server died during attack {key}")


def time_range(answers: list[Answer]) -> str:
    ms = sorted(a.seconds * 1000 for a in answers)
    return f"{fmt_ms(ms[0])} ms" if len(ms) == 1 else f"{fmt_ms(ms[0])}-{fmt_ms(ms[-1])} ms"


def spread(answers: list[Answer]) -> str:
    p50, p90, top = percentiles([a.seconds * 1000 for a in answers], (50, 90, 100))
    return f"p50 / p90 / max {fmt_ms(p50)} / {fmt_ms(p90)} / {fmt_ms(top)} ms over {len(answers)} ({statuses(answers)})"


def throughput(loop: Loop, images: int) -> str:
    ok = sum(a.status == 200 for a in loop.answers)
    return f"{fmt(loop.rate(images) or None, '.1f')} images/s ({ok} answers of 200 in {loop.seconds:.1f} s)"


def sample_request(model: str, prior: str | None, n: int) -> MakeRequest:
    """GET /sample of `model` (with `prior`), n images, seed = the request's number."""
    params = {"model": model, "n": n, **({"prior": prior} if prior else {})}
    return lambda client, i: client.build_request("GET", "/sample", params={**params, "seed": i})


def upload_request(path: str, model: str, pngs: list[bytes], name: str = "image.png", **params: str) -> MakeRequest:
    """POST `path`?model=`model` with every one of `pngs` as a file."""
    files = [("file", (name, png, "image/png")) for png in pngs]
    return lambda client, i: client.build_request("POST", path, params={"model": model, **params}, files=files)


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


Judge = Callable[[Phase, list[Answer]], None]


def quickly(*codes: int) -> Judge:
    """Expected: every answer one of `codes`, within QUICK_ANSWER_S."""
    return lambda phase, answers: phase.expect(" or ".join(map(str, codes)) + f" within {QUICK_ANSWER_S:g} s",
                                               all(a.status in codes and a.seconds <= QUICK_ANSWER_S for a in answers))


async def at_once(ctx: Attacks, key: str, title: str, count: int, make: MakeRequest, judge: Judge | None = None,
                  lines: list[str] = ()) -> None:  # fmt: skip
    """`count` clients, each connected first, send make(client, i) at the same time: one phase."""
    async with ctx.clients(count) as clients, ctx.phase(key, title) as phase:
        answers = await asyncio.gather(*(timed(c, make(c, i)) for i, c in enumerate(clients)))
        phase.lines = [*(f"request {i}: {a.show()}" for i, a in enumerate(answers) if a.status != 200), *lines]
        phase.statuses, phase.answers = statuses(answers), time_range(answers)
        if judge is not None:
            judge(phase, answers)


@contextlib.asynccontextmanager
async def beside(ctx: Attacks, key: str, title: str, who: str, make: MakeRequest, limit: float, load, seconds: float,
                 **pacing: float) -> AsyncIterator[tuple[Phase, object]]:  # fmt: skip
    """`who`'s `make` one at a time on the quiet server, then, in phase `key`, for `seconds` (`pacing`: series'
    every_s, pause_s) while `load`, an async context manager, runs; yields (the phase, what `load` gave) once
    the load is over, the phase expecting `who`'s answers all 200 and their p50 at most `limit` x idle."""
    async with worker_client(ctx.url) as client:  # the idle series' first request opens its connection
        idle = (await series(client, make, count=ctx.args.idle_requests + 1, pause_s=pacing.get("pause_s", 0.0)))[1:]
        async with ctx.phase(key, title) as phase:
            async with load as heavy:
                busy = await series(client, make, until=time.perf_counter() + seconds, **pacing)
            p50s = [float(np.median([a.seconds * 1000 for a in x])) if x else None for x in (idle, busy)]
            ratio = p50s[1] / p50s[0] if None not in p50s else None
            phase.lines = [f"{who}, idle: {spread(idle)}", f"{who}, during: {spread(busy)}"]
            phase.statuses = f"{who} {statuses(busy)}"
            phase.answers = f"{who} p50 {fmt_ms(p50s[0])} -> {fmt_ms(p50s[1])} ms ({fmt(ratio, '.1f', 'x')})"
            phase.expect(f"{who} all 200, p50 at most {limit:g}x idle",
                         ratio is not None and ratio <= limit and all(a.status == 200 for a in busy))
            yield phase, heavy


@contextlib.asynccontextmanager
async def looping_here(ctx: Attacks, count: int, make: MakeRequest) -> AsyncIterator[Loop]:
    """harness.looping on `count` clients of this process, each connected first."""
    async with ctx.clients(count) as clients, looping(clients, make) as loop:
        yield loop


Spec = tuple[str, str | None]  # (model, prior)


def _loop_in_a_process(url: str, loopers: list[Spec], n: int, started, stop, results) -> None:
    """In a child process: looping on `loopers` until `stop`; puts [(time.time() at the answer, status, seconds)]."""

    async def main() -> Loop:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(worker_client(url)) for _ in loopers]
            await asyncio.gather(*(c.get("/health") for c in clients))
            makes = {c: sample_request(m, p, n) for c, (m, p) in zip(clients, loopers)}
            async with looping(clients, lambda c, i: makes[c](c, i)) as loop:
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
            return loop

    loop = asyncio.run(main())
    offset = time.time() - time.perf_counter()
    results.put([(at + offset, a.status, a.seconds) for at, a in loop.timed])


@contextlib.asynccontextmanager
async def looping_elsewhere(url: str, loopers: list[Spec], n: int) -> AsyncIterator[Loop]:
    """looping() of /sample n=`n` on each (model, prior) of `loopers`, in a child process (here its work would delay
    the victim's answers on the client side); the Loop yielded is filled when the block ends (time.time())."""
    context = multiprocessing.get_context("spawn")
    started, stop, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_loop_in_a_process, args=(url, loopers, n, started, stop, results), name="loopers",
                            daemon=True)  # fmt: skip
    child.start()
    result = Loop()
    try:
        if not await asyncio.to_thread(started.wait, 60):
            raise RuntimeError("the loopers' process did not start within 60 s")
        result.start = time.time()
        yield result
    finally:
        stop.set()
        timed_answers = await asyncio.to_thread(results.get, True, CLIENT_TIMEOUT_S + 60) if child.is_alive() else []
        await asyncio.to_thread(child.join, 10)
        result.timed = [(at, Answer(status, seconds)) for at, status, seconds in timed_answers]


def rgba_png(side: int) -> bytes:
    """A side x side RGBA PNG, opaque, mostly flat with a grid of lines: compresses ~900x."""
    pixels = np.zeros((side, side, 4), np.uint8)  # (H, W, RGBA)
    pixels[:, :, 3] = 255
    pixels[::64, :, 0], pixels[:, ::64, 1] = 200, 120
    pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4, 2] = 90
    return png_bytes(Image.fromarray(pixels, "RGBA"))


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket to the server, for what httpx will not send (attacks 2, 7, 8)."""
    return await asyncio.open_connection(httpx.URL(url).host, httpx.URL(url).port or 80)


async def attack_bad_batch_mate(ctx: Attacks) -> None:
    title = "ten /sample?model=vqvae&prior=pixelcnn&n=1 and one with temperature=1e-50, at once"
    params = [{"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": i} for i in range(11)]
    params[10]["temperature"] = "1e-50"
    order = params[:5] + [params[10]] + params[5:10]  # the first one starts a pass alone; the rest share the next

    def judge(phase: Phase, answers: list[Answer]) -> None:
        bad, good = answers[5], answers[:5] + answers[6:]
        phase.statuses = f"innocent {statuses(good)}; bad {bad.status}"
        phase.expect("the ten innocent ones 200, the bad one 4xx",
                     all(a.status == 200 for a in good) and 400 <= (bad.status or 0) < 500)

    await at_once(ctx, "1", title, len(order), lambda c, i: c.build_request("GET", "/sample", params=order[i]), judge)


async def attack_big_json(ctx: Attacks) -> None:
    """POST /decode on a plain socket, 1 MiB chunks written while the answer is read (httpx would send it all first);
    then up to `drain_s` s to see whether the server takes the rest or closes the connection."""
    numbers, drain_s = ctx.args.json_numbers, 5.0
    model = "vae_conv" if not ctx.has("vae_conv") else ctx.models[0]["name"]
    body = b'{"model":"' + model.encode() + b'","z":[[' + b"0," * (numbers - 1) + b"0]]}"  # ~2 bytes a number
    mib = len(body) / MB
    for key, chunked in (("2a", True), ("2b", False)):
        title = (f"POST /decode, a JSON body of {numbers:.3g} numbers, {mib:.1f} MiB, "
                 + ("streamed (chunked)" if chunked else "Content-Length declared"))
        async with ctx.phase(key, title) as phase:
            reader, writer = await open_raw(ctx.url)
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
            writer.write(f"POST /decode HTTP/1.1\r\nHost: {httpx.URL(ctx.url).netloc.decode()}\r\nContent-Type: "
                         f"application/json\r\n{framing}\r\n\r\n".encode())  # fmt: skip
            sent, finished, send_error, start = 0, None, None, time.perf_counter()

            async def pump(writer: asyncio.StreamWriter, chunked: bool) -> None:
                nonlocal sent, finished, send_error
                try:
                    for offset in range(0, len(body), MB):
                        piece = memoryview(body)[offset : offset + MB]
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                        await writer.drain()
                        sent += len(piece)
                    writer.write(b"0\r\n\r\n" if chunked else b"")
                    await writer.drain()
                    finished = time.perf_counter() - start
                except OSError as err:  # ConnectionResetError, BrokenPipeError: the server closed it
                    send_error = type(err).__name__

            writing = asyncio.create_task(pump(writer, chunked))
            try:
                async with asyncio.timeout(CLIENT_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    seconds, at_answer = time.perf_counter() - start, sent
                    length = re.search(rb"(?im)^content-length: *(\d+)", head)
                    text = (await reader.readexactly(int(length[1]))).decode(errors="replace") if length else ""
                    answer = Answer(int(head.split()[1]), seconds, text[:160])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(writing), drain_s)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
                answer, at_answer = Answer(None, time.perf_counter() - start, f"{type(err).__name__}: {err}"), sent
            finally:
                writing.cancel()
                writer.close()
            rest = (f"then the server closed the connection: the client could write {sent / MB:.1f} MiB ({send_error})"
                    if send_error else f"then the server took the rest: all {mib:.1f} MiB written by "
                    f"{finished * 1000:.0f} ms" if finished is not None else f"{drain_s:g} s after the answer the "
                    f"connection was open and the client still writing: {sent / MB:.1f} MiB written")  # fmt: skip
            phase.lines = [f"answer: {answer.show()}", f"when the answer came the client had written {at_answer / MB:.1f} "
                           f"of {mib:.1f} MiB (socket buffers hold a few MiB the server has not read); " + rest]
            phase.statuses = str(answer.status or "no answer")
            phase.answers = f"{answer.seconds * 1000:.0f} ms; {at_answer / MB:.0f} MiB written by then, {sent / MB:.0f} in all"
            phase.expect(f"413 within {QUICK_ANSWER_S:g} s, the connection closed before the whole body was taken",
                         answer.status == 413 and answer.seconds <= QUICK_ANSWER_S and finished is None)


async def attack_uploads(ctx: Attacks) -> None:
    args = ctx.args
    side = f"{args.big_side}x{args.big_side}"
    title = f"{args.big_requests} concurrent /reconstruct?model=vae_conv, {args.big_files} {side} RGBA PNGs each"
    big, max_pixels = rgba_png(args.big_side), int(ctx.config.get("max_pixels", 0))
    notes = [f"note: {side} is over the server's max_pixels ({max_pixels}); --big-side {math.isqrt(max_pixels)} sends "
             "the largest it accepts"] if max_pixels and args.big_side**2 > max_pixels else []
    await at_once(ctx, "3a", title + f" ({len(big) / 1024:.0f} KiB each)", args.big_requests,
                  upload_request("/reconstruct", "vae_conv", [big] * args.big_files, "big.png"), lines=notes)
    count, medium = args.medium_files or int(ctx.config.get("max_files", 64)), rgba_png(args.medium_side)
    title = (f"one /reconstruct?model=vae_conv with {count} {args.medium_side}x{args.medium_side} RGBA PNGs "
             f"({len(medium) / 1024:.0f} KiB each)")
    await at_once(ctx, "3b", title, 1, upload_request("/reconstruct", "vae_conv", [medium] * count, "medium.png"))


async def cancelled(client: httpx.AsyncClient) -> float:
    """The /sample requests the server has counted as cancelled by their client (status 499) so far."""
    text = (await client.get("/metrics")).raise_for_status().text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_total")
               and f.name.startswith("genserve_requests") and s.labels.get("endpoint") == "/sample"
               and s.labels.get("status") == "499")  # fmt: skip


async def attack_disconnect(ctx: Attacks) -> None:
    args = ctx.args
    key, title = "4", f"/sample?model=vqvae&prior=pixelcnnpp&n={args.abandon_n} abandoned after 0.3 s"
    probe = sample_request("vqvae", "pixelcnnpp", 1)
    async with worker_client(ctx.url) as client:
        idle = await series(client, probe, count=6)  # the first one warms up
        if failed := next((a for a in idle if a.status != 200), None):
            return ctx.skip(key, title, f"the probe request failed on the idle server: {failed.show()}")
        idle_s, before = float(np.median([a.seconds for a in idle[1:]])), await cancelled(client)
        async with ctx.phase(key, title) as phase:
            start = time.perf_counter()
            async with worker_client(ctx.url) as abandoned:
                try:
                    response = await asyncio.wait_for(abandoned.send(sample_request(
                        "vqvae", "pixelcnnpp", args.abandon_n)(abandoned, 0)), 0.3)  # fmt: skip
                    outcome = f"answered {response.status_code} after {(time.perf_counter() - start) * 1000:.0f} ms"
                except TimeoutError:
                    outcome = f"abandoned after {(time.perf_counter() - start) * 1000:.0f} ms (connection closed)"
                except httpx.HTTPError as err:
                    outcome = f"failed before it could be abandoned: {type(err).__name__}: {err}"
            gone, probes, busy_s = time.perf_counter(), [], None
            while time.perf_counter() - gone < 60 and busy_s is None:
                probes.append(answer := await timed(client, probe(client, 100 + len(probes))))
                busy_s = time.perf_counter() - gone if answer.status == 200 and answer.seconds < 2 * idle_s else None
            counted = await cancelled(client) - before
            phase.lines = [f"idle latency of n=1: {idle_s * 1000:.0f} ms (median of 5); the n={args.abandon_n} request: "
                           f"{outcome}; {len(probes)} probes (n=1, one after another) until one answered in under 2x "
                           "the idle latency"]  # fmt: skip
            phase.statuses = f"counted as cancelled (status 499): {counted:g}"
            phase.answers = f"busy {busy_s:.2f} s after" if busy_s is not None else "busy > 60 s"


async def attack_strings(ctx: Attacks) -> None:
    args = ctx.args
    limit = int(ctx.config["max_json_bytes"])
    for key, model, name, depth, item in (("5a", "vae_mlp", "z", 2, '""'), ("5b", "vqvae", "codes", 3, '"x"')):
        head, tail = f'{{"model":"{model}","{name}":' + "[" * depth, "]" * depth + "}"
        count = (limit - len(head) - len(tail) + 1) // (len(item) + 1)  # as many items as fit in `limit` bytes
        body = (head + ",".join([item] * count) + tail).encode()
        title = (f"{args.strings_requests} concurrent POST /decode of {model!r} with {name} a list of {count:,} "
                 f"strings {item} ({len(body):,} bytes)")
        json_type = {"Content-Type": "application/json"}
        make: MakeRequest = lambda c, i, body=body: c.build_request("POST", "/decode", content=body, headers=json_type)
        await at_once(ctx, key, title, args.strings_requests, make, quickly(422))


@functools.cache
def ico_bomb(side: int) -> tuple[bytes, str]:
    """An ICO saying 16x16 that holds a mostly flat `side` x `side` RGBA PNG (12000^2: 576 MB of pixels in ~0.57 MiB),
    and what it is, checked with Pillow's Image.open, which decodes the PNG: the bomb itself."""
    image = Image.new("RGBA", (side, side), (30, 60, 90, 255))
    image.paste((200, 0, 0, 255), (side // 4, side // 4, side // 2, side // 2))
    png = png_bytes(image)
    del image
    icondir = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 (icon), one image
    ico = icondir + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16) + png  # 16x16, 32 bpp, its size, offset
    with warnings.catch_warnings(action="ignore"), Image.open(io.BytesIO(ico)) as opened:  # DecompressionBombWarning & co
        if opened.format != "ICO":
            raise RuntimeError(f"the ICO bomb opens as {opened.format}, not ICO")
        return ico, (f"the ICO: {len(ico) / MB:.2f} MiB, its PNG {len(png) / MB:.2f} MiB, {side * side * 4 / 1e6:.0f} MB "
                     f"of RGBA pixels; its directory says 16x16, Pillow opens it as an ICO of {opened.size[0]}x{opened.size[1]}")


async def attack_ico_bomb(ctx: Attacks) -> None:
    args = ctx.args
    title = (f"{args.bomb_requests} concurrent /reconstruct?model=vae_conv of a 16x16 ICO holding a "
             f"{args.bomb_side}x{args.bomb_side} RGBA PNG")
    loops_title = (f"{args.bomb_loopers} clients looping on the ICO bomb for {args.bomb_loops:g} s, an innocent "
                   "/reconstruct?model=vae_conv (one 28x28 PNG) one at a time")
    ico, made = ico_bomb(args.bomb_side)
    bomb = upload_request("/reconstruct", "vae_conv", [ico], "bomb.ico")
    await at_once(ctx, "6a", title + f" ({len(ico) / MB:.2f} MiB)", args.bomb_requests, bomb, quickly(400, 413), [made])
    innocent = upload_request("/reconstruct", "vae_conv", upload_images(1, 0)[0])
    async with beside(ctx, "6b", loops_title, "innocent", innocent, 2.0, looping_here(ctx, args.bomb_loopers, bomb),
                      args.bomb_loops) as (phase, bombs):  # fmt: skip
        phase.lines.append(f"bombs: {spread(bombs.answers)}")
        phase.statuses += f"; bombs {statuses(bombs.answers)}"
        phase.expect("the bombs 4xx", all(400 <= (a.status or 0) < 500 for a in bombs.answers), also=True)


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
                self.answered_s, self.status = time.perf_counter() - self.opened, int(line.split()[1])
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
        what = (f"{self.status} after {self.answered_s:.1f} s" if self.status is not None else "no answer" if
                self.closed_s is None else f"closed without an answer after {self.closed_s:.1f} s")  # fmt: skip
        return f"{what} ({self.sent} bytes of body sent)"


@contextlib.asynccontextmanager
async def trickling(url: str, head: bytes, count: int, data: bytes) -> AsyncIterator[list[Held]]:
    """`count` connections sending `head`, then a byte of `data` each a second while the block runs."""
    held = await asyncio.gather(*(Held.open(url, head) for _ in range(count)))

    async def trickle() -> None:
        for k in itertools.count():
            await asyncio.gather(*(h.send(data[k % len(data) : k % len(data) + 1]) for h in held if h.closed_s is None))
            await asyncio.sleep(1.0)

    task = asyncio.create_task(trickle())
    try:
        yield held
    finally:
        task.cancel()
        for h in held:
            h.release()


async def attack_slow_uploads(ctx: Attacks) -> None:
    args, config = ctx.args, ctx.config
    count = int(config["upload_slots"]) + 1
    title = (f"{count} POST /reconstruct?model=vae_conv declaring 100,000 bytes and sending 1 a second, "
             f"for {args.slow_duration:g} s; an innocent /reconstruct once a second")
    png, boundary = upload_images(1, 0)[0][0], "genserve-slow-upload"
    head = (f"POST /reconstruct?model=vae_conv HTTP/1.1\r\nHost: {httpx.URL(ctx.url).netloc.decode()}\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="slow.png"\r\nContent-Type: image/png\r\n\r\n').encode()
    async with beside(ctx, "7", title, "innocent", upload_request("/reconstruct", "vae_conv", [png]), 2.0,
                      trickling(ctx.url, head, count, png), args.slow_duration, every_s=1.0) as (phase, held):
        phase.lines += [f"attacker {i}: {h.show()}" for i, h in enumerate(held)]
        phase.statuses += "; attackers " + fmt_counts(Counter("no answer" if h.status is None else str(h.status) for h in held))


def rlimit_nofile(pid: int | str = "self") -> str:
    """The soft and hard RLIMIT_NOFILE of process `pid` (this one by default)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return "{} soft, {} hard".format(*line.split()[3:5])
    return "unknown"


async def attack_idle_connections(ctx: Attacks) -> None:
    args, pid, header_timeout = ctx.args, ctx.group.pid, ctx.config.get("header_timeout_s")
    title = (f"{args.idle_conns} connections sending the start of GET /health's headers and no more, held "
             f"{args.idle_hold:g} s; GET /health on a fresh connection every second")
    log_start = ctx.server.log_path.stat().st_size
    head = f"GET /health HTTP/1.1\r\nHost: {httpx.URL(ctx.url).host}\r\n".encode()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)  # every request on a new connection
    async with httpx.AsyncClient(base_url=ctx.url, timeout=5.0, limits=limits) as fresh, ctx.phase("8", title) as phase:
        start, opening = time.perf_counter(), asyncio.Semaphore(64)

        async def hold() -> Held | str:
            async with opening:
                try:
                    return await asyncio.wait_for(Held.open(ctx.url, head), 10.0)
                except (OSError, TimeoutError) as err:
                    return type(err).__name__

        tries = await asyncio.gather(*(hold() for _ in range(args.idle_conns)))
        held, failed = [h for h in tries if isinstance(h, Held)], Counter(h for h in tries if isinstance(h, str))
        opened_s = time.perf_counter() - start
        try:
            probes = await series(fresh, lambda c, i: c.build_request("GET", "/health"), until=start + args.idle_hold,
                                  every_s=1.0)  # fmt: skip
        finally:
            for h in held:
                h.release()
        await asyncio.sleep(1.0)  # what the server logs as they close
        with open(ctx.server.log_path, "rb") as log:
            log.seek(log_start)
            emfile = sum(b"Too many open files" in line for line in log)
            grown = log.tell() - log_start
        closed = sorted(h.closed_s for h in held if h.closed_s is not None)
        answers = Counter(str(h.status) for h in held if h.status is not None)
        phase.lines = [
            f"server RLIMIT_NOFILE: {rlimit_nofile(pid)}; this client's: {rlimit_nofile()}; GET /config "
            f"header_timeout_s: {header_timeout}; {len(held)} of {args.idle_conns} connections opened in {opened_s:.1f} s"
            + (f" (failed: {fmt_counts(failed)})" if failed else ""),
            f"closed by the server: {len(closed)} of {len(held)}"
            + (f", after {closed[0]:.1f} s (first), {np.median(closed):.1f} s (median), {closed[-1]:.1f} s (last)"
               if closed else "") + (f"; answers on them: {fmt_counts(answers)}" if answers else ""),
            f"GET /health on a fresh connection every second: {spread(probes)}",
            *(f"fresh probe {i}: {a.show()}" for i, a in enumerate(probes) if a.status != 200),
            f"server log grew by {fmt_mb(grown)}, {emfile} lines saying 'Too many open files'",
        ]  # fmt: skip
        phase.statuses = f"closed by server {len(closed)}/{len(held)}; fresh /health {statuses(probes)}"
        phase.answers = f"log +{fmt_mb(grown)}"
        phase.expect(f"fresh /health all 200, log growth < {fmt_mb(LOG_GROWTH_TARGET)}",
                     bool(probes) and all(a.status == 200 for a in probes) and grown < LOG_GROWTH_TARGET)
        if header_timeout is not None and args.idle_hold < float(header_timeout) + CLOSE_SLACK_S:
            phase.lines.append(f"not judged: which held sockets the server closes within header_timeout_s "
                               f"+{CLOSE_SLACK_S:g} s (--idle-hold is shorter)")  # fmt: skip
        elif header_timeout is not None:
            deadline = float(header_timeout) + CLOSE_SLACK_S
            phase.expect(f"held sockets closed within header_timeout_s +{CLOSE_SLACK_S:g} s",
                         all(h.closed_s is not None and h.closed_s <= deadline for h in held), also=True)


async def attack_fairness(ctx: Attacks) -> None:
    args = ctx.args
    others = [(m, p or None) for m, _, p in (s.partition(":") for s in args.fair_others)]
    cases = [("9a", [("vqvae", "gated")] * args.fair_loopers, ("vqvae", "gated"), 3.0, []),
             ("9b", [("vqvae_cifar10", "pixelcnnpp")] * args.fair_loopers, ("vqvae_cifar10", "pixelcnnpp"), 3.0, []),
             ("9c", [o for o in others if not ctx.has(*o)], ("vae_mlp", None), 2.0,
              [f"--fair-others left out: {ctx.has(*o)}" for o in others if ctx.has(*o)]),
             ("9d", [("vae", None)] * 4, ("vae_conv", None), 2.0, [])]  # a cheap model beside the autoregressive one
    for key, loopers, victim, limit, notes in cases:
        names = Counter(f"{m}:{p}" if p else m for m, p in loopers)
        title = (", ".join(f"{k} x{n}" if n > 1 else k for k, n in names.items()) + f" looping on /sample n={args.fair_n}; "
                 f"the victim /sample?model={victim[0]}" + (f"&prior={victim[1]}" if victim[1] else "") + "&n=1")
        if reason := next(filter(None, (ctx.has(m, p) for m, p in [victim, *loopers])), None) or (not loopers and "no looper"):
            ctx.skip(key, title, reason)
            continue
        async with beside(ctx, key, title, "victim", sample_request(*victim, 1), limit,
                          looping_elsewhere(ctx.url, loopers, args.fair_n), args.fair_duration,
                          pause_s=0.05) as (phase, heavy):  # fmt: skip
            rate = throughput(heavy, args.fair_n)
            phase.lines += [f"loopers: {rate}, {spread(heavy.answers)}", *notes]
            phase.statuses += f"; loopers {statuses(heavy.answers)}"
            phase.answers += f"; loopers {rate.split(' (')[0]}"


async def attack_large_answers(ctx: Attacks) -> None:
    args = ctx.args
    model, files = "vqvae_cifar10", int(ctx.config["max_files"])
    title = (f"{args.encode_clients} clients looping on /encode?model={model}&include_z_e=true with {files} 28x28 PNGs "
             f"for {args.encode_duration:g} s")
    encode = upload_request("/encode", model, upload_images(files, 0)[0], include_z_e="true")
    async with ctx.phase("10", title) as phase:
        async with looping_here(ctx, args.encode_clients, encode) as encodes:
            await asyncio.sleep(args.encode_duration)
        answers, sizes = encodes.answers, [a.size for a in encodes.answers if a.status == 200]
        phase.lines = [f"answers: {spread(answers)}; {throughput(encodes, files)}",
                       f"answer size: {fmt_mb(float(np.median(sizes))) if sizes else '-'} (median)"]
        phase.statuses, phase.answers = statuses(answers), time_range(answers)
        phase.expect("every answer 200", bool(answers) and all(a.status == 200 for a in answers))


RUNNERS = {  # number -> (the attack, the models (and priors) it needs; 9 checks its cases itself)
    1: (attack_bad_batch_mate, [("vqvae", "pixelcnn")]), 2: (attack_big_json, []), 3: (attack_uploads, [("vae_conv", None)]),
    4: (attack_disconnect, [("vqvae", "pixelcnnpp")]), 5: (attack_strings, [("vae_mlp", None), ("vqvae", None)]),
    6: (attack_ico_bomb, [("vae_conv", None)]), 7: (attack_slow_uploads, [("vae_conv", None)]),
    8: (attack_idle_connections, []), 9: (attack_fairness, []), 10: (attack_large_answers, [("vqvae_cifar10", None)]),
}


def at_least(name: str, kind: type, low: float, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a number at least (or above) `low`; argparse says "invalid <name> value" otherwise."""

    def value(text: str) -> float:
        if float(text) < low or (above and float(text) == low):
            raise ValueError(text)
        return kind(float(text))

    value.__name__ = name
    return value


COUNT, SECONDS, NON_NEGATIVE = at_least("count", int, 1), at_least("positive", float, 0, True), at_least("non-negative", float, 0)
OPTIONS = {  # group -> (option, type, default, help); "(default ...)" is added unless the default is None
    "every attack": [("--pause", NON_NEGATIVE, 1.0, "seconds of quiet before each attack"),
                     ("--linger", NON_NEGATIVE, 1.0, "seconds measured after an attack's last answer"),
                     ("--idle-requests", COUNT, 10, "6b, 7, 9: requests timed on the idle server")],
    "attack 2": [("--json-numbers", COUNT, 50_000_000, "numbers in the body")],
    "attack 3": [("--big-requests", COUNT, 6, "3a: concurrent requests"), ("--big-files", COUNT, 4, "3a: files per request"),
                 ("--big-side", COUNT, 4096, "3a: image side in pixels"),
                 ("--medium-files", COUNT, None, "3b: files (default: the server's max_files)"),
                 ("--medium-side", COUNT, 1024, "3b: image side in pixels")],
    "attack 4": [("--abandon-n", COUNT, 256, "n of the abandoned /sample")],
    "attack 5": [("--strings-requests", COUNT, 2, "concurrent requests")],
    "attack 6": [("--bomb-side", COUNT, 12000, "the embedded PNG's side"),
                 ("--bomb-requests", COUNT, 4, "6a: concurrent requests"),
                 ("--bomb-loopers", COUNT, 3, "6b: clients looping on the bomb"),
                 ("--bomb-loops", SECONDS, 10.0, "6b: seconds of looping")],
    "attack 7": [("--slow-duration", SECONDS, 35.0, "seconds of trickling (past request_timeout_s)")],
    "attack 8": [("--idle-conns", COUNT, 1050, "connections held"), ("--idle-hold", SECONDS, 40.0, "seconds they are held"),
                 ("--server-nofile", at_least("non-negative", int, 0), 1024,
                  "the soft RLIMIT_NOFILE of the server (0: this shell's)")],
    "attack 9": [("--fair-loopers", COUNT, 8, "9a, 9b: looping clients"), ("--fair-n", COUNT, 256, "n of each looping /sample"),
                 ("--fair-duration", SECONDS, 15.0, "seconds the victim is measured, per case")],
    "attack 10": [("--encode-clients", COUNT, 4, "looping clients"), ("--encode-duration", SECONDS, 15.0, "seconds of looping")],
}  # fmt: skip


def parse_args(argv: list[str] | None):
    p = parser(__doc__, "attacks", env="GENSERVE_DECODE_SLOTS=1")
    p.add_argument("--attacks", type=int, nargs="+", choices=list(RUNNERS), default=list(RUNNERS), metavar="N",
                   help="which (default: all of 1-10)")
    groups = {group: p.add_argument_group(group).add_argument for group in OPTIONS}
    for group, options in OPTIONS.items():
        for name, kind, default, text in options:
            groups[group](name, type=kind, default=default, help=text if default is None else f"{text} (default %(default)s)")
    groups["attack 9"]("--fair-others", nargs="+", default=list(FAIR_OTHERS), metavar="MODEL[:PRIOR]",
                       help=f"9c: one looper each (default {' '.join(FAIR_OTHERS)})")
    args = parse(p, argv)
    args.attacks = sorted(set(args.attacks))
    return args


async def run(args, server: Server) -> int:
    models, config, group = server.get_json("/models"), server.get_json("/config"), server.group
    limit = f" (started with a soft limit of {args.server_nofile}: --server-nofile)" if args.server_nofile else ""
    print("\n".join([*machine_lines(), *service_lines(args.env, config, models, CONFIG_KEYS),
                     f"targets per attack: peak RSS growth <= {RSS_GROWTH_TARGET / 1e6:.0f} MB (VmRSS of the server's "
                     f"process group every 10 ms); GET /health every 20 ms on its own connection: p99 <= "
                     f"{HEALTH_P99_TARGET_MS:g} ms, all answered", f"server RLIMIT_NOFILE: {rlimit_nofile(group.pid)}{limit}"]),
          flush=True)  # fmt: skip
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # attack 8's many sockets: the server, not we, is the limit
    ctx, notes = Attacks(server.url, args, models, config, server, group), []
    try:
        for number in args.attacks:
            print(flush=True)
            attack, needs = RUNNERS[number]
            if reason := next(filter(None, (ctx.has(*need) for need in needs)), None):
                ctx.skip(str(number), attack.__name__.removeprefix("attack_").replace("_", " "), reason)
            else:
                await attack(ctx)
    except ServerDied as err:
        notes.append(str(err))
        print(f"\n{err}:\n{server.log_tail()}", flush=True)
    notes += [f"server log: {line}" for line in server.log_errors(10)]
    judged = [[v for p in ctx.phases if not p.skipped and (v := p.verdicts()[i]) is not None] for i in range(3)]
    print("\nsummary (the attacks' titles above):\n" + table(HEADERS, [p.row() for p in ctx.phases]) + "\n\n" + "; ".join(
        f"{what} " + (f"MISSED by {j.count(False)} of {len(j)}" if j else "not measured") for what, j in
        zip(("RSS target", "/health target", "expected outcome (where stated)"), judged)))  # fmt: skip
    print("".join(f"  {note}\n" for note in notes), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.server_nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.server_nofile, hard), hard))  # the server inherits it
    return on_one_server(args, run)


if __name__ == "__main__":
    sys.exit(main())
