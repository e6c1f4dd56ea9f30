"""Dynamic batching: one `Batcher` per (model, operation), each with a worker thread of its own.

A route hands `submit` a tuple of tensors whose first dimension counts its items (images,
latents, noise draws). The worker task runs **opportunistically**: a request that finds the
batcher idle starts at once, and the requests that arrive while a pass runs form the next
pass, up to `max_batch_size` items.

**Fair between requests.** The queue is not first come, first served, which let four clients
drawing 256 images each hold a one-image request for 2.5 s. It is fair queuing by items (start-time
fair queuing, each request a flow): a request bigger than `max_batch_size` is cut into chunks of
that size, and every chunk gets a virtual finish time, the batcher's virtual time when the request
arrived plus the items of the request up to and including that chunk. The virtual time grows as a
fluid fair share would: each item served adds 1 / (the requests then waiting or served). A pass
takes the chunks with the lowest finish times, while they fit. So a small request overtakes the
queued chunks of large ones and runs in the next pass, on its own if no other small one fits with
it; large requests are served a chunk at a time, in turns; and no stream of small requests can
starve a large one, since later arrivals get later tags.
Between batchers the CPU is shared by app/scheduling.py. Waiting for company (`max_wait_s`, counted from the oldest
request, LitServe's `while time.monotonic() < end and len(items) < max_batch_size`) is opt-in
and off by default: on an idle model a wait only adds latency, and under load the passes
fill up on their own while the previous one runs.

Each pass runs in the batcher's own executor (one thread, and one for the express pass), so a cheap
model is never queued behind a slow one: the operating system (or the GPU) interleaves them.
Stacking the inputs, padding, the transfer, the forward pass under `torch.inference_mode()`,
the check that every output has one row per input row, and the slicing into per-request
answers all happen in that thread; the event loop only resolves futures. A request bigger than
`max_batch_size` travels as several chunks.

**Same seed, same bytes.** Stochastic operations receive their noise as inputs, drawn by the
route from the request's own generator, so only the kernels could make a row depend on its
batch-mates: BLAS and cuDNN choose kernels, and so rounding, by shape. With `buckets` every
pass is padded (by repeating its last row, which keeps padding a valid input) to the smallest
bucket that holds it. `check_buckets` finds the buckets at start-up: it runs the operation on
seeded rows at every candidate size (the powers of two below `max_batch_size`) and keeps the
sizes whose rows are bit-identical to the same rows in a pass of `max_batch_size`, both at the
head and at the tail of that pass. With no passing size below it, every pass has the full size.

**Isolation.** A forward pass that raises is split in two and each half is run again, down to
single requests, so only the request that makes the model fail gets `BatchFailedError` and its
batch-mates get their answers. Whatever else goes wrong in the worker (collecting, stacking,
slicing, the metrics callback) fails only the batch in hand; a worker that dies anyway is
restarted (`alive` is False until then, and the service's readiness says "recovering").

**Cancellation.** A request that times out or is cancelled (its client disconnected) withdraws
its queued chunks. A pass that is already running is stopped between steps when no request of
it is still wanted: a multi-step operation calls `check_wanted()` between steps (app/operations.py
passes it to the model methods as `on_step`: the priors' draws, the autoregressive VAE's pixels,
the VQ-VAE's nearest-code search), which raises `PassAbandoned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from app import scheduling
from app.errors import BatchFailedError, NotRunningError, QueueFullError
from app.logs import request_id
from app.scheduling import ComputeScheduler, PassAbandoned

log = logging.getLogger(__name__)

BatchFn = Callable[..., Sequence[torch.Tensor] | torch.Tensor]
Inputs = tuple[torch.Tensor, ...]
ExampleFn = Callable[[int, torch.Generator], Inputs]  # (rows, generator) -> valid inputs of that many rows


_current = threading.local()  # .wanted: the pass running in this thread is still wanted by someone


def pin_torch_threads(count: int) -> None:
    """Give the calling thread `count` torch intra-op threads for good (an executor's initializer).

    torch keeps one count per thread (OpenMP's and MKL's are per thread), but a thread's first call
    that reads it resets it to the count last set by any thread of the process (ATen's
    lazy_init_num_threads). So the count is read first, which spends that reset, then set."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def check_wanted() -> None:
    """Between the steps of a long pass: raise PassAbandoned when no request of the pass running in
    this thread still waits for it (all timed out or cancelled), else offer its compute slot to a
    less-served batcher (app/scheduling.py). Outside a batcher's pass, a no-op."""
    wanted = getattr(_current, "wanted", None)
    if wanted is not None and not wanted():
        raise PassAbandoned
    scheduling.checkpoint(wanted)


@dataclass
class BatcherStats:
    requests: int = 0  # chunks served (a request bigger than max_batch_size counts once per chunk)
    items: int = 0  # real rows computed, padding excluded
    batches: int = 0  # forward passes run
    failed_batches: int = 0  # passes that raised (each is then split and run again)
    failed_requests: int = 0  # chunks that failed alone, so got BatchFailedError
    abandoned: int = 0  # passes stopped between steps because nobody waited for them any more
    restarts: int = 0  # workers restarted after dying
    rejected: int = 0  # requests refused with 503 because the queue was full
    max_batch_items: int = 0
    busy_s: float = 0.0  # time spent in forward passes

    @property
    def mean_latency_s(self) -> float:
        return self.busy_s / self.batches if self.batches else 0.0


@dataclass(eq=False)
class _Entry:
    inputs: Inputs
    n: int
    future: asyncio.Future
    enqueued_at: float  # loop.time()
    request_id: str = "-"
    finish: float = 0.0  # its virtual finish time: passes take the entries with the lowest first
    seq: int = 0  # arrival order, for ties
    flow: int = 0  # its request: the chunks of one request share it
    request_items: int = 0  # the items of its whole request (it may be one chunk of several)

    def __lt__(self, other: _Entry) -> bool:  # heap order
        return (self.finish, self.seq) < (other.finish, other.seq)


def bucket_candidates(max_batch_size: int) -> list[int]:
    """The pass sizes `check_buckets` tries: the powers of two below max_batch_size, then max_batch_size."""
    return [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) < max_batch_size] + [max_batch_size]


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
    max_wait_s: float = 0.0  # opt-in: how long a pass waits for company, from its oldest request
    max_queue: int = 1024
    queue_wait_s: float = 0.0  # how long a request that finds the queue full waits for room before QueueFullError
    # Pass sizes: a pass of n rows is padded to the smallest bucket >= n. None: no padding (the
    # pass has exactly n rows, and a row may change in its last bits with its batch-mates).
    buckets: tuple[int, ...] | None = None
    # A request of at most this many items that finds the pass running busy with a larger request runs
    # in a pass of its own beside it, one such pass at a time (the executor needs a thread more); 0: never.
    express_items: int = 0
    # A pass of one of `lone_sizes` rows, expected to take at most `lone_max_s`, that finds nothing else
    # computing (app/scheduling.py) runs in `lone_executor`, the one thread of the process that computes
    # with every core's torch threads; `check_threads` finds the sizes where that changes no row. Only
    # for passes with no steps (they cannot give the cores back before they end). None: never.
    lone_executor: Executor | None = None
    lone_sizes: tuple[int, ...] = ()
    lone_max_s: float = 0.025
    autocast_dtype: torch.dtype | None = None  # CUDA only
    on_batch: Callable[[str, int, float, bool], None] | None = None  # (name, items, seconds, ok) for metrics
    scheduler: ComputeScheduler | None = None  # shares the CPU with other batchers (app/scheduling.py)
    restart_delay_s: float = 0.1  # before a dead worker is restarted; doubles per death in a row, up to 5 s
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        if self.buckets is not None:
            if not self.buckets or max(self.buckets) < self.max_batch_size or min(self.buckets) < 1:
                raise ValueError(f"buckets must be positive and include max_batch_size {self.max_batch_size}, got {self.buckets}")
            self.buckets = tuple(sorted(set(self.buckets)))
        self._queue: list[_Entry] = []  # a heap, by virtual finish time (_Entry.__lt__)
        self._queued_items = 0
        self._vtime = 0.0  # virtual time: items served, each divided by the requests then competing
        self._room_waiters: list[asyncio.Future] = []  # requests waiting for room in a full queue
        self._flows: dict[int, int] = {}  # request (flow) -> its chunks still queued
        self._pass_seconds: dict[int, float] = {}  # pass rows -> moving average of its time
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._deaths_in_a_row = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")
            self._task.add_done_callback(self._supervise)

    @property
    def alive(self) -> bool:
        """The worker task runs (False while a dead worker waits to be restarted, and after stop)."""
        return self._task is not None and not self._task.done()

    def _supervise(self, task: asyncio.Task) -> None:
        """Done callback of the worker task: a worker that ended while not stopping is restarted."""
        if self._stopping or task is not self._task or task.cancelled():  # cancelled: stop() or the loop closing
            return
        error = task.exception()
        self.stats.restarts += 1
        self._deaths_in_a_row += 1
        delay = min(5.0, self.restart_delay_s * 2 ** (self._deaths_in_a_row - 1))
        log.error("%s: the worker died (%r); restarting it in %.2f s", self.name, error, delay, exc_info=error)

        def restart() -> None:
            if not self._stopping and self._task is task:
                self._task = None
                self.start()

        asyncio.get_running_loop().call_later(delay, restart)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, finish the queued ones (up to drain_timeout_s), then end the worker."""
        self._stopping = True
        self._wakeup.set()
        self._made_room()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        while self._queue:  # only when draining ran out of time
            entry = self._queue.pop()
            self._dequeued(entry)
            if not entry.future.done():
                entry.future.set_exception(NotRunningError("the service is shutting down"))
        self._queued_items = 0

    @property
    def large_limit(self) -> int:
        """How full a request of more than max_batch_size items may make the queue: three quarters
        of max_queue (at least max_batch_size); the last quarter is for requests of one pass."""
        return max(self.max_batch_size, self.max_queue - self.max_queue // 4)

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def pass_rows(self, n: int) -> int:
        """How many rows a pass of n items computes: the smallest bucket >= n, or n without buckets."""
        if self.buckets is None:
            return n
        return next(b for b in self.buckets if b >= n)

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
        # A request that would overflow the queue is refused, unless the queue is empty: then even
        # a request bigger than max_queue is taken, so every request can make progress. A request
        # of several passes may fill it only to `large_limit`: the rest is kept for requests of one
        # pass, so that clients looping on large requests cannot lock small ones out with 503s.
        limit = self.max_queue if n <= self.max_batch_size else self.large_limit
        if self._queued_items and self._queued_items + n > limit and not await self._room_for(n, limit):
            if self._stopping:
                raise NotRunningError("the service is shutting down")
            self.stats.rejected += 1
            retry = max(1, math.ceil(self._queued_items / self.max_batch_size * max(self.stats.mean_latency_s, 0.1)))
            which = "" if limit == self.max_queue else f" for requests of more than {self.max_batch_size} items"
            raise QueueFullError(
                f"{self.name}: queue full ({self._queued_items} items waiting, limit {limit}{which}); retry later",
                headers={"Retry-After": str(retry)},
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = []
        rid = request_id.get()
        finish = self._vtime  # fair queuing: a request's chunks follow each other from the current virtual time
        flow = next(self._seq)
        for start in range(0, n, self.max_batch_size):
            chunk = tuple(t[start : start + self.max_batch_size] for t in inputs)
            size = int(chunk[0].shape[0])
            finish += size
            entries.append(_Entry(chunk, size, loop.create_future(), now, rid, finish, next(self._seq), flow, n))
        for e in entries:
            heapq.heappush(self._queue, e)
        self._flows[flow] = len(entries)
        self._queued_items += n
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            # Timed out, cancelled or failed: withdraw what has not started, cancel the rest.
            withdrawn = False
            for e in entries:
                if not e.future.done():
                    e.future.cancel()
                with contextlib.suppress(ValueError):
                    self._queue.remove(e)
                    self._queued_items -= e.n
                    self._dequeued(e)
                    withdrawn = True
            if withdrawn:
                heapq.heapify(self._queue)
                self._made_room()
            raise
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(outs) for outs in zip(*parts))

    async def _room_for(self, n: int, limit: int) -> bool:
        """Wait up to queue_wait_s for the queue to have room for n more items under `limit`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_wait_s
        while self._queued_items and self._queued_items + n > limit:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping:
                return False
            waiter = loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
        if self._stopping or self._task is None:
            raise NotRunningError("the service is shutting down")
        return True

    def _dequeued(self, entry: _Entry) -> None:
        """Count one chunk of entry's request out of the queue (`_flows`: request -> chunks queued)."""
        left = self._flows.get(entry.flow, 0) - 1
        if left > 0:
            self._flows[entry.flow] = left
        else:
            self._flows.pop(entry.flow, None)

    def _made_room(self) -> None:
        """Items left the queue: every request waiting for room looks again, in the order they came."""
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._room_waiters.clear()

    # -- worker --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        running: set[asyncio.Task] = set()  # the pass collected as usual: at most one
        express: set[asyncio.Task] = set()  # at most one pass of small requests beside them
        large = False  # the usual pass running holds (a chunk of) a request of more than express_items items
        try:
            while True:
                while True:  # until there is work and a pass may start
                    if self._stopping and not self._queue:
                        return
                    usual = not running
                    # An express pass is for a small request stuck behind a large one. Beside a pass of
                    # small requests it would only split the traffic into two smaller passes that share
                    # the cores (PixelCNN n=1 at concurrency 32: 1.3-1.5x fewer requests a second).
                    small = large and not express and 0 < self._queue_head_request_items() <= self.express_items
                    if self._queue and (usual or small):
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                batch: list[_Entry] = []
                try:
                    await (self._collect(batch) if usual else self._collect(batch, self.express_items))
                except Exception as err:  # fails the batch in hand, never the worker
                    self._fail_unexpected(batch, err, "collecting a batch")
                    await asyncio.sleep(0)  # never a busy loop that starves the event loop
                    continue
                if not batch:
                    continue
                self._deaths_in_a_row = 0
                passes = running if usual else express
                if usual:
                    large = any(e.request_items > self.express_items for e in batch)
                task = asyncio.get_running_loop().create_task(self._run(batch, urgent=not usual))
                passes.add(task)
                task.add_done_callback(lambda t, passes=passes: (passes.discard(t), self._wakeup.set()))
        except asyncio.CancelledError:  # stop() ran out of time: the passes in flight fail their requests
            for task in (*running, *express):
                task.cancel()
            raise
        finally:
            if running or express:
                await asyncio.gather(*running, *express, return_exceptions=True)

    def _queue_head_request_items(self) -> int:
        """The items of the whole request whose chunk the next pass takes first (0: none queued)."""
        return self._queue[0].request_items if self._queue else 0

    async def _collect(self, batch: list[_Entry], limit: int | None = None) -> None:
        """Move what is queued into `batch`, up to `limit` (default max_batch_size) items; with
        max_wait_s > 0, wait that long from the oldest request for the batch to fill. With a `limit`
        (an express pass), only requests of at most that many items, up to the first larger one."""
        small_only = limit is not None
        limit = limit or self.max_batch_size
        loop = asyncio.get_running_loop()
        end = min(e.enqueued_at for e in self._queue) + self.max_wait_s
        items = 0
        while True:
            while self._queue and items + self._queue[0].n <= limit and (not small_only or self._queue[0].request_items <= limit):
                entry = heapq.heappop(self._queue)
                self._queued_items -= entry.n
                self._dequeued(entry)
                self._made_room()
                if entry.future.done():  # cancelled while waiting
                    continue
                batch.append(entry)
                items += entry.n
                # The virtual time advances as a fluid share would: by the items served over the
                # requests competing for them (so tags of later arrivals grow, and none starves).
                competing = len(self._flows) + len({e.flow for e in batch if e.flow not in self._flows})
                self._vtime += entry.n / competing
            if self.max_wait_s <= 0 or self._stopping:
                return
            full = items >= limit or bool(self._queue)  # the next one does not fit
            remaining = end - loop.time()
            if full or remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _run(self, batch: list[_Entry], urgent: bool = False) -> None:
        """One pass over batch; if it raises, each half again, so only a failing request fails.
        An urgent (express) pass computes without waiting for a turn of the compute scheduler."""
        try:
            await self._run_pass(batch, urgent)
        except asyncio.CancelledError:  # stop() ran out of time: nobody waits forever
            self._fail(batch, NotRunningError("the service is shutting down"))
            raise
        except Exception as err:  # a bug outside the forward pass: this batch only
            self._fail_unexpected(batch, err, "running a pass")

    async def _run_pass(self, batch: list[_Entry], urgent: bool = False) -> None:
        batch = [e for e in batch if not e.future.done()]  # a retried half may have lost requests meanwhile
        if not batch:
            return
        n = sum(e.n for e in batch)
        start = time.perf_counter()
        args = [e.inputs for e in batch], [e.n for e in batch], [e.future for e in batch]
        try:
            forward = functools.partial(self._forward_entries, urgent=True) if urgent else self._forward_entries
            answers = await asyncio.get_running_loop().run_in_executor(self.executor, forward, *args)
        except PassAbandoned:
            self.stats.abandoned += 1
            log.info("%s: pass over %d items stopped: none of its requests waits any more", self.name, n)
            return
        except Exception as err:
            self.stats.failed_batches += 1
            self._observe(n, time.perf_counter() - start, False)
            if len(batch) > 1:  # find the culprit: each half on its own
                log.warning("%s: a pass over %d requests failed (%s); running each half again", self.name, len(batch), type(err).__name__)
                half = len(batch) // 2
                await self._run_pass(batch[:half], urgent)
                await self._run_pass(batch[half:], urgent)
                return
            entry = batch[0]
            self.stats.failed_requests += 1
            log.error("%s: the pass of request %s (%d items) failed", self.name, entry.request_id, n, exc_info=err)
            self._fail(batch, BatchFailedError(f"inference failed in {self.name}: the model raised {type(err).__name__}"))
            return
        seconds = time.perf_counter() - start
        for e, answer in zip(batch, answers, strict=True):
            if not e.future.done():
                e.future.set_result(answer)
        self.stats.batches += 1
        self.stats.items += n
        self.stats.requests += len(batch)
        self.stats.max_batch_items = max(self.stats.max_batch_items, n)
        self.stats.busy_s += seconds
        self._observe(n, seconds, True)

    def _fail_unexpected(self, batch: list[_Entry], err: Exception, doing: str) -> None:
        log.error(
            "%s: failed %s (requests %s)", self.name, doing, ", ".join(e.request_id for e in batch) or "none", exc_info=err
        )
        self._fail(batch, BatchFailedError(f"{self.name} failed {doing}: {type(err).__name__}"))

    @staticmethod
    def _fail(batch: list[_Entry], error: Exception) -> None:
        for e in batch:
            if not e.future.done():
                e.future.set_exception(error)

    def _observe(self, n: int, seconds: float, ok: bool) -> None:
        """Report a pass to on_batch (metrics); a failing callback is logged, never fatal to the worker."""
        if self.on_batch is None:
            return
        try:
            self.on_batch(self.name, n, seconds, ok)
        except Exception:
            log.exception("%s: the on_batch callback failed", self.name)

    # -- in the worker thread ------------------------------------------------------------------

    def _forward_entries(
        self, inputs: list[Inputs], sizes: list[int], futures: list[asyncio.Future], urgent: bool = False
    ) -> list[Inputs]:
        """Stack the requests' rows, run one padded pass, split the outputs back per request.

        While the pass runs, `check_wanted()` in this thread asks whether any of `futures` is
        still pending (reading a future's state from another thread is a plain attribute read).
        """
        n = sum(sizes)
        stacked = tuple(parts[0] if len(inputs) == 1 else torch.cat(parts) for parts in zip(*inputs))  # (n, ...)
        _current.wanted = wanted = lambda: not all(f.done() for f in futures)
        rows = self.pass_rows(n)
        try:
            expected = 0.0 if urgent else self._pass_seconds.get(rows)  # an express pass needs no turn
            lone = self._may_go_alone(rows, expected)
            with self.scheduler.computing(self.name, wanted, expected, lone) if self.scheduler else contextlib.nullcontext() as alone:
                start = time.perf_counter()
                # `rows` is the size that was found invariant, whatever a check sets meanwhile
                if alone:  # every slot is ours: compute in the thread with every core's threads
                    outputs = self.lone_executor.submit(self._forward, stacked, n, rows).result()  # type: ignore[union-attr]
                else:
                    outputs = self._forward(stacked, n, rows)
                seconds = time.perf_counter() - start
            # what a pass of this size takes (the last 8 weigh most), for the scheduler
            previous = self._pass_seconds.get(rows, seconds)
            self._pass_seconds[rows] = previous + (seconds - previous) / 8
        finally:
            _current.wanted = None
        answers, offset = [], 0
        for size in sizes:
            answers.append(tuple(o[offset : offset + size] for o in outputs))
            offset += size
        return answers

    def _may_go_alone(self, rows: int, expected: float | None) -> bool:
        """Whether a pass of `rows` rows may take every core when nothing else computes: one of the
        checked sizes, expected (from the passes of its size so far) to end within lone_max_s, with
        no request queued for the next pass (under load the other cores serve HTTP and encode PNGs:
        vae_conv n=16 at concurrency 32 served 0.85-0.9x the requests a second with every pass alone)."""
        return (
            self.lone_executor is not None
            and rows in self.lone_sizes
            and expected is not None
            and expected <= self.lone_max_s
            and not self._queue
        )

    def _forward(self, inputs: Sequence[torch.Tensor], n: int, rows: int | None = None) -> Inputs:
        """Pad n rows to `rows` (default pass_rows(n)), transfer, one forward pass, check, the first n
        rows back on the CPU."""
        rows = self.pass_rows(n) if rows is None else rows
        outputs = self._pass(inputs, rows)
        return tuple(o[:n].cpu() for o in outputs)

    def _pass(self, inputs: Sequence[torch.Tensor], rows: int, fn: BatchFn | None = None) -> Inputs:
        """One forward pass of fn (default self.fn) over exactly `rows` rows (fewer are padded with the last row)."""
        cuda = self.device.type == "cuda"
        moved = []
        for t in inputs:
            if t.shape[0] < rows:  # repeat the last row: padding stays a valid input (a temperature of 0 would not)
                t = torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])  # (rows, ...)
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
            outputs = (fn or self.fn)(*moved)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        result = []
        for i, out in enumerate(outputs):
            if out.dim() == 0 or out.shape[0] != rows:
                raise RuntimeError(f"Batch size mismatch: output {i} has shape {tuple(out.shape)}, expected {rows} rows")
            result.append(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out)  # autocast's halves; float64 stays
        return tuple(result)

    def check_buckets(
        self, example: ExampleFn, probe: BatchFn | None = None, seed: int = 0, group: str | None = None
    ) -> tuple[int, ...]:
        """The pass sizes whose rows are bit-identical to the same rows in a pass of max_batch_size.

        Runs in the caller's thread (the service runs it in its check thread, and in this batcher's
        executor to check a CUDA-graph recording again). Seeded rows
        `example(max_batch_size, generator)` are computed twice at the full size (a pass that
        does not reproduce itself can promise nothing: only the full size is kept) and then at
        each candidate size b, once as the first b rows and once as the last b: both must equal
        the full pass's rows exactly, so neither the pass size nor a row's position changes it.
        An operation with a discrete step (an argmin, a draw) rounds small differences away on
        most rows and flips a result on a few, so for it `probe`, which computes the same as
        fn but also returns what precedes each discrete step (distances, logits), is compared.
        With `group` and a scheduler, each of its passes waits for a turn of the compute scheduler
        as that group (a check that runs while requests are served takes only its share of the CPU).
        Returns the passing sizes and max_batch_size; use it as `buckets`.
        """
        top = self.max_batch_size

        def run(inputs: Sequence[torch.Tensor], rows: int) -> Inputs:
            if self.scheduler is None or group is None:
                return self._pass(inputs, rows, probe)
            with self.scheduler.computing(group):
                return self._pass(inputs, rows, probe)

        x = example(top, torch.Generator().manual_seed(seed))
        reference = [o.cpu() for o in run(x, top)]
        if not all(torch.equal(a, b.cpu()) for a, b in zip(reference, run(x, top))):
            log.warning("%s: a pass of %d rows does not reproduce itself; every pass keeps that size", self.name, top)
            return (top,)
        passing = []
        for b in bucket_candidates(top)[:-1]:
            head = run(tuple(t[:b] for t in x), b)
            tail = run(tuple(t[top - b :] for t in x), b)
            same = all(
                torch.equal(h.cpu(), r[:b]) and torch.equal(t.cpu(), r[top - b :])
                for h, t, r in zip(head, tail, reference)
            )
            if same:
                passing.append(b)
        return (*passing, top)

    def check_threads(
        self, example: ExampleFn, sizes: Sequence[int], probe: BatchFn | None = None, seed: int = 0, group: str | None = None
    ) -> tuple[int, ...]:
        """Of `sizes`, those whose rows computed in `lone_executor` (every core's threads) are
        bit-identical to the same rows computed in the calling thread (the service's check thread,
        which has the model threads' count). Like `check_buckets`: seeded rows, `probe` where there
        are discrete steps, and each pass in a turn of the compute scheduler as `group`. Use it as
        `lone_sizes`; () without a lone_executor."""
        if self.lone_executor is None:
            return ()
        lone_executor = self.lone_executor

        def run(inputs: Sequence[torch.Tensor], rows: int, alone: bool) -> Inputs:
            with self.scheduler.computing(group) if self.scheduler and group else contextlib.nullcontext():
                if alone:
                    return lone_executor.submit(self._pass, inputs, rows, probe).result()
                return self._pass(inputs, rows, probe)

        same = []
        for b in sorted(sizes):
            x = example(b, torch.Generator().manual_seed(seed))
            mine, theirs = run(x, b, False), run(x, b, True)
            if all(torch.equal(m.cpu(), t.cpu()) for m, t in zip(mine, theirs)):
                same.append(b)
        return tuple(same)
