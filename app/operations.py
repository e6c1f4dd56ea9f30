"""What each operation of a served model calls, as a table, and the inputs it takes.

An operation's meaning is a model method (models/vae.py, models/vqvae.py): `TABLE[kind][op]` names
the method a batcher of that Op calls and how to make seeded valid inputs of any number of rows
for it (`example`, for warm-ups and the pass-size checks of app/batching.py). Noise is an input
like any other: `sample_inputs` draws a /sample request's from its seed (GET /sample and
benchmarks/peers.py call it), so an answer never depends on which requests shared its pass. A
method with discrete steps (a pixel or code drawn, a nearest code picked) takes `on_step`: the
pass-size check compares what precedes each step (`probe`), and where there are many steps (the
pixels of an autoregressive decoder, a prior's codes) the batcher stops a pass nobody waits for
any more between them (`check_wanted`, which also offers the CPU to a less-served model:
app/scheduling.py). A pass of one step (the VQ-VAE's nearest-code search) runs to its end.

A batcher is built only where a route may submit to it (ROUTES): for the API operations the model
offers (app/registry.py's `Entry.operations`), so a VAE without a latent gets its SAMPLE batcher
alone. A VQ-VAE offers Op.SAMPLE once per attached prior. With GENSERVE_CUDA_GRAPHS,
`Operation.capture` records the method per pass size (app/graphs.py).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.batching import check_wanted
from app.graphs import CapturedPasses, CapturedPriorSteps, pad_rows, size_for
from app.registry import Entry, Prior

Inputs = tuple[torch.Tensor, ...]


class Op(enum.StrEnum):
    RECONSTRUCT = "reconstruct"  # images (B, C, H, W) -> reconstructions (B, C, H, W)
    ENCODE = "encode"  # images -> VAE: mu, logvar (B, D); VQ-VAE: z_e (B, D, h, w), codes (B, h, w)
    DECODE = "decode"  # VAE: z (B, D) -> images; VQ-VAE: codes (B, h, w) -> images
    DECODE_NEAREST = "decode_nearest"  # VQ-VAE: z_e (B, D, h, w) -> nearest codes -> images
    SAMPLE = "sample"  # noise (sample_inputs) -> images
    SCORE = "score"  # VAE: images and noise, a row per sample -> log importance weights; VQ-VAE: images, labels -> nats, map
    SCORE_MAP = "score_map"  # VAE: images -> -log p(x_ij | z = mu) per pixel


# The API operations (routes) that submit to each Op's batcher: a model gets the batchers of the
# operations it offers. /interpolate encodes both ends, then decodes with DECODE (VAE) or
# DECODE_NEAREST (VQ-VAE).
ROUTES: dict[Op, frozenset[str]] = {
    Op.RECONSTRUCT: frozenset({"reconstruct"}),
    Op.ENCODE: frozenset({"encode", "interpolate"}),
    Op.DECODE: frozenset({"decode", "interpolate"}),
    Op.DECODE_NEAREST: frozenset({"interpolate"}),
    Op.SAMPLE: frozenset({"sample"}),
    Op.SCORE: frozenset({"score"}),
    Op.SCORE_MAP: frozenset({"score"}),
}


@dataclass(frozen=True)
class OpKey:
    """Names one batcher: a model's operation, and for a VQ-VAE's SAMPLE the prior's API name."""

    model: str
    op: Op
    prior: str | None = None

    def __str__(self) -> str:  # the batcher's name and its metrics label, e.g. "vqvae:sample:gated"
        return ":".join([self.model, str(self.op), *([self.prior] if self.prior else [])])


@dataclass(frozen=True)
class Operation:
    key: OpKey
    fn: Callable[..., Sequence[torch.Tensor]]
    example: Callable[[int, torch.Generator], Inputs]  # (rows, generator) -> valid CPU inputs
    # For an operation with a discrete step: computes what fn computes and also returns what
    # precedes each discrete step (VQ distances, a prior's logits), one row per item, for the
    # batch-invariance check (Batcher.check_buckets). None: fn's outputs are checked.
    probe: Callable[..., Sequence[torch.Tensor]] | None = None
    # With GENSERVE_CUDA_GRAPHS (app/graphs.py): (pass sizes, device, autocast dtype, record) -> a function
    # of fn's signature that replays CUDA graphs recorded for those sizes and runs fn for any other.
    # None: the operation runs eagerly (an encoder, an autoregressive decoder's pixel steps).
    capture: Callable[[Sequence[int], torch.device, torch.dtype | None, bool], Callable[..., Inputs]] | None = None
    stoppable: bool = False  # a pass has many steps, between which it stops when unwanted (so it never goes alone)


@dataclass(frozen=True)
class Method:
    """One row of TABLE: the model method an Op calls, with which inputs, and how it may run."""

    name: str  # the model's method: method(*inputs[, on_step=...]) -> a tensor or a tuple of tensors
    example: Callable[[Entry, int, torch.Generator], Inputs]  # (entry, rows, generator) -> valid CPU inputs
    steps: bool = False  # takes on_step (has discrete steps): the check compares what precedes them
    stoppable: bool = False  # many steps: a pass nobody waits for any more stops between them (one step: runs to the end)
    graphed: bool = False  # recorded per pass size with GENSERVE_CUDA_GRAPHS (one pass, no value read to the host)
    graph_kwargs: tuple[tuple[str, Any], ...] = ()  # what the recorded call adds (the checks it leaves out)


def _images(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (torch.rand(n, *entry.image_shape, generator=g),)  # (n, C, H, W) in [0, 1)


def _latents(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (torch.randn(n, entry.model.config.latent_dim, generator=g),)  # (n, D)


def _temperatures(n: int, g: torch.Generator) -> torch.Tensor:
    return 0.5 + torch.rand(n, generator=g)  # (n,) in [0.5, 1.5): rows of one pass differ


def _vae_noise(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (*entry.model.draw_noise(n, g), _temperatures(n, g))  # eps (n, D), uniforms (n, U, H, W), temperatures


def _grid_images(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (torch.randint(256, (n, *entry.image_shape), generator=g) / 255,)  # (n, C, H, W) on the grid k / 255: 8-bit images


def _score_rows(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (*_grid_images(entry, n, g), torch.randn(n, entry.model.config.latent_dim, generator=g))  # x (n, C, H, W), eps (n, D)


def _labelled_images(num_labels: int) -> Callable[[Entry, int, torch.Generator], Inputs]:
    def example(entry: Entry, n: int, g: torch.Generator) -> Inputs:
        return (*_grid_images(entry, n, g), torch.randint(-1, max(num_labels, 1), (n,), generator=g))  # labels, -1: none

    return example


def _codes(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (torch.randint(int(entry.model.config.codebook_size), (n, *entry.model.code_shape), generator=g),)  # (n, h, w)


def _encoder_outputs(entry: Entry, n: int, g: torch.Generator) -> Inputs:
    return (torch.randn(n, *entry.model.latent_shape, generator=g),)  # (n, D, h, w)


def _prior_noise(prior: Prior) -> Callable[[Entry, int, torch.Generator], Inputs]:
    def example(entry: Entry, n: int, g: torch.Generator) -> Inputs:
        uniforms, labels = prior.model.draw_noise(n, g)  # (n, h, w), (n,) or None
        return (uniforms, _temperatures(n, g), *([] if labels is None else [labels]))

    return example


# kind -> Op -> the method. A VQ-VAE's SAMPLE is `sample_from(prior, ...)`, one per prior (operations()).
TABLE: dict[str, dict[Op, Method]] = {
    "vae": {
        # an autoregressive decoder's pixel draws are its steps; a factorized decoder has none
        Op.RECONSTRUCT: Method("reconstruct", _images, steps=True, stoppable=True, graphed=True),
        Op.ENCODE: Method("encode", _images),  # -> mu, logvar
        Op.DECODE: Method("decode_latents", _latents, steps=True, stoppable=True, graphed=True),
        Op.SAMPLE: Method("sample_from", _vae_noise, steps=True, stoppable=True, graphed=True),  # a factorized decoder ignores the uniforms
        Op.SCORE: Method("log_importance_weights", _score_rows),  # teacher-forced: no steps, whatever the decoder
        Op.SCORE_MAP: Method("nll_map", _grid_images),
    },
    "vqvae": {
        Op.RECONSTRUCT: Method("reconstruct", _images, steps=True, graphed=True),
        Op.ENCODE: Method("encode_nearest", _images, steps=True),  # -> z_e, codes
        # the range check reads values back to the host; a recorded pass leaves it out (the route checked: parse_codes)
        Op.DECODE: Method("decode_indices", _codes, graphed=True, graph_kwargs=(("check", False),)),
        Op.DECODE_NEAREST: Method("decode_nearest", _encoder_outputs, steps=True, graphed=True),
    },
}


def sample_inputs(
    model: torch.nn.Module, n: int, seed: int, temperature: float, prior: torch.nn.Module | None = None,
    label: int | None = None,
) -> Inputs:
    """A /sample request's inputs, drawn on the CPU from a generator seeded by `seed`: what its
    batcher (Op.SAMPLE) takes. VAE: `draw_noise` (eps, uniforms), then the temperatures (n,); VQ-VAE:
    the prior's `draw_noise` (uniforms, and labels for a class-conditional prior: `label`'s, or
    random ones), the temperatures between them."""
    generator = torch.Generator().manual_seed(seed)
    temperatures = torch.full((n,), float(temperature))  # (n,)
    if prior is None:
        return (*model.draw_noise(n, generator), temperatures)
    uniforms, labels = prior.draw_noise(n, generator, label)
    return (uniforms, temperatures, *([] if labels is None else [labels]))


def operations(entry: Entry) -> list[Operation]:
    """The batchable operations of a served model that its routes use (see the module docstring)."""
    offered = set(entry.operations)
    return [op for op in _every_operation(entry) if ROUTES[op.key.op] & offered]


def _stop_if_unwanted(_: torch.Tensor) -> None:
    check_wanted()  # between steps: stop when nobody waits for this pass any more


def _as_tuple(out: torch.Tensor | Sequence[torch.Tensor]) -> Inputs:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _operation(key: OpKey, entry: Entry, method: Callable[..., Any], spec: Method) -> Operation:
    """An Operation calling `method` (a model's bound method, or one with a prior bound) as `spec` says."""
    steps = spec.steps and not (entry.kind == "vae" and not entry.model.config.autoregressive)  # a factorized decoder draws nothing
    example = functools.partial(spec.example, entry)

    def fn(*inputs: torch.Tensor) -> Inputs:
        return _as_tuple(method(*inputs, on_step=_stop_if_unwanted) if spec.stoppable else method(*inputs))

    probe = None
    if steps:

        def probe(*inputs: torch.Tensor) -> Inputs:
            seen: list[torch.Tensor] = []
            outputs = _as_tuple(method(*inputs, on_step=lambda t: seen.append(t.float().flatten(1))))
            return (*outputs, torch.cat(seen, 1))  # (B, everything that preceded a step)

    capture = None
    # an autoregressive VAE decoder draws pixel after pixel, reading values back between steps: eager
    if spec.graphed and not (entry.kind == "vae" and entry.model.config.autoregressive):
        body = functools.partial(method, **dict(spec.graph_kwargs))
        capture = _passes(lambda *inputs: _as_tuple(body(*inputs)), fn, example)
    return Operation(key, fn, example, probe, capture, stoppable=spec.stoppable and steps)


def _every_operation(entry: Entry) -> list[Operation]:
    """Every batchable operation a model of its kind has, whether or not it offers it."""
    m, name = entry.model, entry.name
    ops = [_operation(OpKey(name, op), entry, getattr(m, spec.name), spec) for op, spec in TABLE[entry.kind].items()]
    if entry.kind == "vqvae":  # the bound under each prior, and under none (uniform codes: log K nats a code)
        for prior in [None, *entry.priors.values()]:
            num_labels = int(getattr(prior.model.config, "num_classes", 0)) if prior is not None else 0
            # steps: the nearest codes' argmin, then a prior pass per label, between which an unwanted pass stops
            spec = Method("nll_labelled", _labelled_images(num_labels), steps=True, stoppable=True)
            method = functools.partial(m.nll_labelled, prior.model if prior is not None else None)
            ops.append(_operation(OpKey(name, Op.SCORE, prior.api_name if prior is not None else None), entry, method, spec))
    for prior in entry.priors.values():
        spec = Method("sample_from", _prior_noise(prior), steps=True, stoppable=True)  # a draw per position
        op = _operation(OpKey(name, Op.SAMPLE, prior.api_name), entry, functools.partial(m.sample_from, prior.model), spec)
        ops.append(dataclasses.replace(op, capture=_prior_steps(prior, m, functools.partial(_codes, entry))))
    return ops


def _passes(body: Callable[..., Inputs], eager: Callable[..., Inputs], example: Callable[[int, torch.Generator], Inputs]):
    """An Operation's `capture` for a one-pass function: `body` (graph-safe: no value read back to the
    host) recorded per pass size, `eager` for the sizes without a recording."""

    def capture(sizes: Sequence[int], device: torch.device, autocast: torch.dtype | None, record: bool = True) -> CapturedPasses:
        return CapturedPasses(body, example, sizes, device, record=record, autocast=autocast, eager=eager)

    return capture


def _prior_steps(prior: Prior, vqvae: torch.nn.Module, codes: Callable[[int, torch.Generator], Inputs]):
    """The `capture` of a prior's SAMPLE: the per-position step recorded per pass size (app/graphs.py),
    then the codes decoded by a recorded decoder (recorded on `codes`, the VQ-VAE's example code
    grids); the eager operation (sampling mode "cached") for the sizes without a recording."""

    def capture(sizes: Sequence[int], device: torch.device, autocast: torch.dtype | None, record: bool = True):
        steps = CapturedPriorSteps(prior.model, sizes, device, record=record, autocast=autocast)
        decoder = CapturedPasses(lambda z: (vqvae.decode_indices(z, check=False),), codes, steps.sizes or sizes,
                                 device, record=record, autocast=autocast)

        def reference(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None,
                      on_step=None) -> Inputs:
            """What the recorded steps compute, eagerly: sampling mode "stepped", then the decoder."""
            return (vqvae.sample_from(prior.model, uniforms, temperature, labels, on_step=on_step, mode="stepped"),)

        def sample(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None,
                   on_step=_stop_if_unwanted) -> Inputs:
            drawn = steps.sample(uniforms, temperature, labels, lambda r, c, logits: on_step(logits))
            if drawn is not None:
                return decoder(drawn)
            rows, size = uniforms.shape[0], size_for(uniforms.shape[0], steps.sizes)
            if size is None:
                return (vqvae.sample_from(prior.model, uniforms, temperature, labels, on_step=on_step),)  # no recording of this size
            # the buffers of its size are taken by another pass: the same arithmetic, eagerly, so the
            # answer does not depend on which ran
            padded = reference(pad_rows(uniforms, size), pad_rows(temperature, size),
                               None if labels is None else pad_rows(labels, size), on_step)
            return tuple(o[:rows] for o in padded)

        def probe(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None) -> Inputs:
            seen: list[torch.Tensor] = []
            (images,) = sample(uniforms, temperature, labels, on_step=lambda logits: seen.append(logits.float()))
            return images, torch.cat(seen, 1)  # (B, h*w*K): every draw's logits

        # app/graphs.py's describe, the service's check of the recorded passes, benchmarks/gpu/graphs.py
        sample.steps, sample.decoder, sample.reference, sample.probe = steps, decoder, reference, probe
        return sample

    return capture


def warm_up(operation: Operation, device: torch.device) -> None:
    """One forward pass of one row, so the first request does not pay for lazy initialisation."""
    inputs = operation.example(1, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        operation.fn(*(t.to(device) for t in inputs))
