"""CUDA graphs for the decoders and the priors' per-position step (GENSERVE_CUDA_GRAPHS=true).

A pass of a small model on a GPU is bound by kernel launches, not arithmetic: a Fashion-MNIST
decoder is a few dozen kernels of microseconds each, a prior's draw of one code a few dozen more
at each of its 49 or 64 positions. A CUDA graph records those launches once for fixed shapes and
replays them with one call (PyTorch's `torch.cuda.graph`). The service records them at start-up,
after each batcher's pass sizes are known, one graph per pass size:

- `CapturedPasses`: a whole one-pass function (a factorized VAE's reconstruct, decode_latents and
  sample_from; a VQ-VAE's reconstruct, decode_indices and decode_nearest, and its decoder after a
  prior's steps) on static input and output tensors: a pass copies its rows in, replays, and
  clones the outputs out. A pass of a size without a graph is padded to the next size with one (the pass
  rows repeat the last row, as Batcher._pass pads), or runs eagerly above the largest. A pass
  that finds its size's buffers taken by another (the batcher's express pass runs beside its
  main pass) runs the recorded function eagerly on the same padded rows rather than wait.
- `CapturedPriorSteps`: a prior's draw of one code (`AutoregressivePrior.position_step`: the
  network on the whole grid, the logits at one position, the draw written back), with the
  position held in a device tensor, so one graph per pass size serves every position: a sample
  is h * w replays, and the batcher's callback still runs between them (a pass nobody waits for
  stops; the compute scheduler offers its turn). The step computes what sampling mode "naive"
  computes; the service's eager default, "cached", computes the same logits up to float rounding.

What a replay computes is what the same function computes eagerly on the same device: the graph
holds the very kernels the eager call launched while it was recorded. benchmarks/gpu/graphs.py
checks that, and measures the speed-up, on a GPU. On the CPU there is nothing to record:
`record=False` runs the function on the same static buffers instead, which is how the tests
exercise the buffers, padding, sizes and fallbacks without a GPU.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from models.prior import check_sampling_inputs

log = logging.getLogger("genserve")

Inputs = tuple[torch.Tensor, ...]
WARMUP_CALLS = 3  # eager calls on a side stream before recording (PyTorch's advice: cuDNN picks its kernels)


def graph_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """The pass sizes to record, ascending and deduplicated; a size must be at least 1."""
    out = tuple(sorted(set(int(s) for s in sizes)))
    if not out or out[0] < 1:
        raise ValueError(f"pass sizes to record must be positive, got {list(sizes)}")
    return out


def size_for(rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest recorded size that holds `rows` (sorted `sizes`), or None above the largest."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with its last row repeated up to `rows` rows (a valid input: a temperature of 0 would not be)."""
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])  # (rows, ...)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and dtype is not None:
        # no cast cache: casts made while recording would be freed when autocast exits (PyTorch's advice
        # for graphed callables); the casts are recorded into the graph instead
        return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext()


class _Recording:
    """One recorded call: its static inputs and outputs, and the graph (None when not recording)."""

    def __init__(self, inputs: Inputs, outputs: Inputs, graph: Any, run: Callable[[], Inputs]) -> None:
        self.inputs, self.outputs, self.graph, self._run = inputs, outputs, graph, run
        self.lock = threading.Lock()  # one pass at a time on these buffers (the express thread shares them)

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:  # record=False: the same function, eagerly, on the same buffers
            for out, new in zip(self.outputs, self._run()):
                out.copy_(new)


def _record(fn: Callable[..., Any], inputs: Inputs, device: torch.device, record: bool, autocast: torch.dtype | None) -> _Recording:
    """fn(*inputs) recorded on `inputs` (static tensors on `device`): warmed up on a side stream, then
    captured into a CUDA graph whose outputs are returned as static tensors. Each graph has its own
    memory pool: graphs sharing one must replay in the order they were recorded, and passes of
    different sizes run in any order (and the express pass beside another)."""

    def run() -> Inputs:
        with torch.inference_mode(), _autocast(device, autocast):
            out = fn(*inputs)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    if not record:
        return _Recording(inputs, tuple(o.clone() for o in run()), None, run)
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other model threads keep running their eager passes while this one records
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = run()
    return _Recording(inputs, outputs, graph, run)


class CapturedPasses:
    """`fn` (tensors with one row per item -> tensors with one row per item) recorded once per pass size.

    `example(rows, generator)` makes valid CPU inputs of any number of rows (app/operations.py's);
    they fill the static buffers while recording. Calling the object runs a pass: rows copied into
    the smallest recorded size that holds them (padding repeats the last row), one replay, the
    outputs' first rows cloned out. Above the largest size, or when the recording of a size
    failed, `eager` (default fn) runs instead.
    """

    def __init__(
        self, fn: Callable[..., Any], example: Callable[[int, torch.Generator], Inputs], sizes: Sequence[int],
        device: torch.device, *, record: bool = True, autocast: torch.dtype | None = None,
        eager: Callable[..., Any] | None = None,
    ) -> None:
        self.fn, self.eager, self.device, self.recorded = fn, eager or fn, device, record
        self.reference = fn  # what a replay computes, eagerly (a prior's sample has its own)
        self.recordings: dict[int, _Recording] = {}
        self.failures: dict[int, str] = {}
        for size in graph_sizes(sizes):
            inputs = tuple(t.to(device) for t in example(size, torch.Generator().manual_seed(size)))
            try:
                self.recordings[size] = _record(fn, inputs, device, record, autocast)
            except Exception as err:  # noqa: BLE001 - a function that cannot be recorded runs eagerly
                self.failures[size] = f"{type(err).__name__}: {str(err)[:200]}"
        self.sizes = tuple(sorted(self.recordings))

    def __call__(self, *inputs: torch.Tensor) -> Inputs:
        rows = inputs[0].shape[0]
        size = size_for(rows, self.sizes)
        if size is None:
            return _tuple(self.eager(*inputs))
        recording = self.recordings[size]
        if not recording.lock.acquire(blocking=False):
            # another pass (the express one) holds these buffers: the recorded function, eagerly, on the
            # same padded rows computes what the replay would, so the answer does not depend on which ran
            padded = _tuple(self.fn(*(pad_rows(t, size) for t in inputs)))
            return tuple(o[:rows] for o in padded)
        try:
            for static, t in zip(recording.inputs, inputs):
                static.copy_(pad_rows(t, size))
            recording.replay()
            return tuple(o[:rows].clone() for o in recording.outputs)
        finally:
            recording.lock.release()


def _tuple(out: Any) -> Inputs:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


class CapturedPriorSteps:
    """A prior's per-position step (`model.position_step`) recorded once per pass size, with the
    static buffers of one sampling: uniforms (n, h, w), temperatures (n, 1), labels (n,), the codes
    drawn so far (n, h, w) and the position (1,). `sample(...)` fills them, replays the step at every
    position in raster order, and returns the codes (rows, h, w); `on_logits(r, c, logits)` sees a
    copy of each position's logits (rows, K) after its draw. A size without a recording (above the
    largest) returns None: the caller samples eagerly.
    """

    def __init__(
        self, model: torch.nn.Module, sizes: Sequence[int], device: torch.device, *, record: bool = True,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model, self.device, self.recorded = model, device, record
        self.h, self.w = model.config.code_shape
        self.recordings: dict[int, _Recording] = {}
        self.failures: dict[int, str] = {}
        for size in graph_sizes(sizes):
            buffers = self._buffers(size)
            try:
                self.recordings[size] = _record(self._step, buffers, device, record, autocast)
            except Exception as err:  # noqa: BLE001 - a prior that cannot be recorded samples eagerly
                self.failures[size] = f"{type(err).__name__}: {str(err)[:200]}"
        self.sizes = tuple(sorted(self.recordings))

    def _buffers(self, n: int) -> Inputs:
        """codes (n, h, w), labels (n,) (all 0 when unconditional: unused), temperatures (n, 1), uniforms (n, h, w), pos (1,)."""
        d = self.device
        return (torch.zeros(n, self.h, self.w, dtype=torch.long, device=d), torch.zeros(n, dtype=torch.long, device=d),
                torch.ones(n, 1, device=d), torch.full((n, self.h, self.w), 0.5, device=d),
                torch.zeros(1, dtype=torch.long, device=d))

    def _step(self, codes: torch.Tensor, labels: torch.Tensor, temp: torch.Tensor, uniforms: torch.Tensor,
              pos: torch.Tensor) -> torch.Tensor:
        conditional = self.model.config.num_classes > 0
        return self.model.position_step(codes, labels if conditional else None, temp, uniforms, pos)

    def sample(
        self, uniforms: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor | None = None,
        on_logits: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | None:
        """The codes (rows, h, w), or None where no recording can take this pass: no size holds its
        rows, or another pass (the express one) holds the buffers of its size, so this one does not
        wait through a whole sample (the caller then samples eagerly, in the same "stepped" mode).
        The inputs are checked as every sampler checks them (models/prior.py), before any is copied."""
        rows = uniforms.shape[0]
        labels, temp_column = check_sampling_inputs(self.model.config, rows, labels, temperature, uniforms, uniforms.device)
        size = size_for(rows, self.sizes)
        if size is None:
            return None
        recording = self.recordings[size]
        if not recording.lock.acquire(blocking=False):
            return None
        try:
            codes, static_labels, temp, static_uniforms, pos = recording.inputs
            (logits,) = recording.outputs
            codes.zero_()
            static_uniforms.copy_(pad_rows(uniforms.float(), size))
            temp.copy_(pad_rows(temp_column.float(), size))
            if labels is not None:
                static_labels.copy_(pad_rows(labels, size))
            for p in range(self.h * self.w):
                pos.fill_(p)
                recording.replay()
                if on_logits is not None:
                    on_logits(p // self.w, p % self.w, logits[:rows].clone())
            return codes[:rows].clone()
        finally:
            recording.lock.release()


def describe(fn: Any) -> str:
    """One log line about a recorded operation (CapturedPasses, or a prior's sample with .steps and
    .decoder): the sizes recorded and those that failed, with why."""
    parts = [("", fn)] if isinstance(fn, CapturedPasses) else [("steps ", fn.steps), ("decoder ", fn.decoder)]
    lines = []
    for label, captured in parts:
        failed = "; ".join(f"{size}: {why}" for size, why in captured.failures.items())
        lines.append(f"{label}{list(captured.sizes)}" + (f" (not recorded: {failed})" if failed else ""))
    what = "CUDA graphs" if (fn if isinstance(fn, CapturedPasses) else fn.steps).recorded else "static buffers (no graphs)"
    return f"{what} for pass sizes " + ", ".join(lines)


def recorded_sizes(fn: Any) -> list[int] | None:
    """The pass sizes a batcher's function replays from graphs (None: it runs eagerly)."""
    if isinstance(fn, CapturedPasses):
        return list(fn.sizes)
    steps = getattr(fn, "steps", None)
    return list(steps.sizes) if isinstance(steps, CapturedPriorSteps) else None
