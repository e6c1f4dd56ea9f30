"""The running service: settings, the registry, one batcher per operation, the pools, metrics.

`Service.start` is what the lifespan runs: resolve the device, load and validate the weights,
then for every operation of every model (app/operations.py) warm it up, find its batch-invariant
pass sizes (with `pad_batches`) and start its batcher. `stop` refuses new work, drains the
queues and ends the workers.

Threads: every batcher has an executor of its own (`max_inflight` threads), so a slow model's
passes never hold up a cheap model's: on the CPU a shared `ComputeScheduler` (app/scheduling.py)
lets `compute_slots` passes compute at once and gives the next turn to the least-served model,
at every step of a multi-step pass; on the GPU the device interleaves them.
PNGs are encoded in a separate bounded pool (`io_threads`), beside the models, and uploads
decoded in one of their own (`decode_slots` threads, behind a semaphore of as many slots).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from app import imaging
from app.batching import Batcher, bucket_candidates
from app.graphs import describe, recorded_sizes
from app.metrics import Metrics
from app.operations import Op, Operation, OpKey, operations, pad_linear_rows, warm_up
from app.registry import Entry, Registry
from app.scheduling import ComputeScheduler
from app.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_slots(settings: Settings, device: torch.device) -> int | None:
    """Passes computing at once (app/scheduling.py): the setting (0: no scheduling), else on the CPU
    the cores over each pass's torch threads, at least 1; on CUDA no scheduling."""
    if settings.compute_slots is not None:
        return settings.compute_slots or None
    if device.type != "cpu":
        return None
    return max(1, usable_cores() // torch_threads(settings))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(settings: Settings) -> int:
    """Intra-op threads of each model thread: the setting, else half the usable cores of each worker
    (the other half serve HTTP and the upload and PNG pools; tiny autoregressive steps lose more to
    thread synchronisation than they gain: on 2 cores, PixelCNN n=1 took 50 ms with 2 threads, 36 with 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, usable_cores() // (2 * settings.workers))


@dataclass
class Service:
    settings: Settings
    device: torch.device
    registry: Registry
    io_pool: ThreadPoolExecutor
    metrics: Metrics
    decode_pool: ThreadPoolExecutor | None = None  # decodes uploads, decode_slots threads
    decode_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    upload_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))  # requests reading uploads
    batchers: dict[OpKey, Batcher] = field(default_factory=dict)
    operations: dict[OpKey, Operation] = field(default_factory=dict)  # what each batcher runs (for cuda_graphs)
    scheduler: ComputeScheduler | None = None  # shares the CPU between the batchers
    executors: list[ThreadPoolExecutor] = field(default_factory=list)
    ready: bool = False  # True from the end of start() until stop()
    draining: bool = False  # begin_drain(): shutdown has begun; /ready is 503, requests are still served

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Service:
        device = settings.resolve_device()
        torch.set_num_threads(torch_threads(settings))  # the loading thread; every model thread sets its own
        imaging.set_pixel_limit(settings.max_pixels)  # Pillow's own bomb check, process-wide (app/imaging.py)
        if settings.precision != "fp32" and device.type != "cuda":
            log.warning("precision=%s applies on CUDA only; %s runs in fp32", settings.precision, device)
        registry = await asyncio.to_thread(Registry.load, settings.weights_dir, device)
        io_pool = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="genserve-io")
        service = cls(settings, device, registry, io_pool, metrics)
        service.decode_pool = ThreadPoolExecutor(max_workers=settings.decode_slots, thread_name_prefix="genserve-decode")
        service.decode_slots = asyncio.Semaphore(settings.decode_slots)
        service.upload_slots = asyncio.Semaphore(settings.upload_slots)
        slots = compute_slots(settings, device)
        service.scheduler = ComputeScheduler(slots) if slots else None
        try:
            if settings.pad_batches and settings.linear_min_rows > 1:
                for entry in registry.entries.values():
                    for model in [entry.model, *(p.model for p in entry.priors.values())]:
                        pad_linear_rows(model, settings.linear_min_rows)
            await asyncio.gather(*(service._start_model(entry) for entry in list(registry.entries.values())))
            await service._record_graphs()
        except BaseException:
            await service.stop()
            raise
        service.ready = True
        log.info(
            "ready on %s: %s", device, ", ".join(f"{e.name} ({e.kind}, priors {sorted(e.priors)})" for e in registry.entries.values())
        )
        return service

    async def _start_model(self, entry: Entry) -> None:
        """Warm up, check and start every batcher of one model. A model that fails any of it (a
        file whose config loads but cannot run) is dropped and listed in GET /models/problems,
        like a file that cannot be loaded: one bad file never stops the service."""
        try:
            results = await asyncio.gather(*(self._start_batcher(op) for op in operations(entry)), return_exceptions=True)
            error = next((r for r in results if isinstance(r, BaseException)), None)
        except Exception as err:  # operations() itself
            error = err
        if error is None:
            return
        if not isinstance(error, Exception):
            raise error  # cancellation, KeyboardInterrupt: not the file's fault
        log.error("%s: cannot be served, its start-up pass failed", entry.name, exc_info=error)
        for key in [k for k in self.batchers if k.model == entry.name]:
            await self.batchers.pop(key).stop(0)
            self.operations.pop(key, None)
        self.registry.entries.pop(entry.name, None)
        self.registry.reject(Path(entry.info.path or entry.name), f"warming it up failed: {type(error).__name__}: {str(error)[:300]}")

    async def _start_batcher(self, operation: Operation) -> None:
        """Warm the operation up and check its pass sizes in its own thread, then start its batcher."""
        s = self.settings
        name = str(operation.key)
        # Each model thread sets its own intra-op thread count (OpenMP's nthreads-var and MKL's are per
        # thread), so the count holds whatever other threads of the process set.
        executor = ThreadPoolExecutor(
            max_workers=s.max_inflight + (1 if s.express_items else 0),  # a thread for the express pass
            thread_name_prefix=f"genserve-{name}",
            initializer=torch.set_num_threads,
            initargs=(torch_threads(s),),
        )
        self.executors.append(executor)
        batcher = Batcher(
            name=name,
            fn=operation.fn,
            executor=executor,
            device=self.device,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            queue_wait_s=s.queue_wait_s,
            max_inflight=s.max_inflight,
            express_items=min(s.express_items, s.max_batch_size),
            autocast_dtype=AUTOCAST_DTYPES[s.precision],
            on_batch=self.metrics.observe_batch,
            scheduler=self.scheduler,
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, warm_up, operation, self.device)
        if s.pad_batches:
            batcher.buckets = await loop.run_in_executor(executor, batcher.check_buckets, operation.example, operation.probe)
            log.info("%s: pass sizes %s (batch-invariant against %d rows)", name, list(batcher.buckets), s.max_batch_size)
        batcher.start()
        self.batchers[operation.key] = batcher
        self.operations[operation.key] = operation

    async def _record_graphs(self, record: bool = True) -> None:
        """With cuda_graphs on a CUDA device: record each operation that offers it (app/operations.py's
        `capture`) at its batcher's pass sizes. One at a time, after every warm-up and check, before
        the service is ready: a recording must not overlap another thread's synchronising call.
        `record=False` (tests, on the CPU) sets up the same static buffers without recording graphs."""
        s = self.settings
        if not s.cuda_graphs:
            return
        if record and self.device.type != "cuda":
            log.info("cuda_graphs is set, but the device is %s: nothing to record, every pass runs eagerly", self.device)
            return
        loop = asyncio.get_running_loop()
        for key, batcher in self.batchers.items():
            operation = self.operations.get(key)
            if operation is None or operation.capture is None:
                continue
            sizes = batcher.buckets or bucket_candidates(s.max_batch_size)
            start = time.perf_counter()
            fn = await loop.run_in_executor(
                batcher.executor, operation.capture, sizes, self.device, AUTOCAST_DTYPES[s.precision], record
            )
            batcher.fn = fn
            log.info("%s: %s in %.2f s", key, describe(fn), time.perf_counter() - start)
            if s.pad_batches and getattr(fn, "probe", None) is not None:
                # the pass sizes were checked on the eager function. A one-pass recording replays the
                # kernels of that function, but a prior's recorded step is another computation (sampling
                # mode "stepped"), so its check runs again on what now runs, over the recorded sizes
                checked = await loop.run_in_executor(batcher.executor, batcher.check_buckets, operation.example, fn.probe)
                checked = tuple(b for b in checked if b in batcher.buckets)
                if checked != batcher.buckets:
                    log.info("%s: pass sizes %s with CUDA graphs (batch-invariant against %d rows)", key, list(checked),
                             s.max_batch_size)
                batcher.buckets = checked

    def graph_sizes(self) -> dict[str, list[int] | None]:
        """Batcher name -> the pass sizes it replays from CUDA graphs (None: eager); shown by GET /config."""
        return {str(key): recorded_sizes(b.fn) for key, b in self.batchers.items()}

    @property
    def state(self) -> str:
        """"ready", "draining", "recovering" (a batcher's worker is being restarted) or "shutting down"."""
        if not self.ready:
            return "shutting down"
        if self.draining:
            return "draining"
        if any(not b.alive for b in self.batchers.values()):
            return "recovering"
        return "ready"

    def begin_drain(self) -> None:
        """Shutdown has begun: GET /ready answers 503 from now on, while requests are still served."""
        if not self.draining:
            log.info("draining: /ready answers 503 from now on; requests are still served")
        self.draining = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.stop(self.settings.request_timeout_s) for b in self.batchers.values()))
        for executor in [*self.executors, self.io_pool, *([self.decode_pool] if self.decode_pool else [])]:
            executor.shutdown(wait=False, cancel_futures=True)

    def batcher(self, model: str, op: Op, prior: str | None = None) -> Batcher:
        return self.batchers[OpKey(model, op, prior)]

    def pass_sizes(self) -> dict[str, list[int] | None]:
        """Batcher name -> the pass sizes it pads to (None: unpadded); shown by GET /config."""
        return {str(key): list(b.buckets) if b.buckets is not None else None for key, b in self.batchers.items()}

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the PNG pool, off the event loop and off the model threads."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def run_decode(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) in the upload decoding pool (callers hold `decode_slots`)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, functools.partial(fn, *args, **kwargs))
