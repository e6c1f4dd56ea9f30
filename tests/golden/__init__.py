"""Golden outputs of the shipped models: what every operation of every weight file in weights/ answers.

`compute` starts the real app (in-process, on the CPU, with the fixed `settings`) on a weights
directory and asks every served model every operation it offers (GET /models' `operations`), with
fixed inputs: /sample at a few seeds, sizes and temperatures (a VQ-VAE: with every prior, with a
label for a class-conditional one, and once with the default prior), /reconstruct and /encode of
the bundled example images (app/static/samples) of the model's channels and two seeded random
images, /decode of seeded latents or code grids, /interpolate (slerp and lerp) between two example
images. Each request is one case; its record holds, per answered item, a short hash of the exact
values (an image's decoded pixels as uint8, so not the PNG bytes, which depend on zlib; /encode's
float32 values as sent, its codes as ints) and a signature (the item's mean and two fixed
projections, for telling rounding from a real change), the answer's shape, and a hash of the inputs
sent. A prior's samples are recorded under the prior's weight file (`depends_on` names its VQ-VAE's
file), everything else under the model's file; each file's SHA-256 is recorded, so a replaced weight
file is reported as such, not as a change of behaviour.

`compare` says, per (weight file, operation), which cases answer otherwise than recorded. On the
machine kind the record was written on (`machine`: torch, its switches, the kernel libraries'
environment, the CPU's model and flags) the hashes must match: the answers are bit-exact there (run twice, they are; the settings fix the pass sizes and threads,
which change the last bits of floats). Elsewhere float rounding differs between kernels, so only
the signatures are compared, within SIGNATURE_TOLERANCE. Rounding floats before hashing would not
help: with thousands of values per item, some always lie at a rounding boundary.

tests/test_golden.py compares the shipped files' answers with GOLDEN (tests/golden/shipped.json).
After a deliberate change of behaviour, or of a shipped weight file, write it again and review
the diff (it names every case whose answer changed):

    python -m tests.golden --write
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from asgi_lifespan import LifespanManager
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "weights"
SAMPLES = ROOT / "app" / "static" / "samples"
GOLDEN = Path(__file__).with_name("shipped.json")
REGENERATE = "python -m tests.golden --write"
HASH_CHARS = 16  # of each item's SHA-256
# How far a signature may move on another machine kind, by the kind of values. Pixels: one pixel off
# by one moves a projection by at most sqrt(2 / pixels), 0.05 at 28 x 28 (measured: 0.02 for a pass
# of another size), while z scaled by 1.01 at /sample moved them by 0.27 to 15. Codes: exactly.
# Floats (/encode): rounding moves them by about 1e-6.
SIGNATURE_TOLERANCE = {"uint8": 0.1, "int64": 0.0, "float32": 1e-4}

# (n, seed, temperature) of a VAE's /sample cases: one image, a few, a few at another temperature
VAE_SAMPLES = ((1, 0, 1.0), (4, 1, 1.0), (4, 2, 0.5))
# (n, seed, temperature, label) with each prior; no label: a conditional prior draws one per image
PRIOR_SAMPLES = ((1, 0, 1.0, None), (4, 1, 1.0, None), (4, 2, 0.5, "3"))
DEFAULT_PRIOR_SAMPLE = (2, 5, 1.0)  # a VQ-VAE's /sample without `prior`
DECODE_ITEMS, DECODE_SEED = 4, 0
INTERPOLATE_STEPS = 5
RANDOM_IMAGES = 2  # beside the bundled examples, seeded random images of the model's own shape
INTERPOLATE_ENDS = {1: ("sneaker.png", "tshirt.png"), 3: ("cat.png", "horse.png")}  # by the model's channels


def settings(weights: Path):
    """Every setting fixed whatever GENSERVE_* says (each one not named here at its default, the
    limits included): the CPU, float32, one torch thread, passes unpadded (the requests run one after
    another, so each pass holds exactly its request's rows, and no pass-size check runs), no check
    cache, no reloading."""
    from app.settings import Settings

    defaults = {name: f.get_default(call_default_factory=True) for name, f in Settings.model_fields.items()}
    return Settings(**{**defaults, **dict(
        weights_dir=weights, device="cpu", precision="fp32", cuda_graphs=False, pad_batches=False,
        torch_threads=1, compute_slots=1, max_batch_size=64, max_n=64, max_wait_ms=0.0, express_items=0,
        request_timeout_s=300.0, check_cache_dir=None, reload_interval_s=0)})


def machine() -> dict[str, Any]:
    """What the exact values depend on besides the code and the files: what the pass-size checks key
    their verdicts on (app/checks.py's machine_key: torch, its switches, the kernel libraries'
    environment variables, the CPU's model and flags)."""
    from app.checks import machine_key

    return machine_key(torch.device("cpu"))


def _signature(values: np.ndarray) -> list[float]:
    """[mean, two fixed projections normalised to the mean's scale] of one item's values."""
    x = values.astype(np.float64).reshape(-1)
    i = np.arange(1, x.size + 1, dtype=np.float64)
    projections = [float(x @ np.cos(i * k * 0.7548776662466927 + k) * math.sqrt(2 / x.size)) for k in (1, 2)]
    return [float(f"{v:.7g}") for v in (float(x.mean()), *projections)]


def _item_hash(values: np.ndarray) -> str:
    data = f"{values.shape}|{values.dtype}|".encode() + np.ascontiguousarray(values).tobytes()
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def _record(items: list[np.ndarray], inputs: bytes | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "shape": [len(items), *items[0].shape],
        "dtype": str(items[0].dtype),
        "items": [_item_hash(v) for v in items],
        "signatures": [_signature(v) for v in items],
    }
    if inputs is not None:
        record["inputs"] = hashlib.sha256(inputs).hexdigest()[:HASH_CHARS]
    return record


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise AssertionError(f"{response.request.method} {response.request.url}: {response.status_code} "
                             f"{response.text[:300]}")
    return response


def _images(response: httpx.Response, inputs: bytes | None = None) -> dict[str, Any]:
    """The record of an image answer ({"images": [base64 PNG, ...]}): each image's decoded pixels."""
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in _ok(response).json()["images"]]
    record = _record(pixels, inputs)
    if "x-prior" in response.headers:  # which prior a VQ-VAE's /sample used
        record["prior"] = response.headers["x-prior"]
    return record


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _uploads(channels: int, height: int, width: int) -> list[tuple[str, bytes]]:
    """What /reconstruct and /encode send: the bundled examples of the model's channels (the app
    converts their size), then RANDOM_IMAGES seeded random images of the model's own shape."""
    mode = "L" if channels == 1 else "RGB"
    files = [(p.name, p.read_bytes()) for p in sorted(SAMPLES.glob("*.png")) if Image.open(p).mode == mode]
    rng = np.random.default_rng(0)
    shape = (height, width) if channels == 1 else (height, width, channels)
    files += [(f"random{i}.png", _png(rng.integers(0, 256, shape, dtype=np.uint8))) for i in range(RANDOM_IMAGES)]
    return files


def _digest(files: list[tuple[str, bytes]]) -> bytes:
    return b"".join(name.encode() + b"\0" + hashlib.sha256(data).digest() for name, data in files)


async def _model_cases(client: httpx.AsyncClient, entry: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{operation: {case: record}} of one served model (its priors' samples: _prior_cases)."""
    name, ops, kind = entry["name"], entry["operations"], entry["kind"]
    channels, height, width = entry["image_shape"]
    as_json = {"Accept": "application/json"}
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    if "sample" in ops:
        draws = VAE_SAMPLES if kind == "vae" else (DEFAULT_PRIOR_SAMPLE,)
        cases["sample"] = {}
        for n, seed, temperature in draws:
            r = await client.get("/sample", params={"model": name, "n": n, "seed": seed, "temperature": temperature},
                                 headers=as_json)
            case = ("" if kind == "vae" else "default prior ") + f"n={n} seed={seed} temperature={temperature}"
            cases["sample"][case] = _images(r)
    uploads = _uploads(channels, height, width)
    files = [("file", (f, data, "image/png")) for f, data in uploads]
    if "reconstruct" in ops:
        r = await client.post("/reconstruct", params={"model": name}, files=files, headers=as_json)
        cases["reconstruct"] = {f"{len(uploads)} images": _images(r, _digest(uploads))}
    if "encode" in ops:
        r = await client.post("/encode", params={"model": name, "include_z_e": kind == "vqvae"}, files=files)
        items = _ok(r).json()["items"]
        fields = {"mu": np.float32, "logvar": np.float32} if kind == "vae" else {"codes": np.int64, "z_e": np.float32}
        # each float32 is sent as the shortest decimal that reads back as the same float32: exact
        cases["encode"] = {f"{len(uploads)} images: {field}": _record([np.asarray(i[field], dtype) for i in items],
                                                                      _digest(uploads))
                           for field, dtype in fields.items()}
    if "decode" in ops:
        g = torch.Generator().manual_seed(DECODE_SEED)
        if kind == "vae":
            body = {"model": name, "z": torch.randn(DECODE_ITEMS, entry["latent_shape"][0], generator=g).tolist()}
        else:
            h, w = entry["code_shape"]
            body = {"model": name, "codes": torch.randint(entry["codebook_size"], (DECODE_ITEMS, h, w), generator=g).tolist()}
        r = await client.post("/decode", json=body, headers=as_json)
        what = "latents" if kind == "vae" else "code grids"
        cases["decode"] = {f"{DECODE_ITEMS} seeded {what}": _images(r, json.dumps(body, sort_keys=True).encode())}
    if "interpolate" in ops:
        a, b = INTERPOLATE_ENDS[channels]
        ends = [(a, (SAMPLES / a).read_bytes()), (b, (SAMPLES / b).read_bytes())]
        cases["interpolate"] = {}
        for method in ("slerp", "lerp"):
            r = await client.post("/interpolate", params={"model": name, "steps": INTERPOLATE_STEPS, "method": method},
                                  files={"a": (a, ends[0][1], "image/png"), "b": (b, ends[1][1], "image/png")},
                                  headers=as_json)
            cases["interpolate"][f"{a} to {b} steps={INTERPOLATE_STEPS} {method}"] = _images(r, _digest(ends))
    return cases


async def _prior_cases(client: httpx.AsyncClient, entry: dict[str, Any], prior: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{case: record} of a VQ-VAE's /sample with one of its priors."""
    cases = {}
    for n, seed, temperature, label in PRIOR_SAMPLES:
        if label is not None and prior["num_classes"] == 0:
            continue
        params = {"model": entry["name"], "prior": prior["name"], "n": n, "seed": seed, "temperature": temperature,
                  **({"label": label} if label is not None else {})}
        r = await client.get("/sample", params=params, headers={"Accept": "application/json"})
        cases[f"n={n} seed={seed} temperature={temperature}" + (f" label={label}" if label else "")] = _images(r)
    return cases


async def _collect(weights: Path) -> dict[str, Any]:
    from app.main import create_app  # here: `python -m tests.golden --help` needs no app

    app = create_app(settings(weights))
    async with LifespanManager(app, startup_timeout=300, shutdown_timeout=60) as manager:
        await app.state.starting
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://golden", timeout=300) as client:
            problems = _ok(await client.get("/models/problems")).json()
            if problems:
                raise AssertionError(f"the app refused weight files of {weights}: {problems}")
            models: dict[str, Any] = {}
            for entry in _ok(await client.get("/models")).json():
                models[entry["file"]] = {"name": entry["name"], "kind": entry["kind"], "sha256": entry["sha256"],
                                         "operations": await _model_cases(client, entry)}
                for prior in entry.get("priors") or []:
                    models[prior["file"]] = {"name": prior["model"], "kind": prior["kind"], "sha256": prior["sha256"],
                                             "depends_on": [entry["file"]],
                                             "operations": {"sample": await _prior_cases(client, entry, prior)}}
    return models


def compute(weights: Path = WEIGHTS) -> dict[str, Any]:
    """The golden record of every weight file in `weights`."""
    models = asyncio.run(_collect(weights))
    return {"regenerate": REGENERATE, "machine": machine(), "models": dict(sorted(models.items()))}


def load(path: Path = GOLDEN) -> dict[str, Any]:
    return json.loads(path.read_text())


def dumps(value: Any, depth: int = 0) -> str:
    """JSON with one line per case record (the sixth level), so that a diff names the cases that changed."""
    if not isinstance(value, dict) or depth == 5 or not value:
        return json.dumps(value)
    pad = " " * (depth + 1)
    body = ",\n".join(f"{pad}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in value.items())
    return "{\n" + body + "\n" + " " * depth + "}"


def write(record: dict[str, Any], path: Path = GOLDEN) -> None:
    path.write_text(dumps(record) + "\n")


def _item_differences(expected: dict[str, Any], actual: dict[str, Any], same_machine: bool) -> tuple[list[int], float, bool]:
    """(the items that differ, their largest signature deviation, whether that is within tolerance).
    On the record's machine an item differs when its hash does; elsewhere when its signature is out
    of tolerance."""
    tolerance = SIGNATURE_TOLERANCE.get(expected.get("dtype", "float32"), 1e-3)
    deviations = [max(abs(a - b) for a, b in zip(old, new))
                  for old, new in zip(expected["signatures"], actual["signatures"])]
    if same_machine:
        differ = [i for i, (a, b) in enumerate(zip(expected["items"], actual["items"])) if a != b]
    else:
        differ = [i for i, d in enumerate(deviations) if d > tolerance]
    largest = max((deviations[i] for i in differ), default=0.0)
    return differ, largest, largest <= tolerance


def _case_difference(expected: dict[str, Any], actual: dict[str, Any] | None, same_machine: bool) -> str:
    """What differs between the recorded and the computed answer of one case ("" when nothing does)."""
    if actual is None:
        return "no longer asked (the case is gone from tests/golden: regenerate)"
    if expected.get("inputs") != actual.get("inputs"):
        return (f"the test's inputs changed (hash {expected.get('inputs')} -> {actual.get('inputs')}), not necessarily "
                "the model's behaviour: regenerate if deliberate")
    if expected.get("prior") != actual.get("prior"):
        return f"answered by prior {actual.get('prior')!r}, recorded {expected.get('prior')!r}"
    if expected["shape"] != actual["shape"] or expected.get("dtype") != actual.get("dtype"):
        return f"shape {expected['shape']} {expected.get('dtype')} -> {actual['shape']} {actual.get('dtype')}"
    differ, largest, rounding = _item_differences(expected, actual, same_machine)
    if not differ:
        return ""
    means = [f"{expected['signatures'][i][0]:.6g} -> {actual['signatures'][i][0]:.6g}" for i in differ[:3]]
    size = ("at the level of rounding: the same computation in another order?" if rounding
            else "beyond rounding: a change of behaviour")
    return (f"items {differ} of {len(expected['items'])} differ (item means {', '.join(means)}; largest signature "
            f"deviation {largest:.3g}, {size})")


def compare(expected: dict[str, Any], actual: dict[str, Any], file: str, operation: str) -> list[str]:
    """Why weight file `file`'s `operation` does not answer as `expected` (a golden record) says,
    one line per case; [] when it does. A weight file (or its VQ-VAE's) whose bytes changed is
    reported as such, its cases not compared."""
    old_models, new_models = expected["models"], actual["models"]
    old, new = old_models[file], new_models.get(file)
    if new is None:
        return [f"{old['name']} ({file}) is no longer served (removed, renamed or refused)"]
    changed = [f for f in [file, *old.get("depends_on", [])]
               if old_models[f]["sha256"] != (new_models.get(f) or {}).get("sha256")]
    if changed:
        return [f"weight file {f} changed (sha256 {old_models[f]['sha256'][:12]} -> "
                f"{str((new_models.get(f) or {}).get('sha256'))[:12]}): its golden values no longer apply; if the new "
                f"file is deliberate, regenerate with `{REGENERATE}`" for f in changed]
    cases_new = new["operations"].get(operation)
    if cases_new is None:
        return [f"{old['name']} ({file}) no longer offers {operation}"]
    same_machine = expected.get("machine") == actual.get("machine")
    lines = [f"{old['name']} ({file}) {operation} [{case}]: {difference}"
             for case, record in old["operations"][operation].items()
             if (difference := _case_difference(record, cases_new.get(case), same_machine))]
    lines += [f"{old['name']} ({file}) {operation} [{case}]: a new case without a golden value (regenerate)"
              for case in cases_new if case not in old["operations"][operation]]
    if lines and not same_machine:
        lines.append(f"(recorded on {expected.get('machine')}, compared on {actual.get('machine')}: signatures only)")
    return lines
