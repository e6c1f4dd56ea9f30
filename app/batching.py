"""Dynamic batching: one `Batcher` per (model, operation).

A route hands `submit` a tuple of tensors whose first dimension counts its items (images,
latents, noise draws). The request waits in a bounded queue; a worker task collects
requests until the batch holds `max_batch_size` items or `max_wait_s` has passed since the
oldest request arrived (LitServe's `while time.monotonic() < end and len(items) < max_batch_size`),
concatenates them, runs ONE forward pass in the device's single worker thread under
`torch.inference_mode()`, checks that every output has one row per input row, and hands each
request its own slice. A request bigger than `max_batch_size` travels as several chunks.

Results never depend on batch-mates: stochastic operations receive their noise as inputs,
drawn by the route from the request's own generator, and with `pad` every forward pass is
padded to exactly `max_batch_size` rows, so the kernels see the same shapes under any load
(BLAS and cuDNN choose kernels, and so rounding, by shape).

A failed forward pass fails each request of its batch with `BatchFailedError` (HTTP 500)
and the worker carries on. Errors carry their HTTP status so app/main.py can map them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

BatchFn = Callable[..., Sequence[torch.Tensor]]


class ServiceError(Exception):
    """An error with an HTTP status: app/main.py turns it into `{"detail": ...}`."""

    status_code = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class QueueFullError(ServiceError):
    status_code = 503


class NotRunningError(ServiceError):
    status_code = 503


class RequestTimeoutError(ServiceError):
    status_code = 504


class BatchFailedError(ServiceError):
    status_code = 500


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """Bound a request's whole handling; raises RequestTimeoutError (504) when it runs out."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RequestTimeoutError(f"request timed out after {seconds:g} s") from None


@dataclass
class BatcherStats:
    requests: int = 0  # chunks served (a request bigger than max_batch_size counts once per chunk)
    items: int = 0  # real rows computed, padding excluded
    batches: int = 0  # forward passes run
    failed_batches: int = 0
    rejected: int = 0  # requests refused with 503 because the queue was full
    max_batch_items: int = 0
    busy_s: float = 0.0  # time spent in forward passes

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.busy_s / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "items": self.items,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "rejected": self.rejected,
            "max_batch_items": self.max_batch_items,
            "mean_batch_size": self.mean_batch_size,
        }


@dataclass(eq=False)
class _Entry:
    inputs: tuple[torch.Tensor, ...]
    n: int
    future: asyncio.Future
    enqueued_at: float  # loop.time()


@dataclass
class Batcher:
    """Collects requests for one batch function and runs them together.

    fn(*inputs) runs in `executor` with every input on `device` and the same number of rows,
    and returns one tensor or a sequence of tensors, each with that many rows.
    """

    name: str
    fn: BatchFn
    executor: Executor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_batch_size: int = 64
    max_wait_s: float = 0.005
    max_queue: int = 1024
    pad: bool = True
    autocast_dtype: torch.dtype | None = None  # CUDA only
    on_batch: Callable[[str, int, float, bool], None] | None = None  # (name, items, seconds, ok) for metrics
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        self._queue: deque[_Entry] = deque()
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, finish the queued ones (up to drain_timeout_s), then end the worker."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        while self._queue:  # only when draining ran out of time
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(NotRunningError("the service is shutting down"))
        self._queued_items = 0

    @property
    def queued_items(self) -> int:
        return self._queued_items

    # -- requests ------------------------------------------------------------------------------

    async def submit(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run fn on these rows (batched with others) and return this request's output rows."""
        if not inputs:
            raise ValueError("submit needs at least one input tensor")
        n = int(inputs[0].shape[0])
        if n < 1 or any(int(t.shape[0]) != n for t in inputs):
            raise ValueError(f"every input needs the same positive number of rows, got {[tuple(t.shape) for t in inputs]}")
        if self._stopping or self._task is None:
            raise NotRunningError("the service is shutting down" if self._stopping else "the service is not running")
        # A request that would overflow the queue is refused, unless the queue is empty:
        # then even a request bigger than max_queue is taken, so every request can make progress.
        if self._queued_items and self._queued_items + n > self.max_queue:
            self.stats.rejected += 1
            retry = max(1, math.ceil(self._queued_items / self.max_batch_size * max(self.stats.mean_latency_s, 0.1)))
            raise QueueFullError(
                f"{self.name}: queue full ({self._queued_items} items waiting, limit {self.max_queue}); retry later",
                headers={"Retry-After": str(retry)},
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = []
        for start in range(0, n, self.max_batch_size):
            chunk = tuple(t[start : start + self.max_batch_size] for t in inputs)
            entries.append(_Entry(chunk, int(chunk[0].shape[0]), loop.create_future(), now))
        self._queue.extend(entries)
        self._queued_items += n
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            # Timed out, cancelled or failed: withdraw what has not started, cancel the rest.
            for e in entries:
                if not e.future.done():
                    e.future.cancel()
                with contextlib.suppress(ValueError):
                    self._queue.remove(e)
                    self._queued_items -= e.n
            raise
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(outs) for outs in zip(*parts))

    # -- worker --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[_Entry]:
        """Take requests until max_batch_size items or max_wait_s after the oldest one arrived."""
        loop = asyncio.get_running_loop()
        end = self._queue[0].enqueued_at + self.max_wait_s
        batch: list[_Entry] = []
        items = 0
        while True:
            while self._queue and items + self._queue[0].n <= self.max_batch_size:
                entry = self._queue.popleft()
                self._queued_items -= entry.n
                if entry.future.done():  # cancelled while waiting
                    continue
                batch.append(entry)
                items += entry.n
            full = items >= self.max_batch_size or bool(self._queue)  # the next one does not fit
            remaining = end - loop.time()
            if full or remaining <= 0 or self._stopping:
                return batch
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _run(self, batch: list[_Entry]) -> None:
        n = sum(e.n for e in batch)
        inputs = [torch.cat([e.inputs[i] for e in batch]) for i in range(len(batch[0].inputs))]
        start = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self._forward, inputs, n)
        except Exception as err:
            seconds = time.perf_counter() - start
            self.stats.failed_batches += 1
            log.exception("%s: forward pass over %d items failed", self.name, n)
            if self.on_batch:
                self.on_batch(self.name, n, seconds, False)
            failure = BatchFailedError(f"inference failed in {self.name}: {type(err).__name__}: {err}")
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(failure)
            return
        seconds = time.perf_counter() - start
        self.stats.batches += 1
        self.stats.items += n
        self.stats.requests += len(batch)
        self.stats.max_batch_items = max(self.stats.max_batch_items, n)
        self.stats.busy_s += seconds
        if self.on_batch:
            self.on_batch(self.name, n, seconds, True)
        offset = 0
        for e in batch:
            if not e.future.done():
                e.future.set_result(tuple(o[offset : offset + e.n] for o in outputs))
            offset += e.n

    def _forward(self, inputs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
        """Runs in the device's worker thread: pad, transfer, one forward pass, check, back to CPU."""
        rows = max(n, self.max_batch_size) if self.pad else n
        cuda = self.device.type == "cuda"
        moved = []
        for t in inputs:
            if rows > n:  # repeat the last row: padding stays a valid input (a temperature of 0 would not)
                t = torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])])  # (rows, ...)
            if cuda:
                t = t.pin_memory().to(self.device, non_blocking=True)
            else:
                t = t.to(self.device)
            moved.append(t)
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
            if cuda and self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            outputs = self.fn(*moved)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        result = []
        for i, out in enumerate(outputs):
            if out.dim() == 0 or out.shape[0] != rows:
                raise RuntimeError(f"Batch size mismatch: output {i} has shape {tuple(out.shape)}, expected {rows} rows")
            out = out[:n]
            if out.is_floating_point():
                out = out.float()
            result.append(out.cpu())
        return tuple(result)
