"""The Kubernetes manifests (deploy/k8s) agree with the app and the image.

Each kustomization is rendered with `kubectl kustomize` (those tests skip where kubectl is missing)
and checked against what the app and the Dockerfile say: the probes hit GET routes of
`create_app()` on the port the service listens on, SIGKILL comes after the drain, the pod runs as
the image's user with a read-only root and an emptyDir wherever the service writes, the
autoscaler, the budget and the Service reach the pods, the GPU overlay asks for a GPU, and every
GENSERVE_* variable is a setting. Each check returns its problems; the last tests break a copy of
the manifests on purpose and expect the check to see it.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from starlette.routing import Match

from app.settings import Settings
from tests.deploy import dockerfile

K8S = dockerfile.ROOT / "deploy" / "k8s"
PREFIX = "GENSERVE_"
CONTAINER = "genserve"
# Where the service writes, beside the check cache (GENSERVE_CHECK_CACHE_DIR): tempfile's directory.
WRITTEN = ["/tmp"]
REQUIRED = {"base", "overlays/gpu", "overlays/queue-autoscaling"}

Doc = dict[str, Any]


def kustomizations() -> list[str]:
    """Every folder that `kubectl apply -k` can take (components are rendered through them)."""
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent.relative_to(K8S).as_posix())
    return found


DIRS = kustomizations()
DEPLOYMENTS = [d for d in DIRS if not d.startswith("examples/monitoring")]


def render(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    command = [kubectl, "kustomize", str(directory)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.lru_cache
def rendered(name: str) -> list[Doc]:
    return render(K8S / name)


# --- what the app says ---------------------------------------------------------------------------


@functools.lru_cache
def app_routes() -> list[Any]:
    from app.main import create_app  # imports torch: only for the tests that need it

    return list(create_app().routes)


def is_get_route(path: str) -> bool:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app_routes())


def default(setting: str) -> Any:
    return Settings.model_fields[setting].default


# --- reading the rendered objects ----------------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(docs: list[Doc]) -> Doc:
    found = of_kind(docs, "Deployment")
    assert len(found) == 1, f"expected one Deployment, got {len(found)}"
    return found[0]


def container(docs: list[Doc]) -> Doc:
    containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == CONTAINER]
    assert named, f"no container named {CONTAINER!r}"
    return named[0]


def environment(docs: list[Doc]) -> dict[str, str]:
    """What the service reads: the image's ENV, then the container's env."""
    env = {k: v for k, v in dockerfile.env().items() if k.startswith(PREFIX)}
    env.update({e["name"]: e.get("value") for e in container(docs).get("env", [])})
    return env


def setting(docs: list[Doc], name: str) -> str:
    """GENSERVE_<NAME> as the service sees it: env, image ENV, else the Settings default."""
    return str(environment(docs).get(PREFIX + name.upper(), default(name)))


def template_labels(docs: list[Doc]) -> dict[str, str]:
    return deployment(docs)["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(docs: list[Doc], port: int | str) -> int | None:
    """A probe's or Service's port (a number or a port name) as a containerPort number."""
    for p in container(docs).get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def security(docs: list[Doc], key: str) -> Any:
    """A security setting in effect: the container's, else the pod's."""
    pod = deployment(docs)["spec"]["template"]["spec"].get("securityContext", {})
    return container(docs).get("securityContext", {}).get(key, pod.get(key))


# --- the checks: each returns its problems -------------------------------------------------------


def check_probes(docs: list[Doc]) -> list[str]:
    problems = []
    # /health stays 200 while the models load and while draining; /ready is 503 then.
    expected = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        spec = container(docs).get(probe)
        if spec is None:
            problems.append(f"no {probe}")
            continue
        got = spec["httpGet"]["path"]
        if got != path:
            problems.append(f"{probe} on {got}, expected {path}")
        if not is_get_route(got):
            problems.append(f"{probe}: {got} is no GET route of create_app()")
    return problems


def check_ports(docs: list[Doc]) -> list[str]:
    problems = []
    port = int(setting(docs, "port"))
    if container_port(docs, port) is None:
        problems.append(f"GENSERVE_PORT={port} is no containerPort")
    if setting(docs, "host") not in ("0.0.0.0", "::"):
        problems.append(f"GENSERVE_HOST={setting(docs, 'host')} does not listen on the pod's address")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe_port = container(docs).get(probe, {}).get("httpGet", {}).get("port")
        if container_port(docs, probe_port) != port:
            problems.append(f"{probe} port {probe_port!r} is not GENSERVE_PORT={port}")
    for service in of_kind(docs, "Service"):
        for p in service["spec"]["ports"]:
            if container_port(docs, p.get("targetPort", p["port"])) != port:
                problems.append(f"Service port {p} does not reach GENSERVE_PORT={port}")
    annotations = deployment(docs)["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations and int(annotations["prometheus.io/port"]) != port:
        problems.append(f"prometheus.io/port {annotations['prometheus.io/port']} is not GENSERVE_PORT={port}")
    if "prometheus.io/path" in annotations and not is_get_route(annotations["prometheus.io/path"]):
        problems.append(f"prometheus.io/path {annotations['prometheus.io/path']} is no GET route")
    return problems


def check_shutdown(docs: list[Doc]) -> list[str]:
    problems = []
    names = {e["name"] for e in container(docs).get("env", [])}
    for name in ("GENSERVE_DRAIN_DELAY_S", "GENSERVE_GRACEFUL_TIMEOUT_S"):
        if name not in names:
            problems.append(f"{name} is not set in the manifest (the grace period depends on it)")
    drain = float(setting(docs, "drain_delay_s"))
    graceful = float(setting(docs, "graceful_timeout_s"))
    grace = deployment(docs)["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if not grace > drain + graceful:
        problems.append(f"terminationGracePeriodSeconds {grace} <= drain {drain} + graceful {graceful}")
    readiness = container(docs).get("readinessProbe", {})
    noticed = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    if noticed > drain:
        problems.append(f"the readiness probe notices a drain after {noticed} s, the drain lasts {drain} s")
    return problems


def check_security(docs: list[Doc]) -> list[str]:
    expected = {
        "runAsNonRoot": True,
        "runAsUser": dockerfile.service_uid(),
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    problems = [f"{k} is {security(docs, k)!r}, expected {v!r}" for k, v in expected.items() if security(docs, k) != v]
    if "ALL" not in (security(docs, "capabilities") or {}).get("drop", []):
        problems.append("capabilities do not drop ALL")
    return problems


def check_writable(docs: list[Doc]) -> list[str]:
    """Every path the service writes lies on a writable emptyDir (the root filesystem is read-only)."""
    cache = environment(docs).get(PREFIX + "CHECK_CACHE_DIR")
    problems = [] if cache else ["GENSERVE_CHECK_CACHE_DIR is set neither in the manifest nor in the image"]
    if cache and cache.strip().lower() in ("none", "off"):  # the cache turned off: nothing written
        cache = None
    volumes = {v["name"]: v for v in deployment(docs)["spec"]["template"]["spec"].get("volumes", [])}
    mounts = container(docs).get("volumeMounts", [])
    for path in WRITTEN + ([cache] if cache else []):
        under = [m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"])]
        if not under:
            problems.append(f"{path} is on the read-only root filesystem")
            continue
        mount = max(under, key=lambda m: len(m["mountPath"]))  # the innermost mount holds the path
        if "emptyDir" not in volumes.get(mount["name"], {}):
            problems.append(f"{path} is on volume {mount['name']!r}, not an emptyDir")
        if mount.get("readOnly"):
            problems.append(f"{path} is mounted read-only")
    return problems


def check_autoscaler(docs: list[Doc]) -> list[str]:
    problems = []
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if len(hpas) != 1:
        return [f"expected one HorizontalPodAutoscaler, got {len(hpas)}"]
    hpa, target = hpas[0], deployment(docs)
    ref = hpa["spec"]["scaleTargetRef"]
    if (hpa["apiVersion"], ref["kind"], ref["name"]) != ("autoscaling/v2", "Deployment", target["metadata"]["name"]):
        problems.append(f"{hpa['apiVersion']} scales {ref}, not Deployment {target['metadata']['name']}")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("minReplicas < 2: one replica cannot drain without an outage")
    if not hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds"):
        problems.append("no scale-down stabilization window")
    if "replicas" in target["spec"]:
        problems.append("the Deployment sets replicas, which every apply would reset under the HPA")
    requests = container(docs).get("resources", {}).get("requests", {})
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource" and metric["resource"]["name"] not in requests:
            problems.append(f"utilization of {metric['resource']['name']} without a request for it")
    return problems


def check_selectors(docs: list[Doc]) -> list[str]:
    labels, spec = template_labels(docs), deployment(docs)["spec"]
    problems = [] if selects(spec["selector"].get("matchLabels"), labels) else ["the Deployment's selector"]
    for service in of_kind(docs, "Service"):
        if not selects(service["spec"].get("selector"), labels):
            problems.append(f"Service {service['metadata']['name']}")
    budgets = of_kind(docs, "PodDisruptionBudget")
    if len(budgets) != 1:
        problems.append(f"expected one PodDisruptionBudget, got {len(budgets)}")
    for budget in budgets:
        if not selects(budget["spec"].get("selector", {}).get("matchLabels"), labels):
            problems.append(f"PodDisruptionBudget {budget['metadata']['name']}")
    for spread in spec["template"]["spec"].get("topologySpreadConstraints", []):
        if not selects(spread["labelSelector"].get("matchLabels"), labels):
            problems.append(f"topologySpreadConstraint on {spread['topologyKey']}")
    return [f"{p} does not select the pod template's labels {labels}" for p in problems]


def check_device(docs: list[Doc], gpu: bool) -> list[str]:
    problems = []
    device = setting(docs, "device")
    gpus = container(docs).get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    tolerations = deployment(docs)["spec"]["template"]["spec"].get("tolerations", [])
    # effect None tolerates every effect, NoSchedule included
    tolerated = any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in ("NoSchedule", None) for t in tolerations)
    if gpu:
        problems += [] if device == "cuda" else [f"GENSERVE_DEVICE={device}, expected cuda"]
        problems += [] if str(gpus) == "1" else [f"nvidia.com/gpu limit {gpus!r}, expected 1"]
        problems += [] if tolerated else ["no toleration for the nvidia.com/gpu NoSchedule taint"]
    else:
        problems += [] if device == "cpu" else [f"GENSERVE_DEVICE={device}, expected cpu"]
        problems += [] if gpus is None else [f"a CPU deployment asks for nvidia.com/gpu {gpus}"]
    return problems


def check_settings(docs: list[Doc]) -> list[str]:
    fields = {name.lower() for name in Settings.model_fields}
    names = [e["name"] for e in container(docs).get("env", []) if e["name"].upper().startswith(PREFIX)]
    return [f"{n} is no field of app.settings.Settings" for n in names if n[len(PREFIX):].lower() not in fields]


def check_service_links(docs: list[Doc]) -> list[str]:
    # With service links on, the Service "genserve" would put GENSERVE_PORT=tcp://... and
    # GENSERVE_SERVICE_HOST into the pods' environment, where the settings are read from.
    links = deployment(docs)["spec"]["template"]["spec"].get("enableServiceLinks", True)
    return ["enableServiceLinks is not false"] if links else []


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "probes": check_probes,
    "ports": check_ports,
    "shutdown": check_shutdown,
    "security": check_security,
    "writable": check_writable,
    "autoscaler": check_autoscaler,
    "selectors": check_selectors,
    "settings": check_settings,
    "service_links": check_service_links,
}


def checks_for(name: str) -> dict[str, Callable[[list[Doc]], list[str]]]:
    """The checks of one kustomization: its device is a GPU where its folder says so."""
    return {**CHECKS, "device": functools.partial(check_device, gpu="gpu" in name)}


# --- the tests -----------------------------------------------------------------------------------


def test_every_overlay_is_found() -> None:
    assert REQUIRED <= set(DIRS), f"missing kustomizations: {REQUIRED - set(DIRS)}"


@pytest.mark.parametrize("name", DIRS)
def test_renders(name: str) -> None:
    docs = rendered(name)
    assert docs, f"{name} renders nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys() and doc["metadata"].get("name"), doc


@pytest.mark.parametrize("check", [*CHECKS, "device"])
@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_manifests_agree_with_the_app(name: str, check: str) -> None:
    assert checks_for(name)[check](rendered(name)) == []


@pytest.mark.parametrize("name", [d for d in DEPLOYMENTS if "queue" in d])
def test_queue_autoscaling_metric_is_exported_and_served(name: str) -> None:
    """The HPA's Pods metric is one the app exports and one the adapter example serves."""
    from app.metrics import Metrics

    exported = {family.name for family in Metrics().registry.collect()}
    adapter = yaml.safe_load(of_kind(rendered("examples/monitoring"), "ConfigMap")[0]["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    (hpa,) = of_kind(rendered(name), "HorizontalPodAutoscaler")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics, "no Pods metric in the queue autoscaler"
    for metric in pods_metrics:
        assert metric in served, f"prometheus-adapter example serves {served}, not {metric}"
        assert metric in exported, f"/metrics exports no {metric}"
    for rule in adapter["rules"]:
        assert rule["seriesQuery"].split("{")[0] in exported, f"{rule['seriesQuery']} names no metric of /metrics"


def test_servicemonitor_scrapes_the_service() -> None:
    (monitor,) = of_kind(rendered("examples/monitoring"), "ServiceMonitor")
    (service,) = of_kind(rendered("base"), "Service")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert is_get_route(endpoint["path"])


# --- a broken copy must fail ---------------------------------------------------------------------


def edit(path: Path, change: Callable[[Doc], None]) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))


def pod(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def main(doc: Doc) -> Doc:
    return pod(doc)["containers"][0]


def env_value(name: str, value: str) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        for e in main(doc)["env"]:
            if e["name"] == name:
                e["value"] = value

    return change


DEPLOYMENT, HPA, PDB, GPU = "base/deployment.yaml", "base/hpa.yaml", "base/pdb.yaml", "overlays/gpu/gpu.yaml"
# name: (file under deploy/k8s, check, change, a word of the problem the check must report)
BREAKAGES: dict[str, tuple[str, str, Callable[[Doc], None], str]] = {
    "readiness on a missing route": (
        DEPLOYMENT, "probes", lambda d: main(d)["readinessProbe"]["httpGet"].update(path="/readyz"), "/readyz"),
    "liveness on /ready": (
        DEPLOYMENT, "probes", lambda d: main(d)["livenessProbe"]["httpGet"].update(path="/ready"), "livenessProbe"),
    "port moved": (DEPLOYMENT, "ports", env_value("GENSERVE_PORT", "8080"), "8080"),
    "short grace period": (DEPLOYMENT, "shutdown", lambda d: pod(d).update(terminationGracePeriodSeconds=35), "35"),
    "longer graceful timeout": (DEPLOYMENT, "shutdown", env_value("GENSERVE_GRACEFUL_TIMEOUT_S", "60"), "60"),
    "another uid": (DEPLOYMENT, "security", lambda d: pod(d)["securityContext"].update(runAsUser=1000), "runAsUser"),
    "writable root": (
        DEPLOYMENT, "security", lambda d: main(d)["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRoot"),
    "no /tmp": (DEPLOYMENT, "writable", lambda d: main(d)["volumeMounts"].pop(0), "/tmp"),
    "check cache off the volume": (DEPLOYMENT, "writable", env_value("GENSERVE_CHECK_CACHE_DIR", "/srv/c"), "/srv/c"),
    "unknown setting": (DEPLOYMENT, "settings", lambda d: main(d)["env"][0].update(name="GENSERVE_NO_SUCH"), "NO_SUCH"),
    "HPA on another target": (HPA, "autoscaler", lambda d: d["spec"]["scaleTargetRef"].update(name="other"), "other"),
    # kustomize rewrites app.kubernetes.io/name in selectors, so add a label the pods lack
    "budget on other pods": (
        PDB, "selectors", lambda d: d["spec"]["selector"]["matchLabels"].update(tier="batch"), "PodDisruptionBudget"),
    "GPU without toleration": (GPU, "device", lambda d: pod(d).pop("tolerations"), "toleration"),
}


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(K8S, tmp_path / "k8s")
    yield tmp_path / "k8s"


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_copy_fails(k8s_copy: Path, breakage: str) -> None:
    file, check, change, word = BREAKAGES[breakage]
    edit(k8s_copy / file, change)
    overlay = file.split("/")[0] if file.startswith("base") else "/".join(file.split("/")[:2])
    problems = checks_for(overlay)[check](render(k8s_copy / overlay))
    assert any(word in p for p in problems), f"{check} did not notice {breakage}: {problems}"
