"""Attacks on the real server: what each costs in memory, and whether /health stays quick meanwhile.

Starts the service (`python -m app` on a free port in its own process group, with --env; or uses
--url) and runs each attack in turn, --pause s apart. During each one a thread polls the server's
RSS every 10 ms (VmRSS summed over its process group) and another sends GET /health every 20 ms on a
connection of its own, both until --linger s after the attack's last answer. Per attack: statuses
and answer times, peak RSS minus the RSS just before, /health p50/p99/max, and "met"/"MISSED"
against the targets: peak RSS growth at most 200 MB, /health p99 at most 100 ms (every probe
answered), and each attack's expected outcome. Where an innocent request or a victim is compared
with itself on the quiet server, its idle latency is --idle-requests of it one at a time just
before (after one that warms up), and the target is on the ratio of p50s, all answers 200.

    1   10 concurrent /sample?model=vqvae&prior=pixelcnn&n=1, one more with temperature=1e-50: the ten 200, it 4xx
    2a  POST /decode of --json-numbers numbers (5e7: ~95 MiB), chunked, on a socket written and read at
        once: 413 within 1 s, the connection closed before the whole body was taken (reported: MiB written
        by the answer, and whether the server closed the connection or took the rest)
    2b  the same with Content-Length declared
    3a  --big-requests concurrent /reconstruct?model=vae_conv of --big-files --big-side RGBA PNGs (mostly flat)
    3b  one /reconstruct?model=vae_conv of max_files (GET /config) --medium-side RGBA PNGs
    4   /sample?model=vqvae&prior=pixelcnnpp&n=--abandon-n abandoned after --abandon-after s: counted as
        cancelled in /metrics (status="499", or a metric named cancel/disconnect/abandon), and how long the
        server stayed busy (until an n=1 probe answers in under 2x its idle latency)
    5a  --strings-requests concurrent /decode of {"model": "vae_mlp", "z": [["", "", ...]]} filling
        max_json_bytes (--strings-bytes): 422 within 1 s
    5b  the same with {"model": "vqvae", "codes": [[["x", ...]]]}
    6a  --bomb-requests concurrent /reconstruct?model=vae_conv of a 16x16 ICO holding a --bomb-side RGBA
        PNG (~0.57 MiB): 400 or 413 within 1 s
    6b  --bomb-loopers clients looping on it for --bomb-loops s while an innocent 28x28 /reconstruct goes one
        at a time: the bombs 4xx, the innocent p50 at most 2x idle
    7   --slow-clients (upload_slots + 1) sockets declaring a --slow-length multipart /reconstruct and
        sending 1 byte a second for --slow-duration s; an innocent /reconstruct once a second: at most 2x
        idle (reported: what each attacker got and when)
    8   --idle-conns sockets sending the start of GET /health's headers and never the end, held --idle-hold s
        (the server started with a soft RLIMIT_NOFILE of --server-nofile); GET /health on a fresh connection
        every second: all 200, the log growing under 1 MB, and (where GET /config has header_timeout_s and
        --idle-hold outlasts it) every held socket closed by the server within it + 1 s
    9a  --fair-loopers clients looping on /sample?model=vqvae&prior=gated&n=--fair-n (in a process of their
        own) for --fair-duration s, a victim sending the same with n=1 one at a time, --victim-pause s
        apart: the victim's p50 at most 3x idle (and the loopers' images/s)
    9b  the same on vqvae_cifar10 with pixelcnnpp (3x)
    9c  one looper on each of --fair-others, the victim /sample?model=vae_mlp&n=1 (2x)
    10  --encode-clients looping on /encode?model=--encode-model&include_z_e=true with max_files PNGs
        (~5 MB of JSON back) for --encode-duration s: every answer 200

    python -m benchmarks.attacks                                 # every attack (several minutes)
    python -m benchmarks.attacks --attacks 5 6 7 8 9 10 --markdown /tmp/attacks.md
    python -m benchmarks.attacks --json-numbers 5e6 --big-requests 2 --medium-files 16 --attacks 1 2 3 4   # smoke run
    python -m benchmarks.attacks --attacks 5 6 7 8 9 10 --pause 0.5 --linger 0.5 --idle-requests 3 \\
        --bomb-requests 2 --bomb-loopers 1 --bomb-loops 3 --slow-duration 5 --idle-hold 12 \\
        --fair-loopers 2 --fair-n 64 --fair-duration 2 --encode-duration 2   # smoke run of 5-10
    python -m benchmarks.attacks --url http://127.0.0.1:8000 --pid 12345 --server-log /tmp/server.log --attacks 8
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
import struct
import sys
import threading
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
    CLIENT_TIMEOUT_S, MB, Answer, Loop, MakeRequest, Poller, ProcessGroup, RssMonitor, Server, Slowdown, bullets,
    service_lines,
    fmt_counts, fmt_mb, fmt_ms, looping, machine_lines, parse, parser, percentiles, png_bytes, sample_request, series,
    serving, spread, statuses, stop_on_sigterm, table, timed, upload_images, verdict, worker_client, write_markdown,
)  # fmt: skip

RSS_GROWTH_TARGET = 200 * 1000 * 1000  # bytes: peak RSS minus the RSS before the attack, at most 200 MB
HEALTH_P99_TARGET_MS = 100.0
QUICK_ANSWER_S = 1.0  # attacks 2, 5, 6: "4xx quickly"
LOG_GROWTH_TARGET = 1024 * 1024  # attack 8: bytes the server's log may grow by (1 MB, as fmt_mb counts)
CLOSE_SLACK_S = 1.0  # attack 8: a held socket counts as closed in time up to this long after header_timeout_s
FAIR_OTHERS = ("vae", "vae_conv", "vae_context", "vae_mlp_logistic", "vqvae:pixelcnn", "vqvae:gated",
               "vqvae:pixelcnnpp", "vqvae_cifar10:pixelcnn")  # attack 9c: MODEL or MODEL:PRIOR
CANCEL_WORDS = re.compile(r"cancel|disconnect|abandon", re.IGNORECASE)
CONFIG_KEYS = ("resolved_device", "max_batch_size", "max_queue", "request_timeout_s", "max_n", "max_files",
               "max_upload_bytes", "max_pixels", "max_json_bytes", "upload_slots", "header_timeout_s", "max_connections")
HEADERS = ["attack", "what", "statuses", "answers", "peak RSS growth", "RSS target", "/health p50/p99/max",
           "/health target", "expected", "RSS before"]
TEXT_COLUMNS = [0, 2, 3, 4, 5, 6, 7, 8]  # the printed summary leaves out the long titles


class HealthProber(Poller):
    """GET /health every `interval_s` on a connection of its own, in a thread (the attack's work in the
    event loop does not delay it). A probe that fails counts with the time it took."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        super().__init__(interval_s)
        self.url, self.latencies_ms, self.failures = url, [], Counter()
        self.ready = threading.Event()  # set once the connection is open

    def run(self) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(base_url=self.url, timeout=10.0, limits=limits) as client:
            with contextlib.suppress(httpx.HTTPError):
                client.get("/health")  # open the connection: not counted
            self.ready.set()
            next_at = time.perf_counter()
            while not self.stopping.is_set():
                start = time.perf_counter()
                try:
                    if (status := client.get("/health").status_code) != 200:
                        self.failures[str(status)] += 1
                except httpx.HTTPError as err:
                    self.failures[type(err).__name__] += 1
                self.latencies_ms.append((time.perf_counter() - start) * 1000)
                next_at = max(next_at + self.interval_s, time.perf_counter())
                self.stopping.wait(next_at - time.perf_counter())


@dataclass
class Phase:
    """One measured attack: what the attack saw, and what the server's memory and /health did meanwhile."""

    key: str
    title: str
    lines: list[str] = field(default_factory=list)  # statuses, answer times, findings
    statuses: str = ""  # for the summary table
    answers: str = ""
    expected: str | None = None  # what the outcome should be, if stated
    expected_met: bool | None = None
    skipped: str | None = None
    seconds: float = 0.0
    rss: dict[str, int | None] = field(default_factory=dict)  # before, peak, after
    health_ms: list[float] = field(default_factory=list)
    health_failures: Counter[str] = field(default_factory=Counter)

    def expect(self, text: str, met: bool) -> None:
        self.expected, self.expected_met = text, met

    @property
    def growth(self) -> int | None:
        before, peak = self.rss.get("before"), self.rss.get("peak")
        return None if before is None or peak is None else max(0, peak - before)

    def rss_met(self) -> bool | None:
        return None if self.growth is None else self.growth <= RSS_GROWTH_TARGET

    def health_met(self) -> bool | None:
        return None if not self.health_ms else (percentiles(self.health_ms, (99,))[0] <= HEALTH_P99_TARGET_MS
                                                and not self.health_failures)  # type: ignore[operator]  # fmt: skip

    def health_text(self) -> str:
        if not self.health_ms:
            return "no probes"
        failed = f", failed: {fmt_counts(self.health_failures)}" if self.health_failures else ""
        p50_p99_max = " / ".join(map(fmt_ms, percentiles(self.health_ms, (50, 99, 100))))
        return f"{p50_p99_max} ms ({len(self.health_ms)} probes{failed})"

    def report(self) -> list[str]:
        if self.skipped:
            return [f"[{self.key}] {self.title}: skipped ({self.skipped})"]
        out = [f"[{self.key}] {self.title} ({self.seconds:.1f} s)", *(f"  {line}" for line in self.lines)]
        if self.expected is not None:
            out.append(f"  expected: {self.expected}: {verdict(bool(self.expected_met))}")
        out.append("  server RSS: not measured (no server process: give --pid with --url)" if self.growth is None else
                   f"  server RSS: {fmt_mb(self.rss['before'])} before, peak growth {fmt_mb(self.growth)} (target <= "
                   f"{RSS_GROWTH_TARGET / 1e6:.0f} MB): {verdict(bool(self.rss_met()))}; {fmt_mb(self.rss['after'])} after")
        met = self.health_met()
        out.append(f"  GET /health p50 / p99 / max: {self.health_text()} (target p99 <= {HEALTH_P99_TARGET_MS:g} ms, "
                   f"all answered): {'-' if met is None else verdict(met)}")  # fmt: skip
        return out

    def row(self) -> list[str]:
        if self.skipped:
            return [self.key, self.title, f"skipped: {self.skipped}", *["-"] * 7]
        v = lambda met: "-" if met is None else verdict(met)
        return [self.key, self.title, self.statuses, self.answers, fmt_mb(self.growth), v(self.rss_met()),
                self.health_text(), v(self.health_met()),
                "-" if self.expected is None else f"{self.expected}: {v(self.expected_met)}", fmt_mb(self.rss.get("before"))]


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
    group: ProcessGroup | None
    phases: list[Phase] = field(default_factory=list)

    def client(self) -> httpx.AsyncClient:
        return worker_client(self.url, self.args.timeout)

    async def clients(self, stack: contextlib.AsyncExitStack, count: int) -> list[httpx.AsyncClient]:
        """`count` clients closed with `stack`, each connected already (what they send next goes out at once)."""
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
        self.phases.append(phase := Phase(key, title, skipped=reason))
        print("\n".join(phase.report()), flush=True)

    @contextlib.asynccontextmanager
    async def phase(self, key: str, title: str) -> AsyncIterator[Phase]:
        """Measure what runs inside and --linger s after it (the server may still be at work): RSS
        before (after --pause), its peak and after; /health throughout."""
        phase, args = Phase(key, title), self.args
        await asyncio.sleep(args.pause)
        phase.rss["before"] = self.group.settled_rss() if self.group else None
        monitor, prober = RssMonitor(self.group) if self.group else contextlib.nullcontext(), HealthProber(self.url)
        try:
            with monitor, prober:
                await asyncio.to_thread(prober.ready.wait, 10)
                start = time.perf_counter()
                try:
                    yield phase
                finally:
                    phase.seconds = time.perf_counter() - start
                await asyncio.sleep(args.linger)
        finally:
            phase.health_ms, phase.health_failures = prober.latencies_ms, prober.failures
            if self.group:
                phase.rss["peak"] = monitor.peak  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
                phase.rss["after"] = self.group.settled_rss()
            self.phases.append(phase)
            print("\n".join(phase.report()), flush=True)
        alive = self.server.process.poll() is None if self.server and self.server.process else None
        if alive is None:
            with contextlib.suppress(httpx.HTTPError):
                alive = httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        if not alive:
            raise ServerDied(f"the server died during attack {key}")


# -- helpers ---------------------------------------------------------------------------------------


def time_range(answers: list[Answer]) -> str:
    ms = sorted(a.seconds * 1000 for a in answers)
    return f"{fmt_ms(ms[0])} ms" if len(ms) == 1 else f"{fmt_ms(ms[0])}-{fmt_ms(ms[-1])} ms"


def rgba_png(side: int) -> bytes:
    """A side x side RGBA PNG, opaque, mostly flat with a grid of lines: compresses ~900x."""
    pixels = np.zeros((side, side, 4), np.uint8)  # (H, W, RGBA)
    pixels[:, :, 3] = 255
    pixels[::64, :, 0], pixels[:, ::64, 1] = 200, 120
    pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4, 2] = 90
    return png_bytes(Image.fromarray(pixels, "RGBA"))


def upload_request(path: str, model: str, pngs: list[bytes], name: str = "image.png", **params: str) -> MakeRequest:
    """POST `path`?model=`model` with every one of `pngs` as a file."""
    files = [("file", (name, png, "image/png")) for png in pngs]
    return lambda client, i: client.build_request("POST", path, params={"model": model, **params}, files=files)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket to the server, for what httpx will not send (attacks 2, 7, 8)."""
    return await asyncio.open_connection(httpx.URL(url).host, httpx.URL(url).port or 80)


async def at_once(ctx: Attacks, key: str, title: str, count: int, make: MakeRequest,
                  expected: tuple[str, Callable[[list[Answer]], bool]] | None = None, notes: list[str] = ()) -> None:
    """`count` clients, each connected first, send make(client, i) at the same time: one phase."""
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, count)
        async with ctx.phase(key, title) as phase:
            answers = await asyncio.gather(*(timed(c, make(c, i)) for i, c in enumerate(clients)))
            phase.lines = [f"statuses: {statuses(answers)}; answered in {time_range(answers)}",
                           *(f"request {i}: {a.show()}" for i, a in enumerate(answers) if a.status != 200), *notes]
            phase.statuses, phase.answers = statuses(answers), time_range(answers)
            if expected is not None:
                phase.expect(expected[0], expected[1](answers))


def quickly(*codes: int) -> tuple[str, Callable[[list[Answer]], bool]]:
    """Expected: every answer one of `codes`, within QUICK_ANSWER_S."""
    return (" or ".join(map(str, codes)) + f" within {QUICK_ANSWER_S:g} s",
            lambda answers: all(a.status in codes and a.seconds <= QUICK_ANSWER_S for a in answers))


async def idle_series(ctx: Attacks, client: httpx.AsyncClient, who: str, make: MakeRequest, limit: float,
                      pause_s: float = 0.0) -> Slowdown:
    """--idle-requests of `make` one at a time on the quiet server, after one that warms up."""
    idle = (await series(client, make, count=ctx.args.idle_requests + 1, pause_s=pause_s))[1:]
    return Slowdown(who, idle, [], limit)


async def during(phase: Phase, slowdown: Slowdown, make: MakeRequest, client: httpx.AsyncClient, seconds: float,
                 **pacing: float) -> None:
    """The innocent request one at a time (`pacing`: series' every_s, pause_s) for `seconds`; the phase's
    expected outcome is then the slowdown's."""
    slowdown.busy = await series(client, make, until=time.perf_counter() + seconds, **pacing)
    phase.expect(slowdown.expected, slowdown.met())


# -- the attacks -----------------------------------------------------------------------------------


async def attack_bad_batch_mate(ctx: Attacks) -> None:
    key, title = "1", "ten /sample?model=vqvae&prior=pixelcnn&n=1 and one with temperature=1e-50, at once"
    if reason := ctx.has("vqvae", "pixelcnn"):
        return ctx.skip(key, title, reason)
    params = [{"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": i} for i in range(11)]
    params[10]["temperature"] = "1e-50"
    order = params[:5] + [params[10]] + params[5:10]  # the first one starts a pass alone; the rest share the next
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, len(order))
        async with ctx.phase(key, title) as phase:
            answers = await asyncio.gather(*(timed(c, c.build_request("GET", "/sample", params=p))
                                             for c, p in zip(clients, order)))  # fmt: skip
            bad, good = answers[5], answers[:5] + answers[6:]
            phase.lines = [f"seeds 0-9: {statuses(good)}; answered in {time_range(good)}",
                           *(f"seed {i}: {a.show()}" for i, a in enumerate(good) if a.status != 200),
                           f"temperature=1e-50: {bad.show()}"]  # fmt: skip
            phase.statuses, phase.answers = f"innocent {statuses(good)}; bad {bad.status}", time_range(answers)
            phase.expect("the ten innocent ones 200, the bad one 4xx",
                         all(a.status == 200 for a in good) and 400 <= (bad.status or 0) < 500)


async def raw_post(url: str, body: bytes, chunked: bool, timeout_s: float,
                   drain_s: float) -> tuple[Answer, int, int, float | None, str | None]:
    """POST /decode `body` on a plain socket, writing 1 MiB chunks while reading the answer (httpx sends the
    whole body before reading a byte, so an early 413 would look as slow as the upload). Returns the
    answer, the bytes written when it came, in all, when the last one was written (None: never), and how
    writing ended early (the server closed the connection); waits up to `drain_s` s after the answer."""
    reader, writer = await open_raw(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    writer.write(f"POST /decode HTTP/1.1\r\nHost: {httpx.URL(url).netloc.decode()}\r\nContent-Type: application/json\r\n"
                 f"{framing}\r\n\r\n".encode())  # fmt: skip
    sent, finished, send_error, start = 0, None, None, time.perf_counter()

    async def pump() -> None:
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

    writing = asyncio.create_task(pump())
    try:
        async with asyncio.timeout(timeout_s):
            status_line = await reader.readline()
            seconds, sent_at_answer = time.perf_counter() - start, sent
            answer = Answer(None, seconds, "the server closed the connection without an answer")
            if status_line:
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    length = int(value) if name.strip().lower() == "content-length" else length
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
    return answer, sent_at_answer, sent, finished, send_error


async def attack_big_json(ctx: Attacks) -> None:
    numbers, drain_s = ctx.args.json_numbers, 5.0
    model = "vae_conv" if not ctx.has("vae_conv") else ctx.models[0]["name"]
    body = b'{"model":"' + model.encode() + b'","z":[[' + b"0," * (numbers - 1) + b"0]]}"  # ~2 bytes a number
    mib = len(body) / MB
    for key, chunked in (("2a", True), ("2b", False)):
        title = (f"POST /decode, a JSON body of {numbers:.3g} numbers, {mib:.1f} MiB, "
                 + ("streamed (chunked)" if chunked else "Content-Length declared"))
        async with ctx.phase(key, title) as phase:
            answer, at_answer, sent, finished, send_error = await raw_post(ctx.url, body, chunked, ctx.args.timeout, drain_s)
            rest = (f"then the server closed the connection: the client could write {sent / MB:.1f} MiB ({send_error})"
                    if send_error else f"then the server took the rest: all {mib:.1f} MiB written by "
                    f"{finished * 1000:.0f} ms" if finished is not None else f"{drain_s:g} s after the answer the "
                    f"connection was open and the client still writing: {sent / MB:.1f} MiB written")  # fmt: skip
            phase.lines = [f"answer: {answer.show()}", f"when the answer came the client had written {at_answer / MB:.1f} "
                           f"of {mib:.1f} MiB (socket buffers hold a few MiB the server has not read); " + rest]
            phase.statuses = str(answer.status or "no answer")
            phase.answers = (f"{answer.seconds * 1000:.0f} ms; {at_answer / MB:.0f} MiB written by then, "
                             f"{sent / MB:.0f} in all")
            phase.expect(f"413 within {QUICK_ANSWER_S:g} s, the connection closed before the whole body was taken",
                         answer.status == 413 and answer.seconds <= QUICK_ANSWER_S and finished is None)


async def attack_uploads(ctx: Attacks) -> None:
    args = ctx.args
    side = f"{args.big_side}x{args.big_side}"
    title = f"{args.big_requests} concurrent /reconstruct?model=vae_conv, {args.big_files} {side} RGBA PNGs each"
    if reason := ctx.has("vae_conv"):
        ctx.skip("3a", title, reason)
        return ctx.skip("3b", "one /reconstruct?model=vae_conv with many medium files", reason)
    big, max_pixels = rgba_png(args.big_side), int(ctx.config.get("max_pixels", 0))
    notes = [f"note: {side} is over the server's max_pixels ({max_pixels}); --big-side {math.isqrt(max_pixels)} sends "
             "the largest it accepts"] if max_pixels and args.big_side**2 > max_pixels else []
    await at_once(ctx, "3a", title + f" ({len(big) / 1024:.0f} KiB each)", args.big_requests,
                  upload_request("/reconstruct", "vae_conv", [big] * args.big_files, "big.png"), notes=notes)
    count, medium = args.medium_files or int(ctx.config.get("max_files", 64)), rgba_png(args.medium_side)
    title = (f"one /reconstruct?model=vae_conv with {count} {args.medium_side}x{args.medium_side} RGBA PNGs "
             f"({len(medium) / 1024:.0f} KiB each)")
    await at_once(ctx, "3b", title, 1, upload_request("/reconstruct", "vae_conv", [medium] * count, "medium.png"))


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of the /sample request counts and every cancel-like metric."""
    out = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).raise_for_status().text):
        for sample in family.samples:
            if CANCEL_WORDS.search(family.name) or (family.name.startswith("genserve_requests") and sample.name.endswith(
                    "_total") and sample.labels.get("endpoint") == "/sample"):  # fmt: skip
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def attack_disconnect(ctx: Attacks) -> None:
    args = ctx.args
    key, title = "4", f"/sample?model=vqvae&prior=pixelcnnpp&n={args.abandon_n} abandoned after {args.abandon_after:g} s"
    if reason := ctx.has("vqvae", "pixelcnnpp"):
        return ctx.skip(key, title, reason)
    probe = sample_request("vqvae", "pixelcnnpp", 1)
    async with ctx.client() as client:
        idle = await series(client, probe, count=6)  # the first one warms up
        if failed := next((a for a in idle if a.status != 200), None):
            return ctx.skip(key, title, f"the probe request failed on the idle server: {failed.show()}")
        idle_s = float(np.median([a.seconds for a in idle[1:]]))
        before = await scrape(client)
        async with ctx.phase(key, title) as phase:
            start = time.perf_counter()
            async with ctx.client() as abandoned:
                request = sample_request("vqvae", "pixelcnnpp", args.abandon_n)(abandoned, 0)
                try:
                    response = await asyncio.wait_for(abandoned.send(request), args.abandon_after)
                    outcome = (f"answered {response.status_code} after {(time.perf_counter() - start) * 1000:.0f} ms, "
                               "before it could be abandoned")
                except TimeoutError:
                    outcome = f"abandoned after {(time.perf_counter() - start) * 1000:.0f} ms (connection closed)"
                except httpx.HTTPError as err:
                    outcome = f"failed before it could be abandoned: {type(err).__name__}: {err}"
            gone, probes, busy_s = time.perf_counter(), [], None  # probes: (seconds since the abandonment, answer)
            while time.perf_counter() - gone < args.busy_limit and busy_s is None:
                answer = await timed(client, probe(client, 100 + len(probes)))
                probes.append((time.perf_counter() - gone, answer))
                busy_s = probes[-1][0] if answer.status == 200 and answer.seconds < 2 * idle_s else None
            after = await scrape(client)
            changes = {k: v for k in after.keys() | before.keys() if (v := after.get(k, 0.0) - before.get(k, 0.0))}
            probe_statuses = Counter(str(a.status) for _, a in probes)
            cancelled = any(v > 0 and (dict(labels).get("status") == "499" or CANCEL_WORDS.search(name))
                            for (name, labels), v in changes.items())  # fmt: skip
            recorded = [f"{s} x{v - probe_statuses.get(s, 0):g}" for (name, labels), v in changes.items()
                        if name.startswith("genserve_requests") and (s := dict(labels).get("status"))
                        and v - probe_statuses.get(s, 0)]  # fmt: skip
            phase.lines = [
                f"idle latency of n=1: {idle_s * 1000:.0f} ms (median of 5); the n={args.abandon_n} request: {outcome}",
                "probes (n=1, one after another; seconds since the abandonment at each answer): "
                + ", ".join(f"{t:.2f} s ({a.status}, {a.seconds * 1000:.0f} ms)" for t, a in probes[:12])
                + (f", ... ({len(probes)} in all)" if len(probes) > 12 else ""),
                f"busy after the abandonment: {busy_s:.2f} s (until a probe answered in under 2x the idle latency)"
                if busy_s is not None
                else f"still busy after {args.busy_limit:g} s: no probe answered in under 2x the idle latency",
                "/metrics changes: " + ("; ".join(n + "{" + ",".join(f'{k}="{v}"' for k, v in lb) + "}" + f" +{d:g}"
                                                  for (n, lb), d in sorted(changes.items())) or "none"),
                "/sample answers recorded beyond the probes' (the abandoned request, as the server counted it): "
                + (", ".join(recorded) or "none"),
                'counted as cancelled (a status="499" sample or a cancel-like metric went up): '
                + ("yes" if cancelled else "no"),
            ]  # fmt: skip
            phase.statuses = f"cancelled counted: {'yes' if cancelled else 'no'}"
            phase.answers = f"busy {busy_s:.2f} s after" if busy_s is not None else f"busy > {args.busy_limit:g} s"


async def attack_strings(ctx: Attacks) -> None:
    args = ctx.args
    limit = args.strings_bytes or int(ctx.config.get("max_json_bytes", 0))
    for key, model, name, depth, item in (("5a", "vae_mlp", "z", 2, '""'), ("5b", "vqvae", "codes", 3, '"x"')):
        head, tail = f'{{"model":"{model}","{name}":' + "[" * depth, "]" * depth + "}"
        count = (limit - len(head) - len(tail) + 1) // (len(item) + 1)  # as many items as fit in `limit` bytes
        body = (head + ",".join([item] * count) + tail).encode()
        title = (f"{args.strings_requests} concurrent POST /decode of {model!r} with {name} a list of {count:,} "
                 f"strings {item} ({len(body):,} bytes)")
        if reason := ctx.has(model) or ("" if limit else "GET /config has no max_json_bytes: give --strings-bytes"):
            ctx.skip(key, title, reason)
            continue
        json_type = {"Content-Type": "application/json"}
        make: MakeRequest = lambda c, i, body=body: c.build_request("POST", "/decode", content=body, headers=json_type)
        await at_once(ctx, key, title, args.strings_requests, make, quickly(422))


@functools.cache
def ico_bomb(side: int) -> tuple[bytes, str]:
    """An ICO whose directory says 16x16 but which holds a `side` x `side` RGBA PNG, mostly flat (deflate packs
    flat rows ~1000x: 12000x12000, 576 MB of pixels, is ~0.57 MiB); and what it is, checked by opening it with
    Pillow, which decodes the PNG inside `Image.open`: the bomb itself."""
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
                     "of RGBA pixels; its directory says 16x16, Pillow opens it as an ICO of "
                     f"{opened.size[0]}x{opened.size[1]}")


async def attack_ico_bomb(ctx: Attacks) -> None:
    args = ctx.args
    title = (f"{args.bomb_requests} concurrent /reconstruct?model=vae_conv of a 16x16 ICO holding a "
             f"{args.bomb_side}x{args.bomb_side} RGBA PNG")
    loops_title = (f"{args.bomb_loopers} clients looping on the ICO bomb for {args.bomb_loops:g} s, an innocent "
                   "/reconstruct?model=vae_conv (one 28x28 PNG) one at a time")
    if reason := ctx.has("vae_conv"):
        ctx.skip("6a", title, reason)
        return ctx.skip("6b", loops_title, reason)
    ico, made = ico_bomb(args.bomb_side)
    bomb = upload_request("/reconstruct", "vae_conv", [ico], "bomb.ico")
    await at_once(ctx, "6a", title + f" ({len(ico) / MB:.2f} MiB)", args.bomb_requests, bomb, quickly(400, 413), [made])
    innocent = upload_request("/reconstruct", "vae_conv", upload_images(1, 0)[0])
    async with contextlib.AsyncExitStack() as stack:
        client, *loopers = await ctx.clients(stack, 1 + args.bomb_loopers)
        slowdown = await idle_series(ctx, client, "innocent", innocent, 2.0)
        async with ctx.phase("6b", loops_title) as phase:
            async with looping(loopers, bomb) as bombs:
                await during(phase, slowdown, innocent, client, args.bomb_loops)
            phase.lines = [*slowdown.lines(), f"bombs: {statuses(bombs.answers)}, {spread(bombs.answers)}"]
            phase.statuses = f"innocent {statuses(slowdown.busy)}; bombs {statuses(bombs.answers)}"
            phase.answers = slowdown.short()
            phase.expect(phase.expected + ", the bombs 4xx",  # type: ignore[operator]
                         bool(phase.expected_met) and all(400 <= (a.status or 0) < 500 for a in bombs.answers))


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
        if self.status is not None:
            return f"{self.status} after {self.answered_s:.1f} s ({self.sent} bytes of body sent)"
        if self.closed_s is not None:
            return f"closed without an answer after {self.closed_s:.1f} s ({self.sent} bytes of body sent)"
        return f"no answer ({self.sent} bytes of body sent)"


async def attack_slow_uploads(ctx: Attacks) -> None:
    args, config = ctx.args, ctx.config
    count = args.slow_clients or (int(config["upload_slots"]) + 1 if "upload_slots" in config else 4)
    title = (f"{count} POST /reconstruct?model=vae_conv declaring {args.slow_length:,} bytes and sending 1 a second, "
             f"for {args.slow_duration:g} s; an innocent /reconstruct once a second")
    if reason := ctx.has("vae_conv"):
        return ctx.skip("7", title, reason)
    png = upload_images(1, 0)[0][0]
    innocent, boundary = upload_request("/reconstruct", "vae_conv", [png]), "genserve-slow-upload"
    head = (f"POST /reconstruct?model=vae_conv HTTP/1.1\r\nHost: {httpx.URL(ctx.url).netloc.decode()}\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {args.slow_length}\r\n\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="slow.png"\r\nContent-Type: image/png\r\n\r\n').encode()
    async with ctx.client() as client:  # the idle series' first request opens its connection
        slowdown = await idle_series(ctx, client, "innocent", innocent, 2.0)
        async with ctx.phase("7", title) as phase:
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
            phase.statuses, phase.answers = f"innocent {statuses(slowdown.busy)}; attackers {attackers}", slowdown.short()


def rlimit_nofile(pid: int | None) -> str:
    """The soft and hard RLIMIT_NOFILE of `pid` (this process when None)."""
    if pid is None:
        return "{} soft, {} hard".format(*resource.getrlimit(resource.RLIMIT_NOFILE))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return "{} soft, {} hard".format(*line.split()[3:5])
    return "unknown"


async def attack_idle_connections(ctx: Attacks) -> None:
    args = ctx.args
    title = (f"{args.idle_conns} connections sending the start of GET /health's headers and no more, held "
             f"{args.idle_hold:g} s; GET /health on a fresh connection every second")
    pid, header_timeout = ctx.group.pid if ctx.group else None, ctx.config.get("header_timeout_s")
    log = ctx.server.log_path if ctx.server is not None else args.server_log
    log_start = log.stat().st_size if log is not None else 0
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
        await asyncio.sleep(1.0)
        fds = str(len(os.listdir(f"/proc/{pid}/fd"))) if pid and os.access(f"/proc/{pid}/fd", os.R_OK) else "unknown"
        try:
            health = lambda c, i: c.build_request("GET", "/health")
            probes = await series(fresh, health, until=start + args.idle_hold, every_s=1.0)
        finally:
            for h in held:
                h.release()
        await asyncio.sleep(1.0)  # what the server logs as they close
        grown, emfile = None, 0
        if log is not None:
            with open(log, "rb") as text:
                text.seek(log_start)
                emfile = sum(b"Too many open files" in line for line in text)
                grown = text.tell() - log_start
        closed = sorted(h.closed_s for h in held if h.closed_s is not None)
        answers = Counter(str(h.status) for h in held if h.status is not None)
        phase.lines = [
            f"server RLIMIT_NOFILE: {rlimit_nofile(pid)} (pid {pid}); this client's: {rlimit_nofile(None)}; "
            f"GET /config header_timeout_s: {header_timeout}",
            f"{len(held)} of {args.idle_conns} connections opened in {opened_s:.1f} s"
            + (f" (failed: {fmt_counts(failed)})" if failed else "") + f"; the server's open descriptors 1 s later: {fds}",
            f"closed by the server: {len(closed)} of {len(held)}"
            + (f", after {closed[0]:.1f} s (first), {np.median(closed):.1f} s (median), {closed[-1]:.1f} s (last)"
               if closed else "")
            + (f"; answers on them: {fmt_counts(answers)}" if answers else ""),
            f"GET /health on a fresh connection every second: {spread(probes)}",
            *(f"fresh probe {i}: {a.show()}" for i, a in enumerate(probes) if a.status != 200),
            f"server log grew by {fmt_mb(grown)}, {emfile} lines saying 'Too many open files'" if log is not None
            else "server log: not measured (with --url, give --server-log)",
        ]  # fmt: skip
        phase.statuses = f"closed by server {len(closed)}/{len(held)}; fresh /health {statuses(probes)}"
        phase.answers = f"log +{fmt_mb(grown)}"
        phase.expect(f"fresh /health all 200, log growth < {fmt_mb(LOG_GROWTH_TARGET)}",
                     bool(probes) and all(a.status == 200 for a in probes) and (grown or 0) < LOG_GROWTH_TARGET)
        if header_timeout is not None and args.idle_hold < float(header_timeout) + CLOSE_SLACK_S:
            phase.lines.append(f"not judged: which held sockets the server closes within header_timeout_s "
                               f"+{CLOSE_SLACK_S:g} s (--idle-hold is shorter)")  # fmt: skip
        elif header_timeout is not None:
            deadline = float(header_timeout) + CLOSE_SLACK_S
            phase.expect(f"{phase.expected}, held sockets closed within header_timeout_s +{CLOSE_SLACK_S:g} s",
                         bool(phase.expected_met) and all(h.closed_s is not None and h.closed_s <= deadline for h in held))


Spec = tuple[str, str | None]  # (model, prior)


def _loop_in_a_process(url: str, timeout_s: float, loopers: list[Spec], n: int, started, stop, results) -> None:
    """In a child process: one client per (model, prior) of `loopers` sending /sample of n images back to back,
    from when `started` is set until `stop` is; puts [(time.time() at the answer, status, seconds), ...] on `results`."""

    async def main() -> Loop:
        makes = [sample_request(m, p, n) for m, p in loopers]
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(worker_client(url, timeout_s)) for _ in loopers]
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
async def looping_elsewhere(url: str, timeout_s: float, loopers: list[Spec], n: int) -> AsyncIterator[Loop]:
    """harness.looping of /sample n=`n` on each (model, prior) of `loopers`, in a child process (its event
    loop and the GIL would otherwise delay the victim's answers on the client side); the Loop yielded is
    filled when the block ends (its times are time.time())."""
    context = multiprocessing.get_context("spawn")
    started, stop, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_loop_in_a_process, args=(url, timeout_s, loopers, n, started, stop, results),
                            name="loopers", daemon=True)  # fmt: skip
    child.start()
    result = Loop()
    try:
        if not await asyncio.to_thread(started.wait, 60):
            raise RuntimeError("the loopers' process did not start within 60 s")
        result.start = time.time()
        yield result
    finally:
        stop.set()
        timed_answers = await asyncio.to_thread(results.get, True, timeout_s + 60) if child.is_alive() else []
        await asyncio.to_thread(child.join, 10)
        result.timed = [(at, Answer(status, seconds)) for at, status, seconds in timed_answers]


async def fairness_case(ctx: Attacks, key: str, loopers: list[Spec], victim: Spec, limit: float, notes: list[str] = ()
                        ) -> None:
    """Loopers sending /sample n=--fair-n on `loopers` back to back while the victim sends /sample n=1 of
    `victim` one at a time: its slowdown, and the loopers' images/s."""
    args = ctx.args
    names = Counter(f"{m}:{p}" if p else m for m, p in loopers)
    title = (", ".join(f"{k} x{n}" if n > 1 else k for k, n in names.items()) + f" looping on /sample n={args.fair_n}; "
             f"the victim /sample?model={victim[0]}" + (f"&prior={victim[1]}" if victim[1] else "") + "&n=1")
    if reason := next(filter(None, (ctx.has(m, p) for m, p in [victim, *loopers])), None):
        return ctx.skip(key, title, reason)
    victim_make = sample_request(*victim, 1)
    async with ctx.client() as client:
        slowdown = await idle_series(ctx, client, "victim", victim_make, limit, args.victim_pause)
        async with ctx.phase(key, title) as phase:
            async with looping_elsewhere(ctx.url, args.timeout, loopers, args.fair_n) as heavy:
                await during(phase, slowdown, victim_make, client, args.fair_duration, pause_s=args.victim_pause)
            rate = heavy.throughput(args.fair_n)
            phase.lines = [*slowdown.lines(), f"loopers: {rate}, {spread(heavy.answers)}", *notes]
            phase.statuses = f"victim {statuses(slowdown.busy)}; loopers {statuses(heavy.answers)}"
            phase.answers = f"{slowdown.short()}; loopers {rate.split(' (')[0]}"


async def attack_fairness(ctx: Attacks) -> None:
    args = ctx.args
    for key, spec in (("9a", ("vqvae", "gated")), ("9b", ("vqvae_cifar10", "pixelcnnpp"))):
        await fairness_case(ctx, key, [spec] * args.fair_loopers, spec, 3.0)
    others = [(m, p or None) for m, _, p in (s.partition(":") for s in args.fair_others)]
    await fairness_case(ctx, "9c", [o for o in others if not ctx.has(*o)], ("vae_mlp", None), 2.0,
                        [f"--fair-others left out: {ctx.has(*o)}" for o in others if ctx.has(*o)])


async def attack_large_answers(ctx: Attacks) -> None:
    args = ctx.args
    model, files = args.encode_model, args.encode_files or int(ctx.config.get("max_files", 64))
    title = (f"{args.encode_clients} clients looping on /encode?model={model}&include_z_e=true with {files} 28x28 PNGs "
             f"for {args.encode_duration:g} s")
    if reason := ctx.has(model):
        return ctx.skip("10", title, reason)
    encode = upload_request("/encode", model, upload_images(files, 0)[0], include_z_e="true")
    async with contextlib.AsyncExitStack() as stack:
        clients = await ctx.clients(stack, args.encode_clients)
        async with ctx.phase("10", title) as phase:
            async with looping(clients, encode) as encodes:
                await asyncio.sleep(args.encode_duration)
            answers, sizes = encodes.answers, [a.size for a in encodes.answers if a.status == 200]
            phase.lines = [f"answers: {spread(answers)}; {encodes.throughput(files)}",
                           f"answer size: {fmt_mb(float(np.median(sizes))) if sizes else '-'} (median)"]
            phase.statuses, phase.answers = statuses(answers), time_range(answers)
            phase.expect("every answer 200", bool(answers) and all(a.status == 200 for a in answers))


RUNNERS = dict(enumerate([attack_bad_batch_mate, attack_big_json, attack_uploads, attack_disconnect, attack_strings,
                          attack_ico_bomb, attack_slow_uploads, attack_idle_connections, attack_fairness,
                          attack_large_answers], start=1))


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = parser(__doc__, url=True, env="GENSERVE_DECODE_SLOTS=1")
    p.add_argument("--attacks", type=int, nargs="+", choices=list(RUNNERS), default=list(RUNNERS), metavar="N",
                   help="which (default: all of 1-10)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each attack (default 1)")
    p.add_argument("--linger", type=float, default=1.0, help="seconds measured after an attack's last answer (default 1)")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S, help=f"client timeout in s (default {CLIENT_TIMEOUT_S:g})")
    p.add_argument("--idle-requests", type=int, default=10, help="6b, 7, 9: requests timed on the idle server (default 10)")
    a = p.add_argument_group("attack 2").add_argument
    a("--json-numbers", type=lambda s: int(float(s)), default=50_000_000, help="numbers in the body (default 5e7)")
    a = p.add_argument_group("attack 3").add_argument
    a("--big-requests", type=int, default=6, help="3a: concurrent requests (default 6)")
    a("--big-files", type=int, default=4, help="3a: files per request (default 4)")
    a("--big-side", type=int, default=4096, help="3a: image side in pixels (default 4096)")
    a("--medium-files", type=int, default=None, help="3b: files (default: the server's max_files)")
    a("--medium-side", type=int, default=1024, help="3b: image side in pixels (default 1024)")
    a = p.add_argument_group("attack 4").add_argument
    a("--abandon-n", type=int, default=256, help="n of the abandoned /sample (default 256)")
    a("--abandon-after", type=float, default=0.3, help="seconds before abandoning (default 0.3)")
    a("--busy-limit", type=float, default=60.0, help="stop probing after this many seconds (default 60)")
    a = p.add_argument_group("attack 5").add_argument
    a("--strings-requests", type=int, default=2, help="concurrent requests (default 2)")
    a("--strings-bytes", type=int, default=None, help="body size in bytes (default: GET /config's max_json_bytes)")
    a = p.add_argument_group("attack 6").add_argument
    a("--bomb-side", type=int, default=12000, help="the embedded PNG's side (default 12000)")
    a("--bomb-requests", type=int, default=4, help="6a: concurrent requests (default 4)")
    a("--bomb-loopers", type=int, default=3, help="6b: clients looping on the bomb (default 3)")
    a("--bomb-loops", type=float, default=10.0, help="6b: seconds of looping (default 10)")
    a = p.add_argument_group("attack 7").add_argument
    a("--slow-clients", type=int, default=None, help="slow uploads (default: GET /config's upload_slots + 1, else 4)")
    a("--slow-length", type=int, default=100_000, help="the Content-Length each declares (default 100000)")
    a("--slow-duration", type=float, default=35.0, help="seconds of trickling (default 35: past request_timeout_s)")
    a = p.add_argument_group("attack 8").add_argument
    a("--idle-conns", type=int, default=1050, help="connections held (default 1050)")
    a("--idle-hold", type=float, default=40.0, help="seconds they are held (default 40)")
    a("--server-nofile", type=int, default=1024, help="the soft RLIMIT_NOFILE of the server we start (default 1024; 0: "
      "this shell's)")
    a("--server-log", type=Path, default=None, help="with --url: the server's log file")
    a = p.add_argument_group("attack 9").add_argument
    a("--fair-loopers", type=int, default=8, help="9a, 9b: looping clients (default 8)")
    a("--fair-n", type=int, default=256, help="n of each looping /sample (default 256)")
    a("--fair-duration", type=float, default=15.0, help="seconds the victim is measured, per case (default 15)")
    a("--fair-others", nargs="+", default=list(FAIR_OTHERS), metavar="MODEL[:PRIOR]",
      help=f"9c: one looper each (default {' '.join(FAIR_OTHERS)})")
    a("--victim-pause", type=float, default=0.05, help="seconds between the victim's requests (default 0.05)")
    a = p.add_argument_group("attack 10").add_argument
    a("--encode-model", default="vqvae_cifar10", help="the VQ-VAE (default vqvae_cifar10)")
    a("--encode-clients", type=int, default=4, help="looping clients (default 4)")
    a("--encode-files", type=int, default=None, help="files per request (default: max_files)")
    a("--encode-duration", type=float, default=15.0, help="seconds of looping (default 15)")
    args = parse(p, "attacks", argv)
    args.attacks = sorted(set(args.attacks))
    counts = ("json_numbers", "big_requests", "big_files", "big_side", "medium_side", "abandon_n", "idle_requests",
              "strings_requests", "bomb_side", "bomb_requests", "bomb_loopers", "slow_length", "idle_conns", "fair_loopers",
              "fair_n", "encode_clients")  # fmt: skip
    if bad := [f"--{name.replace('_', '-')}" for name in counts if getattr(args, name) < 1]:
        p.error(f"{', '.join(bad)} must be at least 1")
    durations = ("bomb_loops", "slow_duration", "idle_hold", "fair_duration", "encode_duration")
    if bad := [f"--{name.replace('_', '-')}" for name in durations if getattr(args, name) <= 0]:
        p.error(f"{', '.join(bad)} must be positive")
    if args.server_log is not None and (not args.url or not args.server_log.is_file()):
        p.error("--server-log goes with --url, and must be a file")
    return args


async def run(args, url: str, server: Server | None) -> int:
    models = httpx.get(f"{url}/models", timeout=30).raise_for_status().json()
    config = httpx.get(f"{url}/config", timeout=30).raise_for_status().json()
    pid = server.process.pid if server is not None and server.process is not None else args.pid
    group = ProcessGroup(pid) if pid is not None else None
    limit = f" (started with a soft limit of {args.server_nofile}: --server-nofile)" if server and args.server_nofile else ""
    header = [*machine_lines(), *service_lines(args, config, models, CONFIG_KEYS),
              f"targets per attack: peak RSS growth <= {RSS_GROWTH_TARGET / 1e6:.0f} MB (VmRSS of the server's process "
              f"group every 10 ms); GET /health every 20 ms on its own connection: p99 <= {HEALTH_P99_TARGET_MS:g} ms, "
              "all answered", "server RSS: not measured (no server process: give --pid with --url)" if group is None
              else f"server RLIMIT_NOFILE: {rlimit_nofile(pid)}{limit}"]
    print("\n".join(header), flush=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # attack 8's many sockets: the server, not we, is the limit
    ctx, notes = Attacks(url, args, models, config, server, group), []
    try:
        for number in args.attacks:
            print(flush=True)
            await RUNNERS[number](ctx)
    except ServerDied as err:
        notes.append(str(err))
        print(f"\n{err}" + (f":\n{server.log_tail()}" if server is not None else ""), flush=True)
    notes += [f"server log: {line}" for line in server.log_errors(10)] if server is not None else []
    measured = [p for p in ctx.phases if not p.skipped]

    def tally(results: list[bool | None]) -> str:
        judged = [r for r in results if r is not None]
        return f"MISSED by {judged.count(False)} of {len(judged)}" if judged else "not measured"

    print("\nsummary (the attacks' titles above):\n" + table([HEADERS[i] for i in TEXT_COLUMNS],
                                                          [[p.row()[i] for i in TEXT_COLUMNS] for p in ctx.phases]))
    print(f"\nRSS target {tally([p.rss_met() for p in measured])}; /health target "
          f"{tally([p.health_met() for p in measured])}; expected outcome (where stated) "
          f"{tally([p.expected_met for p in measured])}")
    print("".join(f"  {note}\n" for note in notes), end="")
    if args.markdown:
        details = [f"**{p.key}. {p.title}**\n\n{bullets(p.lines)}" for p in measured]
        write_markdown(args.markdown, "Attacks: memory and /health under hostile requests", args.command, header,
                       [table(HEADERS, [p.row() for p in ctx.phases], markdown=True), *details, bullets(notes)])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.server_nofile and not args.url:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.server_nofile, hard), hard))  # the server inherits it
    stop_on_sigterm()
    try:
        with serving(args, {"GENSERVE_DRAIN_DELAY_S": "0"}, "genserve-attacks-") as (url, server):
            return asyncio.run(run(args, url, server))
    except KeyboardInterrupt:
        print("\ninterrupted: the server is stopped", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
