"""The running service: settings, the registry, one batcher per operation, the pools, metrics.

`Service.start` is what the lifespan runs, in the background while the listener already answers
(app/main.py): resolve the device, load and validate the weights, then for every operation of
every model (app/operations.py) start its batcher. The service is ready then; every operation is
warmed up after that, in the background (a request for a model waits for its warm-up:
app/dependencies.py's find_model), before the pass size checks. With CUDA graphs the warm-ups, the
checks and the recordings all run before it is ready.

Same seed, same bytes (`pad_batches`): every pass is padded to a size whose rows are bit-identical
to a pass of max_batch_size. Which smaller sizes are so is a verdict of `Batcher.check_buckets`,
which takes about a second per operation on a CPU. So each batcher starts with the verdict of an
earlier start on an identical machine, code and weight file (app/checks.py's cache) or else with
the one size that needs no check, max_batch_size, and the checks run after the service is ready,
one at a time, sharing the CPU with requests through the scheduler; each verdict replaces its
batcher's sizes when it is found and is stored for the next start. A row is computed in a pass of
max_batch_size or in one proven equal to it, so its bytes do not depend on when it was served.
GET /config shows each batcher's sizes and where they came from (`pass_size_sources`).

`stop` refuses new work, drains the queues and ends the workers. What `ready`, `draining` and the
batchers' `alive` mean to clients (GET /ready, the model routes) is decided in app/readiness.py.

Threads: every batcher has an executor of its own (one thread, a second for express passes), so a slow model's
passes never hold up a cheap model's: on the CPU a shared `ComputeScheduler` (app/scheduling.py)
lets `compute_slots` passes compute at once and gives the next turn to the least-served model,
at every step of a multi-step pass; on the GPU the device interleaves them.
PNGs are encoded in a separate bounded pool (`io_threads`), beside the models, and uploads
decoded in one of their own (`decode_slots` threads, behind a semaphore of as many slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from app import imaging
from app.batching import Batcher, bucket_candidates, pin_torch_threads
from app.checks import VerdictCache, code_digest, machine_key
from app.graphs import describe, recorded_sizes
from app.metrics import Metrics
from app.operations import Op, Operation, OpKey, operations, warm_up
from app.registry import Entry, LoadProgress, Registry, iso_time, scan, signature
from app.scheduling import ComputeScheduler
from app.settings import Settings
from models.layers import set_min_rows

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
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (a container's
    CPU limit, e.g. Kubernetes' `resources.limits.cpu`, which the affinity does not show), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, else v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def lone_threads(settings: Settings, device: torch.device) -> int:
    """The torch threads of a lone pass (app/scheduling.py): those of every compute slot, at most the
    usable cores, on the CPU, where lone passes are on (`lone_passes`, with `pad_batches`, whose check
    proves them harmless) and that is more than a pass's own; else 0 (off)."""
    slots = compute_slots(settings, device)
    if device.type != "cpu" or not (settings.lone_passes and settings.pad_batches) or slots is None or slots < 2:
        return 0
    threads = min(slots * torch_threads(settings), usable_cores())  # never more threads than cores
    return threads if threads > torch_threads(settings) else 0


def torch_threads(settings: Settings) -> int:
    """Intra-op threads of each model thread: the setting, else half the usable cores
    (the other half serve HTTP and the upload and PNG pools; tiny autoregressive steps lose more to
    thread synchronisation than they gain: on 2 cores, PixelCNN n=1 took 50 ms with 2 threads, 36 with 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, usable_cores() // 2)


# The models the current request holds (Service.hold): set by app/middleware.py's RequestContext, filled
# by app/dependencies.py's find_model, each released when the request ends. None outside a request.
holding: ContextVar[list[Entry] | None] = ContextVar("holding", default=None)

CHECKS_GROUP = "pass size checks"  # the scheduler's group for the checks that run after start-up


class PassSizeSource:
    """Where a batcher's pass sizes came from (GET /config's pass_size_sources)."""

    CHECKED = "checked"  # this process's check found them
    CACHE = "cache"  # an earlier start's verdict on the same machine, code and file (app/checks.py)
    DEFAULT = "default"  # max_batch_size alone, which needs no check, until the check has run
    UNPADDED = "unpadded"  # pad_batches is off


@dataclass
class Service:
    settings: Settings
    device: torch.device
    registry: Registry
    io_pool: ThreadPoolExecutor
    metrics: Metrics
    decode_pool: ThreadPoolExecutor  # decodes uploads, decode_slots threads
    decode_slots: asyncio.Semaphore  # decodes at a time, across all requests
    upload_slots: asyncio.Semaphore  # requests reading a long upload at a time (app/multipart.py)
    batchers: dict[OpKey, Batcher] = field(default_factory=dict)
    operations: dict[OpKey, Operation] = field(default_factory=dict)  # what each batcher runs (its checks, cuda_graphs)
    scheduler: ComputeScheduler | None = None  # shares the CPU between the batchers
    pass_size_sources: dict[OpKey, str] = field(default_factory=dict)  # PassSizeSource, per batcher
    cache: VerdictCache = field(default_factory=lambda: VerdictCache(None))
    checks: asyncio.Task | None = None  # the pass size checks still to run after start-up
    check_executor: ThreadPoolExecutor | None = None  # they run here, one at a time
    # The one thread that computes with every core's torch threads: lone passes (app/scheduling.py). A
    # second thread of the process with more than one torch thread would be a second OpenMP team, and
    # two teams on 2 cores made a pass 1.5-3.5x slower than with one thread (benchmarks/RESULTS.md).
    lone_executor: ThreadPoolExecutor | None = None
    codec_pool: ThreadPoolExecutor | None = None  # POST /score's codecs (run_codec), started on first use
    started_s: float | None = None  # seconds from Service.start to ready
    generation: int = 0  # the version of the set of models; each reload that changes it adds one
    scanned: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the weights directory at the last scan
    watcher: asyncio.Task | None = None  # scans the weights directory every reload_interval_s
    _released: asyncio.Event = field(default_factory=asyncio.Event)  # a request let go of a model (release)
    _reload_error: str | None = None  # the last scan's failure, logged once until it changes
    _machine: dict[str, Any] | None = None  # machine_key, once
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: dict[asyncio.Task, Entry] = field(default_factory=dict)  # versions waiting for their last requests
    ready: bool = False  # True from the end of start() until stop()
    draining: bool = False  # begin_drain(): shutdown has begun; /ready is 503, requests are still served

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics, progress: LoadProgress | None = None) -> Service:
        """Load, validate and serve (module docstring); `progress` counts the weight files read (GET /ready)."""
        begin = time.perf_counter()
        device = settings.resolve_device()
        pin_torch_threads(torch_threads(settings))  # the loading thread; every model thread sets its own
        imaging.set_pixel_limit(settings.max_pixels)  # Pillow's own bomb check, process-wide (app/imaging.py)
        if settings.precision != "fp32" and device.type != "cuda":
            log.warning("precision=%s applies on CUDA only; %s runs in fp32", settings.precision, device)
        scanned = await asyncio.to_thread(scan, settings.weights_dir)  # before loading: a change during it is seen later
        registry = await asyncio.to_thread(Registry.load, settings.weights_dir, device, None, progress)
        # the pools' torch work (PNG grids, upload tensors) also runs on the model threads' count: no
        # thread but the lone pass's forms an OpenMP team of more (see lone_executor)
        threads = {"initializer": pin_torch_threads, "initargs": (torch_threads(settings),)}
        io_pool = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="genserve-io", **threads)
        decode_pool = ThreadPoolExecutor(max_workers=settings.decode_slots, thread_name_prefix="genserve-decode", **threads)
        service = cls(settings, device, registry, io_pool, metrics, decode_pool,
                      asyncio.Semaphore(settings.decode_slots), asyncio.Semaphore(settings.upload_slots))
        service.scanned = scanned
        service.check_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="genserve-checks", initializer=pin_torch_threads,
            initargs=(torch_threads(settings),),  # the threads of the passes it checks: a verdict depends on them
        )
        service.cache = VerdictCache(settings.check_cache_dir)
        if lone := lone_threads(settings, device):
            service.lone_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="genserve-lone", initializer=pin_torch_threads, initargs=(lone,)
            )
            service.lone_executor.submit(lambda: None).result()  # its thread starts with its count pinned,
            torch.set_num_threads(torch_threads(settings))  # and a thread first using torch later gets the usual count
        slots = compute_slots(settings, device)
        service.scheduler = ComputeScheduler(slots) if slots else None
        graphs = settings.cuda_graphs and device.type == "cuda"
        try:
            for entry in list(registry.entries.values()):
                service._install(entry, service._make_batchers(entry))
            if graphs:
                # a recording is made at the proven sizes and must not overlap another thread's
                # synchronising call: with CUDA graphs (GPU checks take well under a second) the warm-ups,
                # the checks and the recordings run before the service is ready
                await service._settle(list(registry.entries.values()))
                await service._record_graphs()
            elif settings.cuda_graphs:
                await service._record_graphs()  # says why nothing is recorded
        except BaseException:
            await service.stop()
            raise
        service.ready = True
        service.started_s = time.perf_counter() - begin
        log.info(
            "ready on %s in %.2f s: %s", device, service.started_s,
            ", ".join(f"{e.name} ({e.kind}, priors {sorted(e.priors)})" for e in registry.entries.values()),
        )
        if not graphs:
            service._after_checks(functools.partial(service._settle, list(registry.entries.values())))
        if settings.reload_interval_s > 0:
            service.watcher = asyncio.get_running_loop().create_task(service._watch(), name="genserve-watch")
        return service

    def _after_checks(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work()` in the background after the warm-ups and checks already under way (`checks`)."""
        previous = self.checks

        async def chained() -> None:
            if previous is not None:
                await asyncio.wait({previous})  # its outcome is its own; a cancellation of this task still ends it
            await work()

        self.checks = asyncio.get_running_loop().create_task(chained(), name="genserve-checks")

    async def _settle(self, entries: list[Entry]) -> None:
        """After start-up (with CUDA graphs, before the service is ready): warm every operation of
        `entries` up (a model that cannot run is dropped, as at loading), then run the pass size
        checks still to do. Logs a line per model warmed."""
        begin = time.perf_counter()
        done = 0

        async def warm(entry: Entry) -> None:
            nonlocal done
            await self._warm_or_drop(entry)
            done += 1
            served = self.registry.entries.get(entry.name) is entry
            outcome = f"{len(entry.batchers)} batcher(s) warm" if served else "failed: not served"
            log.info("warm-ups: %d/%d models done (%s: %s) in %.2f s", done, len(entries), entry.name, outcome,
                     time.perf_counter() - begin)

        await asyncio.gather(*(warm(entry) for entry in entries))
        await self.check_pass_sizes()

    def _make_batchers(self, entry: Entry) -> list[tuple[Operation, Batcher, str]]:
        """A batcher (not started) for each operation of a model, with its executor and pass sizes:
        the cached verdict of its check, else max_batch_size alone (PassSizeSource)."""
        s = self.settings
        if s.pad_batches:
            for model in [entry.model, *(p.model for p in entry.priors.values())]:
                set_min_rows(model, s.linear_min_rows)  # models/layers.py's Linear
        made = []
        for operation in operations(entry):
            name = str(operation.key)
            # Each model thread sets its own intra-op thread count (OpenMP's nthreads-var and MKL's are per
            # thread), so the count holds whatever other threads of the process set.
            executor = ThreadPoolExecutor(
                max_workers=1 + (1 if s.express_items else 0),  # a thread for the express pass
                thread_name_prefix=f"genserve-{name}",
                initializer=pin_torch_threads,
                initargs=(torch_threads(s),),
            )
            batcher = Batcher(
                name=name,
                fn=operation.fn,
                executor=executor,
                device=self.device,
                max_batch_size=s.max_batch_size,
                max_wait_s=s.max_wait_ms / 1000,
                max_queue=s.max_queue,
                queue_wait_s=s.queue_wait_s,
                express_items=min(s.express_items, s.max_batch_size),
                # a likelihood in half precision would move its bits/dim: /score computes in float32 whatever the precision
                autocast_dtype=None if operation.key.op in (Op.SCORE, Op.SCORE_MAP) else AUTOCAST_DTYPES[s.precision],
                on_batch=self.metrics.observe_batch,
                scheduler=self.scheduler,
            )
            # a stoppable pass (many steps) never goes alone: it could not give the cores back before it ends
            batcher.lone_executor = None if operation.stoppable else self.lone_executor
            batcher.lone_max_s = s.lone_pass_max_ms / 1000
            source = PassSizeSource.UNPADDED
            if s.pad_batches:
                key = self.check_key(operation, entry)
                cached = self.cache.get(key)
                lone = self.cache.get(self.lone_key(key)) if batcher.lone_executor else ()
                if cached and lone is not None:
                    batcher.buckets, batcher.lone_sizes, source = cached, lone, PassSizeSource.CACHE
                    log.debug("%s: pass sizes %s, alone with every core %s (the cached verdicts of an earlier check)",
                              name, list(cached), list(lone))
                else:
                    batcher.buckets, source = (s.max_batch_size,), PassSizeSource.DEFAULT
            made.append((operation, batcher, source))
        return made

    def _install(self, entry: Entry, made: list[tuple[Operation, Batcher, str]]) -> None:
        """Start a model's batchers and serve with them (entry.batchers, and the service's tables)."""
        for operation, batcher, source in made:
            batcher.start()
            entry.batchers[operation.key] = batcher
            self.batchers[operation.key] = batcher
            self.operations[operation.key] = operation
            self.pass_size_sources[operation.key] = source

    async def _warm(self, made: list[tuple[Operation, Batcher, str]]) -> Exception | None:
        """One pass of one row of each operation, each in its batcher's executor, so the first request
        does not pay for lazy initialisation; the first error, or None."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(b.executor, warm_up, op, self.device) for op, b, _ in made), return_exceptions=True
        )
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None and not isinstance(error, Exception):
            raise error  # cancellation, KeyboardInterrupt: not the file's fault
        return error

    async def _warm_or_drop(self, entry: Entry) -> None:
        """Warm a served model up; one that fails (a file whose config loads but cannot run) is dropped
        and listed in GET /models/problems, like a file that cannot be loaded. Until its warm-up has
        ended, a request for it waits (app/dependencies.py's find_model awaits `entry.warmed`)."""
        entry.warmed = asyncio.get_running_loop().create_future()
        try:
            error = await self._warm([(op, entry.batchers[op.key], "") for op in operations(entry)])
        finally:
            entry.warmed.set_result(None)
        if error is None or self.registry.entries.get(entry.name) is not entry:
            return
        log.error("%s: cannot be served, its first pass failed", entry.name, exc_info=error)
        del self.registry.entries[entry.name]
        self.registry.reject(Path(entry.info.path or entry.name), f"warming it up failed: {type(error).__name__}: {str(error)[:300]}")
        self.generation += 1
        self._forget(entry)
        self._retire_later(entry)

    def _retire_later(self, entry: Entry) -> None:
        """`_retire` a version no longer served, in the background (stop() ends it early)."""
        task = asyncio.get_running_loop().create_task(self._retire(entry), name=f"retire:{entry.name}")
        self._retiring[task] = entry
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    def _forget(self, entry: Entry) -> None:
        """Take a model's batchers out of the service's tables (where they are still its own)."""
        for key, batcher in entry.batchers.items():
            if self.batchers.get(key) is batcher:
                del self.batchers[key]
                self.operations.pop(key, None)
                self.pass_size_sources.pop(key, None)

    async def _retire(self, entry: Entry) -> None:
        """Once no request holds `entry` (`hold`), or request_timeout_s after it was swapped out (a
        request still holding it then has had its 504, or is stuck writing an answer already
        computed), stop its batchers and their threads."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        while entry.holders > 0:
            self._released.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("%s: %d request(s) still hold the version swapped out %g s ago; stopping it anyway",
                            entry.name, entry.holders, self.settings.request_timeout_s)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), left)
        await asyncio.gather(*(b.stop(self.settings.request_timeout_s) for b in entry.batchers.values()))
        for batcher in entry.batchers.values():
            batcher.executor.shutdown(wait=False)  # type: ignore[attr-defined]

    # -- requests and versions -------------------------------------------------------------------

    def hold(self, entry: Entry) -> None:
        """A request found `entry` (app/dependencies.py's find_model): a version swapped out by a
        reload keeps its batchers until every request that holds it has let go (`release`)."""
        entry.holders += 1

    def release(self, entry: Entry) -> None:
        """The request that held `entry` has ended (app/middleware.py's RequestContext)."""
        entry.holders -= 1
        self._released.set()

    # -- new weights while serving ---------------------------------------------------------------

    async def _watch(self) -> None:
        """Scan the weights directory every reload_interval_s; reload when any file changed."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            await self.reload_logged()

    async def reload_logged(self, force: bool = False) -> None:
        """`reload`, with a failure (a weights directory gone or unreadable) logged once until it
        changes or clears, not at every scan; the models served so far keep serving."""
        try:
            await self.reload(force)
        except Exception as err:  # a bug here must not end the scanning either
            reason = f"{type(err).__name__}: {err}"
            if reason != self._reload_error:
                log.error("reloading %s failed (%s); the models served so far keep serving", self.settings.weights_dir,
                          reason, exc_info=not isinstance(err, OSError))
            self._reload_error = reason
        else:
            if self._reload_error is not None:
                log.info("reloading %s works again", self.settings.weights_dir)
            self._reload_error = None

    async def reload(self, force: bool = False) -> bool:
        """Pick up what changed in the weights directory (SIGHUP, or every reload_interval_s).

        Nothing happens when no *.safetensors file was added, removed or rewritten since the last
        scan (by name, size, modification time and inode), unless `force`. Otherwise the directory
        is loaded again, reusing every model whose file's bytes are unchanged (app/registry.py);
        each model that is new or changed (its file, or one of its priors' files) gets new batchers,
        which warm up (a new version that cannot run is refused, and the version served before, if
        any, keeps serving) before they are swapped in; the models' table changes at once, under a
        new version number. Requests that began before keep the versions they found, whose batchers
        stop once those requests have ended. The new batchers' pass sizes are checked afterwards, as
        at start-up. Returns whether anything changed."""
        async with self._reload_lock:
            if not self.ready:
                return False
            scanned = await asyncio.to_thread(scan, self.settings.weights_dir)
            if scanned == self.scanned and not force:
                return False
            old = self.registry
            new = await asyncio.to_thread(Registry.load, self.settings.weights_dir, self.device, old)
            self.scanned = scanned  # after the load: a directory that could not be read is scanned again
            if not self.ready:  # stopped meanwhile
                return False
            starting: dict[str, tuple[Entry, list[tuple[Operation, Batcher, str]]]] = {}
            for name, entry in list(new.entries.items()):
                previous = old.entries.get(name)
                if previous is not None and signature(previous) == signature(entry):
                    previous.rejected = entry.rejected  # the refusals are the new scan's
                    new.entries[name] = previous  # the same files: keep serving with the same batchers
                    continue
                starting[name] = (entry, self._make_batchers(entry))
            errors = await asyncio.gather(*(self._warm(made) for _, made in starting.values()))
            if not self.ready:
                for _, made in starting.values():
                    await self._discard(made)
                return False
            for (name, (entry, made)), error in zip(list(starting.items()), errors):
                if error is None:
                    continue
                await self._discard(made)
                del starting[name]
                reason = f"warming it up failed: {type(error).__name__}: {str(error)[:300]}"
                previous = old.entries.get(name)
                if previous is not None:
                    new.entries[name] = previous
                    reason += f"; the version loaded at {iso_time(previous.loaded_at)} is still served"
                else:
                    del new.entries[name]
                new.reject(Path(entry.info.path or name), reason)
            new.drop_stale_problems()  # a fallback to an old version serves files the new scan refused
            retired = [e for name, e in old.entries.items() if new.entries.get(name) is not e]
            # the swap: from here on every lookup finds the new version
            self.registry = new
            self.generation += 1
            for entry in retired:
                self._forget(entry)
            for entry, made in starting.values():
                self._install(entry, made)
            added = sorted(n for n in starting if n not in old.entries)
            replaced = sorted(n for n in starting if n in old.entries)
            removed = sorted(n for n in old.entries if n not in new.entries)
            log.info("reloaded %s: added %s, replaced %s, removed %s; %d problem(s)", self.settings.weights_dir,
                     added or "nothing", replaced or "nothing", removed or "nothing", len(new.problems))
            for entry in retired:
                self._retire_later(entry)
            if starting:
                self._after_checks(self.check_pass_sizes)
            return bool(starting or retired)

    async def _discard(self, made: list[tuple[Operation, Batcher, str]]) -> None:
        for _, batcher, _ in made:
            batcher.executor.shutdown(wait=False)  # type: ignore[attr-defined]

    def check_key(self, operation: Operation, entry: Entry) -> dict[str, Any]:
        """Everything the verdict of `operation` (of `entry`)'s pass size check depends on (app/checks.py)."""
        s = self.settings
        key = operation.key
        files = [entry.digest] + ([entry.priors[key.prior].digest] if key.prior is not None else [])
        return {
            "operation": str(key),
            "files": files,
            "code": code_digest(),
            "machine": self._machine_key(),
            "torch_threads": torch_threads(s),
            "max_batch_size": s.max_batch_size,
            "candidates": bucket_candidates(s.max_batch_size),
            "linear_min_rows": s.linear_min_rows,
            "precision": s.precision,
            "seed": 0,
        }

    def lone_key(self, check_key: dict[str, Any]) -> dict[str, Any]:
        """What the verdict of a batcher's thread check (`Batcher.check_threads`) depends on: its pass
        size check's key, and the thread count and minimum rows of a lone pass."""
        s = self.settings
        return {**check_key, "check": "threads", "lone_threads": lone_threads(s, self.device),
                "lone_pass_min_rows": s.lone_pass_min_rows}

    def _machine_key(self) -> dict[str, Any]:
        """app/checks.py's machine_key, taken once per service (the machine does not change under it)."""
        if self._machine is None:
            self._machine = machine_key(self.device)
        return self._machine

    async def check_pass_sizes(self) -> None:
        """Run the pass size check of every batcher still on the default size, one at a time, in the
        check thread, as a group of the compute scheduler (so requests keep their share of the CPU).
        Each verdict replaces its batcher's sizes at once and goes into the cache. A check that
        fails leaves its batcher on max_batch_size (still batch-invariant) and says so in the log.
        Each batcher's sizes are logged at DEBUG; at INFO a line when a model's checks are done (with
        the count so far) and one when all are."""
        loop = asyncio.get_running_loop()
        pending = [k for k, src in self.pass_size_sources.items() if src == PassSizeSource.DEFAULT]
        begin = time.perf_counter()
        failed = 0
        for i, key in enumerate(pending, 1):
            if not await self._check_one(key, loop):
                failed += 1
            if i == len(pending) or pending[i].model != key.model:  # the table lists a model's batchers together
                log.info("pass size checks: %d/%d done (%s finished) in %.2f s", i, len(pending), key.model,
                         time.perf_counter() - begin)
        if pending:
            log.info("pass size checks done: %d batcher(s) in %.2f s%s", len(pending), time.perf_counter() - begin,
                     f"; {failed} failed (each keeps {self.settings.max_batch_size} rows a pass)" if failed else "")

    async def _check_one(self, key: OpKey, loop: asyncio.AbstractEventLoop) -> bool:
        """One batcher's pass size check (check_pass_sizes); False when it failed."""
        batcher, operation = self.batchers.get(key), self.operations.get(key)
        entry = self.registry.entries.get(key.model)
        if batcher is None or operation is None or entry is None or self.pass_size_sources.get(key) != PassSizeSource.DEFAULT:
            return True  # gone (its model was removed or replaced) or settled meanwhile
        check_key = self.check_key(operation, entry)
        check = functools.partial(batcher.check_buckets, operation.example, operation.probe, group=CHECKS_GROUP)
        try:
            sizes = await loop.run_in_executor(self.check_executor, check)
            lone: tuple[int, ...] = ()
            if batcher.lone_executor:  # which of them a lone pass may run with every core
                wide = [b for b in sizes if b >= self.settings.lone_pass_min_rows]
                check = functools.partial(batcher.check_threads, operation.example, wide, operation.probe, group=CHECKS_GROUP)
                lone = await loop.run_in_executor(self.check_executor, check)
        except Exception:
            log.exception("%s: the pass size check failed; every pass keeps %d rows", key, self.settings.max_batch_size)
            return False
        if self.batchers.get(key) is batcher:
            batcher.buckets, batcher.lone_sizes = sizes, lone
            self.pass_size_sources[key] = PassSizeSource.CHECKED
            self.cache.put(check_key, sizes)
            if batcher.lone_executor:
                self.cache.put(self.lone_key(check_key), lone)
            log.debug("%s: pass sizes %s (batch-invariant against %d rows), alone with every core %s", key, list(sizes),
                      self.settings.max_batch_size, list(lone))
        return True

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
                    log.debug("%s: pass sizes %s with CUDA graphs (batch-invariant against %d rows)", key, list(checked),
                             s.max_batch_size)
                batcher.buckets = checked

    def graph_sizes(self) -> dict[str, list[int] | None]:
        """Batcher name -> the pass sizes it replays from CUDA graphs (None: eager); shown by GET /config."""
        return {str(key): recorded_sizes(b.fn) for key, b in self.batchers.items()}

    def begin_drain(self) -> None:
        """Shutdown has begun: GET /ready answers 503 from now on, while requests are still served."""
        if not self.draining:
            log.info("draining: /ready answers 503 from now on; requests are still served")
        self.draining = True

    async def stop(self) -> None:
        self.ready = False
        retired = list(self._retiring.values())
        for task in [self.watcher, self.checks, *self._retiring]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        every = {id(b): b for e in [*self.registry.entries.values(), *retired] for b in e.batchers.values()}
        every.update({id(b): b for b in self.batchers.values()})
        await asyncio.gather(*(b.stop(self.settings.request_timeout_s) for b in every.values()))
        pools = [self.io_pool, self.decode_pool,
                 *(p for p in (self.check_executor, self.lone_executor, self.codec_pool) if p is not None)]
        for executor in [*(b.executor for b in every.values()), *pools]:
            executor.shutdown(wait=False, cancel_futures=True)  # type: ignore[attr-defined]

    def batcher(self, entry: Entry, op: Op, prior: str | None = None) -> Batcher:
        """The batcher of `entry`'s operation: of the version of the model the request found, even
        when a newer version has been swapped in since."""
        return entry.batchers[OpKey(entry.name, op, prior)]

    def pass_sizes(self) -> dict[str, list[int] | None]:
        """Batcher name -> the pass sizes it pads to (None: unpadded); shown by GET /config."""
        return {str(key): list(b.buckets) if b.buckets is not None else None for key, b in self.batchers.items()}

    def lone_pass_threads(self) -> int:
        """The torch threads of a lone pass; 0: lone passes are off (GET /config)."""
        return lone_threads(self.settings, self.device)

    def lone_pass_sizes(self) -> dict[str, list[int] | None]:
        """Batcher name -> the pass sizes that may run with every core when alone; None where none may
        (lone passes off, or an operation with steps) (GET /config)."""
        return {str(key): list(b.lone_sizes) if b.lone_executor else None for key, b in self.batchers.items()}

    def pass_size_source(self) -> dict[str, str]:
        """Batcher name -> where its pass sizes came from (PassSizeSource); shown by GET /config."""
        return {str(key): self.pass_size_sources.get(key, PassSizeSource.UNPADDED) for key in self.batchers}

    async def run_codec(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the codec thread (POST /score's lossless codecs: WebP takes 6-45 ms an image),
        one at a time, so that scoring never holds up the PNG pool the other answers are written in."""
        if self.codec_pool is None:
            self.codec_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genserve-codec",
                                                 initializer=pin_torch_threads, initargs=(torch_threads(self.settings),))
        return await asyncio.get_running_loop().run_in_executor(self.codec_pool, fn, *args)

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the PNG pool, off the event loop and off the model threads."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def run_decode(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) in the upload decoding pool (callers hold `decode_slots`)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, functools.partial(fn, *args, **kwargs))
