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

    python benchmarks/attacks.py                                 # every attack
    python benchmarks/attacks.py --attacks 1 3                   # some
    python benchmarks/attacks.py --json-numbers 5e6 --big-requests 2 --medium-files 16   # smoke run
    python benchmarks/attacks.py --env GENSERVE_DECODE_SLOTS=1 GENSERVE_WORKERS=2 --markdown /tmp/attacks.md
    python benchmarks/attacks.py --url http://127.0.0.1:8000 --pid 12345   # a running server (RSS of --pid's group)

The server is stopped at the end, on Ctrl-C and on errors (load.py's `Server.stop`). An attack
that needs a model or prior the server does not have is skipped with the reason; a server that
dies ends the run with the tail of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import math
import os
import re
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
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

ATTACKS = (1, 2, 3, 4)
RSS_GROWTH_TARGET = 200 * 1000 * 1000  # bytes: peak RSS minus the RSS before the attack, at most 200 MB
HEALTH_P99_TARGET_MS = 100.0
QUICK_ANSWER_S = 1.0  # attack 2: "413 quickly"
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
        failed = f", failed: {' '.join(f'{k}x{n}' for k, n in self.health_failures.items())}" if self.health_failures else ""
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
    return Answer(response.status_code, time.perf_counter() - start, text)


def count_statuses(answers: list[Answer]) -> str:
    counts = Counter("no answer" if a.status is None else str(a.status) for a in answers)
    return " ".join(f"{k}x{n}" for k, n in sorted(counts.items()))


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


async def connected(clients: list[httpx.AsyncClient]) -> None:
    """Open every client's connection first, so that what follows really goes out at once."""
    await asyncio.gather(*(c.get("/health") for c in clients))


# -- the attacks -----------------------------------------------------------------------------------


async def attack_bad_batch_mate(ctx: Attacks) -> None:
    key, title = "1", "ten /sample?model=vqvae&prior=pixelcnn&n=1 and one with temperature=1e-50, at once"
    if reason := ctx.has("vqvae", "pixelcnn"):
        return ctx.skip(key, title, reason)
    innocent = [{"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": i} for i in range(10)]
    bad = {"model": "vqvae", "prior": "pixelcnn", "n": 1, "seed": 10, "temperature": "1e-50"}
    order = innocent[:5] + [bad] + innocent[5:]  # the first one starts a pass alone; the rest share the next
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ctx.client()) for _ in order]
        await connected(clients)
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
    reader, writer = await asyncio.open_connection(target.host, target.port or 80)
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
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ctx.client()) for _ in range(args.big_requests)]
        await connected(clients)
        async with ctx.phase(key, title + f" ({len(big) / 1024:.0f} KiB each)") as phase:
            requests = [
                c.build_request("POST", "/reconstruct", params={"model": "vae_conv"},
                                files=[("file", (f"big{i}-{j}.png", big, "image/png")) for j in range(args.big_files)])
                for i, c in enumerate(clients)
            ]  # fmt: skip
            answers = await asyncio.gather(*(timed(c, r) for c, r in zip(clients, requests)))
            phase.lines = [f"statuses: {count_statuses(answers)}; answered in {time_range(answers)}",
                           *(f"request {i}: {a.show()}" for i, a in enumerate(answers) if a.status != 200)]  # fmt: skip
            max_pixels = int(ctx.config.get("max_pixels", 0))
            if max_pixels and args.big_side**2 > max_pixels:
                phase.lines.append(f"note: {side} is over the server's max_pixels ({max_pixels}); "
                                   f"--big-side {math.isqrt(max_pixels)} sends the largest it accepts")  # fmt: skip
            phase.statuses, phase.answers = count_statuses(answers), time_range(answers)

    count = args.medium_files or int(ctx.config.get("max_files", 64))
    medium = rgba_png(args.medium_side)
    side = f"{args.medium_side}x{args.medium_side}"
    title = f"one /reconstruct?model=vae_conv with {count} {side} RGBA PNGs ({len(medium) / 1024:.0f} KiB each)"
    async with ctx.client() as client:
        await connected([client])
        async with ctx.phase("3b", title) as phase:
            files = [("file", (f"medium{j}.png", medium, "image/png")) for j in range(count)]
            answer = await timed(client, client.build_request("POST", "/reconstruct", params={"model": "vae_conv"}, files=files))
            phase.lines = [f"answer: {answer.show()}"]
            phase.statuses, phase.answers = str(answer.status), time_range([answer])


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


RUNNERS = {1: attack_bad_batch_mate, 2: attack_big_json, 3: attack_uploads, 4: attack_disconnect}


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", type=int, nargs="+", choices=ATTACKS, default=list(ATTACKS), metavar="N",
                        help="which attacks to run (default: all of 1 2 3 4)")
    parser.add_argument("--url", default=None, help="attack this running server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
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
    if min(args.json_numbers, args.big_requests, args.big_files, args.big_side, args.medium_side, args.abandon_n) < 1:
        parser.error("--json-numbers, --big-*, --medium-side and --abandon-n must be at least 1")
    if args.pid is not None and not args.url:
        parser.error("--pid goes with --url (a server we start is measured anyway)")
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
    return serve_and_run(parse_args(argv), run, "genserve-attacks-")


if __name__ == "__main__":
    sys.exit(main())
