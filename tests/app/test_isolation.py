"""No request can hurt another: cancellation, supervision, request ids, bounded labels, strict input.

Every ordering here is made by events and gates, never by a timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.batching import Batcher, check_wanted
from app.errors import BatchFailedError
from app.operations import Op, OpKey
from tests.app.conftest import LATENT_DIM, image_bytes
from tests.app.test_batching import block, executor, make_batcher  # noqa: F401 (executor is a fixture)

# One app for the module's questions (tests that need other settings start their own with `serve`): the
# async tests run in the module's event loop, that of `module_app` (the mark's warning on sync tests is moot)
pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]


@pytest.fixture
def client(module_app):
    return module_app[1]


# -- cancellation --------------------------------------------------------------------------------


async def test_a_running_pass_stops_between_steps_when_nobody_waits(executor):  # noqa: F811
    entered, gate = threading.Event(), threading.Event()
    steps = []

    def fn(x):
        entered.set()
        assert gate.wait(10)
        for step in range(100):  # a multi-step pass, like a prior's draws
            check_wanted()
            steps.append(step)
        return (x,)

    batcher = make_batcher(executor, fn)
    batcher.start()
    request = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
    assert await asyncio.to_thread(entered.wait, 5)
    request.cancel()  # the client went away while its pass runs
    with pytest.raises(asyncio.CancelledError):
        await request
    gate.set()
    (out,) = await batcher.submit(torch.ones(1, 1))  # the worker is free again, and alive
    await batcher.stop()
    assert torch.equal(out, torch.ones(1, 1))
    assert batcher.stats.abandoned == 1 and steps == list(range(100))  # the first pass stopped before its first step


def test_check_wanted_outside_a_pass_does_nothing():
    check_wanted()  # e.g. a model sampled offline, or the start-up check


async def test_a_client_that_disconnects_withdraws_its_queued_work_and_counts_as_499(serve):
    async with serve(express_items=0) as (app, client):  # the second request queues behind the blocked pass
        batcher, entered, gate = block(app, OpKey("vae", Op.SAMPLE))
        first = asyncio.ensure_future(client.get("/sample", params={"model": "vae", "n": 1, "seed": 1}))
        assert await asyncio.to_thread(entered.wait, 5)  # the worker holds the first request

        disconnect = asyncio.Event()
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/sample", "raw_path": b"/sample", "query_string": b"model=vae&n=3&seed=2", "root_path": "",
            "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80), "app": app,
        }
        gone = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(1000):
            if batcher.queued_items == 3:  # queued behind the blocked pass
                break
            await asyncio.sleep(0.01)
        assert batcher.queued_items == 3
        disconnect.set()
        await gone
        assert batcher.queued_items == 0 and sent == []  # withdrawn; nobody to answer
        gate.set()
        assert (await first).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'genserve_requests_total{endpoint="/sample",method="GET",status="499"} 1.0' in metrics
    assert batcher.stats.items == 1  # the withdrawn request was never computed


# -- supervision --------------------------------------------------------------------------------


async def test_a_fault_while_collecting_fails_only_the_batch_in_hand(executor, monkeypatch):  # noqa: F811
    batcher = make_batcher(executor, lambda x: (x,))
    original = batcher._collect
    faults = [RuntimeError("collect broke")]

    async def collect(batch):
        await original(batch)
        if faults:
            raise faults.pop()

    monkeypatch.setattr(batcher, "_collect", collect)
    batcher.start()
    with pytest.raises(BatchFailedError, match="failed collecting a batch: RuntimeError"):
        await batcher.submit(torch.zeros(1, 1))
    (out,) = await batcher.submit(torch.ones(1, 1))
    await batcher.stop()
    assert torch.equal(out, torch.ones(1, 1)) and batcher.stats.restarts == 0


async def test_a_fault_while_slicing_fails_only_its_request(executor, monkeypatch):  # noqa: F811
    batcher = make_batcher(executor, lambda x: (x,), max_wait_s=0.5)
    original = batcher._forward_entries

    def forward_entries(inputs, sizes, futures):
        if any(float(t[0][0, 0]) == 7.0 for t in inputs):
            raise IndexError("slicing broke")
        return original(inputs, sizes, futures)

    monkeypatch.setattr(batcher, "_forward_entries", forward_entries)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(torch.full((1, 1), v)) for v in (1.0, 7.0, 2.0)), return_exceptions=True)
    await batcher.stop()
    assert isinstance(results[1], BatchFailedError) and "IndexError" in results[1].detail
    assert [float(results[0][0]), float(results[2][0])] == [1.0, 2.0]


async def test_a_dead_worker_is_restarted_and_ready_is_503_until_then(serve, monkeypatch):
    async with serve() as (app, client):
        batcher: Batcher = app.state.service.batchers[OpKey("vae", Op.DECODE)]
        batcher.restart_delay_s = 0.5
        died = asyncio.Event()

        def broken_wait():  # the worker's wait for work raises: outside every try, so the task dies
            died.set()
            raise RuntimeError("the loop itself broke")

        waiting = batcher._wakeup
        monkeypatch.setattr(waiting, "wait", broken_wait)
        waiting.set()  # wake the idle worker: it finds nothing queued and waits again -> dies
        waiting.clear()
        await died.wait()
        await asyncio.sleep(0)  # let the task finish and its done callback run
        assert not batcher.alive and batcher.stats.restarts == 1
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["detail"] == "recovering"
        z = {"model": "vae", "z": [[0.1] * LATENT_DIM]}
        pending = asyncio.ensure_future(client.post("/decode", json=z))  # queued meanwhile, served after the restart
        monkeypatch.undo()  # the next worker's wait works
        await asyncio.wait_for(pending, 20)
        assert pending.result().status_code == 200 and batcher.alive
        assert (await client.get("/ready")).status_code == 200


# -- request ids, labels, strict input ----------------------------------------------------------


async def test_request_ids_are_echoed_or_made(client):
    r = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    made = (await client.get("/health")).headers["X-Request-ID"]
    bad = (await client.get("/health", headers={"X-Request-ID": "no spaces please"})).headers["X-Request-ID"]
    assert len(made) == 32 and len(bad) == 32 and made != bad and bad != "no spaces please"
    assert (await client.get("/nowhere", headers={"X-Request-ID": "x" * 129})).headers["X-Request-ID"] != "x" * 129


async def test_metric_labels_come_from_a_fixed_set(serve):
    async with serve() as (_app, client):  # its own app: the counts below start from zero
        for i in range(20):
            await client.request(f"M{i}", "/health")
            await client.get(f"/unknown/{i}")
        metrics = (await client.get("/metrics")).text
    lines = [line for line in metrics.splitlines() if line.startswith("genserve_requests_total{")]
    assert not any("M1" in line or "/unknown/" in line for line in lines)
    assert 'genserve_requests_total{endpoint="/health",method="other",status="405"} 20.0' in metrics
    assert 'genserve_requests_total{endpoint="unmatched",method="GET",status="404"} 20.0' in metrics


@pytest.mark.parametrize(
    "body, detail",
    [
        ({"model": "vqvae", "codes": [[[True] * 2] * 2]}, "valid integer"),
        ({"model": "vqvae", "codes": [[[1.0] * 2] * 2]}, "valid integer"),
        ({"model": "vae", "z": [[True] * LATENT_DIM]}, "valid number"),
        ({"model": "vae", "z": [["0.5"] * LATENT_DIM]}, "valid number"),
        ({"model": "vae", "z": [[0.5] * LATENT_DIM], "extra": 1}, "unknown field(s) 'extra'"),
        ({"model": 5, "z": [[0.5] * LATENT_DIM]}, "valid string"),
    ],
)
async def test_decode_is_strict_about_types(client, body, detail):
    r = await client.post("/decode", json=body)
    assert r.status_code == 422 and detail in str(r.json()["detail"])


async def test_a_json_body_over_max_json_bytes_is_413_before_parsing(serve):
    async with serve(max_json_bytes=1000) as (_app, client):
        r = await client.post("/decode", json={"model": "vae", "z": [[0.5] * LATENT_DIM] * 100})
        assert r.status_code == 413 and r.json()["detail"] == "request body exceeds 1000 bytes (max_json_bytes)"
        ok = await client.post("/decode", json={"model": "vae", "z": [[0.5] * LATENT_DIM] * 10})
        assert ok.status_code == 200  # uploads keep their own, larger limit:
        assert (await client.post("/reconstruct", params={"model": "vae"},
                                  files=[("file", ("a", image_bytes(size=(40, 40))))])).status_code == 200


async def test_the_lowest_temperature_samples_every_prior(client):
    for prior in ("pixelcnn", "gated", "pixelcnnpp"):
        r = await client.get("/sample", params={"model": "vqvae", "prior": prior, "n": 2, "seed": 0, "temperature": 1e-3})
        assert r.status_code == 200, r.text


async def test_an_answer_before_a_large_body_has_arrived_closes_the_connection(serve, monkeypatch):
    monkeypatch.setattr("app.middleware.LINGER_BYTES", 5000)
    async with serve(max_json_bytes=1000) as (_app, client):
        r = await client.post("/decode", content=b"[" * 6000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.headers["connection"] == "close"  # the server will not read on

        async def chunked():  # no Content-Length: its size is unknown
            for _ in range(5):
                yield b"[" * 2000

        r = await client.post("/decode", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.headers["connection"] == "close"
        small = await client.post("/decode", content=b"[" * 2000, headers={"content-type": "application/json"})
        assert small.status_code == 413 and "connection" not in small.headers  # the rest is read and dropped
        ok = await client.post("/decode", json={"model": "vae", "z": [[0.5] * LATENT_DIM]})
        assert ok.status_code == 200 and "connection" not in ok.headers  # read in full: keep-alive
        assert "connection" not in (await client.get("/health")).headers


# -- what a hostile review found ------------------------------------------------------------------


def multipart(parts: list[tuple[str, bytes]], boundary: str = "zz", close: bool = True) -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n\r\n'.encode() + data + b"\r\n"
        for name, data in parts
    )
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


@pytest.mark.parametrize("route, fields", [("/reconstruct", ["file"]), ("/encode", ["file", "file"]), ("/interpolate", ["a", "b"])])
async def test_a_truncated_upload_is_400_and_no_file_of_it_is_used(client, route, fields):
    full = multipart([(name, image_bytes(seed=i)) for i, name in enumerate(fields)])
    headers = {"content-type": "multipart/form-data; boundary=zz"}
    for body in (full[: len(full) - 40], multipart([(n, image_bytes(seed=i)) for i, n in enumerate(fields)], close=False)):
        r = await client.post(route, params={"model": "vae"}, content=body, headers=headers)
        assert r.status_code == 400 and "ends before its closing boundary" in r.json()["detail"], r.text
    assert (await client.post(route, params={"model": "vae"}, content=full, headers=headers)).status_code == 200


async def test_a_boundary_the_parser_refuses_is_422(client):
    boundary = "B" * 5000
    r = await client.post("/reconstruct", params={"model": "vae"}, content=multipart([("file", image_bytes())], boundary),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422 and "malformed multipart body" in r.json()["detail"]


async def test_the_json_limit_holds_whatever_content_type_is_claimed_and_a_422_echoes_little(serve):
    async with serve(max_json_bytes=1000) as (_app, client):
        r = await client.post("/decode", content=b"x" * 5000, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "max_json_bytes" in r.json()["detail"]
        r = await client.post("/decode", json={"model": "vae", "z": "y" * 900})
        assert r.status_code == 422 and len(r.text) < 1000 and "(902 characters)" in r.text


async def test_an_unhandled_error_is_a_json_500_with_the_request_id(serve, monkeypatch):
    async with serve() as (app, client):
        def broken(*args, **kwargs):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(app.state.service, "batcher", broken)
        r = await client.get("/sample", params={"model": "vae", "n": 1}, headers={"X-Request-ID": "boom-1"})
        assert r.status_code == 500 and r.headers["X-Request-ID"] == "boom-1"
        assert r.json() == {"detail": "internal error: the log has the details", "request_id": "boom-1"}
        assert (await client.get("/health")).status_code == 200  # and the server carries on


async def test_a_body_that_does_not_arrive_in_time_is_408(serve):
    async with serve(request_timeout_s=0.3) as (_app, client):
        never = asyncio.Event()

        async def trickle():
            yield b'{"model": "vae", '
            await never.wait()  # the rest never comes
            yield b"}"

        r = await client.post("/decode", content=trickle(), headers={"content-type": "application/json"})
        never.set()
        assert r.status_code == 408 and r.headers["connection"] == "close"
        assert r.json() == {"detail": "the request body did not arrive within 0.3 s"}


async def test_expect_continue_and_draining_close_the_connection(serve):
    async with serve(max_json_bytes=1000) as (app, client):
        r = await client.post("/decode", content=b"x" * 2000, headers={"content-type": "application/json", "expect": "100-continue"})
        assert r.status_code == 413 and r.headers["connection"] == "close"
        assert "connection" not in (await client.get("/health")).headers
        app.state.service.begin_drain()
        r = await client.get("/sample", params={"model": "vae", "n": 1, "seed": 0})
        assert r.status_code == 200 and r.headers["connection"] == "close"  # pooled clients move on
        assert (await client.get("/ready")).status_code == 503


async def test_a_decode_body_with_many_errors_gets_a_short_422(serve):
    # Validation stops at the first bad item of each list, and unknown fields are one error: the
    # answer names a few errors, not one per item (and costs milliseconds, not seconds, to write).
    bodies = [
        {"model": "vae", "z": [[""] * 300_000]},  # the review's body: 349,504 errors, 22.8 s of the event loop
        {"model": "vqvae", "codes": [[["x"] * 1000] * 100]},
        {"model": "vae", "z": [[0.5] * LATENT_DIM] * 50_000},  # over MAX_DECODE_ITEMS
        {f"k{i}": 0 for i in range(50_000)},  # 50,000 unknown fields
    ]
    async with serve(max_json_bytes=4 * 1024 * 1024) as (_app, client):
        for body in bodies:
            r = await client.post("/decode", json=body)
            errors = r.json()["detail"]
            assert r.status_code == 422 and 1 <= len(errors) <= 3 and len(r.content) < 2000, r.text[:500]


def test_a_422_lists_at_most_max_errors_and_says_how_many_more():
    from app.errors import MAX_ERRORS, validation_errors

    errors = [{"type": "float_type", "loc": ["body", "z", 0, i], "msg": "bad", "input": "x" * 1000} for i in range(25)]
    shown = validation_errors(errors)
    assert len(shown) == MAX_ERRORS + 1 and shown[-1]["msg"] == f"{25 - MAX_ERRORS} more error(s) not shown; fix these first"
    assert all(e["input"].endswith("... (1002 characters)") for e in shown[:-1])
    assert validation_errors([{"type": "t", "loc": [], "msg": "m", "input": list(range(10**6))}])[0]["input"].endswith(
        "(1000000 items)")
