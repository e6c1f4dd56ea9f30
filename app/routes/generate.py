"""Images from noise (/sample) and from latents or codes (/decode)."""

from __future__ import annotations

import math
import re
import secrets
from typing import Annotated

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from app.dependencies import ServiceDep, find_model
from app.errors import deadline
from app.operations import Op, sample_inputs
from app.registry import Entry, Prior
from app.responses import image_response
from app.schemas import MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE, DecodeRequest, Error, ImagesResponse

router = APIRouter(tags=["generate"])

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_LABEL_CHARS = 100  # a class index or name; longer is a 422 before any parsing

IMAGE_RESPONSES = {
    200: {
        "model": ImagesResponse,  # for Accept: application/json
        "content": {"image/png": {}, "application/x-safetensors": {}},
        "description": "a PNG grid; ImagesResponse (one base64 PNG per image) for Accept: application/json; "
                       "for Accept: application/x-safetensors, a safetensors file holding \"images\": float32 "
                       "(n, C, H, W) in [0, 1], as the model computed them (before the PNG's rounding to 8 bits)",
    },
    404: {"model": Error},
    422: {"model": Error},
    503: {"model": Error},
    504: {"model": Error},
}

@router.get("/sample", response_class=Response, responses=IMAGE_RESPONSES)
async def sample(
    request: Request,
    service: ServiceDep,
    model: Annotated[str, Query(description="a VAE or VQ-VAE name from GET /models")],
    n: Annotated[int, Query(ge=1, description="number of images, at most max_n")] = 16,
    seed: Annotated[int | None, Query(ge=0, le=MAX_SEED, description="same seed, same bytes; random if absent")] = None,
    temperature: Annotated[
        float, Query(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="1e-3 is greedy for all purposes; 1 the model's own distribution")
    ] = 1.0,
    prior: Annotated[str | None, Query(description="VQ-VAE only: pixelcnn, gated or pixelcnnpp; default the best")] = None,
    label: Annotated[str | None, Query(
        max_length=MAX_LABEL_CHARS,
        description="a class-conditional prior only: the class's index 0..num_classes-1, or its name from GET /models "
                    "(class_names; exact, else any case when that is unique), e.g. 3 or cat; an integer is always an index",
    )] = None,
) -> Response:
    """n samples as one grid, ceil(sqrt(n)) per row. The seed is echoed in the X-Seed header.

    The noise is drawn before the request joins a batch, from a generator seeded by `seed`
    (app/operations.py's `sample_inputs`): VAE eps = randn(n, D), z = eps * temperature, then for
    an autoregressive decoder the uniforms of its pixel draws = rand(n, U, H, W) (each pixel drawn
    at the same temperature); prior uniforms = rand(n, h, w), then (a conditional prior without
    `label`) one random label per image = randint(num_classes, (n,)). So the answer never depends
    on which requests shared the batch.
    A VQ-VAE without a prior is 404 (GET /models' `operations` lists "sample" where it is offered).
    """
    settings = service.settings
    if n > settings.max_n:
        raise HTTPException(422, f"n must be between 1 and {settings.max_n}, got {n}")
    entry = await find_model(service, model, "sample")
    seed = secrets.randbits(63) if seed is None else seed
    async with deadline(settings.request_timeout_s):
        if entry.kind == "vae":
            if prior is not None or label is not None:
                raise HTTPException(422, f"model {model!r} is a VAE: 'prior' and 'label' apply to VQ-VAE priors only")
            inputs = sample_inputs(entry.model, n, seed, temperature)
            (images,) = await service.batcher(entry, Op.SAMPLE).submit(*inputs)
        else:
            chosen = choose_prior(entry, prior)
            index = None if label is None else resolve_label(chosen, label)
            inputs = sample_inputs(entry.model, n, seed, temperature, chosen.model, index)
            (images,) = await service.batcher(entry, Op.SAMPLE, chosen.api_name).submit(*inputs)
        headers = {"X-Seed": str(seed)}
        if entry.kind == "vqvae":
            headers["X-Prior"] = chosen.api_name
        return await image_response(request, images, headers=headers)


def choose_prior(entry: Entry, name: str | None) -> Prior:
    if name is None:  # find_model has refused a VQ-VAE without priors
        return entry.default_prior  # type: ignore[return-value]
    if name not in entry.priors:
        raise HTTPException(404, f"prior {name!r} is not available for {entry.name!r}; available: {sorted(entry.priors)}")
    return entry.priors[name]


def resolve_label(prior: Prior, label: str) -> int:
    """`label` as sent: an integer is always a class index ("3"); other text is a class name from the
    prior's file ("cat"), matched exactly, else case-insensitively when only one class matches so
    (surrounding spaces ignored on both sides). So classes whose names are integers (folders named
    1..11) are picked by index only. Anything else is a 422 that lists what would do."""
    classes = prior.num_classes
    if classes == 0:
        raise HTTPException(422, f"prior {prior.api_name!r} is unconditional: omit 'label'")
    text = label.strip()
    if re.fullmatch(r"[+-]?[0-9]+", text):
        index = int(text)
        if not 0 <= index < classes:
            raise HTTPException(422, f"label {index} is out of range for prior {prior.api_name!r}: use 0..{classes - 1}")
        return index
    names = [name.strip() for name in prior.class_names]
    matches = [i for i, name in enumerate(names) if name == text] or [
        i for i, name in enumerate(names) if name.casefold() == text.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise HTTPException(422, f"label {label!r} matches classes {matches} of prior {prior.api_name!r} when case is "
                                 f"ignored: send the index or the exact name from {list(prior.class_names)}")
    known = f" or a class name: {list(prior.class_names)}" if prior.class_names else " (its file names no classes)"
    raise HTTPException(422, f"label {label!r} is not a class of prior {prior.api_name!r}: use 0..{classes - 1}{known}")


@router.post(
    "/decode",
    response_class=Response,
    # 400: a body that is not UTF-8 JSON (FastAPI's own answer); 413: a body over max_json_bytes
    responses={**IMAGE_RESPONSES, 400: {"model": Error}, 413: {"model": Error}},
)
async def decode(request: Request, service: ServiceDep, body: DecodeRequest) -> Response:
    """Latents to images, one grid. VAE: {"model", "z": [[D floats], ...]} (an autoregressive
    decoder's pixels are drawn with the model's fixed reconstruct seed, as /reconstruct does, so the
    same z gives the same image); VQ-VAE: {"model",
    "codes": [[[h x w ints in [0, K)]], ...]}. A wrong shape, a non-finite value or a code out
    of range is 422, naming its index. A model without a latent is 422: its decoder ignores z, so
    every z would give the same image (its /sample draws those)."""
    settings = service.settings
    entry = await find_model(service, body.model, "decode")
    if entry.kind == "vae":
        if body.codes is not None or body.z is None:
            raise HTTPException(422, f"model {entry.name!r} is a VAE: send 'z', a list of latent vectors (and no 'codes')")
        x = parse_latents(body.z, entry.model.config.latent_dim, settings.max_n)
    else:
        if body.z is not None or body.codes is None:
            raise HTTPException(422, f"model {entry.name!r} is a VQ-VAE: send 'codes', a list of code grids (and no 'z')")
        x = parse_codes(body.codes, tuple(entry.model.code_shape), int(entry.model.config.codebook_size), settings.max_n)
    async with deadline(settings.request_timeout_s):
        (images,) = await service.batcher(entry, Op.DECODE).submit(x)
        return await image_response(request, images)


def _check_count(items: list, what: str, max_n: int) -> None:
    if not 1 <= len(items) <= max_n:
        raise HTTPException(422, f"{what} must hold between 1 and {max_n} items, got {len(items)}")


def parse_latents(z: list[list[float]], dim: int, max_n: int) -> torch.Tensor:
    """[[D floats], ...] -> (B, D) float32; 422 naming the first bad index."""
    _check_count(z, "z", max_n)
    for i, vector in enumerate(z):
        if len(vector) != dim:
            raise HTTPException(422, f"z[{i}] has {len(vector)} values; the model's latent_dim is {dim}")
        for j, value in enumerate(vector):
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise HTTPException(422, f"z[{i}][{j}] = {value} is not a finite float32")
    return torch.tensor(z, dtype=torch.float32)


def parse_codes(codes: list[list[list[int]]], shape: tuple[int, int], k: int, max_n: int) -> torch.Tensor:
    """[[[h x w ints]], ...] -> (B, h, w) long; 422 naming the first bad index."""
    _check_count(codes, "codes", max_n)
    h, w = shape
    for i, grid in enumerate(codes):
        if len(grid) != h:
            raise HTTPException(422, f"codes[{i}] has {len(grid)} rows; the model's code grid is {h}x{w}")
        for r, row in enumerate(grid):
            if len(row) != w:
                raise HTTPException(422, f"codes[{i}][{r}] has {len(row)} columns; the model's code grid is {h}x{w}")
            for c, code in enumerate(row):
                if not 0 <= code < k:
                    raise HTTPException(422, f"codes[{i}][{r}][{c}] = {code} is out of range: codes lie in [0, {k})")
    return torch.tensor(codes, dtype=torch.long)
