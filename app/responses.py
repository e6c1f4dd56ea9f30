"""What a model route answers with: images as one PNG grid, as JSON, or as the raw tensor.

`negotiate` reads the Accept header (q-values, then specificity; on a tie PNG, then JSON): a client
that asks for nothing, or prefers image/png, gets one PNG grid; `application/json` one base64 PNG per
image; `application/x-safetensors` (TENSOR_TYPE, for programs: app/client.py asks for it) the images
exactly as the model computed them, float32 (B, C, H, W) in [0, 1] under the key "images" of a
safetensors file, before any rounding to 8 bits. `image_response` writes them with app/imaging.py's
encoders (PNG at GENSERVE_PNG_COMPRESSION), off the event loop unless they are small. The JSON
bodies of the routes that answer JSON only (GET /models, POST /encode) are their own routes'
(app/routes/); every error body is app/errors.py's.
"""

from __future__ import annotations

import safetensors.torch
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app import imaging
from app.service import Service

SMALL_IMAGE_ELEMENTS = 3 * 32 * 32  # image_response encodes answers up to this size on the event loop
PNG_TYPE, JSON_TYPE, TENSOR_TYPE = "image/png", "application/json", "application/x-safetensors"
OFFERS = (PNG_TYPE, JSON_TYPE, TENSOR_TYPE)  # in the order that wins a tie


def negotiate(request: Request, offers: tuple[str, ...] = OFFERS) -> str:
    """The media type to answer with, of `offers`, by the Accept header: the highest q-value, then the
    most specific range that matches it; on a tie the first of `offers`; the first without a header."""
    accept = request.headers.get("accept")
    if not accept:
        return offers[0]
    ranges = []
    for part in accept.split(","):
        media, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((media.strip().lower(), q))

    def score(offer: str) -> tuple[float, int]:
        kind = offer.split("/")[0]
        best = (0.0, -1)
        for media, q in ranges:
            specificity = 2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if specificity > best[1]:
                best = (q, specificity)
        return best

    scores = {offer: score(offer) for offer in offers}
    best = max(offers, key=lambda offer: scores[offer])  # max keeps the first of equals
    return best if scores[best][0] > 0 else offers[0]


def wants_json(request: Request) -> bool:
    """True when the Accept header prefers application/json to the other answers."""
    return negotiate(request) == JSON_TYPE


def tensor_bytes(images: torch.Tensor) -> bytes:
    """Images (B, C, H, W) as a safetensors file: {"images": float32, contiguous, on the CPU}."""
    return safetensors.torch.save({"images": images.detach().float().cpu().contiguous()})


async def image_response(
    request: Request, images: torch.Tensor, *, nrow: int | None = None, headers: dict[str, str] | None = None
) -> Response:
    """One PNG grid of images (B, C, H, W), {"images": [base64 PNG, ...]} for Accept: application/json,
    or the float32 images as a safetensors file for Accept: application/x-safetensors.

    PNG encoding (and the JSON around base64 PNGs) runs in the service's PNG pool: a grid of 256
    images is too much work for the event loop, and the model threads have their own work. An
    answer of at most SMALL_IMAGE_ELEMENTS values (one CIFAR-10 image: a fraction of a millisecond
    to encode) is encoded right here instead, so that it never waits in the pool behind the grids
    of heavy requests.
    """
    service: Service = request.app.state.service
    headers = {**(headers or {}), "Vary": "Accept"}  # the answer's type follows the Accept header
    small = images.numel() <= SMALL_IMAGE_ELEMENTS
    level = service.settings.png_compression
    media = negotiate(request)
    if media == TENSOR_TYPE:  # a copy of the floats: cheap, but not for the event loop at 64 CIFAR-10 images
        body = tensor_bytes(images) if small else await service.run_io(tensor_bytes, images)
        return Response(body, media_type=TENSOR_TYPE, headers=headers)
    if media == JSON_TYPE:  # the JSON of 256 base64 PNGs is written in the pool too

        def encode() -> JSONResponse:
            return JSONResponse({"images": imaging.pngs_base64(images, level)}, headers=headers)

        return encode() if small else await service.run_io(encode)
    png = imaging.grid_png(images, nrow, level) if small else await service.run_io(imaging.grid_png, images, nrow, level)
    return Response(png, media_type="image/png", headers=headers)
