"""Endpoints that take images: /reconstruct, /encode, /interpolate, /score.

Uploads are multipart files, converted by the rule in app/imaging.py. They are read as they
stream in and decoded one by one (app/multipart.py), before the request joins a batch, so one bad
file fails only its own request, and at its first bad file.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import orjson
import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from app.dependencies import ServiceDep, find_model
from app.errors import deadline
from app.multipart import read_upload_images, upload_body
from app.operations import Op
from app import imaging
from app.registry import Entry, Prior
from app.responses import JSON_TYPE, PNG_TYPE, image_response, negotiate
from app.service import Service
from app.routes.generate import IMAGE_RESPONSES, choose_prior, resolve_label
from app.schemas import MAX_STEPS, MIN_STEPS, EncodeResponse, Error, InterpolationMethod, OodThreshold, ScoreResponse
from models.complexity import codec_bits_per_dim
from models.vae import VAE

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


@router.post(
    "/score", response_model=ScoreResponse, response_model_exclude_none=True,
    responses={**ENCODE_RESPONSES, 200: {"content": {"image/png": {}}, "description": "JSON (ScoreResponse), or with "
               "Accept: image/png the heat maps as one PNG grid"}}, openapi_extra=FILES
)
async def score(
    request: Request,
    service: ServiceDep,
    model: ModelQuery,
    prior: Annotated[str | None, Query(description="VQ-VAE only: pixelcnn, gated, pixelcnnpp or none (uniform codes); "
                                                   "default the best")] = None,
    label: Annotated[str | None, Query(description="a class-conditional prior only: score -log p(x | y) for this class "
                                                   "(index or name); default: the class marginalised out")] = None,
    k: Annotated[int, Query(ge=1, description="VAE only: importance samples per image (the IWAE-k bound; "
                                              "at most GENSERVE_MAX_SCORE_SAMPLES)")] = 100,
    seed: Annotated[int, Query(ge=0, lt=2**63, description="VAE only: seeds the importance samples")] = 0,
    codec: Annotated[list[Literal["png", "webp"]], Query(description="lossless codecs for the complexity score "
                                                                      "(WebP is the better anchor and 40x slower)")] = ["png"],  # noqa: B006
    background: Annotated[str | None, Query(description="a second model of the same image shape (e.g. vae_context): "
                                                        "adds each image's likelihood-ratio score")] = None,
    include_map: Annotated[bool, Query(description="also return each image's nats per pixel, as numbers")] = False,
    heat: Annotated[bool, Query(alias="map", description="also return each image's heat map of bits per subpixel "
                                                         "as a base64 PNG (`map_png`)")] = False,
) -> Response:
    """How likely each uploaded image is under a model: an upper bound on -log p(x), in nats and in
    bits/dim, computed by the code that computes the model card's bits/dim (training/evaluate.py), and
    the input-complexity score against lossless codecs. A model whose pixel likelihood is not a
    probability of 8-bit images (GET /models' `operations` lacks "score") is 422.

    VAE: the IWAE-k bound (Burda et al. 2015) with k importance samples drawn from `seed`:
    `VAE.draw_score_noise(n, k, Generator(seed))` for the n files (randn(k, n, D)), so an image's
    bound depends on the seed, the number of files and its position among them, never on other
    requests; the k samples go through the batcher a pass at a time, so one request never fills the
    queue. VQ-VAE: -log p(x | z_q(x)) - log P(z(x)) under the prior (`VQVAE.nll`), given `label` (then
    it bounds -log p(x | y)) or with the label marginalised over equally likely classes. A `verdict`
    comes where the file (a prior's, for a VQ-VAE) stores a threshold and the image was scored as
    it was set: the same k, and no label.

    `background`: the same images are scored under a second model (a VAE with the same k and seed;
    a VQ-VAE under its default prior, label marginalised), and `ratio_score` is bits_per_dim minus
    its bits_per_dim: -log of the likelihood ratio of Ren et al. (2019) per dimension, higher is
    less typical (with `label`, -log p(x | y) against the background's -log p(x)). The verdict judges
    the model's own score (`verdict.score`), never the ratio.

    `map=true` adds a heat map per image; with `Accept: image/png` (preferred to application/json)
    the answer is the heat maps alone, one PNG grid, and only they are computed (no importance
    samples: a VAE's map is one pass; `background` is refused). A heat map shows bits per subpixel,
    map / (C ln 2), from 0 (black) to 8 (pale yellow: as costly as a uniform guess over the 256
    levels) and clipped there; `map_meaning` (the PNG's X-Genserve-Map header) says what it is."""
    entry = await find_model(service, model, "score")
    s = service.settings
    png_answer = negotiate(request, (JSON_TYPE, PNG_TYPE)) == PNG_TYPE
    if entry.kind == "vae" and (prior is not None or label is not None):
        raise HTTPException(422, f"model {model!r} is a VAE: 'prior' and 'label' apply to VQ-VAE priors only")
    chosen = None if entry.kind == "vae" or prior == "none" else choose_prior(entry, prior)
    if label is not None and (chosen is None or not chosen.num_classes):
        raise HTTPException(422, f"'label' applies to a class-conditional prior; {prior or 'the default prior'} is not")
    index = resolve_label(chosen, label) if label is not None and chosen is not None else -1
    back = back_prior = None
    if background is not None:
        if png_answer:
            raise HTTPException(422, "the image/png answer holds only the heat maps: drop 'background', or ask for "
                                     "application/json")
        back, back_prior = await _background(service, background, entry)
    vaes = [e for e in (entry, back) if e is not None and e.kind == "vae"]
    if k > s.max_score_samples and vaes and not png_answer:
        raise HTTPException(422, f"k={k} is more than the {s.max_score_samples} importance samples allowed "
                                 "(GENSERVE_MAX_SCORE_SAMPLES); use fewer")
    async with deadline(s.request_timeout_s):
        names, x = await read_files(request, service, entry)  # (n, C, H, W) on the grid k / 255
        n = len(x)
        headers = {"Vary": "Accept"}  # the answer depends on the Accept header
        if png_answer:
            pixel_nats, meaning = await _heat(service, entry, chosen, index, x)
            png = await service.run_io(_heat_png, pixel_nats, x.shape[1], s.png_compression)
            return Response(png, media_type=PNG_TYPE, headers={**headers, "X-Genserve-Map": meaning})
        rows = n * k * len(vaes)
        if rows > s.max_score_rows:
            raise HTTPException(422, f"{n} images x k={k}{' under two VAEs' if len(vaes) > 1 else ''} is {rows} importance "
                                     f"samples, more than the {s.max_score_rows} a request may ask for "
                                     "(GENSERVE_MAX_SCORE_ROWS); send fewer images or a smaller k")
        nats, vq_map, bound = await _bound(service, entry, chosen, index, x, k, seed)
        pixel_nats = meaning = None
        if include_map or heat:
            pixel_nats, meaning = (vq_map, VQVAE_MAP) if vq_map is not None else await _heat(service, entry, chosen, index, x)
        back_nats = back_bound = None
        if back is not None:
            back_nats, _, back_bound = await _bound(service, back, back_prior, -1, x, k, seed)
        # the verdict against the file's threshold (the prior's for a VQ-VAE), computing its codec if not asked for
        threshold = chosen.ood if chosen is not None else entry.ood if entry.kind == "vae" else None
        if threshold is not None and (index >= 0 or (threshold.k is not None and threshold.k != k)):
            threshold = None  # scored otherwise than the threshold was set: no verdict
        codecs = list(dict.fromkeys([*codec, *([threshold.score] if threshold is not None and threshold.score != "bits" else [])]))
        head = {"model": entry.name, "kind": entry.kind, "prior": chosen.api_name if chosen else None, "bound": bound,
                **({"background": back.name, "background_bound": back_bound} if back is not None else {}),
                **({"map_meaning": meaning} if meaning else {}),
                **({"map_scale": f"bits per subpixel, 0 (black) to {HEAT_MAX_BITS:g} (pale yellow), clipped"} if heat else {})}
        return await service.run_codec(_score_response, head, names, x, nats, back_nats, pixel_nats if include_map else None,
                                       pixel_nats if heat else None, codecs, threshold, s.png_compression, headers)


async def _background(service: Service, name: str, entry: Entry) -> tuple[Entry, Prior | None]:
    """The `background` model (held for the request, as `model` is) and the prior it is scored under."""
    try:
        back = await find_model(service, name, "score")
    except HTTPException as e:
        raise HTTPException(e.status_code, f"background: {e.detail}") from None
    if back.image_shape != entry.image_shape:
        raise HTTPException(422, f"background {name!r} scores {tuple(back.image_shape)} images and {entry.name!r} "
                                 f"{tuple(entry.image_shape)}: pick a background model of the same image shape")
    if back.kind == "vae":
        return back, None
    if back.default_prior is None:
        raise HTTPException(422, f"background {name!r} is a VQ-VAE with no prior loaded: its bound would be of uniform "
                                 "codes; pick a model with one")
    return back, back.default_prior


VAE_MAP = "-log p(x_ij | z = mu), the decoder's term at the posterior mean (it does not sum to the IWAE bound)"
VQVAE_MAP = "the decoder's nats per pixel plus each code's prior nats spread over its patch (sums to `nats`)"


async def _bound(service: Service, entry: Entry, chosen: Prior | None, index: int, x: torch.Tensor, k: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Images x (n, C, H, W) under one model -> (nats (n,), a VQ-VAE's nats per pixel (n, H, W) (computed
    with its bound; a VAE's is another pass: `_heat`) or None, what `nats` bounds)."""
    n = len(x)
    if entry.kind == "vae":
        eps = entry.model.draw_score_noise(n, k, torch.Generator().manual_seed(seed)).reshape(n * k, -1)  # (n k, D)
        batcher, parts = service.batcher(entry, Op.SCORE), []
        for start in range(0, n * k, batcher.max_batch_size):  # a pass at a time: never a queue-filling request
            rows = torch.arange(start, min(start + batcher.max_batch_size, n * k))
            parts += await batcher.submit(x[rows // k], eps[rows])  # row r: image r // k, its sample r % k
        log_w = torch.cat(parts)  # (n k,)
        nats = -VAE.iwae_from_log_weights(log_w.reshape(n, k))  # (n,)
        return nats, None, f"IWAE-{k} (seed {seed}): an upper bound on -log p(x), as the model card's table"
    key = chosen.api_name if chosen is not None else None
    nats, pixel_nats = await service.batcher(entry, Op.SCORE, key).submit(x, torch.full((n,), index))
    given = f"given label {index}: an upper bound on -log p(x | y)" if index >= 0 else "an upper bound on -log p(x)"
    marg = " (label marginalised over equally likely classes)" if chosen is not None and chosen.num_classes and index < 0 else ""
    return nats, pixel_nats, f"-log p(x | z_q(x)) - log P(z(x)) under {'prior ' + key if key else 'uniform codes'}: {given}{marg}"


async def _heat(service: Service, entry: Entry, chosen: Prior | None, index: int, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Images x -> (nats per pixel (n, H, W), what they mean): a VAE's in one pass (no importance samples)."""
    if entry.kind == "vae":
        (pixel_nats,) = await service.batcher(entry, Op.SCORE_MAP).submit(x)
        return pixel_nats, VAE_MAP
    _, pixel_nats, _ = await _bound(service, entry, chosen, index, x, k=1, seed=0)  # a VQ-VAE's map comes with its bound
    return pixel_nats, VQVAE_MAP


HEAT_MAX_BITS = 8.0  # a heat map's top colour: bits per subpixel as costly as a uniform guess over 256 levels


def _heat_images(pixel_nats: torch.Tensor, channels: int) -> torch.Tensor:
    """Nats per pixel (n, H, W) -> heat maps (n, 3, H, W) of bits per subpixel, 0 to HEAT_MAX_BITS."""
    return imaging.heat_map(pixel_nats.double() / (channels * math.log(2)), HEAT_MAX_BITS)


def _heat_png(pixel_nats: torch.Tensor, channels: int, level: int) -> bytes:
    return imaging.grid_png(_heat_images(pixel_nats, channels), compress_level=level)


def _score_response(head: dict[str, Any], names: list[str], x: torch.Tensor, nats: torch.Tensor,
                    back_nats: torch.Tensor | None, values: torch.Tensor | None, heat: torch.Tensor | None,
                    codecs: list[str], threshold: OodThreshold | None, level: int, headers: dict[str, str]) -> Response:
    """The /score answer (ScoreResponse: `head`, then the items), built in the codec thread: the codecs
    compress every image."""
    dims = x[0].numel()
    bpd = nats.double() / (dims * math.log(2))  # (n,)
    back_bpd = back_nats.double() / (dims * math.log(2)) if back_nats is not None else None
    anchors = {c: codec_bits_per_dim(x, c) for c in codecs}  # codec -> (n,)
    maps = imaging.pngs_base64(_heat_images(heat, x.shape[1]), level) if heat is not None else None

    def item(i: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": names[i],
            "nats": float(nats[i]),
            "bits_per_dim": float(bpd[i]),
            "codec_bits_per_dim": {c: float(a[i]) for c, a in anchors.items()},
            "complexity_score": {c: float(bpd[i] - a[i]) for c, a in anchors.items()},
        }
        if back_bpd is not None:
            out["background_bits_per_dim"] = float(back_bpd[i])
            out["ratio_score"] = float(bpd[i] - back_bpd[i])
        if values is not None:
            out["map"] = values[i].double().numpy()
        if maps is not None:
            out["map_png"] = maps[i]
        if threshold is not None:
            value = out["bits_per_dim"] if threshold.score == "bits" else out["complexity_score"][threshold.score]
            out["verdict"] = {"score": threshold.score, "value": value, "threshold": threshold.threshold,
                              "unusual": value > threshold.threshold}
        return out

    body = {**head, "items": [item(i) for i in range(len(names))]}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json", headers=headers)
