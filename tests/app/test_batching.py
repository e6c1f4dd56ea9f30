"""The batcher alone and inside the app: shared batches, own answers, 503, 504, 500."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from app.batching import Batcher, BatchFailedError, QueueFullError
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


async def test_padding_gives_every_forward_pass_the_same_shape(executor):
    shapes = []
    batcher = make_batcher(executor, lambda x: (shapes.append(tuple(x.shape)), x + 1)[1], max_wait_s=0)
    batcher.start()
    (out,) = await batcher.submit(torch.zeros(1, 2))
    await batcher.stop()
    assert shapes == [(4, 2)] and torch.equal(out, torch.ones(1, 2))


async def test_a_wrong_output_count_fails_the_batch_and_the_worker_survives(executor):
    calls = []

    def fn(x):
        calls.append(1)
        return (x[:1],) if len(calls) == 1 else (x,)

    batcher = make_batcher(executor, fn, pad=False)
    batcher.start()
    with pytest.raises(BatchFailedError, match="Batch size mismatch"):
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


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), wait=st.sampled_from([0.0, 0.02]))
def test_batched_output_equals_per_item_output(executor, sizes, wait):
    """With padding, a VAE decode of a request is bit-identical whatever shares its batch."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(image_size=8, latent_dim=LATENT_DIM, hidden_dims=(16,))).eval()
    g = torch.Generator().manual_seed(sum(sizes))
    requests = [torch.randn(n, LATENT_DIM, generator=g) for n in sizes]

    batcher = make_batcher(executor, lambda z: (vae.sample(len(z), z=z),), max_batch_size=8, max_wait_s=wait)

    async def run():
        batcher.start()
        together = await asyncio.gather(*(batcher.submit(z) for z in requests))
        await batcher.stop()
        return together

    together = asyncio.run(run())
    alone = [batcher._forward([z[i : i + 1]], 1) for z in requests for i in range(len(z))]  # one item per pass
    flat = torch.cat([out for (out,) in together])
    assert torch.equal(flat, torch.cat([out for (out,) in alone]))


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
        stats = {k: app.state.service.batchers[k].stats for k in [("vae", "sample"), ("vqvae", "sample:gated")]}
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.content for r in responses] == solo
    assert len(set(solo)) == 20
    for s in stats.values():
        assert s.requests == 10 and s.items == 20 and s.batches == 1 and s.max_batch_items == 20


async def test_a_request_bigger_than_the_batch_is_chunked_and_equals_single_decodes(serve):
    async with serve(max_batch_size=8) as (app, client):
        r = await client.get("/sample", params={"model": "vae", "n": 19, "seed": 4, "temperature": 0.7},
                             headers={"Accept": "application/json"})
        stats = app.state.service.batchers[("vae", "sample")].stats
        assert (stats.batches, stats.items) == (3, 19)
        z = torch.randn(19, LATENT_DIM, generator=torch.Generator().manual_seed(4)) * 0.7  # the documented noise
        singles = [(await client.post("/decode", json={"model": "vae", "z": [row.tolist()]},
                                      headers={"Accept": "application/json"})).json()["images"][0] for row in z]
    assert r.json()["images"] == singles


async def test_a_full_queue_is_503_with_retry_after(serve):
    async with serve(max_batch_size=1, max_queue=2, max_wait_ms=0) as (app, client):
        batcher, entered, gate = block(app, ("vae", "sample"))
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
    async with serve(request_timeout_s=0.2) as (app, client):
        _batcher, _entered, gate = block(app, ("vae", "reconstruct"))
        try:
            r = await client.post("/reconstruct", params={"model": "vae"}, files=[("file", ("a", image_bytes()))])
            assert r.status_code == 504 and r.json()["detail"] == "request timed out after 0.2 s"
        finally:
            gate.set()
        assert (await client.post("/reconstruct", params={"model": "vae"}, files=[("file", ("a", image_bytes()))])).status_code == 200


async def test_a_failing_forward_pass_is_500_for_its_batch_and_the_next_request_succeeds(serve):
    async with serve(max_wait_ms=200, max_batch_size=4) as (app, client):
        batcher = app.state.service.batchers[("vae", "sample")]
        original = batcher.fn

        def boom(*inputs):
            batcher.fn = original
            raise RuntimeError("boom")

        batcher.fn = boom
        failed = await asyncio.gather(*(client.get("/sample", params={"model": "vae", "n": 2, "seed": s}) for s in range(2)))
        assert [r.status_code for r in failed] == [500, 500]
        assert failed[0].json()["detail"] == "inference failed in vae:sample: RuntimeError: boom"
        assert (await client.get("/sample", params={"model": "vae", "n": 2, "seed": 0})).status_code == 200
        assert batcher.stats.failed_batches == 1
        assert 'genserve_batch_failures_total{batcher="vae:sample"} 1.0' in (await client.get("/metrics")).text
