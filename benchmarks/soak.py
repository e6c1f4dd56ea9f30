"""Soak test of the real server: thousands of mixed good and bad requests at high concurrency.

Starts the service (`python -m app` on a free port, in its own process group, the way
benchmarks/load.py does; or uses --url) and builds a request mix from a fixed --seed, over
every endpoint and every served model (GET /models) and limit (GET /config):

    good   seeded /sample (VAEs; VQ-VAE with each prior, with and without a label), unseeded
           /sample, /decode (z or codes), /reconstruct and /encode (1-4 uploads of several formats),
           /interpolate (slerp, lerp), /health, /ready, /config, /models, /metrics; a tenth of the
           image requests ask for `Accept: application/json`
    bad    (--bad-fraction of all, 65 kinds drawn uniformly) unknown models and priors; n,
           temperature, label and seed out of range, temperature=1e-50, NaN and inf; /decode with
           wrong JSON types (strings, `true`, null, NaN, Infinity, 1e39, fractional codes), wrong
           latent lengths and grid shapes, codes out of range, z for a VQ-VAE and codes for a VAE,
           bodies that are not JSON or over max_json_bytes; uploads that are not images, empty,
           truncated, over max_upload_bytes or max_pixels, more than max_files, missing fields;
           /interpolate steps and method out of range; unknown paths and wrong methods

First every good deterministic request (a seeded /sample, /decode, /reconstruct, /encode,
/interpolate) is sent alone, one after another with nothing else running. Then the server's RSS
is read (VmRSS of /proc/<pid>/status, summed over the server's process group), and the whole mix goes out in a closed loop of --concurrency
workers, one keep-alive connection each (load.py's `worker_client`). After a --settle pause the
RSS is read again. Each deterministic answer under load must equal its answer alone byte for byte.

Targets, each reported "met" or "MISSED": no 5xx; no lost responses (connection errors,
timeouts); no mismatched deterministic response; every bad request answered 4xx; every good
request answered 2xx (alone and under load); server RSS after the load within 10% of before.
Also: counts by status class and p50/p90/p99/max latency (ms, every answered request, as the
client sees it) per endpoint and overall, examples of each finding, and ERROR lines of the log.

    python benchmarks/soak.py                                   # 10,000 requests at C=64 (several minutes)
    python benchmarks/soak.py --requests 300                    # smoke run
    python benchmarks/soak.py --env GENSERVE_MAX_QUEUE=256 --markdown /tmp/soak.md
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 12345   # a running server (RSS of --pid's group)

The server is stopped at the end, on Ctrl-C and on errors: SIGTERM, SIGKILL after 30 s, then
SIGKILL to whatever is left of its process group (load.py's `Server.stop`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (benchmarks/load.py, beside this script)
    CLIENT_TIMEOUT_S,
    ROOT,
    Server,
    busy_warning,
    cpu_model,
    describe_models,
    fmt_ms,
    free_port,
    stop_on_sigterm,
    upload_images,
    worker_client,
)

MB = 1024 * 1024
OPERATIONS = ("reconstruct", "encode", "decode", "interpolate", "sample")  # GET /models' operations, all of them
RSS_RATIO_TARGET = 1.10  # RSS after the load / before, at most
MAX_TEMPERATURE, MAX_STEPS, MAX_SEED = 10.0, 64, 2**63 - 1  # app/schemas.py
CONFIG_KEYS = ("resolved_device", "max_batch_size", "max_wait_ms", "max_queue", "max_inflight",
               "request_timeout_s", "max_n", "max_files", "max_upload_bytes", "max_pixels", "max_json_bytes",
               "decode_slots", "pad_batches", "torch_threads", "io_threads")  # fmt: skip


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# -- the server and its memory ---------------------------------------------------------------------


def parse_env(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def server_env(args: argparse.Namespace, port: int) -> dict[str, str]:
    """This shell's environment without its GENSERVE_* variables, our defaults, then every --env pair."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    defaults = {
        "GENSERVE_WEIGHTS_DIR": str(args.weights.resolve()),
        "GENSERVE_HOST": "127.0.0.1",
        "GENSERVE_ACCESS_LOG": "false",
        "GENSERVE_DRAIN_DELAY_S": "0",  # nobody to drain for: stop at once
    }
    return {**base, **defaults, **args.env, "GENSERVE_PORT": str(port)}


@contextlib.contextmanager
def serving(args: argparse.Namespace, log_dir: Path) -> Iterator[tuple[str, Server | None]]:
    """(url, server): a server of our own, always stopped at the end, or --url's (server None)."""
    if args.url:
        yield args.url.rstrip("/"), None
        return
    port = free_port()
    server = Server("server", port, server_env(args, port), log_dir / "server.log")
    try:
        server.start()
        server.wait_ready(args.startup_timeout)
        yield server.url, server
    finally:
        server.stop()


class ServerMemory:
    """The resident memory of a server: VmRSS summed over the processes of its process group.

    A server we start leads its own group (load.py's Server: start_new_session), which holds its
    uvicorn workers. When `pid` shares this script's group, only `pid` itself is counted.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pgid = os.getpgid(pid)
        self.own_group = self.pgid != os.getpgrp()

    def pids(self) -> list[int]:
        if not self.own_group:
            return [self.pid]
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            if int(fields[2]) == self.pgid:  # pgrp (field 5)
                found.append(int(stat.parent.name))
        return found

    @staticmethod
    def rss(pids: list[int]) -> int | None:
        """Summed VmRSS in bytes; None when none of `pids` is alive."""
        total, alive = 0, False
        for pid in pids:
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024  # kB
                    alive = True
                    break
        return total if alive else None

    def current(self) -> int | None:
        return self.rss(self.pids())

    def settled(self, samples: int = 5, interval_s: float = 0.02) -> int | None:
        """The median of a few readings."""
        values = []
        for _ in range(samples):
            if (value := self.current()) is not None:
                values.append(value)
            time.sleep(interval_s)
        return int(np.median(values)) if values else None


class RssMonitor:
    """Polls a ServerMemory every `interval_s` in a thread and keeps the peak (the group's members
    are re-listed every 0.5 s; reading /proc for every process each poll would cost too much)."""

    def __init__(self, memory: ServerMemory, interval_s: float = 0.01) -> None:
        self.memory = memory
        self.interval_s = interval_s
        self.peak: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def _run(self) -> None:
        pids, listed = self.memory.pids(), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - listed > 0.5:
                pids, listed = self.memory.pids(), time.monotonic()
            value = self.memory.rss(pids)
            if value is not None:
                self.samples += 1
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fmt_mb(value: int | float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f} MB"


def percentiles(values: list[float]) -> list[float | None]:
    """p50, p90, p99 and max."""
    if not values:
        return [None] * 4
    return [float(np.percentile(values, q)) for q in (50, 90, 99)] + [max(values)]


# -- requests --------------------------------------------------------------------------------------

Upload = tuple[str, bytes, str]  # (filename, bytes, content type)


@dataclass
class Req:
    """One request of the mix, kept as data so that it can be sent twice (alone, then under load)."""

    kind: str  # "sample", "decode", ... for a good one; "bad: <what>" for a bad one
    method: str
    path: str
    params: dict[str, str | int | float] = field(default_factory=dict)
    body: bytes | None = None  # sent as is: JSON written by json.dumps keeps NaN, Infinity, true
    files: list[tuple[str, Upload]] = field(default_factory=list)  # (form field, upload)
    headers: dict[str, str] = field(default_factory=dict)
    good: bool = True
    deterministic: bool = False  # same request, same bytes: compared alone vs under load
    expect: int = 200  # the documented status

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"

    def build(self, client: httpx.AsyncClient) -> httpx.Request:
        extra: dict[str, object] = {}
        if self.files:
            extra["files"] = self.files
        elif self.body is not None:
            extra["content"] = self.body
        return client.build_request(self.method, self.path, params=self.params or None, headers=self.headers, **extra)

    def describe(self, limit: int = 160) -> str:
        text = self.endpoint + (f"?{urlencode(self.params)}" if self.params else "")
        if self.body is not None:
            preview = self.body[:100].decode(errors="replace")
            text += f" {preview}{'...' if len(self.body) > 100 else ''} ({len(self.body)} B)"
        if self.files:
            parts = Counter(f"{name}={upload[0]} ({len(upload[1])} B)" for name, upload in self.files)
            text += " files: " + ", ".join(f"{p}{f' x{n}' if n > 1 else ''}" for p, n in parts.items())
        if self.headers.get("Accept") == "application/json":
            text += " [Accept: application/json]"
        return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # allow_nan: NaN and Infinity go out as literals


def upload_variants(pngs: list[bytes]) -> list[Upload]:
    """Good uploads: the 28x28 PNGs as they are, and some re-encoded (JPEG RGB, RGBA PNG 2x, BMP, GIF)."""
    uploads: list[Upload] = [(f"img{i}.png", data, "image/png") for i, data in enumerate(pngs)]
    for i, data in enumerate(pngs[:8]):
        image = Image.open(io.BytesIO(data)).convert("L")
        buffer = io.BytesIO()
        if i % 4 == 0:
            image.convert("RGB").save(buffer, format="JPEG", quality=90)
            uploads.append((f"img{i}.jpg", buffer.getvalue(), "image/jpeg"))
        elif i % 4 == 1:
            big = image.resize((56, 56)).convert("RGBA")
            big.putalpha(image.resize((56, 56)))
            big.save(buffer, format="PNG")
            uploads.append((f"img{i}-rgba.png", buffer.getvalue(), "image/png"))
        elif i % 4 == 2:
            image.save(buffer, format="BMP")
            uploads.append((f"img{i}.bmp", buffer.getvalue(), "image/bmp"))
        else:
            image.convert("P").save(buffer, format="GIF")
            uploads.append((f"img{i}.gif", buffer.getvalue(), "image/gif"))
    return uploads


class Skip(Exception):
    """This kind of request needs something the server does not serve (a VQ-VAE, a conditional prior)."""


@dataclass
class Context:
    """What the mix is built from: the served models, the limits in force, the uploads."""

    vaes: list[dict]  # GET /models entries
    vqvaes: list[dict]
    limits: dict[str, int]
    uploads: list[Upload]
    _blobs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_server(cls, models: list[dict], config: dict, uploads: list[Upload]) -> Context:
        limits = {
            "max_n": int(config.get("max_n", 256)),
            "max_files": int(config.get("max_files", 64)),
            "max_upload_bytes": int(config.get("max_upload_bytes", 10 * MB)),
            "max_pixels": int(config.get("max_pixels", 4096 * 4096)),
            "max_json_bytes": int(config.get("max_json_bytes", MB)),  # 1 MiB where the server has no such limit
        }
        offers_all = [m for m in models if len(m.get("operations", OPERATIONS)) == len(OPERATIONS)]  # not vae_context
        vaes = [m for m in offers_all if m["kind"] == "vae"]
        vqvaes = [m for m in offers_all if m["kind"] == "vqvae"]
        return cls(vaes, vqvaes, limits, uploads)

    # Models. The autoregressive VAE takes ~0.3 s for one image: drawn 10x less often.
    def model(self, r: np.random.Generator) -> dict:
        models = self.vaes + self.vqvaes
        weights = np.array([0.1 if m.get("decoder") == "autoregressive" else 1.0 for m in models])
        return models[r.choice(len(models), p=weights / weights.sum())]

    def vae(self, r: np.random.Generator) -> dict:
        if not self.vaes:
            raise Skip
        fast = [m for m in self.vaes if m.get("decoder") != "autoregressive"] or self.vaes
        return fast[r.integers(len(fast))]

    def vqvae(self, r: np.random.Generator, *, with_priors: bool = False) -> dict:
        choices = [m for m in self.vqvaes if m.get("priors") or not with_priors]
        if not choices:
            raise Skip
        return choices[r.integers(len(choices))]

    def prior(self, r: np.random.Generator, *, conditional: bool = False) -> tuple[dict, dict]:
        pairs = [(m, p) for m in self.vqvaes for p in m.get("priors") or [] if p["num_classes"] or not conditional]
        if not pairs:
            raise Skip
        return pairs[r.integers(len(pairs))]

    def upload(self, r: np.random.Generator) -> Upload:
        return self.uploads[r.integers(len(self.uploads))]

    @staticmethod
    def accept(r: np.random.Generator) -> dict[str, str]:
        return {"Accept": "application/json"} if r.random() < 0.1 else {}

    # Valid pieces.
    def sample_params(self, r: np.random.Generator, model: dict | None = None) -> dict[str, str | int | float]:
        model = model or self.model(r)
        slow = model.get("decoder") == "autoregressive"
        n = int(r.integers(1, 5)) if slow else (min(64, self.limits["max_n"]) if r.random() < 0.05 else int(r.integers(1, 17)))
        params: dict[str, str | int | float] = {"model": model["name"], "n": min(n, self.limits["max_n"])}
        if r.random() < 0.5:
            params["temperature"] = round(float(r.uniform(0.3, 2.0)), 3)
        if model["kind"] == "vqvae":
            priors = model.get("priors") or []
            if not priors:
                raise Skip
            prior = priors[r.integers(len(priors))]
            if r.random() < 0.8:
                params["prior"] = prior["name"]
            else:
                prior = next((p for p in priors if p["default"]), prior)
            if prior["num_classes"] and r.random() < 0.5:
                params["label"] = int(r.integers(prior["num_classes"]))
        return params

    @staticmethod
    def latents(r: np.random.Generator, model: dict, rows: int, dim: int | None = None) -> list[list[float]]:
        dim = model["latent_shape"][0] if dim is None else dim
        return np.round(r.normal(size=(rows, dim)), 4).tolist()

    @staticmethod
    def codes(r: np.random.Generator, model: dict, rows: int, shape: tuple[int, int] | None = None) -> list:
        h, w = shape or model["code_shape"]
        return r.integers(model["codebook_size"], size=(rows, h, w)).tolist()

    def upload_req(
        self, r: np.random.Generator, bad: list[Upload], expect: int, *, paths: tuple[str, ...] = (), model: str | None = None
    ) -> Req:
        """An upload request holding the `bad` uploads (plus good ones where /interpolate needs two)."""
        paths = paths or (("/reconstruct", "/encode", "/interpolate") if len(bad) <= 2 else ("/reconstruct", "/encode"))
        path = paths[r.integers(len(paths))]
        params: dict[str, str | int | float] = {"model": model or self.model(r)["name"]}
        if path == "/interpolate":
            a, b = (bad + [self.upload(r)])[:2] if r.random() < 0.5 else ([self.upload(r)] + bad)[-2:]
            files = [("a", a), ("b", b)]
        else:
            files = [("file", u) for u in bad]
        return Req("", "POST", path, params, files=files, expect=expect)

    # Large bodies, made once.
    def blob(self, name: str) -> bytes:
        if name not in self._blobs:
            if name == "oversized":
                data = b"\x89PNG\r\n\x1a\n" + bytes(self.limits["max_upload_bytes"] - 7)  # one byte over the limit
            elif name == "too-many-pixels":
                side = math.isqrt(self.limits["max_pixels"]) + 1  # side x side > max_pixels
                buffer = io.BytesIO()
                Image.new("L", (side, side)).save(buffer, format="PNG")
                data = buffer.getvalue()
            elif name == "json-too-large":
                vae = self.vaes[0] if self.vaes else {"name": "vae", "latent_shape": [32]}
                row = "[" + ",".join(["0.000001"] * vae["latent_shape"][0]) + "]"
                rows = self.limits["max_json_bytes"] // len(row) + 2
                data = f'{{"model":"{vae["name"]}","z":[{",".join([row] * rows)}]}}'.encode()
            else:
                raise KeyError(name)
            self._blobs[name] = data
        return self._blobs[name]


Builder = Callable[[Context, np.random.Generator], Req]


def _get(path: str, expect: int, **params: str | int | float) -> Req:
    return Req("", "GET", path, dict(params), expect=expect)


def _post_json(body: object | bytes, expect: int, path: str = "/decode", method: str = "POST") -> Req:
    data = body if isinstance(body, bytes) else _json(body)
    return Req("", method, path, body=data, headers={"Content-Type": "application/json"}, expect=expect)


def _sample(c: Context, r: np.random.Generator, expect: int, base: dict | None = None, **changes: object) -> Req:
    """A valid /sample query (for model `base`, or any) with `changes` applied (None removes a parameter)."""
    params = {"seed": int(r.integers(0, 2**31)), **c.sample_params(r, base)}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value  # type: ignore[assignment]
    return Req("", "GET", "/sample", params, expect=expect)


def _prior_sample(c: Context, r: np.random.Generator, expect: int, *, conditional: bool = False, **changes: object) -> Req:
    model, prior = c.prior(r, conditional=conditional)
    params = {"model": model["name"], "prior": prior["name"], "n": 1, "seed": int(r.integers(0, 2**31)), **changes}
    return Req("", "GET", "/sample", params, expect=expect)  # type: ignore[arg-type]


def _z(c: Context, r: np.random.Generator, expect: int, fill: Callable[[list[list[object]]], None]) -> Req:
    """A VAE /decode body whose z (2 rows of the right length) `fill` spoils in place."""
    vae = c.vae(r)
    z: list[list[object]] = c.latents(r, vae, 2)  # type: ignore[assignment]
    fill(z)
    return _post_json({"model": vae["name"], "z": z}, expect)


def _codes(c: Context, r: np.random.Generator, expect: int, fill: Callable[[list, dict], None]) -> Req:
    """A VQ-VAE /decode body whose codes (2 grids) `fill` spoils in place."""
    vq = c.vqvae(r)
    codes = c.codes(r, vq, 2)
    fill(codes, vq)
    return _post_json({"model": vq["name"], "codes": codes}, expect)


def _set(value: object) -> Callable[[list, dict], None]:
    def fill(codes: list, vq: dict) -> None:
        codes[1][0][0] = value

    return fill


# -- the good requests: (kind, weight, builder) ----------------------------------------------------


def good_sample(c: Context, r: np.random.Generator) -> Req:
    params = c.sample_params(r)
    seeded = r.random() < 0.9
    if seeded:
        params["seed"] = int(r.integers(0, MAX_SEED, dtype=np.int64)) if r.random() < 0.1 else int(r.integers(0, 2**31))
    return Req("sample", "GET", "/sample", params, headers=c.accept(r), deterministic=seeded)


def good_decode(c: Context, r: np.random.Generator) -> Req:
    model = c.model(r)
    rows = int(r.integers(1, 5 if model.get("decoder") == "autoregressive" else 9))
    if model["kind"] == "vae":
        body = {"model": model["name"], "z": c.latents(r, model, rows)}
    else:
        body = {"model": model["name"], "codes": c.codes(r, model, rows)}
    return Req("decode", "POST", "/decode", body=_json(body), headers={"Content-Type": "application/json", **c.accept(r)},
               deterministic=True)  # fmt: skip


def good_reconstruct(c: Context, r: np.random.Generator) -> Req:
    files = [("file", c.upload(r)) for _ in range(int(r.integers(1, 5)))]
    return Req("reconstruct", "POST", "/reconstruct", {"model": c.model(r)["name"]}, files=files,
               headers=c.accept(r), deterministic=True)  # fmt: skip


def good_encode(c: Context, r: np.random.Generator) -> Req:
    model = c.model(r)
    params: dict[str, str | int | float] = {"model": model["name"]}
    if model["kind"] == "vqvae" and r.random() < 0.3:
        params["include_z_e"] = "true"
    files = [("file", c.upload(r)) for _ in range(int(r.integers(1, 4)))]
    return Req("encode", "POST", "/encode", params, files=files, deterministic=True)


def good_interpolate(c: Context, r: np.random.Generator) -> Req:
    params: dict[str, str | int | float] = {"model": c.model(r)["name"], "steps": int(r.integers(2, 17))}
    if r.random() < 0.7:
        params["method"] = ["slerp", "lerp"][r.integers(2)]
    files = [("a", c.upload(r)), ("b", c.upload(r))]
    return Req("interpolate", "POST", "/interpolate", params, files=files, headers=c.accept(r), deterministic=True)


def good_info(c: Context, r: np.random.Generator) -> Req:
    paths = ("/health", "/ready", "/config", "/models", "/models/problems", "/metrics")
    return Req("info", "GET", paths[r.integers(len(paths))])


GOOD: list[tuple[float, Builder]] = [
    (34, good_sample), (14, good_decode), (14, good_reconstruct), (12, good_encode), (10, good_interpolate),
    (16, good_info),
]  # fmt: skip


# -- the bad requests: every one must get a 4xx; `expect` is the documented status ------------------

BAD: dict[str, Builder] = {
    # /sample
    "sample: unknown model": lambda c, r: _get("/sample", 404, model="no-such-model", n=1, seed=1),
    "sample: a prior's file name as model": lambda c, r: _get("/sample", 404, model=c.prior(r)[1]["model"], n=1),
    "sample: unknown prior": lambda c, r: _sample(c, r, 404, c.vqvae(r), prior="no-such-prior"),
    "sample: prior on a VAE": lambda c, r: _sample(c, r, 422, c.vae(r), prior="pixelcnn"),
    "sample: label on a VAE": lambda c, r: _sample(c, r, 422, c.vae(r), label=1),
    "sample: n=0": lambda c, r: _sample(c, r, 422, n=0),
    "sample: n above max_n": lambda c, r: _sample(c, r, 422, n=c.limits["max_n"] + 1),
    "sample: n negative": lambda c, r: _sample(c, r, 422, n=-3),
    "sample: n not an integer": lambda c, r: _sample(c, r, 422, n=["2.5", "ten", "1e3", ""][r.integers(4)]),
    "sample: temperature=0": lambda c, r: _sample(c, r, 422, temperature=0),
    "sample: temperature negative": lambda c, r: _sample(c, r, 422, temperature=-1),
    "sample: temperature above the maximum": lambda c, r: _sample(
        c, r, 422, temperature=[MAX_TEMPERATURE * 1.1, 1e300][r.integers(2)]),
    "sample: temperature=1e-50": lambda c, r: _prior_sample(c, r, 422, temperature="1e-50"),
    "sample: temperature=nan": lambda c, r: _sample(c, r, 422, temperature=["nan", "NaN", "-nan"][r.integers(3)]),
    "sample: temperature=inf": lambda c, r: _sample(c, r, 422, temperature=["inf", "infinity", "1e400"][r.integers(3)]),
    "sample: label out of range": lambda c, r: _prior_sample(c, r, 422, conditional=True, label=10**int(r.integers(0, 20)) + 9),
    "sample: label negative": lambda c, r: _prior_sample(c, r, 422, conditional=True, label=-1),
    "sample: seed negative": lambda c, r: _sample(c, r, 422, seed=-1),
    "sample: seed of 2**63 or more": lambda c, r: _sample(c, r, 422, seed=[2**63, 2**64, 10**30][r.integers(3)]),
    "sample: no model": lambda c, r: _sample(c, r, 422, model=None),
    "sample: POST": lambda c, r: replace(_sample(c, r, 405), method="POST"),
    # /decode
    "decode: unknown model": lambda c, r: _post_json({"model": "no-such-model", "z": [[0.0] * 32]}, 404),
    "decode: z of the wrong length": lambda c, r: _z(c, r, 422, lambda z: z[1].append(0.5) if r.random() < 0.5 else z[1].pop()),
    "decode: NaN in z": lambda c, r: _z(c, r, 422, lambda z: z[1].__setitem__(3, math.nan)),
    "decode: Infinity in z": lambda c, r: _z(c, r, 422, lambda z: z[0].__setitem__(0, -math.inf)),
    "decode: z beyond float32": lambda c, r: _z(c, r, 422, lambda z: z[0].__setitem__(1, 1e39)),
    "decode: a string in z": lambda c, r: _z(c, r, 422, lambda z: z[1].__setitem__(2, "abc")),
    "decode: a numeric string in z": lambda c, r: _z(c, r, 422, lambda z: z[1].__setitem__(2, "0.5")),
    "decode: true in z": lambda c, r: _z(c, r, 422, lambda z: z[0].__setitem__(2, True)),
    "decode: null in z": lambda c, r: _z(c, r, 422, lambda z: z[0].__setitem__(2, None)),
    "decode: z not nested": lambda c, r: _post_json({"model": c.vae(r)["name"], "z": c.latents(r, c.vae(r), 1)[0]}, 422),
    "decode: z empty": lambda c, r: _post_json({"model": c.vae(r)["name"], "z": []}, 422),
    "decode: z of more than max_n rows": lambda c, r: _post_json(
        {"model": (v := c.vae(r))["name"], "z": [[0.0] * v["latent_shape"][0]] * (c.limits["max_n"] + 1)}, 422),
    "decode: true as a code": lambda c, r: _codes(c, r, 422, _set(True)),
    "decode: a code out of range": lambda c, r: _codes(c, r, 422, lambda codes, vq: codes[0][1].__setitem__(
        2, [vq["codebook_size"], -1, 2**70][r.integers(3)])),
    "decode: a fractional code": lambda c, r: _codes(c, r, 422, _set(1.5)),
    "decode: a string as a code": lambda c, r: _codes(c, r, 422, _set("7")),
    "decode: a code grid of the wrong shape": lambda c, r: _post_json(
        {"model": (vq := c.vqvae(r))["name"], "codes": c.codes(r, vq, 1, (vq["code_shape"][0] + 1, vq["code_shape"][1]))}, 422),
    "decode: codes for a VAE": lambda c, r: _post_json({"model": c.vae(r)["name"], "codes": [[[0]]]}, 422),
    "decode: z for a VQ-VAE": lambda c, r: _post_json({"model": c.vqvae(r)["name"], "z": [[0.0] * 32]}, 422),
    "decode: neither z nor codes": lambda c, r: _post_json({"model": c.model(r)["name"]}, 422),
    "decode: not JSON": lambda c, r: _post_json([b"hello", b"{", b'{"model": "vae", "z": [[1,]]}', b""][r.integers(4)], 422),
    "decode: a JSON list": lambda c, r: _post_json([1, 2, 3], 422),
    "decode: model not a string": lambda c, r: _post_json({"model": 5, "z": [[0.0] * 32]}, 422),
    "decode: no model": lambda c, r: _post_json({"z": c.latents(r, c.vae(r), 1)}, 422),
    "decode: body over max_json_bytes": lambda c, r: _post_json(c.blob("json-too-large"), 413),
    "decode: GET": lambda c, r: _get("/decode", 405),
    # uploads
    "upload: unknown model": lambda c, r: c.upload_req(r, [c.upload(r)], 404, model="no-such-model"),
    "upload: random bytes": lambda c, r: c.upload_req(r, [("x.png", r.bytes(int(r.integers(1, 4000))), "image/png")], 400),
    "upload: a text file": lambda c, r: c.upload_req(r, [("notes.txt", b"hello, not an image\n", "text/plain")], 400),
    "upload: a truncated PNG": lambda c, r: c.upload_req(
        r, [("cut.png", (u := c.upload(r))[1][: len(u[1]) // 2], "image/png")], 400),
    "upload: an empty file": lambda c, r: c.upload_req(r, [("empty.png", b"", "image/png")], 400),
    "upload: one bad file among good ones": lambda c, r: c.upload_req(
        r, [c.upload(r), c.upload(r), ("bad.png", b"GIF89a broken", "image/gif")], 400),
    "upload: a file over max_upload_bytes": lambda c, r: c.upload_req(r, [("huge.png", c.blob("oversized"), "image/png")], 413),
    "upload: an image over max_pixels": lambda c, r: c.upload_req(
        r, [("wide.png", c.blob("too-many-pixels"), "image/png")], 413),
    "upload: more than max_files files": lambda c, r: c.upload_req(r, [c.upload(r)] * (c.limits["max_files"] + 1), 422),
    "upload: no file field": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, paths=("/reconstruct", "/encode")),
                                                  files=[("image", c.upload(r))]),
    "upload: JSON instead of multipart": lambda c, r: replace(
        _post_json({"file": "abc"}, 422, path=["/reconstruct", "/encode", "/interpolate"][r.integers(3)]),
        params={"model": c.model(r)["name"]}),
    "upload: no model": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422), params={}),
    "interpolate: b missing": lambda c, r: Req("", "POST", "/interpolate", {"model": c.model(r)["name"]},
                                               files=[("a", c.upload(r))], expect=422),
    "interpolate: steps=1": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, paths=("/interpolate",)), params={
        "model": c.model(r)["name"], "steps": 1}),
    "interpolate: steps above the maximum": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, paths=("/interpolate",)),
                                                                 params={"model": c.model(r)["name"], "steps": MAX_STEPS + 1}),
    "interpolate: unknown method": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, paths=("/interpolate",)), params={
        "model": c.model(r)["name"], "method": "cubic"}),
    "encode: include_z_e on a VAE": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, paths=("/encode",)), params={
        "model": c.vae(r)["name"], "include_z_e": "true"}),
    # elsewhere
    "unknown path": lambda c, r: _get(["/nope", "/models/vae", "/admin", "/sample/extra"][r.integers(4)], 404),
}  # fmt: skip


def request_mix(c: Context, count: int, bad_fraction: float, seed: int) -> list[Req]:
    """`count` requests from the seed alone: about `bad_fraction` of them bad, kinds drawn uniformly."""
    r = np.random.default_rng(seed)
    weights = np.array([w for w, _ in GOOD])
    bad_kinds = list(BAD)
    reqs: list[Req] = []
    while len(reqs) < count:
        try:
            if r.random() < bad_fraction:
                name = bad_kinds[r.integers(len(bad_kinds))]
                reqs.append(replace(BAD[name](c, r), kind=f"bad: {name}", good=False, deterministic=False))
            else:
                reqs.append(GOOD[r.choice(len(GOOD), p=weights / weights.sum())][1](c, r))
        except Skip:
            continue  # this server lacks what the kind needs: draw another
    return reqs


# -- sending ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None  # None: no answer (connection error, timeout)
    ms: float
    body: bytes | None = None  # kept for deterministic requests
    snippet: str = ""  # the start of the answer, or the exception

    @property
    def status_class(self) -> str:
        return "lost" if self.status is None else f"{self.status // 100}xx"


async def send(client: httpx.AsyncClient, req: Req) -> Outcome:
    start = time.perf_counter()
    try:
        response = await client.send(req.build(client))
    except httpx.HTTPError as err:
        return Outcome(None, (time.perf_counter() - start) * 1000, snippet=f"{type(err).__name__}: {err}"[:200])
    ms = (time.perf_counter() - start) * 1000
    snippet = "" if response.headers.get("content-type", "").startswith("image/") else response.text[:200]
    return Outcome(response.status_code, ms, response.content if req.deterministic else None, snippet)


def client_for(url: str, timeout_s: float) -> httpx.AsyncClient:
    """load.py's worker_client (one keep-alive connection) with our timeout."""
    client = worker_client(url)
    client.timeout = httpx.Timeout(timeout_s)
    return client


async def alone_pass(url: str, reqs: list[Req], timeout_s: float) -> dict[int, Outcome]:
    """Every deterministic good request, one after another on one connection."""
    out: dict[int, Outcome] = {}
    todo = [i for i, req in enumerate(reqs) if req.good and req.deterministic]
    start = last = time.perf_counter()
    async with client_for(url, timeout_s) as client:
        for done, i in enumerate(todo, 1):
            out[i] = await send(client, reqs[i])
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"  alone: {done}/{len(todo)} in {last - start:.0f} s", flush=True)
    return out


async def load_pass(url: str, reqs: list[Req], concurrency: int, timeout_s: float) -> tuple[list[Outcome | None], float]:
    """The whole mix in order, through `concurrency` workers with one connection each."""
    outcomes: list[Outcome | None] = [None] * len(reqs)
    order = iter(range(len(reqs)))  # shared: each index goes to one worker
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        for i in order:
            outcomes[i] = await send(client, reqs[i])
            done += 1

    async def progress(start: float) -> None:
        while True:
            await asyncio.sleep(10)
            got = [o for o in outcomes if o is not None]
            print(f"  load: {done}/{len(reqs)} in {time.perf_counter() - start:.0f} s, "
                  f"5xx {sum(o.status_class == '5xx' for o in got)}, lost {sum(o.status is None for o in got)}",
                  flush=True)  # fmt: skip

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(url, timeout_s)) for _ in range(concurrency)]
        start = time.perf_counter()
        reporter = asyncio.create_task(progress(start))
        try:
            await asyncio.gather(*(worker(client) for client in clients))
        finally:
            reporter.cancel()
        seconds = time.perf_counter() - start
    return outcomes, seconds


# -- report ----------------------------------------------------------------------------------------


@dataclass
class Findings:
    """Counts and the first --examples examples of each kind of problem."""

    limit: int
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.limit:
            self.examples[kind].append(text)


def first_difference(a: bytes, b: bytes) -> str:
    offset = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    text = f"{len(a)} vs {len(b)} B, first difference at byte {offset}"
    if a[:4] == b[:4] == b"\x89PNG":
        from peers import pixel_difference  # benchmarks/peers.py (imports torch: only when needed)

        text += f"; {pixel_difference(a, b)}"
    return text


def analyse(reqs: list[Req], alone: dict[int, Outcome], load: list[Outcome | None], findings: Findings) -> dict:
    """Fill `findings`; return the counts the targets are judged on."""
    counts = Counter()
    for i, req in enumerate(reqs):
        out = load[i]
        if out is None:  # interrupted
            continue
        where = f"{req.kind}: {req.describe()} -> {out.status if out.status is not None else 'no answer'}"
        if out.status is None:
            findings.add("lost (connection error or timeout)", f"{where} after {out.ms:.0f} ms: {out.snippet}")
        elif out.status >= 500:
            findings.add("5xx", f"{where}: {out.snippet}")
        if req.good:
            counts["good"] += 1
            failed_alone = i in alone and alone[i].status != 200
            if failed_alone:
                a = alone[i]
                findings.add("good request not 2xx alone",
                             f"{req.kind}: {req.describe()} -> {a.status if a.status is not None else 'no answer'}: {a.snippet}")
            if out.status is not None and not 200 <= out.status < 300:
                findings.add("good request not 2xx under load", f"{where}: {out.snippet}")
            if failed_alone or out.status is None or not 200 <= out.status < 300:
                counts["good not 2xx"] += 1
            if req.deterministic:
                if out.status == 200 and alone.get(i) is not None and alone[i].status == 200:
                    counts["compared"] += 1
                    if out.body != alone[i].body:
                        counts["mismatched"] += 1
                        findings.add("mismatched (load vs alone)",
                                     f"{req.kind}: {req.describe()}: {first_difference(out.body or b'', alone[i].body or b'')}")
                else:
                    counts["not compared"] += 1
        else:
            counts["bad"] += 1
            if out.status is None or not 400 <= out.status < 500:
                counts["bad not 4xx"] += 1
                if out.status is not None:
                    findings.add(f"bad request answered {out.status_class}", f"{where}: {out.snippet[:120]}")
            elif out.status != req.expect:
                findings.add("bad request answered another 4xx than documented (informational)",
                             f"{req.kind}: expected {req.expect}, got {out.status}: {out.snippet[:100]}")
        counts["5xx"] += out.status is not None and out.status >= 500
        counts["lost"] += out.status is None
    return counts


def endpoint_rows(reqs: list[Req], load: list[Outcome | None]) -> list[list[str]]:
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for req, out in zip(reqs, load):
        if out is not None:
            groups[req.endpoint].append(out)
    rows = []
    for name, outs in [*sorted(groups.items()), ("all", [o for outs in groups.values() for o in outs])]:
        classes = Counter(o.status_class for o in outs)
        p = percentiles([o.ms for o in outs if o.status is not None])
        rows.append([name, str(len(outs)), *(str(classes.get(k, 0)) for k in ("2xx", "3xx", "4xx", "5xx", "lost")),
                     *(fmt_ms(v) for v in p)])  # fmt: skip
    return rows


def bad_kind_rows(reqs: list[Req], load: list[Outcome | None]) -> list[list[str]]:
    """Per bad kind whose answers were not all 4xx: the statuses it got."""
    got: dict[str, Counter[str]] = defaultdict(Counter)
    for req, out in zip(reqs, load):
        if out is not None and not req.good:
            got[req.kind][str(out.status) if out.status is not None else "lost"] += 1
    rows = []
    for kind, statuses in sorted(got.items()):
        if any(not s.startswith("4") for s in statuses):
            rows.append([kind.removeprefix("bad: "), " ".join(f"{s}x{n}" for s, n in sorted(statuses.items()))])
    return rows


ENDPOINT_HEADERS = ["endpoint", "sent", "2xx", "3xx", "4xx", "5xx", "lost", "p50 ms", "p90 ms", "p99 ms", "max ms"]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["--:"] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in [headers, align, *rows])


def target_lines(counts: Counter, rss: dict[str, int | None]) -> list[str]:
    before, after, peak = rss.get("before"), rss.get("after"), rss.get("peak")
    if before and after:
        ratio = after / before
        rss_line = (f"server RSS after / before the load: {fmt_mb(after)} / {fmt_mb(before)} = {ratio:.3f} "
                    f"(peak {fmt_mb(peak)} during the load; target <= {RSS_RATIO_TARGET:.2f}): "
                    f"{verdict(ratio <= RSS_RATIO_TARGET)}")  # fmt: skip
    else:
        rss_line = "server RSS: not measured (no server process: give --pid with --url)"
    return [
        f"5xx responses: {counts['5xx']} (target 0): {verdict(counts['5xx'] == 0)}",
        f"lost responses (connection errors, timeouts): {counts['lost']} (target 0): {verdict(counts['lost'] == 0)}",
        f"mismatched deterministic responses, under load vs alone: {counts['mismatched']} of {counts['compared']} "
        f"compared ({counts['not compared']} not comparable: not 200 in one pass) (target 0): "
        f"{verdict(counts['mismatched'] == 0)}",
        f"bad requests not answered 4xx: {counts['bad not 4xx']} of {counts['bad']} (target 0): "
        f"{verdict(counts['bad not 4xx'] == 0)}",
        f"good requests not answered 2xx (alone or under load): {counts['good not 2xx']} of {counts['good']} "
        f"(target 0): {verdict(counts['good not 2xx'] == 0)}",
        rss_line,
    ]


def write_markdown(path: Path, command: str, header: list[str], sections: list[tuple[str, list[str], str]]) -> None:
    text = ["## Soak: mixed good and bad requests under load", "", "```", f"$ {command}", *header, "```", ""]
    for title, lines, table in sections:
        text += [f"**{title}**", ""]
        if table:
            text += [table, ""]
        text += [f"- {line}" for line in lines] + [""]
    path.write_text("\n".join(text))


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the mix (default 10000)")
    parser.add_argument("--concurrency", type=int, default=64, help="workers, one connection each (default 64)")
    parser.add_argument("--bad-fraction", type=float, default=0.2, help="share of bad requests (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server we start, e.g. GENSERVE_MAX_QUEUE=256")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="GENSERVE_WEIGHTS_DIR (default weights/)")
    parser.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S,
                        help=f"client timeout per request in s (default {CLIENT_TIMEOUT_S:g}); past it, a response is lost")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the load's end and the RSS reading")
    parser.add_argument("--examples", type=int, default=5, help="examples printed per kind of finding (default 5)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report as markdown to this file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the server's log here (default: a temporary directory)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for GET /ready")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)])
    args.env = parse_env(args.env, parser)
    if args.requests < 1 or args.concurrency < 1 or not 0 <= args.bad_fraction <= 1:
        parser.error("--requests and --concurrency must be at least 1, --bad-fraction within [0, 1]")
    if args.pid is not None and not args.url:
        parser.error("--pid goes with --url (a server we start is measured anyway)")
    if not args.url and not args.weights.is_dir():
        parser.error(f"--weights {args.weights} is not a directory")
    return args


def header_lines(args: argparse.Namespace, config: dict, models: list[dict], image_source: str, reqs: list[Req]) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kinds = Counter(r.kind if r.good else "bad" for r in reqs)
    det = sum(r.good and r.deterministic for r in reqs)
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs ({cores} usable)",
        "server: " + (args.url if args.url else "python -m app" + "".join(f" {k}={v}" for k, v in args.env.items())),
        "config: " + ", ".join(f"{k}={config[k]}" for k in CONFIG_KEYS if k in config),
        describe_models(models),
        f"mix (seed {args.seed}): {len(reqs)} requests, " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        + f"; {det} deterministic, sent alone first; {len(BAD)} bad kinds; uploads: {image_source}",
        f"load: closed loop of {args.concurrency} workers, one connection each; client timeout {args.timeout:g} s",
    ]


async def run(args: argparse.Namespace, url: str, server: Server | None) -> int:
    models = httpx.get(f"{url}/models", timeout=30).raise_for_status().json()
    config = httpx.get(f"{url}/config", timeout=30).raise_for_status().json()
    pngs, image_source = upload_images(16, args.seed)
    reqs = request_mix(Context.from_server(models, config, upload_variants(pngs)), args.requests, args.bad_fraction, args.seed)
    header = header_lines(args, config, models, image_source, reqs)
    if warning := busy_warning():
        header.append(warning)
    print("\n".join(header), flush=True)

    pid = server.process.pid if server is not None and server.process is not None else args.pid
    memory = ServerMemory(pid) if pid is not None else None
    start = time.perf_counter()
    alone = await alone_pass(url, reqs, args.timeout)
    print(f"alone: {len(alone)} deterministic good requests, one at a time, in {time.perf_counter() - start:.1f} s; "
          f"not 200: {sum(o.status != 200 for o in alone.values())}", flush=True)  # fmt: skip
    await asyncio.sleep(1.0)
    rss: dict[str, int | None] = {"before": memory.settled() if memory else None}
    monitor = RssMonitor(memory, 0.05) if memory else contextlib.nullcontext()
    with monitor:
        load, seconds = await load_pass(url, reqs, args.concurrency, args.timeout)
    if memory:
        rss["peak"] = monitor.peak  # type: ignore[union-attr]
        await asyncio.sleep(args.settle)
        rss["after"] = memory.settled()
    answered = sum(o is not None and o.status is not None for o in load)
    print(f"load: {len(reqs)} requests in {seconds:.1f} s ({answered / seconds:.1f} answers/s)", flush=True)
    ready = "unknown"
    with contextlib.suppress(httpx.HTTPError):
        ready = str(httpx.get(f"{url}/ready", timeout=10).status_code)

    findings = Findings(args.examples)
    counts = analyse(reqs, alone, load, findings)
    targets = target_lines(counts, rss)
    rows = endpoint_rows(reqs, load)
    bad_rows = bad_kind_rows(reqs, load)
    finding_lines = [f"{kind} ({findings.counts[kind]}): {ex}" for kind, exs in findings.examples.items() for ex in exs]
    log_lines = server.log_errors(10) if server is not None else []
    notes = [f"alone pass: {len(alone)} requests; load: {seconds:.1f} s, {answered / seconds:.1f} answers/s; "
             f"GET /ready after the load: {ready}",
             "latencies: every answered request (good and bad), ms as the client sees it"]  # fmt: skip

    print("\n" + text_table(ENDPOINT_HEADERS, rows))
    print("\n".join(f"  {n}" for n in notes))
    print("\ntargets:\n" + "\n".join(f"  {t}" for t in targets))
    if bad_rows:
        print("\nbad kinds not always answered 4xx:\n" + text_table(["kind", "statuses"], bad_rows))
    if finding_lines:
        print(f"\nfindings (at most {args.examples} examples each):\n" + "\n".join(f"  {f}" for f in finding_lines))
    if log_lines:
        print("\nserver log errors:\n" + "\n".join(f"  {line}" for line in log_lines))
    if args.markdown:
        sections = [
            ("Per endpoint", notes, markdown_table(ENDPOINT_HEADERS, rows)),
            ("Targets", targets, ""),
            ("Bad kinds not always answered 4xx", [], markdown_table(["kind", "statuses"], bad_rows) if bad_rows else "none"),
            ("Findings", [f.replace("`", "'") for f in finding_lines] or ["none"], ""),
            *([("Server log errors", log_lines, "")] if log_lines else []),
        ]
        write_markdown(args.markdown, args.command, header, sections)
        print(f"\nmarkdown written to {args.markdown}")
    return 0


def serve_and_run(args: argparse.Namespace, run_fn, prefix: str) -> int:
    """Start (or reach) the server, run `run_fn(args, url, server)` against it, stop it; 130 on Ctrl-C.
    Shared with benchmarks/attacks.py."""
    stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            with serving(args, log_dir) as (url, server):
                return asyncio.run(run_fn(args, url, server))
        except KeyboardInterrupt:
            print("\ninterrupted: the server is stopped", flush=True)
            return 130


def main(argv: list[str] | None = None) -> int:
    return serve_and_run(parse_args(argv), run, "genserve-soak-")


if __name__ == "__main__":
    sys.exit(main())
