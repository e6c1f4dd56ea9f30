"""The batchable operations of every served model, by name, and their example inputs.

Each served model offers a fixed set of `Op`s; a VQ-VAE offers `Op.SAMPLE` once per attached
prior. A batcher is built only where a route may submit to it (ROUTES): for the API operations the
model offers (app/registry.py's `Entry.operations`), so a VAE without a latent gets its SAMPLE batcher
alone. `operations(entry)` returns one `Operation` per (model, op[, prior]): the batch function
the batcher runs, which takes and returns tensors with one row per item, and `example`, which
makes seeded valid inputs of any number of rows. The service uses the examples to warm each
operation up and to check which pass sizes are batch-invariant (app/batching.py).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from app.batching import check_wanted
from app.graphs import CapturedPasses, CapturedPriorSteps, pad_rows, size_for
from app.registry import Entry, Prior
from models.vqvae import squared_distances

Inputs = tuple[torch.Tensor, ...]


class Op(enum.StrEnum):
    RECONSTRUCT = "reconstruct"  # images (B, C, H, W) -> reconstructions (B, C, H, W)
    ENCODE = "encode"  # images -> VAE: mu, logvar (B, D); VQ-VAE: z_e (B, D, h, w), codes (B, h, w)
    DECODE = "decode"  # VAE: z (B, D) -> images; VQ-VAE: codes (B, h, w) -> images
    DECODE_NEAREST = "decode_nearest"  # VQ-VAE: z_e (B, D, h, w) -> nearest codes -> images
    SAMPLE = "sample"  # VAE: z (B, D) scaled by temperature, uniforms (B, U, H, W), temperature (B,) -> images; VQ-VAE: see _prior_sample


# The API operations (routes) that submit to each Op's batcher: a model gets the batchers of the
# operations it offers. /interpolate encodes both ends, then decodes with DECODE (VAE) or
# DECODE_NEAREST (VQ-VAE).
ROUTES: dict[Op, frozenset[str]] = {
    Op.RECONSTRUCT: frozenset({"reconstruct"}),
    Op.ENCODE: frozenset({"encode", "interpolate"}),
    Op.DECODE: frozenset({"decode", "interpolate"}),
    Op.DECODE_NEAREST: frozenset({"interpolate"}),
    Op.SAMPLE: frozenset({"sample"}),
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


def operations(entry: Entry) -> list[Operation]:
    """The batchable operations of a served model that its routes use (see the module docstring)."""
    offered = set(entry.operations)
    return [op for op in _every_operation(entry) if ROUTES[op.key.op] & offered]


def _every_operation(entry: Entry) -> list[Operation]:
    """Every batchable operation a model of its kind has, whether or not it offers it."""
    m = entry.model
    name = entry.name
    c, hh, ww = entry.image_shape

    def images(n: int, g: torch.Generator) -> Inputs:
        return (torch.rand(n, c, hh, ww, generator=g),)  # (n, C, H, W) in [0, 1)

    if entry.kind == "vae":
        d = int(m.config.latent_dim)

        def latents(n: int, g: torch.Generator) -> Inputs:
            return (torch.randn(n, d, generator=g),)  # (n, D)

        def draws(n: int, g: torch.Generator) -> Inputs:  # what /sample submits: z, pixel uniforms, temperatures
            return torch.randn(n, d, generator=g), torch.rand(m.uniform_shape(n), generator=g), 0.5 + torch.rand(n, generator=g)

        def generate(z: torch.Tensor, uniforms: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                     on_params=None) -> Inputs:
            """Stoppable between steps. Without uniforms: the fixed draws of `reconstruct` (decode, interpolate)."""
            if uniforms is None:
                uniforms = m.reconstruct_uniforms(z.shape[0], z.device)
            t = 1.0 if temperature is None else temperature.float()
            return (m.generate(z, uniforms=uniforms, temperature=t, on_step=check_wanted, on_params=on_params),)

        probe = None
        if m.config.autoregressive:  # pixel draws are discrete steps: compare what precedes each one

            def probe(z: torch.Tensor, uniforms: torch.Tensor | None = None, temperature: torch.Tensor | None = None) -> Inputs:
                steps: list[torch.Tensor] = []
                (images,) = generate(z, uniforms, temperature, on_params=lambda params: steps.append(params.flatten(1)))
                return images, torch.cat(steps, 1)  # (B, all parameters of every step)

        reconstruct = lambda x: generate(m.encode(x)[0])  # noqa: E731
        # A factorized decoder is one pass: recorded whole. An autoregressive one draws pixel after
        # pixel, reading values back between steps: it runs eagerly.
        graphs = not m.config.autoregressive
        return [
            Operation(OpKey(name, Op.RECONSTRUCT), reconstruct, images,
                      None if probe is None else lambda x: probe(m.encode(x)[0]),
                      _passes(lambda x: (m.generate(m.encode(x)[0]),), reconstruct, images) if graphs else None),
            Operation(OpKey(name, Op.ENCODE), lambda x: m.encode(x), images),
            Operation(OpKey(name, Op.DECODE), generate, latents, probe,
                      _passes(lambda z: (m.generate(z),), generate, latents) if graphs else None),
            # a factorized decoder's sample is its mean image of z: the uniforms and temperatures go unused
            Operation(OpKey(name, Op.SAMPLE), generate, draws, probe,
                      _passes(lambda z, u, t: (m.generate(z),), generate, draws) if graphs else None),
        ]

    quantizer = m.quantizer
    dim, (h, w), k = int(m.config.embedding_dim), tuple(m.code_shape), int(m.config.codebook_size)

    def encode(x: torch.Tensor) -> Inputs:
        z_e = m.encode(x)  # (B, D, h, w)
        return z_e, quantizer.nearest(z_e)  # codes (B, h, w): the inference path, never the training forward

    def distances(z_e: torch.Tensor) -> torch.Tensor:
        """What quantizer.nearest takes the argmin of: (B, D, h, w) -> (B, h*w*K)."""
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        return squared_distances(flat, quantizer.embedding.float()).reshape(z_e.shape[0], -1)

    def reconstruct_probe(x: torch.Tensor) -> Inputs:
        z_e = m.encode(x)
        return m.decode_indices(quantizer.nearest(z_e)), z_e, distances(z_e)

    def codes(n: int, g: torch.Generator) -> Inputs:
        return (torch.randint(k, (n, h, w), generator=g),)  # (n, h, w)

    def encoder_outputs(n: int, g: torch.Generator) -> Inputs:
        return (torch.randn(n, dim, h, w, generator=g),)  # (n, D, h, w)

    def decode_nearest(z_e: torch.Tensor) -> Inputs:
        return (m.decode_indices(quantizer.nearest(z_e)),)

    def reconstruct(x: torch.Tensor) -> Inputs:
        return (m.reconstruct(x),)

    def decode(z: torch.Tensor) -> Inputs:
        return (m.decode_indices(z),)

    # recorded bodies: the codes are in range by construction (nearest, a draw) or checked by the route
    # (parse_codes), so the range check, which reads values back to the host, is left out
    ops = [
        Operation(OpKey(name, Op.RECONSTRUCT), reconstruct, images, reconstruct_probe,
                  _passes(lambda x: (m.decode_indices(quantizer.nearest(m.encode(x)), check=False),), reconstruct, images)),
        Operation(OpKey(name, Op.ENCODE), encode, images, lambda x: (*encode(x), distances(m.encode(x)))),
        Operation(OpKey(name, Op.DECODE), decode, codes, None,
                  _passes(lambda z: (m.decode_indices(z, check=False),), decode, codes)),
        Operation(OpKey(name, Op.DECODE_NEAREST), decode_nearest, encoder_outputs, lambda z_e: (*decode_nearest(z_e), distances(z_e)),
                  _passes(lambda z_e: (m.decode_indices(quantizer.nearest(z_e), check=False),), decode_nearest, encoder_outputs)),
    ]
    for prior in entry.priors.values():
        sample, probe = _prior_sample(prior, m)
        ops.append(Operation(OpKey(name, Op.SAMPLE, prior.api_name), sample, _prior_example(prior), probe,
                             _prior_steps(prior, m, sample, codes)))
    return ops


def _passes(body: Callable[..., Inputs], eager: Callable[..., Inputs], example: Callable[[int, torch.Generator], Inputs]):
    """An Operation's `capture` for a one-pass function: `body` (graph-safe: no value read back to the
    host) recorded per pass size, `eager` for the sizes without a recording."""

    def capture(sizes: Sequence[int], device: torch.device, autocast: torch.dtype | None, record: bool = True) -> CapturedPasses:
        return CapturedPasses(body, example, sizes, device, record=record, autocast=autocast, eager=eager)

    return capture


def _prior_steps(prior: Prior, vqvae: torch.nn.Module, eager: Callable[..., Inputs],
                 codes: Callable[[int, torch.Generator], Inputs]):
    """The `capture` of a prior's SAMPLE: the per-position step recorded per pass size (app/graphs.py),
    then the codes decoded by a recorded decoder (recorded on `codes`, the VQ-VAE's example code
    grids); `eager` for the sizes without a recording."""

    def capture(sizes: Sequence[int], device: torch.device, autocast: torch.dtype | None, record: bool = True):
        steps = CapturedPriorSteps(prior.model, sizes, device, record=record, autocast=autocast)
        decoder = CapturedPasses(lambda z: (vqvae.decode_indices(z, check=False),), codes, steps.sizes or sizes,
                                 device, record=record, autocast=autocast)

        def reference(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None,
                      on_logits=None) -> Inputs:
            """What the recorded steps compute, eagerly: sampling mode "stepped", then the decoder."""
            codes = prior.model.sample(uniforms.shape[0], labels=labels, temperature=temperature.float(),
                                       uniforms=uniforms.float(), mode="stepped", on_logits=on_logits)
            return (vqvae.decode_indices(codes),)

        def sample(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None,
                   on_logits=None) -> Inputs:
            on_logits = on_logits or (lambda r, c, logits: check_wanted())  # noqa: E731
            drawn = steps.sample(uniforms, temperature, labels, on_logits)
            if drawn is not None:
                return decoder(drawn)
            rows, size = uniforms.shape[0], size_for(uniforms.shape[0], steps.sizes)
            if size is None:
                return eager(uniforms, temperature, labels, on_logits)  # no recording of this size
            # the buffers of its size are taken by another pass: the same arithmetic, eagerly, so the
            # answer does not depend on which ran
            padded = reference(pad_rows(uniforms, size), pad_rows(temperature, size),
                               None if labels is None else pad_rows(labels, size), on_logits)
            return tuple(o[:rows] for o in padded)

        # app/graphs.py's describe, the service's check of the recorded passes, benchmarks/gpu/graphs.py
        sample.steps, sample.decoder, sample.reference, sample.probe = steps, decoder, reference, _logits_probe(sample)
        return sample

    return capture


def _prior_sample(prior: Prior, vqvae: torch.nn.Module) -> tuple[Callable[..., Inputs], Callable[..., Inputs]]:
    """The batch function (uniforms (B, h, w), temperature (B,)[, labels (B,)]) -> images (B, C, H, W),
    and its probe, which also returns the logits of every draw (B, h*w, K)."""

    def sample(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None, on_logits=None) -> Inputs:
        if on_logits is None:  # between draws: stop when nobody waits for this pass any more
            on_logits = lambda r, c, logits: check_wanted()  # noqa: E731
        codes = prior.model.sample(
            uniforms.shape[0], labels=labels, temperature=temperature.float(), uniforms=uniforms.float(), on_logits=on_logits
        )
        return (vqvae.decode_indices(codes),)  # the codes themselves are not returned: /sample shows images

    return sample, _logits_probe(sample)


def _logits_probe(sample: Callable[..., Inputs]) -> Callable[..., Inputs]:
    """A prior's probe: `sample`'s images and the logits of every draw (B, h*w, K), through its on_logits."""

    def probe(uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None) -> Inputs:
        steps: list[torch.Tensor] = []
        (images,) = sample(uniforms, temperature, labels, on_logits=lambda r, c, logits: steps.append(logits.float()))
        return images, torch.stack(steps, 1)  # (B, h*w, K)

    return probe


def _prior_example(prior: Prior) -> Callable[[int, torch.Generator], Inputs]:
    h, w = prior.model.config.code_shape
    classes = prior.num_classes

    def example(n: int, g: torch.Generator) -> Inputs:
        uniforms = torch.rand(n, h, w, generator=g)  # (n, h, w) in [0, 1)
        temperature = 0.5 + torch.rand(n, generator=g)  # (n,) in [0.5, 1.5)
        if not classes:
            return uniforms, temperature
        return uniforms, temperature, torch.randint(classes, (n,), generator=g)

    return example


def pad_linear_rows(model: torch.nn.Module, min_rows: int) -> int:
    """Make every nn.Linear of `model` compute at least `min_rows` rows; returns how many it changed.

    CPU BLAS (MKL) multiplies a matrix of 1-3 rows with other kernels than a taller one, so a
    row's last bits change with the size of its pass; the convolutions do not. Padding only the
    Linear inputs (a few hundred numbers) is far cheaper than padding a whole pass, and lets the
    start-up check keep small pass sizes: a row's result is then its result in a product of at
    least `min_rows` rows, whatever the pass size. The check in app/batching.py still decides
    which sizes are used. Each Linear's forward becomes `_padded_linear_forward` bound to the
    module (stateless, so the passes of several threads may share it; deepcopy and pickle work).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" not in vars(module):
            module.min_rows = min_rows
            module.forward = types.MethodType(_padded_linear_forward, module)  # instance attribute, looked up first
            changed += 1
    return changed


def _padded_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])  # (rows, in_features): every leading dimension counts as rows
    rows = flat.shape[0]
    if rows == 0 or rows >= self.min_rows:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    flat = torch.cat([flat, flat[-1:].expand(self.min_rows - rows, -1)])  # (min_rows, in_features)
    return torch.nn.functional.linear(flat, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], -1)


def warm_up(operation: Operation, device: torch.device) -> None:
    """One forward pass of one row, so the first request does not pay for lazy initialisation."""
    inputs = operation.example(1, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        operation.fn(*(t.to(device) for t in inputs))
