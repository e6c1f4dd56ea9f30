"""What a model route answers with: images as one PNG grid, or as JSON when the client asks for it.

`wants_json` negotiates the Accept header (q-values, then specificity: a client that asks for
nothing, or prefers image/png, gets the PNG); `image_response` writes the images (B, C, H, W) with
app/imaging.py's encoders, off the event loop unless they are small. The JSON bodies of the routes
that answer JSON only (GET /models, POST /encode) are their own routes' (app/routes/); every error
body is app/errors.py's.
"""

from __future__ import annotations

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app import imaging
from app.service import Service

SMALL_IMAGE_ELEMENTS = 3 * 32 * 32  # image_response encodes answers up to this size on the event loop


def wants_json(request: Request) -> bool:
    """True when the Accept header prefers application/json to image/png (q-values, then specificity)."""
    accept = request.headers.get("accept")
    if not accept:
        return False
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

    as_json, as_png = score("application/json"), score("image/png")
    return as_json[0] > 0 and as_json > as_png


async def image_response(
    request: Request, images: torch.Tensor, *, nrow: int | None = None, headers: dict[str, str] | None = None
) -> Response:
    """One PNG grid of images (B, C, H, W), or {"images": [base64 PNG, ...]} for Accept: application/json.

    PNG encoding (and the JSON around base64 PNGs) runs in the service's PNG pool: a grid of 256
    images is too much work for the event loop, and the model threads have their own work. An
    answer of at most SMALL_IMAGE_ELEMENTS values (one CIFAR-10 image: a fraction of a millisecond
    to encode) is encoded right here instead, so that it never waits in the pool behind the grids
    of heavy requests.
    """
    service: Service = request.app.state.service
    small = images.numel() <= SMALL_IMAGE_ELEMENTS
    level = service.settings.png_compression
    if wants_json(request):  # the JSON of 256 base64 PNGs is written in the pool too

        def encode() -> JSONResponse:
            return JSONResponse({"images": imaging.pngs_base64(images, level)}, headers=headers)

        return encode() if small else await service.run_io(encode)
    png = imaging.grid_png(images, nrow, level) if small else await service.run_io(imaging.grid_png, images, nrow, level)
    return Response(png, media_type="image/png", headers=headers)
