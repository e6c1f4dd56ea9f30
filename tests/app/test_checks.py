"""Ready before the pass size checks, with the same bytes (app/service.py, app/checks.py).

The service is ready once its models are loaded; each batcher pads every pass to max_batch_size
until its check has proven smaller sizes, or starts with the verdict an earlier start cached for the
same machine, code and file. A request served before the checks gets the bytes of one served after.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch

from app.batching import Batcher
from app.checks import VerdictCache, code_digest, file_digest, machine_key

from .conftest import image_bytes, started

SAMPLES = [  # (path, params) of seeded requests whose answers must not depend on the pass sizes
    ("/sample", {"model": "vae", "n": 3, "seed": 5}),
    ("/sample", {"model": "vae_rgb", "n": 2, "seed": 6}),
    ("/sample", {"model": "vqvae", "prior": "gated", "n": 3, "seed": 7, "label": 1}),
    ("/sample", {"model": "vqvae", "prior": "pixelcnnpp", "n": 1, "seed": 8}),
]


async def answers(client) -> list[bytes]:
    out = []
    for path, params in SAMPLES:
        r = await client.get(path, params=params)
        assert r.status_code == 200, r.text
        out.append(r.content)
    return out


@pytest.fixture
def held_checks(monkeypatch):
    """Every pass size check waits for the returned event before it runs."""
    release = threading.Event()
    real = Batcher.check_buckets

    def held(self, *args, **kwargs):
        assert release.wait(120), "the test never released the checks"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Batcher, "check_buckets", held)
    yield release
    release.set()


async def test_a_request_before_the_checks_gets_the_bytes_of_one_after(weights_dir, held_checks):
    async with started(weights_dir, checked=False) as (app, client):
        service = app.state.service
        config = (await client.get("/config")).json()
        assert set(config["pass_size_sources"].values()) == {"default"}
        assert set(map(tuple, config["pass_sizes"].values())) == {(8,)}  # every pass padded to max_batch_size
        before = await answers(client)
        assert (await client.get("/ready")).status_code == 200
        held_checks.set()
        await service.checks
        config = (await client.get("/config")).json()
        assert set(config["pass_size_sources"].values()) == {"checked"}
        assert any(len(sizes) > 1 for sizes in config["pass_sizes"].values())  # smaller sizes were proven
        after = await answers(client)
    assert before == after


async def test_a_second_start_takes_the_cached_verdicts(weights_dir, tmp_path):
    cache = tmp_path / "cache"
    async with started(weights_dir, check_cache_dir=cache) as (_app, client):
        first = (await client.get("/config")).json()
        first_answers = await answers(client)
    assert set(first["pass_size_sources"].values()) == {"checked"}
    stored = sorted(cache.glob("*.json"))
    threads_checked = sum(sizes is not None for sizes in first["lone_pass_sizes"].values())
    assert len(stored) == len(first["pass_sizes"]) + threads_checked  # and the thread checks
    async with started(weights_dir, check_cache_dir=cache, checked=False) as (app, client):
        second = (await client.get("/config")).json()
        assert app.state.service.checks is not None
        assert set(second["pass_size_sources"].values()) == {"cache"}  # nothing left to check
        assert second["pass_sizes"] == first["pass_sizes"]
        assert second["lone_pass_sizes"] == first["lone_pass_sizes"]
        assert await answers(client) == first_answers


async def test_passes_alone_with_every_core_give_the_bytes_of_passes_in_one_slot(weights_dir, monkeypatch):
    """Lone passes (app/scheduling.py) run only at the sizes whose rows their thread check found
    unchanged by the thread count, so every answer is the same with them on and off."""
    from app.service import usable_cores

    if usable_cores() < 2:
        pytest.skip("one core: no other slot's threads to take")
    async def more_answers(client) -> list[bytes]:  # and operations with no steps, which may go alone
        files = [("file", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in range(3)]
        out = []
        for model in ("vae", "vqvae"):
            params = {"model": model, **({"include_z_e": "true"} if model == "vqvae" else {})}  # floats, not just codes
            r = await client.post("/encode", params=params, files=files)
            assert r.status_code == 200, r.text
            out.append(r.content)
        return out

    went_alone = []
    real = Batcher._forward

    def recording(self, inputs, n, rows=None):
        if threading.current_thread().name.startswith("genserve-lone"):
            went_alone.append((self.name, torch.get_num_threads()))
        return real(self, inputs, n, rows)

    monkeypatch.setattr(Batcher, "_forward", recording)
    async with started(weights_dir, lone_pass_min_rows=2) as (app, client):
        config = (await client.get("/config")).json()
        app.state.service.scheduler.short_s = 0.0  # the tiny models' passes are shorter than its default
        on = [*await answers(client), *await more_answers(client), *await more_answers(client)]  # twice: a pass
        # with no steps goes alone only once its size has a time estimate
        with_steps = {str(key) for key, op in app.state.service.operations.items() if op.stoppable}
    assert config["resolved_lone_pass_threads"] >= 2
    assert any(config["lone_pass_sizes"].values())
    for name, lone in config["lone_pass_sizes"].items():
        assert set(lone or []) <= set(config["pass_sizes"][name])
        assert (lone is None) == (name in with_steps)  # a pass with steps never goes alone
    assert went_alone, config["lone_pass_sizes"]  # passes did go alone, with every core's threads
    assert {threads for _, threads in went_alone} == {config["resolved_lone_pass_threads"]}
    went_alone.clear()
    async with started(weights_dir, lone_passes=False) as (_app, client):
        config = (await client.get("/config")).json()
        off = [*await answers(client), *await more_answers(client), *await more_answers(client)]
    assert config["resolved_lone_pass_threads"] == 0 and set(config["lone_pass_sizes"].values()) == {None}
    assert went_alone == []
    assert on == off


async def test_a_cached_verdict_is_not_trusted_under_another_key(weights_dir, tmp_path):
    """Another max_batch_size is another key: the verdicts of max_batch_size=8 are not used for 4."""
    cache = tmp_path / "cache"
    async with started(weights_dir, check_cache_dir=cache):
        pass
    async with started(weights_dir, check_cache_dir=cache, max_batch_size=4, checked=False) as (_app, client):
        config = (await client.get("/config")).json()
    assert set(config["pass_size_sources"].values()) == {"default"}


async def test_without_padding_there_is_nothing_to_check(weights_dir):
    async with started(weights_dir, pad_batches=False) as (_app, client):
        config = (await client.get("/config")).json()
    assert set(config["pass_size_sources"].values()) == {"unpadded"}
    assert set(config["pass_sizes"].values()) == {None}


# --- the cache itself ---------------------------------------------------------------------------


def key(**changes) -> dict:
    base = {"operation": "vae:decode", "files": ["ab"], "code": code_digest(), "machine": machine_key(torch.device("cpu")),
            "torch_threads": 1, "max_batch_size": 8, "candidates": [1, 2, 4, 8], "linear_min_rows": 4,
            "precision": "fp32", "seed": 0}
    return {**base, **changes}


def test_the_cache_returns_a_verdict_only_for_an_equal_key(tmp_path):
    cache = VerdictCache(tmp_path)
    cache.put(key(), (2, 4, 8))
    assert cache.get(key()) == (2, 4, 8)
    for changed in (key(files=["cd"]), key(torch_threads=2), key(code="0" * 64), key(max_batch_size=4, candidates=[1, 2, 4]),
                    key(machine={**machine_key(torch.device("cpu")), "torch": "0.0"})):
        assert cache.get(changed) is None
    assert VerdictCache(None).get(key()) is None  # no directory: remembers nothing
    VerdictCache(None).put(key(), (8,))


def test_a_tampered_or_foreign_cache_file_is_not_trusted(tmp_path):
    cache = VerdictCache(tmp_path)
    cache.put(key(), (2, 4, 8))
    [path] = tmp_path.glob("*.json")
    stored = json.loads(path.read_text())
    for bad in ([1, 2, 3, 8], [8, 4], [2, 4], [], ["8"], "8", [2.0, 8], [16]):  # not candidates, unsorted, no max...
        path.write_text(json.dumps({**stored, "pass_sizes": bad}))
        assert cache.get(key()) is None, bad
    path.write_text(json.dumps({**stored, "key": key(files=["other"])}))  # a file under another key's name
    assert cache.get(key()) is None
    path.write_text(json.dumps({**stored, "format": 0}))
    assert cache.get(key()) is None
    path.write_text("{not json")
    assert cache.get(key()) is None


def test_an_unwritable_cache_costs_only_the_check(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = VerdictCache(blocker / "cache")  # below a file: cannot be created
    cache.put(key(), (8,))
    assert cache.get(key()) is None
    assert "cannot write" in caplog.text


def test_the_machine_key_holds_what_steers_the_kernels(monkeypatch):
    """ONEDNN_MAX_CPU_ISA changes oneDNN's kernels but not torch's CPU capability: it is in the key."""
    plain = machine_key(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    capped = machine_key(torch.device("cpu"))
    assert capped != plain and capped["env"] == {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    assert machine_key(torch.device("cpu")) == capped
    assert plain["backends"]["build"] and plain["backends"]["mkldnn"] in (True, False)


def test_the_machine_key_names_the_cpu_and_torch():
    k = machine_key(torch.device("cpu"))
    assert k["torch"] == torch.__version__ and k["device_type"] == "cpu"
    assert k["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists():
        assert k["cpu"].get("flags") or k["cpu"].get("Features")


def test_file_digest_is_sha256sum(tmp_path):
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


async def test_the_checks_share_the_cpu_through_the_scheduler(weights_dir, held_checks):
    """With a compute scheduler, the checks run as a group of their own (requests keep their share)."""
    async with started(weights_dir, checked=False, compute_slots=1) as (app, _client):
        service = app.state.service
        held_checks.set()
        await service.checks
        assert "pass size checks" in service.scheduler.virtual_times()
    await asyncio.sleep(0)


async def test_a_request_right_after_start_up_waits_for_its_models_first_pass(weights_dir, monkeypatch):
    """Warm-ups run after /ready: a request for a model whose first pass has not ended waits for it,
    and one whose first pass failed gets a 503 naming the problem, not a 500 from the model."""
    import app.service as service_module

    release = threading.Event()
    real = service_module.warm_up

    def slow(operation, device):
        if operation.key.model in ("vae", "vae_rgb"):
            assert release.wait(60)
            if operation.key.model == "vae_rgb":
                raise RuntimeError("cannot run")
        return real(operation, device)

    monkeypatch.setattr(service_module, "warm_up", slow)
    async with started(weights_dir, checked=False) as (app, client):
        assert (await client.get("/ready")).status_code == 200
        waiting = asyncio.ensure_future(client.get("/sample", params={"model": "vae", "seed": 1}))
        broken = asyncio.ensure_future(client.get("/sample", params={"model": "vae_rgb", "seed": 1}))
        await asyncio.sleep(0.2)
        assert not waiting.done() and not broken.done()
        release.set()
        assert (await waiting).status_code == 200
        r = await broken
        assert r.status_code == 503 and "failed its first pass" in r.json()["detail"]
        problems = (await client.get("/models/problems")).json()
        assert [p["file"] for p in problems] == ["vae_rgb.safetensors"] and "warming it up failed" in problems[0]["reason"]
