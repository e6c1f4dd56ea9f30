"""Schema fuzzing: every operation of the OpenAPI schema, driven by schemathesis, against the live app.

Cases are generated from `create_app().openapi()`, built at import without starting anything
(the schema depends on the routes only), so pytest gets one test per operation. The live app
runs on the tiny test models: `from_asgi` fetches /openapi.json from it in-process, which starts
its lifespan in schemathesis's event-loop thread (models loaded, batchers running), and the
fixture checks that it serves the same schema. Every case is sent to that app; the lifespan is
shut down when the module's tests end.

Per operation and per Accept (image/png, application/json): the coverage phase (boundary and
just-out-of-range values, missing required parts) and a bounded, seeded fuzzing phase, positive
and negative. Each response must be below 500, have a documented status and content type, and
match the documented body schema. In the fuzzing phase `model` and `prior` are mostly served
names, and the hooks below often put in a body or query that fits a model (real small images,
latents and codes of the right shape), so the models run; otherwise uploads are whatever bytes
schemathesis makes (4xx expected, never 5xx).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings, strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from app.main import create_app

from .conftest import CLASS_NAMES, CODE_SHAPE, CODEBOOK_SIZE, LATENT_DIM, NUM_CLASSES, image_bytes, make_settings

MODELS = ["vae", "vae_rgb", "vqvae", "gated"]  # the served models, and a prior's name (404: it is not a model)
PRIORS = ["pixelcnn", "gated", "pixelcnnpp"]
IMAGES = st.sampled_from(
    [
        image_bytes("PNG", "L"),
        image_bytes("PNG", "RGB", size=(20, 12), seed=1),
        image_bytes("PNG", "RGBA", seed=2),
        image_bytes("PNG", "I;16", seed=3),
        image_bytes("GIF", "P", seed=4),
        image_bytes("JPEG", "RGB", size=(9, 9), seed=5),
    ]
)
# /decode bodies of the right shapes, so the decoders run (on any float32 latent, up to +-3.4e38).
LATENTS = st.lists(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=LATENT_DIM, max_size=LATENT_DIM), min_size=1, max_size=4
)
CODES = st.lists(
    st.lists(st.lists(st.integers(0, CODEBOOK_SIZE - 1), min_size=CODE_SHAPE[1], max_size=CODE_SHAPE[1]), min_size=CODE_SHAPE[0], max_size=CODE_SHAPE[0]),
    min_size=1,
    max_size=4,
)
DECODE_BODIES = st.fixed_dictionaries({"model": st.sampled_from(["vae", "vae_rgb"]), "z": LATENTS}) | st.fixed_dictionaries(
    {"model": st.just("vqvae"), "codes": CODES}
)
# /sample queries that name a served model and fit it, so the samplers run (a label past the gated prior's 3 classes is a 422).
SAMPLE_OPTIONS = {"n": st.integers(1, 16), "seed": st.integers(0, 2**63 - 1), "temperature": st.floats(0.01, 10)}
SAMPLE_QUERIES = st.fixed_dictionaries({"model": st.sampled_from(["vae", "vae_rgb"])}, optional=SAMPLE_OPTIONS) | st.fixed_dictionaries(
    {"model": st.just("vqvae")},
    optional={**SAMPLE_OPTIONS, "prior": st.sampled_from(PRIORS),
              "label": st.integers(0, NUM_CLASSES) | st.sampled_from(CLASS_NAMES).map(str.upper) | st.text(max_size=6)},
)
UPLOAD_FIELDS = {"/reconstruct": {"file": True}, "/encode": {"file": True}, "/interpolate": {"a": False, "b": False}}  # -> several files?

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 0,  # the same cases on every run, in CI too
        "dictionaries": {"models": {"values": MODELS}, "priors": {"values": PRIORS}},
        "parameters": {
            "query.model": {"dictionary": "models", "probability": 0.9},
            "body.model": {"dictionary": "models", "probability": 0.9},
            "query.prior": {"dictionary": "priors", "probability": 0.8},
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_dict(create_app().openapi(), config=CONFIG)


@schema.hook
def flatmap_body(ctx, body):
    """Often a body the models can run: /decode latents or codes of the right shape, real small images as uploads."""
    path = ctx.operation.path
    if path == "/decode":
        return st.just(body) | DECODE_BODIES
    if path in UPLOAD_FIELDS:
        files = {name: st.lists(IMAGES, min_size=1, max_size=3) if several else IMAGES for name, several in UPLOAD_FIELDS[path].items()}
        return st.just(body) | st.fixed_dictionaries(files)
    return st.just(body)


@schema.hook
def flatmap_query(ctx, query):
    """/sample: often a query that fits a served model."""
    if ctx.operation.path == "/sample":
        return st.just(query) | SAMPLE_QUERIES
    return st.just(query)


@pytest.fixture(scope="module")
def live_app(weights_dir):
    """The started app. max_n = 16 (the default n of /sample) and small uploads keep each request cheap."""
    app = create_app(
        make_settings(weights_dir, max_n=16, max_files=3, max_upload_bytes=50_000, max_pixels=256 * 256, request_timeout_s=10.0)
    )
    app = WaitForStart(app)
    served = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)  # starts the lifespan
    try:
        assert served.raw_schema == schema.raw_schema, "the live app serves a different schema"
        yield app
    finally:
        shutdown_lifespans()


class WaitForStart:
    """The app, with a lifespan start-up that completes only once its models are loaded. Schemathesis
    starts the lifespan on a test's first request and ends it after each test; the app's own start-up
    returns at once and loads in the background (app/main.py), which would answer the first requests
    of every test with 503 "starting"."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_when_started(message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.app.state.starting
            await send(message)

        await self.app(scope, receive, send_when_started)


# Accept is a test parameter, not part of the case: image routes answer either, and the in-process
# client's default `Accept: */*` would replace a case's own header (passed explicitly it wins).
# It also gives each item its own node id (with pytest 9.2, unparametrized schemathesis items share one).
@schema.parametrize()
@pytest.mark.parametrize("accept", ["image/png", "application/json"])
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_operation_conforms_to_its_schema(case, accept, live_app):
    case.headers["Accept"] = accept  # for the reproducing curl command of a failure
    case.call_and_validate(app=live_app, headers={"Accept": accept}, checks=CHECKS)
