"""app/ray_serve.py on a real local Ray cluster (2 CPUs): two replicas behind Ray's HTTP proxy serve
every endpoint with the standalone app's bytes, a replica killed under load costs only retryable
503s, autoscaling on ongoing requests goes 1 -> 2 -> 1 without losing a request, a replica whose
start-up fails is never routed to, and deploy/ray/serve.yaml builds the application.

One cluster for the module (about a minute on 2 cores); skipped where ray is not installed.
Run: .venv/bin/python -m pytest tests/deploy/test_ray_serve.py -m slow
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from app.ray_serve import REPLICA_HEADER, GenServe, build, shutdown_options
from app.settings import Settings
from tests.app.conftest import image_bytes, make_settings, started, write_weights
from tests.app.test_drain import free_port

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
              # a short look-back, below the 10 s default of AutoscalingConfig's deprecated metrics_interval_s
              pytest.mark.filterwarnings("ignore:`look_back_period_s`.*must be greater than `metrics_interval_s`:FutureWarning")]

REPO = Path(__file__).resolve().parents[2]
APP = "genserve"
REPLICA_CPUS = 0.5  # two replicas here and up to two of the autoscaled app fit the cluster's 2 CPUs
A, B = image_bytes(seed=1), image_bytes("PNG", "RGB", (20, 20), seed=2)

# name -> (method, path, httpx keyword arguments): every endpoint of the README's table but /metrics
# (each replica counts its own) and /config (below: the replica's own threads differ)
REQUESTS = {
    "health": ("GET", "/health", {}),
    "ready": ("GET", "/ready", {}),
    "models": ("GET", "/models", {}),
    "sample vae": ("GET", "/sample", {"params": {"model": "vae", "n": 4, "seed": 1}}),
    "sample prior": ("GET", "/sample", {"params": {"model": "vqvae", "prior": "gated", "label": 1, "n": 4, "seed": 2}}),
    "sample autoregressive": ("GET", "/sample", {"params": {"model": "vae_rgb", "n": 3, "seed": 3}}),
    "reconstruct": ("POST", "/reconstruct", {"params": {"model": "vae_rgb"}, "files": [("file", ("a.png", A)), ("file", ("b.png", B))]}),
    "encode": ("POST", "/encode", {"params": {"model": "vqvae"}, "files": [("file", ("a.png", A)), ("file", ("b.png", B))]}),
    "decode": ("POST", "/decode", {"json": {"model": "vae", "z": [[0.1, -0.2, 0.3, 0.0], [1.0, 0.5, -1.5, 2.0]]}}),
    "interpolate": ("POST", "/interpolate", {"params": {"model": "vae", "steps": 4, "method": "slerp"},
                                             "files": [("a", ("a.png", A)), ("b", ("b.png", B))]}),
}
# the request the load tests repeat: an autoregressive decoder, a pass of tens of milliseconds here
LOAD = {"model": "vae_rgb", "n": 8}


def comparable(name: str, r: httpx.Response) -> bytes | object:
    """What must be equal between any two servers: the bytes, but for /models' `loaded_at` times
    (of its models and their priors)."""

    def without_times(value: object) -> object:
        if isinstance(value, dict):
            return {k: without_times(v) for k, v in value.items() if k != "loaded_at"}
        if isinstance(value, list):
            return [without_times(v) for v in value]
        return value

    return without_times(r.json()) if name == "models" else r.content


def replica_states(app: str) -> Counter:
    return Counter(serve.status().applications[app].deployments[GenServe.name].replica_states)


def live_replicas(app: str) -> set[str]:
    """The actor names (what X-Genserve-Replica says) of the app's live replicas."""
    prefix = f"SERVE_REPLICA::{app}#{GenServe.name}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


async def until(condition, timeout_s: float, what: str, period_s: float = 0.25) -> None:
    """Poll `condition` (a quick blocking call: serve.status) until it holds, the event loop running between."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(period_s)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def overrides(weights: Path) -> dict:
    """The replicas' settings: the tests' (tests/app/conftest.py) and a short drain delay."""
    return {**make_settings(weights).model_dump(mode="json", exclude_unset=True), "drain_delay_s": 0.5}


@pytest.fixture(scope="module")
def base_url(overrides: dict):
    """A local Ray cluster with Serve on a free port and the app in two replicas; its URL."""
    with pytest.MonkeyPatch.context() as env:  # read by the processes ray.init starts
        env.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "app.ray_serve:proxy_middlewares")
        env.setenv("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.2")  # default 10 s
        env.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.2")
        env.setenv("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = shutdown_options(Settings(**overrides))
        app = GenServe.options(num_replicas=2, ray_actor_options={"num_cpus": REPLICA_CPUS}, **options).bind(overrides)
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def standalone(weights: Path) -> dict[str, httpx.Response]:
    """The standalone app's answers (in process, the same settings) to REQUESTS and to LOAD's seeds."""
    async with started(weights) as (_app, client):
        answers = {name: await client.request(method, path, **kw) for name, (method, path, kw) in REQUESTS.items()}
        for seed in range(4):
            answers[f"load {seed}"] = await client.get("/sample", params={**LOAD, "seed": seed})
    assert all(r.status_code == 200 for r in answers.values())
    return answers


@pytest_asyncio.fixture(loop_scope="module")
async def client(base_url: str):
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


async def test_two_replicas_answer_every_endpoint_as_the_standalone_app(client, standalone):
    for name, (method, path, kw) in REQUESTS.items():
        by_replica: dict[str, object] = {}
        for _ in range(40):  # until each replica has answered (Ray picks between idle replicas at random)
            r = await client.request(method, path, **kw)
            assert r.status_code == 200, (name, r.status_code, r.text)
            by_replica[r.headers[REPLICA_HEADER]] = comparable(name, r)
            if len(by_replica) == 2:
                break
        assert len(by_replica) == 2, f"{name}: one replica answered every time"
        for replica, content in by_replica.items():
            assert content == comparable(name, standalone[name]), f"{name}: {replica} differs from the standalone app"
        assert r.headers["content-type"] == standalone[name].headers["content-type"]
        assert "," not in r.headers["x-request-id"]  # one X-Request-ID: Ray's proxy echoes it, the app's copy is dropped


async def test_each_replica_takes_its_num_cpus_as_its_cores(client):
    configs = {}
    for _ in range(40):
        r = await client.get("/config")
        configs[r.headers[REPLICA_HEADER]] = r.json()
        if len(configs) == 2:
            break
    assert len(configs) == 2
    for config in configs.values():
        assert config["torch_threads"] == 1 and config["compute_slots"] == 1 and config["resolved_compute_slots"] == 1
        assert config["drain_delay_s"] == 0.5 and config["resolved_device"] == "cpu"


async def test_a_replica_killed_under_load_costs_only_retryable_503s(client, standalone):
    """20 clients send requests for 3 s; after 1 s one replica is killed. Each request gets its right
    bytes or a 503 with Retry-After (the client may retry); none hangs, none is wrong, none is a 500."""
    expected = {seed: standalone[f"load {seed}"].content for seed in range(4)}
    outcomes: list[tuple[int, bool, str]] = []  # (status, right bytes, replica)

    async def one_client(k: int) -> None:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            seed = k % 4
            r = await client.get("/sample", params={**LOAD, "seed": seed})
            outcomes.append((r.status_code, r.content == expected[seed], r.headers.get(REPLICA_HEADER, "")))
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "retry" in r.json()["detail"], r.text
            else:
                assert r.status_code == 200 and r.content == expected[seed], (r.status_code, r.text[:200])

    async def kill_one() -> str:
        await asyncio.sleep(1)
        name = (await client.get("/health")).headers[REPLICA_HEADER]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        return name

    *_, killed = await asyncio.wait_for(asyncio.gather(*(one_client(k) for k in range(20)), kill_one()), timeout=60)
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1, f"no request was in hand on the killed replica: {statuses}"
    assert statuses[200] > statuses[503], statuses
    # Ray starts a new replica in its place, and both serve
    await until(lambda: len(live_replicas(APP) - {killed}) == 2 and replica_states(APP) == Counter(RUNNING=2), 60,
                "a new replica")
    answered = set()
    for _ in range(40):
        r = await client.get("/sample", params={**LOAD, "seed": 0})
        assert r.status_code == 200 and r.content == expected[0]
        answered.add(r.headers[REPLICA_HEADER])
        if len(answered) == 2:
            break
    assert answered == live_replicas(APP) and killed not in answered


async def test_autoscaling_on_ongoing_requests_up_and_down_without_losing_a_request(base_url, overrides, standalone):
    """min 1, max 2, target 1 ongoing request: six clients scale it to 2 replicas; one client (1 ongoing
    request) keeps sending while it returns to 1, and every request of both phases gets its bytes."""
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                   "downscale_delay_s": 1,
                   "look_back_period_s": 0.5}
    app = GenServe.options(autoscaling_config=autoscaling, ray_actor_options={"num_cpus": REPLICA_CPUS},
                           **shutdown_options(Settings(**overrides))).bind(overrides)
    serve.run(app, name="autoscaled", route_prefix="/auto")
    assert replica_states("autoscaled") == Counter(RUNNING=1)
    expected = {seed: standalone[f"load {seed}"].content for seed in range(4)}
    outcomes: list[tuple[int, bool]] = []
    stop_heavy, stop_light = asyncio.Event(), asyncio.Event()

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async def one_client(k: int, stop: asyncio.Event) -> None:
            while not stop.is_set():
                r = await client.get("/auto/sample", params={**LOAD, "seed": k % 4})
                outcomes.append((r.status_code, r.content == expected[k % 4]))

        light = asyncio.ensure_future(one_client(0, stop_light))
        heavy = [asyncio.ensure_future(one_client(k, stop_heavy)) for k in range(1, 7)]
        try:
            await until(lambda: replica_states("autoscaled") == Counter(RUNNING=2), 60, "2 replicas")
            up = len(outcomes)
            stop_heavy.set()
            await asyncio.gather(*heavy)
            await until(lambda: replica_states("autoscaled") == Counter(RUNNING=1), 60, "back to 1")
            await asyncio.sleep(1)  # the light client goes on beside the one replica left
        finally:
            stop_heavy.set()
            stop_light.set()
            await asyncio.gather(light, *heavy)
    serve.delete("autoscaled")
    assert up > 0 and len(outcomes) > up
    assert Counter(outcomes) == Counter({(200, True): len(outcomes)}), Counter(outcomes)


async def test_a_replica_whose_start_up_fails_is_never_routed_to(base_url, overrides):
    """No weights directory: check_health raises what start-up raised, Ray counts each try as a failed
    start, and the deploy fails with the app's reason; the proxy answers 503 and routes nothing to it."""
    app = GenServe.options(name="broken", num_replicas=1, ray_actor_options={"num_cpus": REPLICA_CPUS}).bind(
        {**overrides, "weights_dir": "/nonexistent/weights"})
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(app, name="broken", route_prefix="/broken")
    deployment = serve.status().applications["broken"].deployments["broken"]
    assert deployment.status == "DEPLOY_FAILED"
    assert "weights directory '/nonexistent/weights' does not exist" in deployment.message
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        r = await client.get("/broken/health")
    assert r.status_code == 503 and "failed to deploy" in r.text and REPLICA_HEADER not in r.headers
    serve.delete("broken")


def test_the_config_file_builds_the_application(weights, monkeypatch):
    """deploy/ray/serve.yaml is a valid Serve config whose import path builds the app with the shutdown
    timing of its settings (no cluster needed: Ray runs `build` in the same way at deploy time)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "app.ray_serve:build" and application.route_prefix == "/"
    for name, value in application.runtime_env["env_vars"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GENSERVE_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("GENSERVE_DRAIN_DELAY_S", "2")
    monkeypatch.setenv("GENSERVE_GRACEFUL_TIMEOUT_S", "20")
    bound = build(application.args)
    deployment_config = bound._bound_deployment._deployment_config  # Ray has no public accessor for it
    assert deployment_config.graceful_shutdown_wait_loop_s == 2 and deployment_config.graceful_shutdown_timeout_s == 22
    (deployment,) = application.deployments
    assert deployment.name == GenServe.name
    with pytest.raises(ValueError, match="max_batch_size"):
        build({"settings": {"max_batch_size": 0}})
