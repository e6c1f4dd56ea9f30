"""Request and response models, and the fixed bounds of query parameters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, model_validator

# /sample temperature lies in [MIN_TEMPERATURE, MAX_TEMPERATURE]. A prior divides its float32
# logits by it: far below 1e-3 they overflow (inf - inf = NaN), and at 1e-3 a logit gap of 0.02
# already makes the runner-up e^-20 times less likely than the best code, which a float32
# uniform draw (resolution 2^-24) cannot pick: 1e-3 is greedy decoding for all purposes.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0
MIN_STEPS, MAX_STEPS = 2, 64  # /interpolate steps, both ends included
MAX_SEED = 2**63 - 1
# Bounds on the lists of a /decode body, so that validation stops early: the outer list at most
# MAX_DECODE_ITEMS (Settings.max_n cannot exceed it), a latent at most MAX_LATENT_DIM numbers, a code
# grid at most MAX_CODE_SIDE rows of as many codes (models/io.py refuses models beyond these). Each
# list stops at its first bad item (fail_fast), so a 422 names one error, not a million; the route
# then checks the exact counts and shapes against the model (app/routes/generate.py).
MAX_DECODE_ITEMS = 4096
MAX_LATENT_DIM = 4096
MAX_CODE_SIDE = 256

InterpolationMethod = Literal["slerp", "lerp"]
# The model operations of the HTTP API, one route each, in the order GET /models lists them
# (app/registry.py's Entry.operations says which a model offers)
ApiOperation = Literal["reconstruct", "encode", "decode", "interpolate", "sample", "score"]


class Status(BaseModel):
    status: str


class Ready(BaseModel):
    status: Literal["ready"]
    models: int


class Error(BaseModel):
    detail: Any


class NotReady(BaseModel):
    """GET /ready's 503. While starting, how far loading has got (the other states have `detail` alone)."""

    detail: str = Field(description='"starting", "draining", "recovering", "shutting down" or "start-up failed"')
    loaded: int | None = Field(None, description="starting: the weight files read so far (loaded or refused)")
    files: int | None = Field(None, description="starting: the weight files to read; null until the directory is listed")
    elapsed_s: float | None = Field(None, description="starting: seconds since start-up began")


class OodThreshold(BaseModel):
    """An out-of-distribution threshold stored in a weight file (`python -m training threshold`)."""

    score: Literal["bits", "png", "webp"] = Field(description="bits: /score's bits_per_dim; png, webp: its complexity_score")
    definition: str
    threshold: float = Field(description="a score above it is unusual")
    accept: float = Field(gt=0, lt=1, description="the share of validation images at or under the threshold")
    split: str = Field(description="the images it was set on (a validation split, never test)")
    k: int | None = Field(None, description="VAE: the importance samples per image of the scores it was set with")
    seed: int | None = None
    validation_scores: dict[str, float] | None = None


class Verdict(BaseModel):
    score: str
    value: float
    threshold: float
    unusual: bool = Field(description="value > threshold: less typical than `accept` of the validation images")


class PriorInfo(BaseModel):
    name: str = Field(description="API name: pixelcnn, gated or pixelcnnpp")
    kind: str
    model: str = Field(description="the prior's own name in its weight file")
    test_bits_per_code: float | None
    test_bits_per_dim: float | None = Field(
        None, description="test NLL bound of the images, -log p(x|z_q) - log P(z), with the VQ-VAE's likelihood"
    )
    test_marginal_bits_per_dim: float | None = Field(
        None, description="a class-conditional prior: the same bound with the label marginalised out over the training "
        "classes' frequencies, a bound on -log p(x) (test_bits_per_dim is told each image's class: -log p(x|y))"
    )
    num_classes: int = Field(description="0 = unconditional")
    default: bool = Field(description="the prior /sample uses when none is named: the lowest validation NLL (test where a file has none)")
    dataset: str
    class_names: list[str] = Field(
        description="the training data's classes: label i is class_names[i]; the prior's own file's, else (a "
        "class-conditional prior) its VQ-VAE's when that records one per class; empty otherwise"
    )
    class_names_conflict: str | None = Field(
        None, description="a class-conditional prior whose VQ-VAE records other class names, or another number "
        "of them: how they differ (the prior's class_names are used for its labels)"
    )
    file: str | None
    sha256: str | None = Field(None, description="SHA-256 of the weight file's bytes (what sha256sum prints)")
    loaded_at: str | None = Field(None, description="when this version of the file was loaded (ISO 8601, UTC)")
    ood: OodThreshold | None = Field(None, description="the out-of-distribution threshold of /score under this prior")


class RejectedPrior(BaseModel):
    file: str
    reason: str


class ModelEntry(BaseModel):
    name: str
    kind: Literal["vae", "vqvae"]
    operations: list[ApiOperation] = Field(
        description="the routes this model answers: a model without a latent (a VAE trained with use_latent=False, "
        "whose decoder ignores z) only samples, a VQ-VAE samples once a prior is loaded for it; "
        "any other is refused with 422 (404 for a VQ-VAE's missing prior)"
    )
    image_shape: list[int]
    latent_shape: list[int] | None = Field(description="z's shape (a VQ-VAE's: channels, then its code grid); null for a "
                                           "model whose images do not depend on z, such as the context-only baseline")
    dataset: str
    class_names: list[str] = Field(
        description="the training data's classes, by label (a VQ-VAE whose file has none shows its priors'); "
        "empty when unknown or unlabelled"
    )
    metrics: dict[str, Any]
    device: str
    file: str | None
    sha256: str | None = Field(None, description="SHA-256 of the weight file's bytes (what sha256sum prints)")
    loaded_at: str | None = Field(None, description="when this version of the file was loaded (ISO 8601, UTC)")
    # "logistic" (discretized logistic mixture: a likelihood of 8-bit images), "bernoulli" (VAE) or "mse" (VQ-VAE)
    likelihood: str
    ood: OodThreshold | None = Field(None, description="the out-of-distribution threshold of /score (a VAE; a VQ-VAE's are its priors')")
    # VAE only: "mlp" or "conv"; "factorized" p(x|z) or "autoregressive" p(x_i|z, x_<i) (pixel by pixel)
    arch: str | None = None
    decoder: str | None = None
    # VQ-VAE only:
    code_shape: list[int] | None = None
    codebook_size: int | None = None
    default_prior: str | None = None
    priors: list[PriorInfo] | None = None
    rejected_priors: list[RejectedPrior] | None = None


class Problem(BaseModel):
    file: str
    reason: str
    vqvae: str | None = None


class ImagesResponse(BaseModel):
    """What image endpoints answer to `Accept: application/json`: one base64 PNG per image."""

    images: list[str]


class VAEEncoding(BaseModel):
    file: str
    mu: list[float]
    logvar: list[float]


class VQVAEEncoding(BaseModel):
    file: str
    codes: list[list[int]] = Field(description="(h, w) code indices")
    z_e: list[list[list[float]]] | None = Field(None, description="(D, h, w) encoder output, with include_z_e=true")


class ImageScore(BaseModel):
    file: str
    nats: float = Field(description="an upper bound on -log p(x) of this image, in nats (see `bound`)")
    bits_per_dim: float = Field(description="the same bound per dimension (subpixel), in bits: nats / (C H W ln 2)")
    codec_bits_per_dim: dict[str, float] = Field(
        description="what each lossless codec asked for (`codec`) needs for this image alone, file headers included, in bits/dim")
    complexity_score: dict[str, float] = Field(
        description="bits_per_dim minus each codec's: the input-complexity out-of-distribution score (Serra et al. 2020); "
                    "higher is less typical of the training data")
    background_bits_per_dim: float | None = Field(None, description="with `background`: the same bound under that model")
    ratio_score: float | None = Field(
        None, description="with `background`: bits_per_dim minus background_bits_per_dim, -log of the likelihood ratio "
                          "(Ren et al. 2019) per dimension; higher is less typical of the training data")
    map: list[list[float]] | None = Field(
        None, description="with include_map=true: (H, W) nats per pixel (`map_meaning` says what they sum to)")
    map_png: str | None = Field(None, description="with map=true: a base64 PNG heat map of the bits per subpixel "
                                                  "(`map_scale`)")
    verdict: Verdict | None = Field(None, description="against the threshold stored in the weight file, where there is one")


class ScoreResponse(BaseModel):
    model: str
    kind: str
    prior: str | None = Field(description="VQ-VAE: the prior of the bound; null: uniform codes (a VAE has none)")
    bound: str = Field(description="what `nats` bounds and how it was computed")
    background: str | None = Field(None, description="the background model of `ratio_score`, where one was asked for")
    background_bound: str | None = Field(None, description="what the background's bits/dim bound")
    map_meaning: str | None = Field(None, description="with include_map or map: what the per-pixel nats are")
    map_scale: str | None = Field(None, description="with map=true: the heat maps' colour scale")
    items: list[ImageScore]


class EncodeResponse(BaseModel):
    model: str
    kind: str
    items: list[VAEEncoding] | list[VQVAEEncoding]


StrictFloat = Annotated[float, Strict()]  # a JSON number (an integer too), never true/false or "1.5"


class DecodeRequest(BaseModel):
    """Strict: `true` is not the code 1 nor "0.5" a latent value, and unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Strict()]
    z: list[Annotated[list[StrictFloat], Field(max_length=MAX_LATENT_DIM, fail_fast=True)]] | None = Field(
        None, max_length=MAX_DECODE_ITEMS, fail_fast=True, description="VAE: one latent vector of length D per image"
    )
    codes: list[Annotated[list[Annotated[list[StrictInt], Field(max_length=MAX_CODE_SIDE, fail_fast=True)]],
                          Field(max_length=MAX_CODE_SIDE, fail_fast=True)]] | None = Field(
        None, max_length=MAX_DECODE_ITEMS, fail_fast=True, description="VQ-VAE: one (h, w) grid of code indices per image"
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        """One error for unknown fields, however many (extra="forbid" would report each of 100,000 keys)."""
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                shown = ", ".join(repr(str(k)[:40]) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
                raise ValueError(f"unknown field(s) {shown}; a /decode body has 'model' and 'z' or 'codes'")
        return data
