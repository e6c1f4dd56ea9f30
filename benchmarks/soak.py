"""Soak test of the real server: thousands of mixed good and bad requests at high concurrency.

Starts the service and builds a mix from --seed over every served model and limit (GET /models,
/config). Good: seeded and unseeded /sample (each prior, with and without a label), /decode,
/reconstruct and /encode (1-4 PNG, JPEG, RGBA, BMP or GIF uploads), /interpolate, the info routes, a
tenth asking for JSON. Bad (--bad-fraction): half schemathesis's negative cases from /openapi.json
(its coverage phase, --schema-examples fuzzed ones per operation), half the kinds of BAD below (what
the schema cannot say: served models and limits, NaN, ...). Every good deterministic request is sent
alone first; then, between two readings of the server's RSS, the mix from --concurrency workers.

Targets, each "met" or "MISSED": no 5xx; no lost responses; every deterministic answer under load
the same bytes as alone; every bad request answered 4xx, every good one 2xx; RSS after the load
within 10% of before. Also: status classes and latencies per endpoint, findings, the log's errors.

    python -m benchmarks.soak                                   # 10,000 requests at C=64 (several minutes)
    python -m benchmarks.soak --requests 300                    # smoke run
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

import httpx
import numpy as np
from PIL import Image

from benchmarks.harness import (
    CLIENT_TIMEOUT_S, MB, Answer, RssMonitor, Server, fmt_mb, fmt_ms, image_difference, machine_lines, on_one_server,
    parse, parser, percentiles, png_bytes, service_lines, table, timed, upload_images, verdict, worker_client,
)  # fmt: skip

OPERATIONS = ("reconstruct", "encode", "decode", "interpolate", "sample")  # GET /models' operations, all of them
RSS_RATIO_TARGET = 1.10  # RSS after the load / before, at most
MAX_SEED = 2**63 - 1  # app/schemas.py
SCHEMA_SHARE = 0.5  # of the bad requests, the share drawn from schemathesis's cases
CONFIG_KEYS = ("resolved_device", "max_batch_size", "max_wait_ms", "max_queue", "request_timeout_s",
               "max_n", "max_files", "max_upload_bytes", "max_pixels", "max_json_bytes", "decode_slots", "pad_batches",
               "torch_threads", "io_threads")  # fmt: skip
Upload = tuple[str, bytes, str]  # (filename, bytes, content type)


@dataclass
class Req:
    """One request of the mix, kept as data so that it can be sent twice (alone, then under load)."""

    kind: str  # "sample", "decode", ... for a good one; "bad: <what>" or "schemathesis: <what>" for a bad one
    method: str
    path: str
    params: dict = field(default_factory=dict)
    content: bytes | None = None  # sent as is: JSON written by json.dumps keeps NaN and Infinity
    files: list[tuple[str, tuple]] = field(default_factory=list)  # (form field, (filename, bytes[, content type]))
    headers: dict[str, str] = field(default_factory=dict)
    good: bool = True
    deterministic: bool = False  # same request, same bytes: compared alone vs under load
    expect: int | None = 200  # the documented status, where known

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"

    def build(self, client: httpx.AsyncClient) -> httpx.Request:
        body = {"files": self.files} if self.files else {"content": self.content} if self.content is not None else {}
        return client.build_request(self.method, self.path, params=self.params or None, headers=self.headers, **body)

    def describe(self, limit: int = 160) -> str:
        text = self.endpoint + (f"?{urlencode(self.params)}" if self.params else "")
        if self.content is not None:
            start = self.content[:100].decode(errors="replace") + "..." * (len(self.content) > 100)
            text += f" {start} ({len(self.content)} B)"
        if self.files:
            parts = Counter(f"{name}={upload[0]} ({len(upload[1])} B)" for name, upload in self.files)
            text += " files: " + ", ".join(f"{p}{f' x{n}' if n > 1 else ''}" for p, n in parts.items())
        text += " [Accept: application/json]" * (self.headers.get("Accept") == "application/json")
        return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # allow_nan: NaN and Infinity go out as literals


def upload_variants(pngs: list[bytes]) -> list[Upload]:
    """Good uploads: the 28x28 PNGs as they are, and some re-encoded (JPEG RGB, RGBA PNG 2x, BMP, GIF)."""
    uploads: list[Upload] = [(f"img{i}.png", data, "image/png") for i, data in enumerate(pngs)]
    for i, data in enumerate(pngs[:8]):
        image, buffer = Image.open(io.BytesIO(data)).convert("L"), io.BytesIO()
        if i % 4 == 1:
            big = image.resize((56, 56)).convert("RGBA")
            big.putalpha(image.resize((56, 56)))
            uploads.append((f"img{i}-rgba.png", png_bytes(big), "image/png"))
            continue
        fmt, mode, name = [("JPEG", "RGB", "jpg"), None, ("BMP", "L", "bmp"), ("GIF", "P", "gif")][i % 4]
        image.convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        uploads.append((f"img{i}.{name}", buffer.getvalue(), f"image/{fmt.lower()}"))
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
        defaults = {"max_n": 256, "max_files": 64, "max_upload_bytes": 10 * MB, "max_pixels": 2048**2, "max_json_bytes": MB}
        offers_all = [m for m in models if len(m.get("operations", OPERATIONS)) == len(OPERATIONS)]  # not vae_context
        return cls([m for m in offers_all if m["kind"] == "vae"], [m for m in offers_all if m["kind"] == "vqvae"],
                   {key: int(config.get(key, value)) for key, value in defaults.items()}, uploads)  # fmt: skip

    def model(self, r: np.random.Generator) -> dict:
        """Any model; the autoregressive VAE (~0.3 s an image) 10x less often."""
        models = self.vaes + self.vqvaes
        weights = np.array([0.1 if m.get("decoder") == "autoregressive" else 1.0 for m in models])
        return models[r.choice(len(models), p=weights / weights.sum())]

    def vae(self, r: np.random.Generator) -> dict:
        fast = [m for m in self.vaes if m.get("decoder") != "autoregressive"] or self.vaes
        return fast[r.integers(len(fast))] if fast else _skip()

    def vqvae(self, r: np.random.Generator) -> dict:
        return self.vqvaes[r.integers(len(self.vqvaes))] if self.vqvaes else _skip()

    def prior(self, r: np.random.Generator, *, conditional: bool = False) -> tuple[dict, dict]:
        pairs = [(m, p) for m in self.vqvaes for p in m.get("priors") or [] if p["num_classes"] or not conditional]
        return pairs[r.integers(len(pairs))] if pairs else _skip()

    def upload(self, r: np.random.Generator) -> Upload:
        return self.uploads[r.integers(len(self.uploads))]

    @staticmethod
    def accept(r: np.random.Generator) -> dict[str, str]:
        return {"Accept": "application/json"} if r.random() < 0.1 else {}

    def sample_params(self, r: np.random.Generator, model: dict | None = None) -> dict:
        model = model or self.model(r)
        slow = model.get("decoder") == "autoregressive"
        n = int(r.integers(1, 5)) if slow else 64 if r.random() < 0.05 else int(r.integers(1, 17))
        params: dict = {"model": model["name"], "n": min(n, self.limits["max_n"])}
        if r.random() < 0.5:
            params["temperature"] = round(float(r.uniform(0.3, 2.0)), 3)
        if model["kind"] == "vqvae":
            priors = model.get("priors") or _skip()
            prior = priors[r.integers(len(priors))]
            if r.random() < 0.8:
                params["prior"] = prior["name"]
            else:
                prior = next((p for p in priors if p["default"]), prior)
            if prior["num_classes"] and r.random() < 0.5:
                params["label"] = int(r.integers(prior["num_classes"]))
        return params

    @staticmethod
    def latents(r: np.random.Generator, model: dict, rows: int) -> list[list[float]]:
        return np.round(r.normal(size=(rows, model["latent_shape"][0])), 4).tolist()

    @staticmethod
    def codes(r: np.random.Generator, model: dict, rows: int, shape: tuple[int, int] | None = None) -> list:
        return r.integers(model["codebook_size"], size=(rows, *(shape or model["code_shape"]))).tolist()

    def upload_req(self, r: np.random.Generator, bad: list[Upload], expect: int, paths: tuple[str, ...] = (),
                   **params: object) -> Req:  # fmt: skip
        """An upload request holding the `bad` uploads (plus a good one where /interpolate needs two)."""
        paths = paths or (("/reconstruct", "/encode", "/interpolate") if len(bad) <= 2 else ("/reconstruct", "/encode"))
        path = paths[r.integers(len(paths))]
        if path == "/interpolate":
            a, b = (bad + [self.upload(r)])[:2] if r.random() < 0.5 else ([self.upload(r)] + bad)[-2:]
            files = [("a", a), ("b", b)]
        else:
            files = [("file", u) for u in bad]
        return Req("", "POST", path, {"model": self.model(r)["name"], **params}, files=files, expect=expect)

    def blob(self, name: str) -> bytes:
        """Large bodies, made once: one byte over max_upload_bytes, an image over max_pixels, JSON over max_json_bytes."""
        if name not in self._blobs:
            if name == "oversized":
                self._blobs[name] = b"\x89PNG\r\n\x1a\n" + bytes(self.limits["max_upload_bytes"] - 7)
            elif name == "too-many-pixels":
                side = math.isqrt(self.limits["max_pixels"]) + 1  # side x side > max_pixels
                self._blobs[name] = png_bytes(Image.new("L", (side, side)))
            else:
                vae = self.vaes[0] if self.vaes else {"name": "vae", "latent_shape": [32]}
                row = "[" + ",".join(["0.000001"] * vae["latent_shape"][0]) + "]"
                rows = ",".join([row] * (self.limits["max_json_bytes"] // len(row) + 2))
                self._blobs[name] = f'{{"model":"{vae["name"]}","z":[{rows}]}}'.encode()
        return self._blobs[name]


def _skip():
    raise Skip


Builder = Callable[[Context, np.random.Generator], Req]


def _post_json(body: object, expect: int) -> Req:
    return Req("", "POST", "/decode", content=body if isinstance(body, bytes) else _json(body),
               headers={"Content-Type": "application/json"}, expect=expect)  # fmt: skip


def _sample(c: Context, r: np.random.Generator, expect: int, base: dict | None = None, **changes: object) -> Req:
    """A valid /sample query (for model `base`, or any) with `changes` applied."""
    return Req("", "GET", "/sample", {"seed": int(r.integers(0, 2**31)), **c.sample_params(r, base), **changes},
               expect=expect)  # fmt: skip


def _prior_sample(c: Context, r: np.random.Generator, expect: int, **changes: object) -> Req:
    model, prior = c.prior(r, conditional="label" in changes)
    return Req("", "GET", "/sample", {"model": model["name"], "prior": prior["name"], "n": 1, **changes}, expect=expect)


def _spoilt(c: Context, r: np.random.Generator, name: str, spoil: Callable[[list, dict], object]) -> Req:
    """A /decode body, 2 rows of a VAE's z or of a VQ-VAE's codes (`name`), that `spoil` changes in place: 422."""
    model = c.vae(r) if name == "z" else c.vqvae(r)
    rows = c.latents(r, model, 2) if name == "z" else c.codes(r, model, 2)
    spoil(rows, model)
    return _post_json({"model": model["name"], name: rows}, 422)


def good_sample(c: Context, r: np.random.Generator) -> Req:
    params, seeded = c.sample_params(r), r.random() < 0.9
    if seeded:
        params["seed"] = int(r.integers(0, MAX_SEED, dtype=np.int64)) if r.random() < 0.1 else int(r.integers(0, 2**31))
    return Req("sample", "GET", "/sample", params, headers=c.accept(r), deterministic=seeded)


def good_decode(c: Context, r: np.random.Generator) -> Req:
    model = c.model(r)
    rows = int(r.integers(1, 5 if model.get("decoder") == "autoregressive" else 9))
    body = {"model": model["name"], **({"z": c.latents(r, model, rows)} if model["kind"] == "vae"
                                       else {"codes": c.codes(r, model, rows)})}  # fmt: skip
    return Req("decode", "POST", "/decode", content=_json(body), deterministic=True,
               headers={"Content-Type": "application/json", **c.accept(r)})  # fmt: skip


def good_upload(path: str, most: int) -> Builder:
    """/reconstruct or /encode of 1 to `most` uploads (/encode of a VQ-VAE: include_z_e 3 times in 10)."""

    def build(c: Context, r: np.random.Generator) -> Req:
        model = c.model(r)
        params = {"model": model["name"], **({"include_z_e": "true"} if path == "/encode" and model["kind"] == "vqvae"
                                             and r.random() < 0.3 else {})}  # fmt: skip
        files = [("file", c.upload(r)) for _ in range(int(r.integers(1, most + 1)))]
        return Req(path[1:], "POST", path, params, files=files, headers=c.accept(r) if path == "/reconstruct" else {},
                   deterministic=True)  # fmt: skip

    return build


INFO_PATHS = ("/health", "/ready", "/config", "/models", "/models/problems", "/metrics")
GOOD: list[tuple[float, Builder]] = [
    (34, good_sample), (14, good_decode), (14, good_upload("/reconstruct", 4)), (12, good_upload("/encode", 3)),
    (10, lambda c, r: Req("interpolate", "POST", "/interpolate", {
        "model": c.model(r)["name"], "steps": int(r.integers(2, 17)),
        **({"method": ["slerp", "lerp"][r.integers(2)]} if r.random() < 0.7 else {})},
        files=[("a", c.upload(r)), ("b", c.upload(r))], headers=c.accept(r), deterministic=True)),
    (16, lambda c, r: Req("info", "GET", INFO_PATHS[r.integers(len(INFO_PATHS))])),
]  # fmt: skip

BAD: dict[str, Builder] = {  # what schemathesis cannot make; each must get a 4xx (`expect`: the documented one)
    "sample: a prior's file name as model": lambda c, r: Req("", "GET", "/sample", {"model": c.prior(r)[1]["model"]}, expect=404),
    "sample: unknown prior": lambda c, r: _sample(c, r, 404, c.vqvae(r), prior="no-such-prior"),
    "sample: prior on a VAE": lambda c, r: _sample(c, r, 422, c.vae(r), prior="pixelcnn"),
    "sample: label on a VAE": lambda c, r: _sample(c, r, 422, c.vae(r), label=1),
    "sample: n above max_n": lambda c, r: _sample(c, r, 422, n=c.limits["max_n"] + 1),
    "sample: temperature nan or inf": lambda c, r: _sample(c, r, 422, temperature=["nan", "-nan", "inf", "1e400"][r.integers(4)]),
    "sample: label out of range": lambda c, r: _prior_sample(c, r, 422, label=[-1, 10 ** int(r.integers(20)) + 9][r.integers(2)]),
    "decode: z of the wrong length": lambda c, r: _spoilt(
        c, r, "z", lambda z, _: z[1].append(0.5) if r.random() < 0.5 else z[1].pop()),
    "decode: NaN or Infinity in z": lambda c, r: _spoilt(
        c, r, "z", lambda z, _: z[1].__setitem__(3, [math.nan, -math.inf][r.integers(2)])),
    "decode: z beyond float32": lambda c, r: _spoilt(c, r, "z", lambda z, _: z[0].__setitem__(1, 1e39)),
    "decode: a code out of range": lambda c, r: _spoilt(c, r, "codes", lambda codes, vq: codes[1][0].__setitem__(
        0, [vq["codebook_size"], -1, 2**70][r.integers(3)])),
    "decode: a code grid of the wrong shape": lambda c, r: _post_json(
        {"model": (vq := c.vqvae(r))["name"], "codes": c.codes(r, vq, 1, (vq["code_shape"][0] + 1, vq["code_shape"][1]))}, 422),
    "decode: codes for a VAE": lambda c, r: _post_json({"model": c.vae(r)["name"], "codes": [[[0]]]}, 422),
    "decode: z for a VQ-VAE": lambda c, r: _post_json({"model": c.vqvae(r)["name"], "z": [[0.0] * 32]}, 422),
    "decode: neither z nor codes": lambda c, r: _post_json({"model": c.model(r)["name"], **[{}, {"z": []}][r.integers(2)]}, 422),
    "decode: body over max_json_bytes": lambda c, r: _post_json(c.blob("json-too-large"), 413),
    "upload: a truncated PNG": lambda c, r: c.upload_req(r, [("cut.png", (u := c.upload(r)[1])[: len(u) // 2], "image/png")], 400),
    "upload: an empty file": lambda c, r: c.upload_req(r, [("empty.png", b"", "image/png")], 400),
    "upload: one bad file among good ones": lambda c, r: c.upload_req(
        r, [c.upload(r), c.upload(r), ("bad.png", b"GIF89a broken", "image/gif")], 400),
    "upload: a file over max_upload_bytes": lambda c, r: c.upload_req(r, [("huge.png", c.blob("oversized"), "image/png")], 413),
    "upload: an image over max_pixels": lambda c, r: c.upload_req(r, [("wide.png", c.blob("too-many-pixels"), "image/png")], 413),
    "upload: more than max_files files": lambda c, r: c.upload_req(r, [c.upload(r)] * (c.limits["max_files"] + 1), 422),
    "encode: include_z_e on a VAE": lambda c, r: replace(c.upload_req(r, [c.upload(r)], 422, ("/encode",), include_z_e="true"),
                                                         params={"model": c.vae(r)["name"], "include_z_e": "true"}),
    "unknown path": lambda c, r: Req("", "GET", ["/nope", "/models/vae", "/admin", "/sample/extra"][r.integers(4)], expect=404),
}  # fmt: skip


def schema_cases(url: str, models: list[dict], examples: int, seed: int) -> list[Req]:
    """schemathesis's negative cases for every operation of the server's /openapi.json: the coverage
    phase, and `examples` cases of seeded fuzzing with served model and prior names 9 times in 10. Left
    out: the negations a server may rightly ignore (a Content-Type on a request without a body, unknown
    query parameters), as schemathesis's own negative_data_rejection check leaves them out."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.specs.openapi.checks import has_only_additional_properties_in_non_body_parameters

    names = {"models": [m["name"] for m in models] or ["none"],
             "priors": sorted({p["name"] for m in models for p in m.get("priors") or []}) or ["none"]}
    served = {"query.model": "models", "body.model": "models", "query.prior": "priors"}
    config = schemathesis.Config.from_dict({
        "seed": seed, "dictionaries": {key: {"values": values} for key, values in names.items()},
        "parameters": {where: {"dictionary": key, "probability": 0.9} for where, key in served.items()}})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    negative = schemathesis.GenerationMode.NEGATIVE
    cases = []
    for operation in (result.ok() for result in schema.get_all_operations()):
        found = list(schema.iter_coverage_cases(operation, generation_modes=[negative],
                                                generation_config=schema.config.generation_for(operation=operation)))
        check = settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))  # fmt: skip
        with contextlib.suppress(Unsatisfiable):  # nothing to negate: no parameters, no body
            check(given(operation.as_strategy(generation_mode=negative))(lambda case: found.append(case)))()
        bodiless = not operation.body
        for case in found:
            scenario = str(getattr(getattr(case.meta.phase.data, "scenario", None), "value", ""))
            if (bodiless and "content_type" in scenario) or has_only_additional_properties_in_non_body_parameters(case):
                continue
            cases.append(case_request(case, scenario))
    return cases


def case_request(case, scenario: str) -> Req:
    """A schemathesis case as a bad Req (its kind: the phase, the operation and what was negated)."""
    kw = case.as_transport_kwargs()
    headers = {k: v for k, v in kw.get("headers", {}).items() if k.lower() in ("content-type", "accept")}
    what = scenario or (case.meta.phase.data.description or "fuzzing").split("\n")[0].strip(" -")[:60]
    req = Req(f"schemathesis: {case.method.upper()} {case.formatted_path}: {what}", case.method.upper(),
              case.formatted_path, dict(kw.get("params") or {}), headers=headers, good=False, expect=None)  # fmt: skip
    if "json" in kw:
        req.content, req.headers["Content-Type"] = _json(kw["json"]), "application/json"
    elif kw.get("files"):  # httpx wants bytes, schemathesis may give numbers; form fields go as parts too
        def part(value: object) -> tuple:
            value = value if isinstance(value, tuple) else (None, value)
            data = value[1] if isinstance(value[1], bytes) else str(value[1]).encode()
            return (value[0], data, *value[2:])

        req.files = [(n, part(v)) for n, v in kw["files"]] + [(n, part(v)) for n, v in (kw.get("data") or {}).items()]
    elif kw.get("data") is not None:
        req.content = kw["data"] if isinstance(kw["data"], bytes) else str(kw["data"]).encode()
    return req


def request_mix(c: Context, schema: list[Req], count: int, bad_fraction: float, seed: int) -> list[Req]:
    """`count` requests from the seed alone: about `bad_fraction` bad, half of those schemathesis's cases."""
    r = np.random.default_rng(seed)
    weights = np.array([w for w, _ in GOOD])
    reqs: list[Req] = []
    while len(reqs) < count:
        try:
            if r.random() >= bad_fraction:
                reqs.append(GOOD[r.choice(len(GOOD), p=weights / weights.sum())][1](c, r))
            elif schema and r.random() < SCHEMA_SHARE:
                reqs.append(schema[r.integers(len(schema))])
            else:
                name = list(BAD)[r.integers(len(BAD))]
                reqs.append(replace(BAD[name](c, r), kind=f"bad: {name}", good=False, deterministic=False))
        except Skip:
            continue  # this server lacks what the kind needs: draw another
    return reqs


def status_class(answer: Answer) -> str:
    return "lost" if answer.status is None else f"{answer.status // 100}xx"


async def send(url: str, reqs: list[Req], order: list[int], concurrency: int, timeout_s: float
               ) -> tuple[dict[int, Answer], float]:  # fmt: skip
    """reqs[i] for each i of `order`, in order, through `concurrency` workers with one connection each (a
    deterministic request's answer with its body): i -> answer, and the seconds it took."""
    answers: dict[int, Answer] = {}
    todo = iter(order)  # shared: each index goes to one worker

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            answers[i] = await timed(client, reqs[i].build(client), keep_body=reqs[i].deterministic)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(worker_client(url, timeout_s)) for _ in range(concurrency)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
    return answers, time.perf_counter() - start


def first_difference(a: bytes, b: bytes) -> str:
    offset = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    pixels = f"; {image_difference([a], [b])}" if a[:4] == b[:4] == b"\x89PNG" else ""
    return f"{len(a)} vs {len(b)} B, first difference at byte {offset}{pixels}"


def analyse(reqs: list[Req], alone: dict[int, Answer], load: dict[int, Answer]) -> tuple[Counter, dict[str, list[str]]]:
    """The counts the targets are judged on, and every finding by kind."""
    counts: Counter = Counter()
    findings: dict[str, list[str]] = defaultdict(list)
    for i, req in enumerate(reqs):
        if (out := load.get(i)) is None:  # interrupted
            continue
        where = f"{req.kind}: {req.describe()} -> {out.status or 'no answer'}"
        if out.status is None:
            findings["lost (connection error or timeout)"].append(f"{where} after {out.seconds * 1000:.0f} ms: {out.text}")
        elif out.status >= 500:
            findings["5xx"].append(f"{where}: {out.text}")
        ok = out.status is not None and 200 <= out.status < 300
        if req.good:
            counts["good"] += 1
            if i in alone and alone[i].status != 200:
                findings["good request not 2xx alone"].append(f"{req.kind}: {req.describe()} -> {alone[i].show()}")
            if out.status is not None and not ok:
                findings["good request not 2xx under load"].append(f"{where}: {out.text}")
            counts["good not 2xx"] += (i in alone and alone[i].status != 200) or not ok
            if req.deterministic and out.status == 200 and i in alone and alone[i].status == 200:
                counts["compared"] += 1
                if out.body != alone[i].body:
                    counts["mismatched"] += 1
                    findings["mismatched (load vs alone)"].append(
                        f"{req.kind}: {req.describe()}: {first_difference(out.body or b'', alone[i].body or b'')}")
            elif req.deterministic:
                counts["not compared"] += 1
        else:
            counts["bad"] += 1
            if out.status is None or not 400 <= out.status < 500:
                counts["bad not 4xx"] += 1
                if out.status is not None:
                    findings[f"bad request answered {status_class(out)}"].append(f"{where}: {out.text[:120]}")
            elif req.expect is not None and out.status != req.expect:
                findings["bad request answered another 4xx than documented (informational)"].append(
                    f"{req.kind}: expected {req.expect}, got {out.status}: {out.text[:100]}")
        counts["5xx"] += out.status is not None and out.status >= 500
        counts["lost"] += out.status is None
    return counts, findings


ENDPOINT_HEADERS = ["endpoint", "sent", "2xx", "3xx", "4xx", "5xx", "lost", "p50 ms", "p90 ms", "p99 ms", "max ms"]


def endpoint_rows(reqs: list[Req], load: dict[int, Answer]) -> list[list[str]]:
    groups: dict[str, list[Answer]] = defaultdict(list)
    for i, out in sorted(load.items()):
        groups[reqs[i].endpoint].append(out)
    rows = []
    for name, outs in [*sorted(groups.items()), ("all", [o for group in groups.values() for o in group])]:
        classes = Counter(map(status_class, outs))
        rows.append([name, str(len(outs)), *(str(classes.get(k, 0)) for k in ("2xx", "3xx", "4xx", "5xx", "lost")),
                     *map(fmt_ms, percentiles([o.seconds * 1000 for o in outs if o.status is not None]))])
    return rows


def target_lines(counts: Counter, rss: dict[str, int | None]) -> list[str]:
    zeros = [("5xx responses", "5xx", ""), ("lost responses (connection errors, timeouts)", "lost", ""),
             ("mismatched deterministic responses, under load vs alone", "mismatched", f" of {counts['compared']} "
              f"compared ({counts['not compared']} not comparable: not 200 in one pass)"),
             ("bad requests not answered 4xx", "bad not 4xx", f" of {counts['bad']}"),
             ("good requests not answered 2xx (alone or under load)", "good not 2xx", f" of {counts['good']}")]  # fmt: skip
    lines = [f"{what}: {counts[key]}{of} (target 0): {verdict(counts[key] == 0)}" for what, key, of in zeros]
    before, after = rss.get("before"), rss.get("after")
    return lines + [f"server RSS after / before the load: {fmt_mb(after)} / {fmt_mb(before)} = {after / before:.3f} "
                    f"(peak {fmt_mb(rss.get('peak'))} during the load; target <= {RSS_RATIO_TARGET:.2f}): "
                    f"{verdict(after / before <= RSS_RATIO_TARGET)}" if before and after else
                    "server RSS: not measured (the server's processes were gone)"]  # fmt: skip


def parse_args(argv: list[str] | None):
    p = parser(__doc__, "soak")
    p.add_argument("--requests", type=int, default=10_000, help="requests in the mix (default 10000)")
    p.add_argument("--concurrency", type=int, default=64, help="workers, one connection each (default 64)")
    p.add_argument("--bad-fraction", type=float, default=0.2, help="share of bad requests (default 0.2)")
    p.add_argument("--schema-examples", type=int, default=20,
                   help="schemathesis's negative fuzzing cases per operation, beside its coverage phase (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and of schemathesis (default 0)")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT_S,
                   help=f"client timeout per request in s (default {CLIENT_TIMEOUT_S:g}); past it, a response is lost")
    args = parse(p, argv)
    if args.requests < 1 or args.concurrency < 1 or not 0 <= args.bad_fraction <= 1 or args.schema_examples < 0:
        p.error("--requests and --concurrency must be at least 1, --bad-fraction within [0, 1], --schema-examples >= 0")
    return args


async def run(args, server: Server) -> int:
    url, group, models, config = server.url, server.group, server.get_json("/models"), server.get_json("/config")
    pngs, image_source = upload_images(16, args.seed)
    schema = await asyncio.to_thread(schema_cases, url, models, args.schema_examples, args.seed) if args.bad_fraction else []
    reqs = request_mix(Context.from_server(models, config, upload_variants(pngs)), schema, args.requests,
                       args.bad_fraction, args.seed)  # fmt: skip
    kinds = Counter(r.kind if r.good else r.kind.split(":")[0] for r in reqs)
    alone_order = [i for i, r in enumerate(reqs) if r.good and r.deterministic]
    print("\n".join([*machine_lines(), *service_lines(args.env, config, models, CONFIG_KEYS),
                     f"mix (seed {args.seed}): {len(reqs)} requests, " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
                     + f"; {len(alone_order)} deterministic, sent alone first; bad: {len(BAD)} hand-written kinds and "
                     f"{len(schema)} schemathesis cases; uploads: {image_source}",
                     f"load: closed loop of {args.concurrency} workers, one connection each; client timeout "
                     f"{args.timeout:g} s"]), flush=True)  # fmt: skip
    alone, seconds = await send(url, reqs, alone_order, 1, args.timeout)
    print(f"alone: {len(alone)} deterministic good requests, one at a time, in {seconds:.1f} s; not 200: "
          f"{sum(a.status != 200 for a in alone.values())}", flush=True)  # fmt: skip
    await asyncio.sleep(1.0)
    rss: dict[str, int | None] = {"before": group.settled_rss()}  # type: ignore[union-attr]
    with RssMonitor(group, 0.05) as monitor:  # type: ignore[arg-type]
        load, seconds = await send(url, reqs, list(range(len(reqs))), args.concurrency, args.timeout)
    await asyncio.sleep(2.0)  # then the RSS after
    rss.update(peak=monitor.peak, after=group.settled_rss())  # type: ignore[union-attr]
    answered = sum(a.status is not None for a in load.values())
    ready = "unknown"
    with contextlib.suppress(httpx.HTTPError):
        ready = str(httpx.get(f"{url}/ready", timeout=10).status_code)
    counts, findings = analyse(reqs, alone, load)
    print(f"load: {len(reqs)} requests in {seconds:.1f} s ({answered / seconds:.1f} answers/s); GET /ready after the "
          f"load: {ready}\n\n" + table(ENDPOINT_HEADERS, endpoint_rows(reqs, load))
          + "\n  latencies: every answered request (good and bad), ms as the client sees it")  # fmt: skip
    for title, lines in (("targets", target_lines(counts, rss)), ("findings (at most 5 examples each)",
                          [f"{kind} ({len(texts)}): {text}" for kind, texts in findings.items() for text in texts[:5]]),
                         ("server log errors", server.log_errors(10))):  # fmt: skip
        if lines:
            print(f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return on_one_server(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
