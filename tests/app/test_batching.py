"""The batcher alone and inside the app: shared batches, own answers, 503, 504, 500."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from app.batching import Batcher, bucket_candidates, pin_torch_threads
from app.errors import BatchFailedError, NotRunningError, QueueFullError
from app import operations as app_operations
from app.operations import Op, OpKey
from models.layers import set_min_rows
from models.vae import VAE, VAEConfig

from .conftest import LATENT_DIM, image_bytes

# -- the Batcher on its own -------------------------------------------------------------------


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def make_batcher(executor, fn, **kw):
    return Batcher(name="test", fn=fn, executor=executor, **{"max_batch_size": 4, "max_wait_s": 0.05, **kw})


async def test_each_request_gets_its_own_rows_even_when_split_into_chunks(executor):
    batcher = make_batcher(executor, lambda x: (x * 2, x.sum(1)))
    batcher.start()
    inputs = [torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * n for n in (1, 3, 6, 2, 9)]
    outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
    await batcher.stop()
    for x, (doubled, sums) in zip(inputs, outputs):
        assert torch.equal(doubled, x * 2) and torch.equal(sums, x.sum(1))
    assert batcher.stats.items == 21 and batcher.stats.max_batch_items <= 4
    assert batcher.stats.batches < batcher.stats.requests  # requests did share forward passes


async def test_a_pass_is_padded_to_the_smallest_bucket_that_holds_it(executor):
    shapes = []
    batcher = make_batcher(executor, lambda x: (shapes.append(tuple(x.shape)), x + 1)[1], buckets=(2, 4), max_wait_s=0)
    batcher.start()
    outs = [await batcher.submit(torch.zeros(n, 2)) for n in (1, 2, 3, 4)]
    await batcher.stop()
    assert shapes == [(2, 2), (2, 2), (4, 2), (4, 2)]
    assert [tuple(o.shape) for (o,) in outs] == [(n, 2) for n in (1, 2, 3, 4)]
    assert all(torch.equal(o, torch.ones_like(o)) for (o,) in outs)


def test_buckets_must_include_the_full_size(executor):
    with pytest.raises(ValueError, match="include max_batch_size 4"):
        make_batcher(executor, lambda x: x, buckets=(1, 2))


async def test_a_wrong_output_count_fails_the_batch_and_the_worker_survives(executor):
    calls = []

    def fn(x):
        calls.append(1)
        return (x[:1],) if len(calls) == 1 else (x,)

    batcher = make_batcher(executor, fn)
    batcher.start()
    with pytest.raises(BatchFailedError, match="the model raised RuntimeError"):
        await batcher.submit(torch.zeros(2, 1))
    (out,) = await batcher.submit(torch.ones(2, 1))
    await batcher.stop()
    assert torch.equal(out, torch.ones(2, 1)) and batcher.stats.failed_batches == 1


async def test_a_full_queue_refuses_with_retry_after_and_stop_drains(executor):
    entered, gate = threading.Event(), threading.Event()
    batcher = make_batcher(executor, lambda x: (entered.set(), gate.wait(10), x)[2], max_batch_size=1, max_queue=2, max_wait_s=0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 5)  # the worker holds the first request
    queued = [asyncio.ensure_future(batcher.submit(torch.full((1, 1), float(i)))) for i in range(2)]
    await asyncio.sleep(0.01)
    assert batcher.queued_items == 2
    with pytest.raises(QueueFullError) as err:
        await batcher.submit(torch.zeros(1, 1))
    assert int(err.value.headers["Retry-After"]) >= 1 and "queue full" in err.value.detail
    stopping = asyncio.ensure_future(batcher.stop())
    gate.set()
    await stopping  # drains: the queued requests still get their answers
    assert [float(f.result()[0]) for f in queued] == [0.0, 1.0] and first.done()


async def test_large_requests_cannot_fill_the_queue_for_small_ones(executor):
    # Eight clients looping on 256-image requests filled the queue (1024 items), and a one-image
    # request got 503 as often as theirs. Requests of several passes may fill only three quarters.
    entered, gate = threading.Event(), threading.Event()
    batcher = make_batcher(executor, lambda x: (entered.set(), gate.wait(10), x)[2], max_batch_size=4, max_queue=16,
                           max_wait_s=0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 5)
    large = [asyncio.ensure_future(batcher.submit(torch.zeros(6, 1))) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert batcher.queued_items == 12 == batcher.large_limit
    with pytest.raises(QueueFullError, match="limit 12 for requests of more than 4 items"):
        await batcher.submit(torch.zeros(5, 1))
    small = [asyncio.ensure_future(batcher.submit(torch.ones(2, 1))) for _ in range(2)]  # up to max_queue
    await asyncio.sleep(0.01)
    assert batcher.queued_items == 16
    with pytest.raises(QueueFullError, match=r"limit 16\)"):
        await batcher.submit(torch.zeros(1, 1))
    gate.set()
    await asyncio.gather(first, *large, *small)
    await batcher.stop()


async def test_a_request_that_finds_the_queue_full_waits_for_room_before_its_503(executor):
    # Refused at once, clients that resend at once (ignoring Retry-After) answered thousands of 503s a
    # second, and that storm took the CPU from the passes. A request now waits up to queue_wait_s.
    entered, gate = threading.Event(), threading.Event()
    batcher = make_batcher(executor, lambda x: (entered.set(), gate.wait(10), x)[2], max_batch_size=1, max_queue=1,
                           max_wait_s=0, queue_wait_s=5.0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 5)
    queued = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(batcher.submit(torch.full((1, 1), 2.0)))  # the queue is full: it waits
    await asyncio.sleep(0.05)
    assert not waiting.done() and batcher.stats.rejected == 0
    gate.set()  # the first pass ends, `queued` is taken into the next: room for `waiting`
    assert [float(t[0]) for t in await asyncio.gather(first, queued, waiting)] == [0.0, 1.0, 2.0]
    batcher.queue_wait_s = 0.05
    entered.clear(), gate.clear()
    held = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 5)
    filler = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError):  # no room within queue_wait_s
        await batcher.submit(torch.zeros(1, 1))
    gate.set()
    await asyncio.gather(held, filler)
    await batcher.stop()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), wait=st.sampled_from([0.0, 0.02]))
def test_batched_output_equals_per_item_output(executor, sizes, wait):
    """With the pass sizes check_buckets found, a VAE decode of a request is bit-identical whatever shares its batch."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_size=8, latent_dim=LATENT_DIM, hidden_dims=(16,))).eval()
    g = torch.Generator().manual_seed(sum(sizes))
    requests = [torch.randn(n, LATENT_DIM, generator=g) for n in sizes]

    batcher = make_batcher(executor, lambda z: (vae.sample(len(z), z=z),), max_batch_size=8, max_wait_s=wait)
    batcher.buckets = batcher.check_buckets(lambda n, g: (torch.randn(n, LATENT_DIM, generator=g),))
    assert batcher.buckets[-1] == 8

    async def run():
        batcher.start()
        together = await asyncio.gather(*(batcher.submit(z) for z in requests))
        await batcher.stop()
        return together

    together = asyncio.run(run())
    alone = [batcher._forward([z[i : i + 1]], 1) for z in requests for i in range(len(z))]  # one item per pass
    flat = torch.cat([out for (out,) in together])
    assert torch.equal(flat, torch.cat([out for (out,) in alone]))


async def test_a_lone_request_starts_at_once_even_with_the_clock_stopped(executor, monkeypatch):
    """With the default max_wait_s = 0 nothing waits on a timer: with the event loop's clock frozen,
    any wait for company would never end, yet the request is answered."""
    loop = asyncio.get_running_loop()
    frozen = loop.time()
    monkeypatch.setattr(loop, "time", lambda: frozen)
    watchdog = threading.Timer(20, lambda: loop.call_soon_threadsafe(task.cancel))  # fails the test instead of hanging it
    batcher = Batcher(name="test", fn=lambda x: (x + 1,), executor=executor)
    assert batcher.max_wait_s == 0
    batcher.start()
    task = asyncio.ensure_future(batcher.submit(torch.zeros(1, 2)))
    watchdog.start()
    try:
        (out,) = await task
    finally:
        watchdog.cancel()
    monkeypatch.undo()
    await batcher.stop()
    assert torch.equal(out, torch.ones(1, 2)) and batcher.stats.batches == 1


async def test_requests_that_arrive_during_a_pass_form_the_next_pass(executor):
    entered, gate, passes = threading.Event(), threading.Event(), []

    def fn(x):
        passes.append(x[:, 0].tolist())
        entered.set()
        assert gate.wait(20), "test gate never opened"
        return (x,)

    batcher = Batcher(name="test", fn=fn, executor=executor, max_batch_size=8)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 10)  # the lone request is in a pass of its own
    later = [asyncio.ensure_future(batcher.submit(torch.full((1, 1), float(i)))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *later)
    await batcher.stop()
    assert passes == [[0.0], [1.0, 2.0, 3.0]]


async def test_a_small_request_overtakes_the_queued_chunks_of_large_ones(executor):
    # First come, first served held a one-row request behind every queued chunk of the large
    # requests (the review: 51 ms -> 2.5 s). Fair queuing runs it in the very next pass, alone.
    entered, gate, passes = threading.Event(), threading.Event(), []

    def fn(x):
        passes.append(sorted(set(x[:, 0].tolist())))
        entered.set()
        assert gate.wait(20), "test gate never opened"
        return (x,)

    batcher = Batcher(name="test", fn=fn, executor=executor, max_batch_size=4)
    batcher.start()
    large = [asyncio.ensure_future(batcher.submit(torch.full((12, 1), float(i)))) for i in (1, 2)]
    assert await asyncio.to_thread(entered.wait, 10)  # the first chunk of request 1 runs
    small = asyncio.ensure_future(batcher.submit(torch.full((1, 1), 9.0)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*large, small)
    await batcher.stop()
    assert passes[:2] == [[1.0], [9.0]]  # the small one next, on its own (a chunk of 4 would not fit beside it)
    # and the two large ones take turns, a chunk at a time, rather than one after the other
    assert passes[2:] == [[2.0], [1.0], [2.0], [1.0], [2.0]]


async def test_a_small_request_runs_beside_a_busy_pass_not_after_it():
    # express_items: a one-row request that finds the only pass slot busy gets a pass of its own at
    # once (one at a time), instead of waiting for the 64-row pass to end.
    gate, passes = threading.Event(), []

    def fn(x):
        passes.append(x.shape[0])
        if x.shape[0] > 2:
            assert gate.wait(20), "test gate never opened"
        return (x,)

    with ThreadPoolExecutor(max_workers=2) as pool:
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, express_items=2)
        batcher.start()
        large = asyncio.ensure_future(batcher.submit(torch.zeros(8, 1)))
        while not passes:
            await asyncio.sleep(0.005)
        small = await asyncio.wait_for(batcher.submit(torch.ones(1, 1)), 10)  # answered while the large pass runs
        assert torch.equal(small[0], torch.ones(1, 1)) and not large.done()
        too_big = asyncio.ensure_future(batcher.submit(torch.ones(3, 1)))  # over express_items: it waits
        await asyncio.sleep(0.05)
        assert not too_big.done()
        gate.set()
        await asyncio.gather(large, too_big)
        await batcher.stop()
    assert passes == [8, 1, 3]


async def test_a_small_request_beside_a_pass_of_small_ones_joins_the_next_pass():
    # Express passes are for small requests stuck behind a large one. When the pass running holds
    # only small requests, a new one waits for the next pass: two small passes at once would only
    # split the traffic into smaller passes that share the cores.
    gate, passes = threading.Event(), []

    def fn(x):
        passes.append(x.shape[0])
        if len(passes) == 1:
            assert gate.wait(20), "test gate never opened"
        return (x,)

    with ThreadPoolExecutor(max_workers=2) as pool:
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, express_items=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(torch.zeros(2, 1)))  # small: not more than express_items
        while not passes:
            await asyncio.sleep(0.005)
        later = [asyncio.ensure_future(batcher.submit(torch.full((1, 1), float(i)))) for i in range(3)]
        await asyncio.sleep(0.1)
        assert passes == [2] and not any(f.done() for f in later)  # no express pass beside the small one
        gate.set()
        await asyncio.gather(first, *later)
        await batcher.stop()
    assert passes == [2, 3]  # the three came together in the next pass


async def test_a_stream_of_small_requests_does_not_starve_a_large_one(executor):
    # A small request arrives during every pass. Shortest-first would serve the large one only once
    # they stop; fair queuing gives each arrival a later tag as the virtual time grows, so the
    # large request's three chunks are done within six passes while the stream goes on.
    entered, passes = asyncio.Queue(), []
    gates = [threading.Event() for _ in range(16)]
    loop = asyncio.get_running_loop()

    def fn(x):
        passes.append(sorted(set(x[:, 0].tolist())))
        loop.call_soon_threadsafe(entered.put_nowait, len(passes))
        assert gates[len(passes) - 1].wait(20), "test gate never opened"
        return (x,)

    batcher = Batcher(name="test", fn=fn, executor=executor, max_batch_size=4)
    batcher.start()
    large = asyncio.ensure_future(batcher.submit(torch.full((12, 1), 100.0)))
    small = []
    for i in range(10):
        await asyncio.wait_for(entered.get(), 10)  # pass i runs: one more small request arrives
        small.append(asyncio.ensure_future(batcher.submit(torch.full((4, 1), float(i)))))
        await asyncio.sleep(0)
        gates[i].set()
    for gate in gates:
        gate.set()
    await asyncio.gather(large, *small)
    await batcher.stop()
    large_passes = [i for i, p in enumerate(passes) if p == [100.0]]
    assert len(large_passes) == 3 and large_passes[-1] <= 5, passes  # of 13 passes


@pytest.mark.parametrize(("wait", "expected"), [(30.0, [4]), (0.0, [1, 3])])
async def test_the_opt_in_wait_collects_company(executor, wait, expected):
    sizes, gate = [], threading.Event()
    batcher = make_batcher(executor, lambda x: (sizes.append(len(x)), gate.wait(20), x)[2], max_batch_size=4, max_wait_s=wait)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    for _ in range(20):  # event-loop turns, not time: the worker takes the lone request (or waits)
        await asyncio.sleep(0)
    later = [asyncio.ensure_future(batcher.submit(torch.zeros(1, 1))) for _ in range(3)]
    for _ in range(20):
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *later)  # with the wait, a full batch ends it
    await batcher.stop()
    assert sizes == expected


async def test_stop_fails_a_running_pass_that_outlasts_the_drain(executor):
    gate = threading.Event()
    batcher = make_batcher(executor, lambda x: (gate.wait(20), x)[1], max_wait_s=0)
    batcher.start()
    request = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    for _ in range(20):
        await asyncio.sleep(0)
    try:
        await batcher.stop(drain_timeout_s=0.05)
        with pytest.raises(NotRunningError, match="shutting down"):
            await request
    finally:
        gate.set()


async def test_a_failing_metrics_callback_does_not_kill_the_worker(executor):
    def on_batch(*_):
        raise FileNotFoundError("metrics directory is gone")

    batcher = make_batcher(executor, lambda x: (x + 1,), max_wait_s=0, on_batch=on_batch)
    batcher.start()
    outs = [await batcher.submit(torch.zeros(1, 1)) for _ in range(2)]
    await batcher.stop()
    assert [float(o[0]) for (o,) in outs] == [1.0, 1.0] and batcher.stats.batches == 2


# -- the batch-invariance check ---------------------------------------------------------------


def rows(n, g):
    return (torch.randn(n, 3, generator=g),)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda x: (x * 2,), (1, 2, 4, 8, 16)),  # row-wise: every size is invariant
        (lambda x: (x + (1e-3 if len(x) < 4 else 0.0),), (4, 8, 16)),  # passes of 1-3 rows round differently
        (lambda x: (x + (1e-3 if len(x) == 8 else 0.0),), (1, 2, 4, 16)),  # one odd size is skipped
        (lambda x: (x * len(x),), (16,)),  # every size differs: full-size passes only
        (lambda x: (x - x.mean(0),), (16,)),  # rows depend on their batch-mates
        (lambda x: (x + torch.arange(len(x))[:, None],), (16,)),  # rows depend on their position
        (lambda x: (x + torch.rand(len(x), 1),), (16,)),  # not even reproducible
    ],
)
def test_check_buckets_keeps_the_sizes_whose_rows_equal_a_full_pass(executor, fn, expected):
    batcher = make_batcher(executor, fn, max_batch_size=16)
    assert bucket_candidates(16) == [1, 2, 4, 8, 16] and bucket_candidates(20) == [1, 2, 4, 8, 16, 20]
    assert batcher.check_buckets(rows) == expected


def test_check_buckets_compares_every_output_and_the_tail_of_the_full_pass(executor):
    def numbered(n, g):  # row i holds i: a pass knows which rows it holds
        return (torch.arange(n, dtype=torch.float32)[:, None],)

    def fn(x):  # the second output differs in small passes of the full pass's last rows only
        second = x + (1e-3 if len(x) < 4 and float(x[0, 0]) >= 4 else 0.0)
        return x, second

    batcher = make_batcher(executor, fn, max_batch_size=8)
    assert batcher.check_buckets(numbered) == (4, 8)


def test_check_buckets_compares_the_probe_of_an_operation_with_a_discrete_step(executor):
    """An argmin hides a last-bit difference on most rows; the probe's distances show it."""

    def distances(x):
        return x + (1e-6 if len(x) < 4 else 0.0)  # (B, K): small passes round differently

    def fn(x):
        return (distances(x).argmin(1),)

    def probe(x):
        return fn(x)[0], distances(x)

    def example(n, g):
        return (torch.rand(n, 5, generator=g),)

    batcher = make_batcher(executor, fn, max_batch_size=8)
    assert batcher.check_buckets(example) == (1, 2, 4, 8)  # the codes alone look invariant
    assert batcher.check_buckets(example, probe) == (4, 8)


# -- inside the app ---------------------------------------------------------------------------


def block(app, key):
    """Make a batcher's forward pass wait on a threading.Event: -> (batcher, entered, gate)."""
    batcher = app.state.service.batchers[key]
    entered, gate, original = threading.Event(), threading.Event(), batcher.fn

    def blocked(*inputs):
        entered.set()
        assert gate.wait(20), "test gate never opened"
        return original(*inputs)

    batcher.fn = blocked
    return batcher, entered, gate


async def test_concurrent_samples_share_a_batch_and_each_equals_its_solo_answer(serve):
    vae_requests = [dict(model="vae", n=2, seed=s, temperature=0.5 + 0.1 * s) for s in range(10)]
    vq_requests = [dict(model="vqvae", n=2, seed=s, prior="gated", **({"label": s % 3} if s % 2 else {}))
                   for s in range(10)]
    # Same max_batch_size (the padded shape) in both apps; the solo app never waits for company.
    async with serve(max_batch_size=20, max_wait_ms=0) as (_app, client):
        solo = [(await client.get("/sample", params=p)).content for p in vae_requests + vq_requests]
    async with serve(max_batch_size=20, max_wait_ms=2000) as (app, client):
        responses = await asyncio.gather(*(client.get("/sample", params=p) for p in vae_requests + vq_requests))
        stats = {k: app.state.service.batchers[k].stats for k in [OpKey("vae", Op.SAMPLE), OpKey("vqvae", Op.SAMPLE, "gated")]}
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.content for r in responses] == solo
    assert len(set(solo)) == 20
    for s in stats.values():
        assert s.requests == 10 and s.items == 20 and s.batches == 1 and s.max_batch_items == 20


async def test_a_request_bigger_than_the_batch_is_chunked_and_equals_single_decodes(serve):
    async with serve(max_batch_size=8) as (app, client):
        r = await client.get("/sample", params={"model": "vae", "n": 19, "seed": 4, "temperature": 0.7},
                             headers={"Accept": "application/json"})
        stats = app.state.service.batchers[OpKey("vae", Op.SAMPLE)].stats
        assert (stats.batches, stats.items) == (3, 19)
        z = torch.randn(19, LATENT_DIM, generator=torch.Generator().manual_seed(4)) * 0.7  # the documented noise
        singles = [(await client.post("/decode", json={"model": "vae", "z": [row.tolist()]},
                                      headers={"Accept": "application/json"})).json()["images"][0] for row in z]
    assert r.json()["images"] == singles


async def test_a_full_queue_is_503_with_retry_after(serve):
    async with serve(max_batch_size=1, max_queue=2, max_wait_ms=0, queue_wait_s=0, express_items=0) as (app, client):
        batcher, entered, gate = block(app, OpKey("vae", Op.SAMPLE))
        try:
            tasks = [asyncio.ensure_future(client.get("/sample", params={"model": "vae", "n": 1, "seed": 0}))]
            assert await asyncio.to_thread(entered.wait, 5)  # the first request is in the forward pass
            tasks += [asyncio.ensure_future(client.get("/sample", params={"model": "vae", "n": 1, "seed": i})) for i in (1, 2)]
            for _ in range(2000):
                await asyncio.sleep(0.001)
                if batcher.queued_items == 2:
                    break
            assert batcher.queued_items == 2  # one request in the blocked forward pass, two waiting
            r = await client.get("/sample", params={"model": "vae", "n": 1})
            assert r.status_code == 503 and "queue full" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        finally:
            gate.set()
        assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 3
        assert (await client.get("/sample", params={"model": "vae", "n": 1})).status_code == 200


async def test_a_slow_request_times_out_with_504_and_the_service_recovers(serve):
    # 1 s, not less: the same limit bounds the upload's arrival (408), which a loaded 2-core CI box can take 0.2 s for
    async with serve(request_timeout_s=1.0) as (app, client):
        _batcher, _entered, gate = block(app, OpKey("vae", Op.RECONSTRUCT))
        try:
            r = await client.post("/reconstruct", params={"model": "vae"}, files=[("file", ("a", image_bytes()))])
            assert r.status_code == 504 and r.json()["detail"] == "request timed out after 1 s"
        finally:
            gate.set()
        assert (await client.post("/reconstruct", params={"model": "vae"}, files=[("file", ("a", image_bytes()))])).status_code == 200


async def test_a_failing_request_fails_alone_and_its_batch_mates_get_their_answers(serve):
    """A pass that raises is split and run again until only the request that makes it fail is left."""
    async with serve(max_wait_ms=200, max_batch_size=8) as (app, client):
        batcher = app.state.service.batchers[OpKey("vae", Op.DECODE)]
        original = batcher.fn
        def poisoned(z):
            if (z[:, 0] == 7.0).any():
                raise RuntimeError(f"boom on {z}")  # the message (a tensor) must not reach the client
            return original(z)

        def body(first: float) -> dict:
            return {"model": "vae", "z": [[first] + [0.1] * 3, [0.2] * 4]}

        alone = [await client.post("/decode", json=body(v)) for v in (0.5, 1.5)]
        batcher.fn = poisoned
        answers = await asyncio.gather(*(client.post("/decode", json=body(v), headers={"X-Request-ID": f"r{i}"})
                                         for i, v in enumerate((0.5, 7.0, 1.5))))
        assert [r.status_code for r in answers] == [200, 500, 200]
        assert [answers[0].content, answers[2].content] == [r.content for r in alone]
        failed = answers[1].json()
        assert failed == {"detail": "inference failed in vae:decode: the model raised RuntimeError", "request_id": "r1"}
        assert answers[1].headers["X-Request-ID"] == "r1"
        assert batcher.stats.failed_requests == 1 and batcher.stats.failed_batches >= 2  # the shared pass, then halves
        assert 'genserve_batch_failures_total{batcher="vae:decode"}' in (await client.get("/metrics")).text


async def test_a_cheap_model_is_served_while_a_slow_one_computes(serve):
    """Every batcher has its own thread: the VQ-VAE answers between the blocked VAE pass's start and end."""
    async with serve() as (app, client):
        _batcher, entered, gate = block(app, OpKey("vae", Op.SAMPLE))
        try:
            slow = asyncio.ensure_future(client.get("/sample", params={"model": "vae", "n": 1, "seed": 0}))
            assert await asyncio.to_thread(entered.wait, 10)  # the slow pass has started
            r = await client.post("/reconstruct", params={"model": "vqvae"}, files=[("file", ("a", image_bytes()))])
            assert r.status_code == 200
            assert not slow.done()  # answered while the slow pass still computes
        finally:
            gate.set()
        assert (await slow).status_code == 200


async def test_config_shows_each_batchers_pass_sizes(serve):
    async with serve(max_batch_size=8) as (app, client):
        sizes = (await client.get("/config")).json()["pass_sizes"]
        assert set(sizes) == {str(k) for k in app.state.service.batchers}
        assert "vqvae:sample:gated" in sizes and "vqvae:decode_nearest" in sizes
        for name, buckets in sizes.items():
            assert buckets[-1] == 8 and buckets == sorted(buckets) and set(buckets) <= {1, 2, 4, 8}, name
        assert sizes["vae:sample"] == [1, 2, 4, 8]  # the MLP, its Linear inputs padded: every size is invariant
    async with serve(max_batch_size=8, pad_batches=False) as (_app, client):
        assert set((await client.get("/config")).json()["pass_sizes"].values()) == {None}


def test_padded_linear_computes_small_inputs_as_part_of_a_taller_product(monkeypatch):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_size=8, latent_dim=LATENT_DIM, hidden_dims=(16,))).eval()
    linears = [m for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    seen, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: (seen.append(x.shape[0]), linear(x, *a))[1])
    z, mates = torch.randn(3, LATENT_DIM), torch.randn(7, LATENT_DIM)
    with torch.inference_mode():
        expected = [vae.decode(torch.cat([z[i : i + 1], mates[:k]]))[:1] for i, k in enumerate((3, 5, 7))]  # in taller passes
        seen.clear()
        assert set_min_rows(vae, 4) == len(linears)  # every Linear of the VAE is models/layers.py's
        assert set_min_rows(vae, 4) == 0  # already set
        got = [vae.decode(z[i : i + 1]) for i in range(3)]
        taller = vae.decode(torch.randn(5, LATENT_DIM))
    assert seen == [4, 4] * 3 + [5, 5]  # the decoder's two Linears: 1-row inputs padded to 4, 5 rows untouched
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert tuple(taller.shape) == (5, 1, 8, 8)


async def test_the_service_pads_linear_inputs_only_with_pad_batches(serve):
    def min_rows(app):
        model = app.state.service.registry.get("vae").model
        return {m.min_rows for m in model.modules() if isinstance(m, torch.nn.Linear)}

    async with serve() as (app, client):
        assert min_rows(app) == {4} and (await client.get("/config")).json()["linear_min_rows"] == 4
    async with serve(pad_batches=False) as (app, _client):
        assert min_rows(app) == {1}
    async with serve(linear_min_rows=1) as (app, _client):
        assert min_rows(app) == {1}


async def test_prior_samples_are_float_identical_alone_and_in_a_shared_pass(serve):
    """Below the PNG's 8 bits: the batcher's float images for each request equal its images alone."""
    async with serve(max_batch_size=8, max_wait_ms=2000) as (app, _client):
        op = next(o for o in app_operations.operations(app.state.service.registry.get("vqvae")) if o.key.prior == "gated")
        batcher = app.state.service.batchers[op.key]
        requests = [op.example(n, torch.Generator().manual_seed(n)) for n in (1, 2, 5)]
        together = await asyncio.gather(*(batcher.submit(*inputs) for inputs in requests))
        assert batcher.stats.batches == 1  # the three shared one pass of 8
        alone = [batcher._forward(inputs, len(inputs[0])) for inputs in requests]  # a lone request's pass
    assert all(torch.equal(a[0], b[0]) for a, b in zip(together, alone))


async def test_an_express_pass_does_not_wait_for_a_compute_turn():
    # With every compute slot held by another model, an express pass (a small request beside its own
    # model's busy pass) would wait for a turn behind its own model's pass (same group): it needs none.
    from app.scheduling import ComputeScheduler

    scheduler, gate, started = ComputeScheduler(1), threading.Event(), threading.Event()

    def fn(x):
        if x.shape[0] > 2:
            started.set()
            assert gate.wait(20), "test gate never opened"
        return (x,)

    with ThreadPoolExecutor(max_workers=2) as pool:
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, express_items=2, scheduler=scheduler)
        batcher.start()
        large = asyncio.ensure_future(batcher.submit(torch.zeros(8, 1)))  # holds the only slot
        assert await asyncio.to_thread(started.wait, 5)
        small = await asyncio.wait_for(batcher.submit(torch.ones(1, 1)), 10)
        assert torch.equal(small[0], torch.ones(1, 1)) and not large.done()
        gate.set()
        await large
        await batcher.stop()


# --- lone passes: every core for a pass that computes alone (app/scheduling.py) -------------------


def test_the_thread_check_keeps_the_sizes_whose_rows_do_not_change_with_the_thread_count():
    # A stand-in for a kernel that rounds by thread count at some sizes: rows of a pass of 4 or more
    # get 1e-7 per thread. The check runs in the calling thread (1 thread) and in the lone one (2).
    def fn(x):
        return (x + (1e-7 * torch.get_num_threads() if x.shape[0] >= 4 else 0.0),)

    def example(n, g):
        return (torch.rand(n, 3, generator=g),)

    with (
        ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(1,)) as pool,
        ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(2,)) as lone,
    ):
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8)
        assert pool.submit(batcher.check_threads, example, [1, 2, 4, 8]).result() == ()  # no lone thread: none
        batcher.lone_executor = lone
        assert pool.submit(batcher.check_threads, example, [1, 2, 4, 8]).result() == (1, 2)
        assert pool.submit(batcher.check_threads, example, []).result() == ()


def test_the_thread_check_compares_the_probe_where_there_is_one():
    # An operation with a discrete step: its outputs agree at both thread counts, but what precedes
    # the step does not at 4 rows and more, so a later step could differ: those sizes are refused.
    def fn(x):
        return (x.round(),)

    def probe(x):
        return (x.round(), x + (1e-7 * torch.get_num_threads() if x.shape[0] >= 4 else 0.0))

    def example(n, g):
        return (torch.rand(n, 3, generator=g),)

    with (
        ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(1,)) as pool,
        ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(2,)) as lone,
    ):
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, lone_executor=lone)
        assert pool.submit(batcher.check_threads, example, [1, 2, 4, 8]).result() == (1, 2, 4, 8)  # fn alone: all
        assert pool.submit(batcher.check_threads, example, [1, 2, 4, 8], probe).result() == (1, 2)


async def test_a_small_request_runs_beside_a_chunk_of_a_large_one_even_with_small_passes():
    # max_batch_size no larger than express_items: every chunk is small, but the request it belongs
    # to is not, so a one-item request still gets an express pass beside it.
    gate, passes = threading.Event(), []

    def fn(x):
        passes.append(x.shape[0])
        if x[0, 0] < 0:
            assert gate.wait(20), "test gate never opened"
        return (x,)

    with ThreadPoolExecutor(max_workers=2) as pool:
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=4, express_items=4)
        batcher.start()
        large = asyncio.ensure_future(batcher.submit(torch.full((12, 1), -1.0)))  # three chunks of 4
        while not passes:
            await asyncio.sleep(0.005)
        small = await asyncio.wait_for(batcher.submit(torch.ones(1, 1)), 10)
        assert torch.equal(small[0], torch.ones(1, 1)) and not large.done()
        gate.set()
        await large
        await batcher.stop()
    assert passes[:2] == [4, 1]


async def test_a_lone_pass_runs_in_the_lone_thread_and_a_pass_beside_another_in_its_own():
    from app.scheduling import ComputeScheduler

    seen, gate = [], threading.Event()

    def fn(x):
        seen.append((x.shape[0], threading.current_thread().name.split("_")[0]))
        time.sleep(0.003)  # longer than the scheduler's short_s: every pass takes a turn
        if x[0, 0] < 0:  # the holder: keeps its slot until the gate opens
            assert gate.wait(20), "test gate never opened"
        return (x,)

    scheduler = ComputeScheduler(2)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="own") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="other") as other_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lone") as lone,
    ):
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, buckets=(4, 8), scheduler=scheduler,
                          lone_executor=lone, lone_sizes=(8,), lone_max_s=1.0)
        other = Batcher(name="other", fn=fn, executor=other_pool, max_batch_size=8, scheduler=scheduler)
        batcher.start()
        other.start()
        await batcher.submit(torch.zeros(3, 1))  # a pass of 4: not a lone size
        await batcher.submit(torch.zeros(8, 1))  # the first of its size: no time estimate yet
        await batcher.submit(torch.zeros(8, 1))  # alone, a lone size, expected within lone_max_s
        assert seen == [(4, "own"), (8, "own"), (8, "lone")]
        holding = asyncio.ensure_future(other.submit(torch.full((1, 1), -1.0)))
        while len(seen) < 4:
            await asyncio.sleep(0.005)
        await batcher.submit(torch.zeros(8, 1))  # another pass computes: one slot, its own thread
        assert seen[-1] == (8, "own")
        gate.set()
        await holding
        batcher.lone_max_s = 0.0  # not expected to be that short: it stays in its own thread
        await batcher.submit(torch.zeros(8, 1))
        assert seen[-1] == (8, "own")
        await batcher.stop()
        await other.stop()


def test_a_pinned_thread_count_survives_counts_set_by_other_threads():
    # torch resets a thread's count at its first use to the count last set by any thread; pinning
    # spends that reset first, so a model thread keeps its count whatever the lone thread sets later.
    def later_use():
        torch.ones(1 << 16).sum()
        return torch.get_num_threads()

    with ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(1,)) as pool:
        pool.submit(lambda: None).result()
        with ThreadPoolExecutor(max_workers=1, initializer=pin_torch_threads, initargs=(2,)) as lone:
            assert lone.submit(later_use).result() == 2
            assert pool.submit(later_use).result() == 1


async def test_a_pass_with_requests_queued_behind_it_does_not_go_alone():
    # Under load the other cores serve HTTP and encode answers: only a pass that leaves nothing
    # queued for the next one takes them.
    from app.scheduling import ComputeScheduler

    seen, gate = [], threading.Event()

    def fn(x):
        seen.append((x.shape[0], threading.current_thread().name.split("_")[0]))
        time.sleep(0.003)
        if x[0, 0] < 0:
            assert gate.wait(20), "test gate never opened"
        return (x,)

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="own") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lone") as lone,
    ):
        batcher = Batcher(name="test", fn=fn, executor=pool, max_batch_size=8, buckets=(4, 8),
                          scheduler=ComputeScheduler(2), lone_executor=lone, lone_sizes=(8,), lone_max_s=1.0)
        batcher.start()
        await batcher.submit(torch.zeros(8, 1))  # a time estimate for passes of 8
        blocked = asyncio.ensure_future(batcher.submit(torch.full((3, 1), -1.0)))  # a pass of 4 that waits
        while len(seen) < 2:
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(batcher.submit(torch.zeros(8, 1))) for _ in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocked, *queued)
        await batcher.stop()
    assert seen == [(8, "own"), (4, "own"), (8, "own"), (8, "lone")]  # the first of the two had one behind it
