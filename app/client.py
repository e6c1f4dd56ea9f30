"""A typed client for the genserve HTTP API (its command line, `genserve`, is app/cli.py).

    from app.client import Client, grid, to_tensor
    with Client("http://127.0.0.1:8000") as c:
        s = c.sample("vae", n=16, seed=1)          # Sample(images=[16 PIL images], seed=1, prior=None)
        grid(s.images).save("grid.png")            # the same pixels as the server's own PNG grid
        x = to_tensor(s.images)                    # float32 (16, C, H, W) in [0, 1], as the models take
        boots = c.sample("vqvae", n=4, seed=1, label="Ankle boot")  # a label by its class name
        recon = c.reconstruct("vae", ["a.png", array, pil_image, png_bytes])
        enc = c.encode("vae", ["a.png"])           # [Encoding(file, mu, logvar)] as numpy arrays
        out = c.decode("vae", z=[e.mu for e in enc])
        strip = c.interpolate("vae", "a.png", "b.png", steps=8, method="slerp")

`AsyncClient` has the same methods, as coroutines. Both wrap an httpx client: `transport=` (e.g.
httpx.ASGITransport(app=...) or httpx.MockTransport) and any other httpx.Client option
(`headers=`, `verify=`, `limits=`, ...) are passed on to it.

Images in: a file path (str or os.PathLike, sent as its bytes), bytes of an image file, a PIL
image, or a numpy array (H, W) / (H, W, C) with C in 1, 3, 4, uint8 or float in [0, 1] (sent as
PNG; floats become round(255 x)). The server converts them to the model's size and channels
(app/imaging.py). Images out: `Images`, a list of one PIL image per image (mode L or RGB) whose
`.array` is what the model computed, float32 (B, C, H, W) in [0, 1], exactly: the client asks for
`Accept: application/x-safetensors` (and takes base64 PNGs, `.array` None, from a server that only
answers JSON). The PIL images are `.array` rounded to 8 bits as the server's PNGs are, pixel for
pixel. `to_array` stacks PIL images into one uint8 array, `to_tensor` into one float torch tensor
(B, C, H, W) in [0, 1]; `grid` lays them out as the server's PNG grid does.

Labels: `sample(label=...)` takes a class index, or a class name (any case) that the server looks up
in the `class_names` of the prior that will sample: the one named, else the model's default.

Errors: every answer that is not 2xx raises `APIError(status_code, detail, request_id)`; a 2xx answer
that is not what this API sends (another server at the URL, a proxy's page) raises
`UnexpectedResponse`; network failures and timeouts are httpx's own exceptions (httpx.TransportError).

Retries (`retries=`, `max_retry_wait=`): only a 503 that carries Retry-After (queue full, service
starting) is retried, after the wait it asks for, and only for a request whose repeat asks for
exactly the same answer:
- GET /models;
- GET /sample with an explicit `seed` (same seed, same bytes);
- POST /reconstruct, /encode, /decode, /interpolate: pure functions of their input and the loaded
  weights (an autoregressive decoder draws its pixels with the model's fixed reconstruct seed).
GET /sample without a seed is not retried: the server draws a fresh seed per try, so a repeat is a
new request, not the same one again; pass a seed to make it retryable. A retry that would take the
total wait of one call past `max_retry_wait` seconds is not made: the 503 is raised instead. Each
wait is at least MIN_RETRY_WAIT_S (a Retry-After of 0 does not make a burst of requests), and
`retries` is at most MAX_RETRIES.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import mimetypes
import os
import re
import reprlib
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Union

import httpx
import numpy as np
from PIL import Image

from app.schemas import ModelEntry

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0  # per request; the service's own request_timeout_s defaults to 30 s
DEFAULT_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT_S = 30.0
MIN_RETRY_WAIT_S = 0.1  # the shortest wait before a retry, whatever Retry-After says
MAX_RETRIES = 20
# image routes answer the float32 images as a safetensors file; a server without it, {"images": [base64 PNG, ...]}
IMAGE_ACCEPT = {"Accept": "application/x-safetensors, application/json;q=0.5"}
TENSOR_TYPE = "application/x-safetensors"

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Looked up at call time so tests can record the waits instead of sleeping.
_sleep = time.sleep
_async_sleep = asyncio.sleep


class APIError(Exception):
    """An answer of the API that is not 2xx: its status, its `detail` (a string, or FastAPI's list of
    validation errors for a 422) and its request id (X-Request-ID, also in the body of a 5xx)."""

    def __init__(self, status_code: int, detail: Any, request_id: str | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.request_id = request_id
        super().__init__(f"{status_code}: {_detail_text(detail)}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"]
        else:
            detail = response.text or response.reason_phrase
        rid = response.headers.get("x-request-id") or (body.get("request_id") if isinstance(body, dict) else None)
        return cls(response.status_code, detail, rid)


def _detail_text(detail: Any) -> str:
    """One line: a string as is; FastAPI's validation errors as 'query.n: Input should be ...; ...'."""
    if isinstance(detail, list) and all(isinstance(e, dict) and "msg" in e for e in detail):
        return "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e['msg']}" for e in detail)
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return " ".join(text.split())


class UnexpectedResponse(Exception):
    """A 2xx answer whose body or headers are not what the genserve API sends: another server behind
    the URL, a proxy's page, or a server of another version. Its status and request id, if any."""

    def __init__(self, method: str, path: str, response: httpx.Response, reason: str) -> None:
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")
        super().__init__(f"unexpected answer to {method} {path} (HTTP {response.status_code}): {shorten(reason)}")


def shorten(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Images(list):
    """The images of an answer: a list of PIL images (mode L or RGB), and `array`, the float32 images
    (B, C, H, W) in [0, 1] the model computed (None from a server that answers base64 PNGs only)."""

    def __init__(self, images: Iterable[Image.Image], array: np.ndarray | None = None) -> None:
        super().__init__(images)
        self.array = array


@dataclass(frozen=True)
class Sample:
    """What /sample answers: the images, the seed that reproduces them, and (VQ-VAE) the prior used."""

    images: Images
    seed: int
    prior: str | None = None


@dataclass(frozen=True, eq=False)
class Encoding:
    """One image's encoding. VAE: mu and logvar of q(z|x), each (D,). VQ-VAE: its codes (h, w) int64,
    and with include_z_e the encoder output z_e (D, h, w)."""

    file: str
    mu: np.ndarray | None = None
    logvar: np.ndarray | None = None
    codes: np.ndarray | None = None
    z_e: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Score:
    """One image's /score: an upper bound on -log p(x) (`bound` says which) in nats and bits/dim, each
    codec's bits/dim for the image alone and the input-complexity score (bits_per_dim minus the
    codec's), with include_map the nats per pixel (H, W), with heat_map the heat map of bits per
    subpixel (an RGB image, black 0 to pale yellow 8), and with a background model its bits/dim and the
    likelihood-ratio score (bits_per_dim minus the background's)."""

    file: str
    nats: float
    bits_per_dim: float
    bound: str
    codec_bits_per_dim: dict[str, float]
    complexity_score: dict[str, float]
    map: np.ndarray | None = None
    verdict: dict[str, Any] | None = None  # against the file's threshold: score, value, threshold, unusual
    heat_map: Image.Image | None = None
    background_bits_per_dim: float | None = None
    ratio_score: float | None = None
    background_bound: str | None = None  # "background_name: what its bits/dim bound"


# --- images in and out -------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def array_to_image(array: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, C), C in 1, 3, 4, uint8 or float in [0, 1] -> a PIL image (L, RGB or RGBA)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ValueError("a float image array must hold finite values in [0, 1]")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 or float in [0, 1]; got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA


def _upload(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    """One image as a multipart file: (filename, bytes, content type)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return f"image{index}.png", _png(image), "image/png"
    if isinstance(image, np.ndarray):
        return f"image{index}.png", _png(array_to_image(image)), "image/png"
    raise TypeError(f"an image must be a path, bytes, a PIL image or a numpy array; got {type(image).__name__}")


def _images(response: httpx.Response) -> Images:
    if response.headers.get("content-type", "").split(";")[0].strip().lower() == TENSOR_TYPE:
        return _tensor_images(response.content)
    encoded_images = response.json()["images"]
    if not isinstance(encoded_images, list):
        raise TypeError(f"'images' must be a list of base64 PNGs, got {type(encoded_images).__name__}")
    return Images([_image(base64.b64decode(encoded)) for encoded in encoded_images])


def _image(data: bytes) -> Image.Image:
    """PNG bytes -> a loaded PIL image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _tensor_images(body: bytes) -> Images:
    """A safetensors answer {"images": float32 (B, C, H, W), C in 1 or 3, in [0, 1]} -> Images, the PIL
    images rounded as the server rounds before writing a PNG (app/imaging.py's to_uint8)."""
    from safetensors.numpy import load

    tensors = load(body)
    array = tensors["images"]
    if array.dtype != np.float32 or array.ndim != 4 or array.shape[1] not in (1, 3) or set(tensors) != {"images"}:
        raise ValueError(f"a safetensors answer holds 'images', float32 (B, 1 or 3, H, W); got {reprlib.repr(tensors)}")
    pixels = np.round(np.clip(np.nan_to_num(array, nan=0.0), 0, 1) * np.float32(255)).astype(np.uint8)
    images = [Image.fromarray(p[0] if p.shape[0] == 1 else np.ascontiguousarray(p.transpose(1, 2, 0))) for p in pixels]
    return Images(images, array)


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """Images of one size -> uint8 (B, H, W) for L, (B, H, W, C) otherwise; `/ 255` gives [0, 1]."""
    return np.stack([np.asarray(img) for img in images])


def to_tensor(images: Sequence[Image.Image]) -> Any:
    """Images of one size -> a float32 torch tensor (B, C, H, W) in [0, 1], the models' input layout
    (torch is imported here, so the rest of the client does not need it)."""
    import torch

    a = to_array(images)
    a = a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)  # (B, H, W) -> (B, 1, H, W); (B, H, W, C) -> (B, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(a)).float().div_(255)


def grid(images: Sequence[Image.Image], nrow: int | None = None, padding: int = 2) -> Image.Image:
    """The server's grid layout (torchvision's make_grid): `nrow` per row (default ceil(sqrt(n))),
    `padding` black pixels around every cell; a single image is returned as is."""
    if not images:
        raise ValueError("grid needs at least one image")
    if len(images) == 1:
        return images[0].copy()
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    cols = min(nrow, len(images))
    rows = -(-len(images) // cols)
    out = Image.new(images[0].mode, (cols * (w + padding) + padding, rows * (h + padding) + padding))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out.paste(img, (padding + c * (w + padding), padding + r * (h + padding)))
    return out


def _jsonable(value: Any) -> Any:
    """Nested sequences, numpy arrays or tensors of numbers -> nested lists of Python numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- requests: built and parsed once, sent by either client ------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    idempotent: bool  # may be retried after a 503 with Retry-After (module docstring)
    params: dict[str, Any] | None = None
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] | None = None


def _models_call() -> _Call:
    return _Call("GET", "/models", idempotent=True)


def _sample_call(
    model: str, n: int, seed: int | None, temperature: float, prior: str | None, label: int | str | None
) -> _Call:
    params = {"model": model, "n": n, "seed": seed, "temperature": temperature, "prior": prior, "label": label}
    params = {k: v for k, v in params.items() if v is not None}
    return _Call("GET", "/sample", idempotent=seed is not None, params=params, headers=IMAGE_ACCEPT)


def _files_call(path: str, model: str, images: Iterable[ImageInput], params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> _Call:
    files = [("file", _upload(img, i)) for i, img in enumerate(images)]
    if not files:
        raise ValueError("send at least one image")
    return _Call("POST", path, idempotent=True, params={"model": model, **(params or {})}, files=files, headers=headers)


def _decode_call(model: str, z: Any, codes: Any) -> _Call:
    if (z is None) == (codes is None):
        raise ValueError("pass exactly one of z (VAE latents) and codes (VQ-VAE code grids)")
    body = {"model": model, "z": _jsonable(z)} if z is not None else {"model": model, "codes": _jsonable(codes)}
    return _Call("POST", "/decode", idempotent=True, json=body, headers=IMAGE_ACCEPT)


def _interpolate_call(model: str, a: ImageInput, b: ImageInput, steps: int, method: str) -> _Call:
    files = [("a", _upload(a, 0)), ("b", _upload(b, 1))]
    return _Call("POST", "/interpolate", idempotent=True, params={"model": model, "steps": steps, "method": method},
                 files=files, headers=IMAGE_ACCEPT)


def _parse_sample(response: httpx.Response, seed: int | None) -> Sample:
    """The images and the seed in X-Seed (the one asked for, if a proxy dropped the header)."""
    header = response.headers.get("x-seed")
    if header is not None and re.fullmatch(r"[0-9]+", header.strip()):
        seed = int(header)
    elif header is not None or seed is None:
        raise ValueError(f"X-Seed header {header!r} is not the seed of the images")
    return Sample(_images(response), seed, response.headers.get("x-prior"))


def _parse_models(response: httpx.Response) -> list[ModelEntry]:
    entries = response.json()
    if not isinstance(entries, list):
        raise ValueError(f"a list of models expected, got {type(entries).__name__}")
    return [ModelEntry.model_validate(m) for m in entries]


def _parse_encodings(response: httpx.Response, n: int) -> list[Encoding]:
    items = response.json()["items"]
    if not isinstance(items, list) or len(items) != n:
        got = len(items) if isinstance(items, list) else reprlib.repr(items)
        raise ValueError(f"{n} encoded item{'s' if n != 1 else ''} expected, got {got}")
    out = []
    for item in items:
        arrays = {k: np.asarray(item[k], dtype=np.int64 if k == "codes" else np.float32)
                  for k in ("mu", "logvar", "codes", "z_e") if item.get(k) is not None}
        out.append(Encoding(file=item["file"], **arrays))
    return out


def _score_call(model: str, images: Iterable[ImageInput], prior: str | None, label: int | str | None, k: int, seed: int,
                codecs: Sequence[str], include_map: bool, heat_map: bool, background: str | None) -> _Call:
    params = {"prior": prior, "label": label, "k": k, "seed": seed, "codec": list(codecs),
              "include_map": "true" if include_map else None, "map": "true" if heat_map else None, "background": background}
    return _files_call("/score", model, images, {key: v for key, v in params.items() if v is not None})


def _parse_scores(response: httpx.Response, n: int) -> list[Score]:
    body = response.json()
    items = body["items"]
    if not isinstance(items, list) or len(items) != n:
        got = len(items) if isinstance(items, list) else reprlib.repr(items)
        raise ValueError(f"{n} scored item{'s' if n != 1 else ''} expected, got {got}")
    return [Score(file=item["file"], nats=float(item["nats"]), bits_per_dim=float(item["bits_per_dim"]), bound=body["bound"],
                  codec_bits_per_dim=dict(item["codec_bits_per_dim"]), complexity_score=dict(item["complexity_score"]),
                  map=np.asarray(item["map"], dtype=np.float64) if item.get("map") is not None else None,
                  verdict=item.get("verdict"),
                  heat_map=_image(base64.b64decode(item["map_png"])) if item.get("map_png") is not None else None,
                  background_bits_per_dim=item.get("background_bits_per_dim"), ratio_score=item.get("ratio_score"),
                  background_bound=f"{body['background']}: {body['background_bound']}" if body.get("background") else None)
            for item in items]


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):  # not str.isdigit(): it accepts "²", which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _retry_wait(response: httpx.Response, call: _Call, attempt: int, waited: float, retries: int,
                max_wait: float) -> float | None:
    """Seconds to wait before trying `call` again after `response`, or None to give up."""
    if response.status_code != 503 or not call.idempotent or attempt >= retries:
        return None
    delay = retry_after_s(response.headers.get("retry-after"))
    if delay is None:
        return None
    delay = max(delay, MIN_RETRY_WAIT_S)
    return None if waited + delay > max_wait else delay


def _check_retries(retries: int, max_retry_wait: float) -> None:
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, got {retries}")
    if not (math.isfinite(max_retry_wait) and max_retry_wait >= 0):
        raise ValueError(f"max_retry_wait must be a finite number of seconds >= 0, got {max_retry_wait}")


def _parsed(call: _Call, response: httpx.Response, parse: Any, *args: Any) -> Any:
    """`parse(response, *args)`, with any surprise in the answer raised as UnexpectedResponse."""
    try:
        return parse(response, *args)
    except (KeyError, IndexError, TypeError, ValueError, OSError, Image.DecompressionBombError) as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise UnexpectedResponse(call.method, call.path, response, reason) from err


def _request_args(call: _Call) -> dict[str, Any]:
    return {"params": call.params, "json": call.json, "files": call.files, "headers": call.headers}


# --- the clients --------------------------------------------------------------------------------


class Client:
    """Synchronous client over httpx.Client. A context manager; `close()` otherwise.

    timeout: seconds per request (or an httpx.Timeout); retries: how many times (0 to MAX_RETRIES) an
    idempotent call is repeated after a 503 with Retry-After; max_retry_wait: the most seconds one call
    spends waiting between tries. `transport` and `httpx_options` go to httpx.Client.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_S,
                 transport: httpx.BaseTransport | None = None, **httpx_options: Any) -> None:
        _check_retries(retries, max_retry_wait)
        self.retries, self.max_retry_wait = retries, max_retry_wait
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, **httpx_options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call, parse: Any, *args: Any) -> Any:
        """Send `call` (retried as the module docstring says); `parse(response, *args)` of the 2xx answer."""
        waited = 0.0
        attempt = 0
        while True:
            response = self._http.request(call.method, call.path, **_request_args(call))
            if response.is_success:
                return _parsed(call, response, parse, *args)
            delay = _retry_wait(response, call, attempt, waited, self.retries, self.max_retry_wait)
            if delay is None:
                raise APIError.from_response(response)
            _sleep(delay)
            waited += delay
            attempt += 1

    def models(self) -> list[ModelEntry]:
        """GET /models: one entry per served model (name, kind, image_shape, priors, ...)."""
        return self._send(_models_call(), _parse_models)

    def sample(self, model: str, n: int = 16, seed: int | None = None, temperature: float = 1.0,
               prior: str | None = None, label: int | str | None = None) -> Sample:
        """GET /sample: n images; `.seed` reproduces them (the server's when none was given). `label`: a
        class index, or a class name of the sampling prior (module docstring)."""
        return self._send(_sample_call(model, n, seed, temperature, prior, label), _parse_sample, seed)

    def reconstruct(self, model: str, images: Sequence[ImageInput]) -> Images:
        """POST /reconstruct: one reconstruction per image, at the model's resolution."""
        return self._send(_files_call("/reconstruct", model, images, headers=IMAGE_ACCEPT), _images)

    def encode(self, model: str, images: Sequence[ImageInput], include_z_e: bool = False) -> list[Encoding]:
        """POST /encode: one Encoding per image."""
        params = {"include_z_e": "true"} if include_z_e else None
        call = _files_call("/encode", model, images, params)
        return self._send(call, _parse_encodings, len(call.files))

    def score(self, model: str, images: Sequence[ImageInput], prior: str | None = None, label: int | str | None = None,
              k: int = 100, seed: int = 0, codecs: Sequence[str] = ("png",), include_map: bool = False,
              heat_map: bool = False, background: str | None = None) -> list[Score]:
        """POST /score: one Score per image (the likelihood bound, the codecs' bits/dim, the complexity score;
        the likelihood-ratio score against `background`, a second model, where one is named)."""
        call = _score_call(model, images, prior, label, k, seed, codecs, include_map, heat_map, background)
        return self._send(call, _parse_scores, len(call.files))

    def decode(self, model: str, z: Any = None, codes: Any = None) -> Images:
        """POST /decode: VAE latents z (B, D), or VQ-VAE codes (B, h, w): lists, arrays or tensors."""
        return self._send(_decode_call(model, z, codes), _images)

    def interpolate(self, model: str, a: ImageInput, b: ImageInput, steps: int = 8,
                    method: str = "slerp") -> Images:
        """POST /interpolate: `steps` images from a to b, both ends included."""
        return self._send(_interpolate_call(model, a, b, steps, method), _images)


class AsyncClient:
    """Client's methods as coroutines, over httpx.AsyncClient. `async with`, or `await aclose()`.

    Paths given as images are read with blocking file reads (they are small).
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_S,
                 transport: httpx.AsyncBaseTransport | None = None, **httpx_options: Any) -> None:
        _check_retries(retries, max_retry_wait)
        self.retries, self.max_retry_wait = retries, max_retry_wait
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, **httpx_options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call, parse: Any, *args: Any) -> Any:
        waited = 0.0
        attempt = 0
        while True:
            response = await self._http.request(call.method, call.path, **_request_args(call))
            if response.is_success:
                return _parsed(call, response, parse, *args)
            delay = _retry_wait(response, call, attempt, waited, self.retries, self.max_retry_wait)
            if delay is None:
                raise APIError.from_response(response)
            await _async_sleep(delay)
            waited += delay
            attempt += 1

    async def models(self) -> list[ModelEntry]:
        return await self._send(_models_call(), _parse_models)

    async def sample(self, model: str, n: int = 16, seed: int | None = None, temperature: float = 1.0,
                     prior: str | None = None, label: int | str | None = None) -> Sample:
        return await self._send(_sample_call(model, n, seed, temperature, prior, label), _parse_sample, seed)

    async def reconstruct(self, model: str, images: Sequence[ImageInput]) -> Images:
        return await self._send(_files_call("/reconstruct", model, images, headers=IMAGE_ACCEPT), _images)

    async def encode(self, model: str, images: Sequence[ImageInput], include_z_e: bool = False) -> list[Encoding]:
        params = {"include_z_e": "true"} if include_z_e else None
        call = _files_call("/encode", model, images, params)
        return await self._send(call, _parse_encodings, len(call.files))

    async def score(self, model: str, images: Sequence[ImageInput], prior: str | None = None,
                    label: int | str | None = None, k: int = 100, seed: int = 0, codecs: Sequence[str] = ("png",),
                    include_map: bool = False, heat_map: bool = False, background: str | None = None) -> list[Score]:
        call = _score_call(model, images, prior, label, k, seed, codecs, include_map, heat_map, background)
        return await self._send(call, _parse_scores, len(call.files))

    async def decode(self, model: str, z: Any = None, codes: Any = None) -> Images:
        return await self._send(_decode_call(model, z, codes), _images)

    async def interpolate(self, model: str, a: ImageInput, b: ImageInput, steps: int = 8,
                          method: str = "slerp") -> Images:
        return await self._send(_interpolate_call(model, a, b, steps, method), _images)


if __name__ == "__main__":  # `python -m app.client` runs the command line (app/cli.py), as `python -m app.cli` does
    from app.cli import main

    sys.exit(main())
