"""Endpoints that take images: /reconstruct, /encode, /interpolate.

Uploads are multipart files, converted by the rule in app/imaging.py. They are read as they
stream in and decoded one by one (app/multipart.py), before the request joins a batch, so one bad
file fails only its own request, and at its first bad file.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from app.dependencies import ServiceDep, find_model
from app.errors import deadline
from app.multipart import read_upload_images, upload_body
from app.operations import Op
from app.responses import image_response
from app.routes.generate import IMAGE_RESPONSES
from app.schemas import MAX_STEPS, MIN_STEPS, EncodeResponse, Error, InterpolationMethod

router = APIRouter(tags=["uploads"])

UPLOAD_RESPONSES = {**IMAGE_RESPONSES, 400: {"model": Error}, 413: {"model": Error}}
ENCODE_RESPONSES = {code: v for code, v in UPLOAD_RESPONSES.items() if code != 200}  # 200: EncodeResponse (JSON)
FILES = upload_body({"file": "one or more images (PNG, JPEG, GIF, WebP, BMP, ...)"}, multiple="file")
ENDS = upload_body({"a": "the first end", "b": "the last end"})

ModelQuery = Annotated[str, Query(description="a VAE or VQ-VAE name from GET /models")]


async def read_files(request: Request, service: ServiceDep, entry) -> tuple[list[str], torch.Tensor]:
    """The `file` uploads: their names and images (B, C, H, W)."""
    files = (await read_upload_images(request, service, entry, ["file"]))["file"]
    return [name for name, _ in files], torch.stack([image for _, image in files])


@router.post("/reconstruct", response_class=Response, responses=UPLOAD_RESPONSES, openapi_extra=FILES)
async def reconstruct(request: Request, service: ServiceDep, model: ModelQuery) -> Response:
    """Reconstructions at the model's resolution: one grid, ceil(sqrt(n)) per row (one file: just its image).
    A model without a latent (GET /models' `operations`) is 422."""
    entry = await find_model(service, model, "reconstruct")
    async with deadline(service.settings.request_timeout_s):
        _, x = await read_files(request, service, entry)  # (B, C, H, W)
        (images,) = await service.batcher(entry, Op.RECONSTRUCT).submit(x)
        return await image_response(request, images)


@router.post(
    "/encode", response_model=EncodeResponse, response_model_exclude_none=True, responses=ENCODE_RESPONSES, openapi_extra=FILES
)
async def encode(
    request: Request,
    service: ServiceDep,
    model: ModelQuery,
    include_z_e: Annotated[bool, Query(description="VQ-VAE: also return the continuous encoder output z_e")] = False,
) -> Response:
    """VAE: mu and logvar of q(z|x) per image. VQ-VAE: the (h, w) code grid per image (and z_e on request).
    A model without a latent (GET /models' `operations`) is 422."""
    entry = await find_model(service, model, "encode")
    if include_z_e and entry.kind != "vqvae":
        raise HTTPException(422, f"include_z_e applies to VQ-VAE models; {entry.name!r} is a {entry.kind}")
    async with deadline(service.settings.request_timeout_s):
        names, x = await read_files(request, service, entry)
        first, second = await service.batcher(entry, Op.ENCODE).submit(x)
        # A VQ-VAE's z_e for 64 files is megabytes of JSON: built and written in the PNG pool, off
        # the event loop (returning a Response skips FastAPI's validation against EncodeResponse,
        # which only documents the answer).
        return await service.run_io(_encoding_response, entry.name, entry.kind, names, first, second, include_z_e)


def _encoding_response(
    model: str, kind: str, names: list[str], first: torch.Tensor, second: torch.Tensor, include_z_e: bool
) -> Response:
    """The /encode answer (EncodeResponse): VAE mu, logvar (B, D); VQ-VAE z_e (B, D, h, w), codes (B, h, w).

    orjson writes the arrays straight from NumPy, item by item: FastAPI's json.dumps of the lists
    of a 64-file answer held the GIL, and with it the event loop, for 170 ms of float formatting;
    this takes 14 ms, in the PNG pool. Each float32 is written as the shortest decimal that reads
    back as the same float32 (json.dumps wrote the float64 it widens to: the same value, in twice
    the digits). A non-finite value is written as null.
    """
    def item(i: int) -> dict[str, Any]:
        if kind == "vae":
            return {"file": names[i], "mu": first[i].numpy(), "logvar": second[i].numpy()}
        out: dict[str, Any] = {"file": names[i], "codes": second[i].numpy()}
        if include_z_e:
            out["z_e"] = first[i].numpy()
        return out

    head = orjson.dumps({"model": model, "kind": kind})[:-1]  # without its closing brace
    items = b",".join(orjson.dumps(item(i), option=orjson.OPT_SERIALIZE_NUMPY) for i in range(len(names)))
    return Response(head + b',"items":[' + items + b"]}", media_type="application/json")


@router.post("/interpolate", response_class=Response, responses=UPLOAD_RESPONSES, openapi_extra=ENDS)
async def interpolate(
    request: Request,
    service: ServiceDep,
    model: ModelQuery,
    steps: Annotated[int, Query(ge=MIN_STEPS, le=MAX_STEPS, description="images in the strip, both ends included")] = 8,
    method: InterpolationMethod = "slerp",
) -> Response:
    """A strip of `steps` images from a to b, both ends included.

    VAE: interpolate the posterior means mu_a, mu_b and decode; the ends are exactly the
    reconstructions of a and b. VQ-VAE: interpolate the continuous encoder outputs z_e (as
    one flattened vector), replace every vector of each step by its nearest code, decode; the
    ends are again the reconstructions. A model without a latent (GET /models' `operations`) is 422.
    """
    entry = await find_model(service, model, "interpolate")
    async with deadline(service.settings.request_timeout_s):
        ends = await read_upload_images(request, service, entry, ["a", "b"], max_per_field={"a": 1, "b": 1})
        x = torch.stack([ends["a"][0][1], ends["b"][0][1]])  # (2, C, H, W)
        if entry.kind == "vae":
            mu, _logvar = await service.batcher(entry, Op.ENCODE).submit(x)  # (2, D)
            z = interpolate_latents(mu[0], mu[1], steps, method)  # (steps, D)
            (images,) = await service.batcher(entry, Op.DECODE).submit(z)
        else:
            z_e, _codes = await service.batcher(entry, Op.ENCODE).submit(x)  # (2, D, h, w)
            z = interpolate_latents(z_e[0], z_e[1], steps, method)  # (steps, D, h, w)
            (images,) = await service.batcher(entry, Op.DECODE_NEAREST).submit(z)
        return await image_response(request, images, nrow=steps)


def interpolate_latents(a: torch.Tensor, b: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """`steps` points from a to b (any shape, treated as flat vectors) -> (steps, *a.shape).

    lerp: (1 - t) a + t b. slerp (Shoemake 1985; White 2016, "Sampling Generative Networks"):
    sin((1 - t) omega) / sin(omega) a + sin(t omega) / sin(omega) b, omega the angle between
    a and b, which falls back to lerp when a or b is zero or they are (anti)parallel. Computed
    in float64; the ends are a and b exactly.
    """
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]  # (steps, 1)
    a64, b64 = a.double().flatten(), b.double().flatten()  # (N,)
    out = None
    if method == "slerp":
        na, nb = a64.norm(), b64.norm()
        if na > 0 and nb > 0:
            omega = torch.arccos((a64 @ b64 / (na * nb)).clamp(-1, 1))
            so = torch.sin(omega)
            if so > 1e-6:
                out = torch.sin((1 - t) * omega) / so * a64 + torch.sin(t * omega) / so * b64  # (steps, N)
    elif method != "lerp":
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")
    if out is None:
        out = (1 - t) * a64 + t * b64  # (steps, N)
    out = out.to(a.dtype).reshape(steps, *a.shape)
    out[0], out[-1] = a, b
    return out
