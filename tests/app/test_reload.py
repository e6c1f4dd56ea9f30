"""New weights while serving (Service.reload, app/registry.py): add, replace under load, remove, a
broken replacement, a VQ-VAE whose priors no longer fit, polling and SIGHUP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest
import torch

from models.io import save_model
from models.vae import VAE, VAEConfig
from models.vqvae import VQVAE

from .conftest import CLASS_NAMES, LATENT_DIM, started, tiny_vqvae
from .test_drain import server_process
from .test_startup import wait_for

SEEDED = {"model": "vae", "n": 4, "seed": 11}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def other_vae(path: Path, seed: int = 1) -> None:
    """A VAE of the same shape as conftest's "vae" with other weights (so other samples)."""
    torch.manual_seed(seed)
    save_model(path, VAE(VAEConfig(image_size=8, latent_dim=LATENT_DIM, hidden_dims=(16,))),
               name="vae", dataset="unit-test", command="pytest", metrics={"test_neg_elbo": 41.0}, class_names=CLASS_NAMES)


@pytest.fixture
def weights(weights_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "weights"
    shutil.copytree(weights_dir, d)
    return d


async def models(client) -> dict[str, dict]:
    r = await client.get("/models")
    assert r.status_code == 200
    return {m["name"]: m for m in r.json()}


async def test_models_show_each_files_digest_and_load_time(weights):
    async with started(weights) as (_app, c):
        listed = await models(c)
    for m in listed.values():
        assert m["sha256"] == sha256(weights / m["file"])
        assert m["loaded_at"].endswith("Z") and m["loaded_at"][:4].isdigit()
        for p in m.get("priors") or []:
            assert p["sha256"] == sha256(weights / p["file"]) and p["loaded_at"].endswith("Z")


async def test_a_file_added_is_served_and_one_removed_is_not(weights, tmp_path):
    aside = tmp_path / "vae_rgb.safetensors"
    shutil.move(weights / "vae_rgb.safetensors", aside)
    async with started(weights) as (app, client):
        service = app.state.service
        assert set(await models(client)) == {"vae", "vqvae"}
        assert await service.reload() is False  # nothing changed
        shutil.copy(aside, weights / "vae_rgb.safetensors")
        assert await service.reload() is True
        listed = await models(client)
        assert set(listed) == {"vae", "vae_rgb", "vqvae"} and listed["vae_rgb"]["sha256"] == sha256(aside)
        r = await client.get("/sample", params={"model": "vae_rgb", "seed": 3})
        assert r.status_code == 200
        assert "vae_rgb:sample" in (await client.get("/config")).json()["pass_sizes"]
        await service.checks  # the new model's checks run after it is served
        assert (await client.get("/config")).json()["pass_size_sources"]["vae_rgb:sample"] == "checked"

        (weights / "vae.safetensors").unlink()
        assert await service.reload() is True
        assert set(await models(client)) == {"vae_rgb", "vqvae"}
        r = await client.get("/sample", params={"model": "vae"})
        assert r.status_code == 404 and "unknown model 'vae'" in r.json()["detail"]
        assert "vae:sample" not in (await client.get("/config")).json()["pass_sizes"]
        metrics = (await client.get("/metrics")).text
        assert 'genserve_queue_items{batcher="vae_rgb:sample"}' in metrics and 'batcher="vae:sample"}' not in metrics.split("genserve_queue_items")[-1]


async def test_a_replacement_under_load_answers_every_request_with_one_version(weights, tmp_path):
    """Requests running while the file is replaced get the old version's bytes or the new one's,
    never an error and never a mixture; after the swap, the new version's."""
    replacement = tmp_path / "new" / "vae.safetensors"
    other_vae(replacement)
    async with started(replacement.parent) as (_app, client):
        new_bytes = (await client.get("/sample", params=SEEDED)).content
    async with started(weights) as (app, client):
        service = app.state.service
        old_bytes = (await client.get("/sample", params=SEEDED)).content
        assert old_bytes != new_bytes
        stop = asyncio.Event()
        seen: list[tuple[int, bytes]] = []

        async def load() -> None:
            while not stop.is_set():
                r = await client.get("/sample", params=SEEDED)
                seen.append((r.status_code, r.content))

        clients = [asyncio.create_task(load()) for _ in range(6)]
        while len(seen) < 12:
            await asyncio.sleep(0.01)
        shutil.copy(replacement, weights / "vae.tmp")
        os.replace(weights / "vae.tmp", weights / "vae.safetensors")  # as a deployment should: an atomic rename
        assert await service.reload() is True
        during = len(seen)
        while len(seen) < during + 12:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*clients)
        assert all(status == 200 for status, _ in seen), {status for status, _ in seen}
        assert {body for _, body in seen} <= {old_bytes, new_bytes}
        assert (await client.get("/sample", params=SEEDED)).content == new_bytes
        assert (await models(client))["vae"]["sha256"] == sha256(replacement)


async def wait_until(predicate, what: str, tries: int = 400) -> None:
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_an_old_version_stops_only_once_its_requests_have_ended(weights, tmp_path):
    """A request holding the old version (as find_model holds it) keeps its batchers; a request holding
    another model does not (one stuck client cannot pin every retired version)."""
    other_vae(tmp_path / "vae.safetensors")
    async with started(weights) as (app, client):
        service = app.state.service
        old, other = service.registry.entries["vae"], service.registry.entries["vae_rgb"]
        service.hold(old)  # a request that found `old` before the swap
        service.hold(other)  # and one stuck on another model
        shutil.copy(tmp_path / "vae.safetensors", weights / "vae.safetensors")
        assert await service.reload() is True
        assert service.registry.entries["vae"] is not old
        await asyncio.sleep(0.05)
        assert all(b.alive for b in old.batchers.values())  # still there for the request in hand
        x = torch.rand(1, 1, 8, 8)
        (images,) = await service.batcher(old, _op("reconstruct")).submit(x)  # and it still answers
        assert images.shape == (1, 1, 8, 8)
        service.release(old)
        await wait_until(lambda: not any(b.alive for b in old.batchers.values()), "the old version to stop")
        assert all(b.alive for b in service.registry.entries["vae"].batchers.values())
        service.release(other)


async def test_a_version_held_too_long_is_stopped_after_the_request_timeout(weights, tmp_path):
    other_vae(tmp_path / "vae.safetensors")
    async with started(weights, request_timeout_s=0.5) as (app, client):
        service = app.state.service
        old = service.registry.entries["vae"]
        service.hold(old)  # never released: a client that stopped reading its answer
        shutil.copy(tmp_path / "vae.safetensors", weights / "vae.safetensors")
        assert await service.reload() is True
        await wait_until(lambda: not any(b.alive for b in old.batchers.values()), "the held version to stop")
        assert not service._retiring


async def test_requests_hold_the_version_they_found_until_they_end(weights):
    """Through HTTP: while a request runs, the entry it found counts it (app/middleware.py, dependencies.py)."""
    async with started(weights) as (app, client):
        service = app.state.service
        entry = service.registry.entries["vae"]
        seen = []
        real = service.batcher

        def spy(e, op, prior=None):
            seen.append(e.holders)
            return real(e, op, prior)

        service.batcher = spy
        assert (await client.get("/sample", params=SEEDED)).status_code == 200
        assert seen == [1] and entry.holders == 0


async def test_a_file_changed_while_loading_at_start_up_is_picked_up(weights, tmp_path, monkeypatch):
    """The directory is scanned before the files are read, so a change during the load is seen later."""
    import app.registry as registry_module

    aside = tmp_path / "vae_rgb.safetensors"
    shutil.move(weights / "vae_rgb.safetensors", aside)
    real = registry_module.Registry.load.__func__
    added = []

    def load_then_add(cls, weights_dir, device, previous=None, progress=None):
        registry = real(cls, weights_dir, device, previous, progress)
        if not added:  # the first load, at start-up: a file arrives just after it
            shutil.copy(aside, weights / "vae_rgb.safetensors")
            added.append(True)
        return registry

    monkeypatch.setattr(registry_module.Registry, "load", classmethod(load_then_add))
    async with started(weights) as (app, client):
        assert "vae_rgb" not in await models(client)
        assert await app.state.service.reload() is True
        assert "vae_rgb" in await models(client)


async def test_a_rewrite_that_keeps_size_and_mtime_is_seen(weights, tmp_path):
    other_vae(tmp_path / "vae.safetensors")
    target = weights / "vae.safetensors"
    assert target.stat().st_size == (tmp_path / "vae.safetensors").stat().st_size
    async with started(weights) as (app, client):
        before = target.stat()
        target.write_bytes((tmp_path / "vae.safetensors").read_bytes())  # in place: same inode and size
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime restored, as cp -p does
        assert await app.state.service.reload() is True
        assert (await models(client))["vae"]["sha256"] == sha256(target)


async def test_stop_does_not_wait_for_the_checks_still_queued(weights, tmp_path, monkeypatch):
    """Checks queued behind others (a reload during the start-up checks) end with the service."""
    import threading

    from app.batching import Batcher

    release, ran = threading.Event(), []
    real = Batcher.check_buckets

    def held(self, *args, **kwargs):
        ran.append(self.name)
        release.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Batcher, "check_buckets", held)
    aside = tmp_path / "vae_rgb.safetensors"
    shutil.move(weights / "vae_rgb.safetensors", aside)
    async with started(weights, checked=False) as (app, client):
        service = app.state.service
        await wait_until(lambda: ran, "the first check")
        shutil.copy(aside, weights / "vae_rgb.safetensors")
        assert await service.reload() is True  # its checks queue behind the running ones
        checks = service.checks
        release.set()
    assert checks.done()
    assert len(ran) <= 2  # the one running when stop() came (15 batchers, and 4 more queued by the reload)


async def test_a_weights_directory_that_goes_away_keeps_the_models_and_logs_once(weights, caplog):
    caplog.set_level("INFO", logger="app.service")
    async with started(weights) as (app, client):
        service = app.state.service
        moved = weights.with_name("moved")
        weights.rename(moved)
        for _ in range(3):
            await service.reload_logged(force=True)
        assert set(await models(client)) == {"vae", "vae_rgb", "vqvae"}
        assert caplog.text.count("failed (FileNotFoundError") == 1
        moved.rename(weights)
        await service.reload_logged(force=True)
        assert "works again" in caplog.text


def fail_warm_up(monkeypatch, model: str) -> None:
    """Every first pass of `model`'s operations raises (a file whose config loads but cannot run)."""
    import app.service as service_module

    real = service_module.warm_up

    def failing(operation, device):
        if operation.key.model == model:
            raise RuntimeError("cannot run")
        return real(operation, device)

    monkeypatch.setattr(service_module, "warm_up", failing)


def _op(name: str):
    from app.operations import Op

    return Op(name)


async def test_a_broken_replacement_keeps_the_version_served(weights):
    async with started(weights) as (app, client):
        service = app.state.service
        before = (await client.get("/sample", params=SEEDED)).content
        digest = (await models(client))["vae"]["sha256"]
        (weights / "vae.safetensors").write_bytes(b"not a weight file")
        assert await service.reload() is False  # nothing served changed
        listed = await models(client)
        assert listed["vae"]["sha256"] == digest
        [problem] = (await client.get("/models/problems")).json()
        assert problem["file"] == "vae.safetensors" and "cannot load" in problem["reason"] and "still served" in problem["reason"]
        assert (await client.get("/sample", params=SEEDED)).content == before
        other_vae(weights / "vae.safetensors")  # fixed: served, and the problem is gone
        assert await service.reload() is True
        assert (await client.get("/models/problems")).json() == []
        assert (await client.get("/sample", params=SEEDED)).content != before


async def test_a_replacement_that_cannot_run_keeps_the_version_served(weights, tmp_path, monkeypatch):
    other_vae(tmp_path / "vae.safetensors")
    async with started(weights) as (app, client):
        service = app.state.service
        before = (await client.get("/sample", params=SEEDED)).content
        fail_warm_up(monkeypatch, "vae")
        shutil.copy(tmp_path / "vae.safetensors", weights / "vae.safetensors")
        await service.reload()
        [problem] = (await client.get("/models/problems")).json()
        assert problem["file"] == "vae.safetensors" and "warming it up failed" in problem["reason"]
        assert "still served" in problem["reason"]
        assert (await client.get("/sample", params=SEEDED)).content == before


async def test_a_new_vqvae_that_cannot_run_keeps_the_old_one_and_its_priors(weights, monkeypatch):
    """The old VQ-VAE keeps serving with its priors, and /models/problems does not call them refused."""
    async with started(weights) as (app, client):
        service = app.state.service
        fail_warm_up(monkeypatch, "vqvae")
        torch.manual_seed(3)
        save_model(weights / "vqvae.safetensors", tiny_vqvae(), name="vqvae", dataset="unit-test", command="pytest")
        await service.reload()
        listed = await models(client)
        assert sorted(p["name"] for p in listed["vqvae"]["priors"]) == ["gated", "pixelcnn", "pixelcnnpp"]
        problems = (await client.get("/models/problems")).json()
        assert [p["file"] for p in problems] == ["vqvae.safetensors"] and "still served" in problems[0]["reason"]
        assert (await client.get("/sample", params={"model": "vqvae", "prior": "gated", "seed": 1, "label": 0})).status_code == 200


async def test_a_new_vqvae_codebook_refuses_the_priors_trained_on_the_old(weights):
    async with started(weights) as (app, client):
        service = app.state.service
        torch.manual_seed(3)
        vq: VQVAE = tiny_vqvae()
        save_model(weights / "vqvae.safetensors", vq, name="vqvae", dataset="unit-test", command="pytest")
        assert await service.reload() is True
        listed = await models(client)
        assert listed["vqvae"]["priors"] == [] and listed["vqvae"]["sha256"] == sha256(weights / "vqvae.safetensors")
        problems = {p["file"]: p["reason"] for p in (await client.get("/models/problems")).json()}
        assert set(problems) == {"pixelcnn.safetensors", "gated.safetensors", "pixelcnnpp.safetensors"}
        assert all("codebook digest" in reason for reason in problems.values())
        r = await client.get("/sample", params={"model": "vqvae", "prior": "gated"})
        assert r.status_code == 404 and "no prior is loaded" in r.json()["detail"]


async def test_the_directory_is_polled(weights, tmp_path):
    aside = tmp_path / "vae_rgb.safetensors"
    shutil.move(weights / "vae_rgb.safetensors", aside)
    async with started(weights, reload_interval_s=0.05) as (_app, client):
        shutil.copy(aside, weights / "vae_rgb.safetensors")
        for _ in range(400):
            if "vae_rgb" in await models(client):
                break
            await asyncio.sleep(0.05)
        assert "vae_rgb" in await models(client)


def test_a_sighup_while_starting_is_kept_for_when_the_service_is_ready(tmp_path: Path, weights_dir: Path) -> None:
    """Between the bind and the app's own handler, SIGHUP's default action would end the process;
    a SIGHUP before the service is ready rescans once it is."""
    d = tmp_path / "weights"
    d.mkdir()
    shutil.copy(weights_dir / "vae.safetensors", d)
    os.mkfifo(d / "zz_held.safetensors")  # the loader blocks on it until the test writes
    with server_process(tmp_path, d, wait_ready=False) as server:
        wait_for(lambda: httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200, "/health")
        server.proc.send_signal(signal.SIGHUP)  # during the load
        shutil.copy(weights_dir / "vae_rgb.safetensors", d)  # after the scan: the load does not see it
        # release the loader (a writer opens the FIFO), and take the FIFO away before the rescan reads it
        fd = os.open(d / "zz_held.safetensors", os.O_WRONLY)
        os.unlink(d / "zz_held.safetensors")
        os.close(fd)
        def both_served() -> bool:
            assert server.proc.poll() is None, server.logs()
            r = httpx.get(f"{server.base_url}/models", timeout=5)
            return r.status_code == 200 and len(r.json()) == 2

        wait_for(both_served, "the rescan")
        assert sorted(m["name"] for m in httpx.get(f"{server.base_url}/models").json()) == ["vae", "vae_rgb"]
        assert "rescanned once start-up has finished" in server.logs()


def test_sighup_rescans_at_once(tmp_path: Path, weights_dir: Path) -> None:
    d = tmp_path / "weights"
    d.mkdir()
    shutil.copy(weights_dir / "vae.safetensors", d)
    with server_process(tmp_path, d) as server:  # polling is off (reload_interval_s=0)
        assert [m["name"] for m in httpx.get(f"{server.base_url}/models").json()] == ["vae"]
        shutil.copy(weights_dir / "vae_rgb.safetensors", d)
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(httpx.get(f"{server.base_url}/models").json()) == 2, "the rescan")
        assert sorted(m["name"] for m in httpx.get(f"{server.base_url}/models").json()) == ["vae", "vae_rgb"]
        assert server.proc.poll() is None
