"""docker-compose.yml runs the GPU service; with docker/compose.cpu.yml the same service runs on the CPU.

The files are resolved by `docker compose config` where the compose plugin is installed, else by a
small stand-in for compose's merge (mappings merge, sequences append, `!reset` removes, `${VAR:-x}`
takes x) that is enough for these two files. Every GENSERVE_* variable they and the Dockerfile set
must be a setting.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings
from tests.deploy import dockerfile

ROOT = dockerfile.ROOT
COMPOSE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker" / "compose.cpu.yml"
SERVICE = "genserve"

Doc = dict[str, Any]


# --- resolving compose files ----------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


class Reset:
    """compose's `!reset`: the attribute is removed from what the earlier files said."""


class Loader(yaml.SafeLoader):
    pass


Loader.add_constructor("!reset", lambda loader, node: Reset())


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else strip_resets(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return strip_resets(override)


def strip_resets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_resets(v) for k, v in value.items() if not isinstance(v, Reset)}
    return value


def interpolate(value: Any) -> Any:
    """`${VAR:-default}` and `${VAR-default}` with no VAR set, as in a clean environment."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value


def resolve(*files: Path) -> Doc:
    """The project that `docker compose -f ... config` gives in an environment without GENSERVE_*."""
    cli = compose_cli()
    if cli is not None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GENSERVE_", "COMPOSE_"))}
        args = [a for f in files for a in ("-f", str(f))]
        command = [*cli, *args, "config", "--format", "json"]
        done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
        return json.loads(done.stdout)
    project: Doc = {}
    for f in files:
        project = merge(project, yaml.load(f.read_text(), Loader=Loader))
    return interpolate(project)


# --- what a service asks for ----------------------------------------------------------------------


def gpu_reservations(service: Doc) -> list[Doc]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []
    return [d for d in devices if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])]


def environment(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def is_setting(name: str) -> bool:
    fields = {field.lower() for field in Settings.model_fields}
    return name.upper().startswith("GENSERVE_") and name[len("GENSERVE_"):].lower() in fields


# --- the tests -------------------------------------------------------------------------------------


def test_plain_up_runs_the_gpu_service() -> None:
    project = resolve(COMPOSE)
    assert set(project["services"]) == {SERVICE}
    service = project["services"][SERVICE]
    assert not service.get("profiles"), "a service with profiles would not start on a plain `docker compose up`"
    assert gpu_reservations(service), "the default service lost its NVIDIA device reservation"
    assert environment(service)["GENSERVE_DEVICE"] == "auto"
    drain = Settings.model_fields["drain_delay_s"].default + Settings.model_fields["graceful_timeout_s"].default
    assert seconds(service["stop_grace_period"]) > drain, "SIGKILL would come before the drain ends"


def test_cpu_override_runs_the_same_service_on_the_cpu() -> None:
    gpu = resolve(COMPOSE)["services"][SERVICE]
    project = resolve(COMPOSE, CPU)
    assert set(project["services"]) == {SERVICE}, "the override must change the service, not add one"
    cpu = project["services"][SERVICE]
    assert gpu_reservations(cpu) == []
    assert environment(cpu)["GENSERVE_DEVICE"] == "cpu"
    # Nothing else differs: same image, build, ports, volumes, stop grace period, other settings.
    rest = [copy.deepcopy(s) for s in (gpu, cpu)]
    for service in rest:
        service.pop("deploy", None)
        service["environment"] = {k: v for k, v in environment(service).items() if k != "GENSERVE_DEVICE"}
    assert rest[0] == rest[1]


def test_an_override_without_reset_keeps_the_gpu(tmp_path: Path) -> None:
    """The check above can fail: compose appends sequences, so only `!reset` removes the reservation."""
    text = CPU.read_text()
    assert "!reset" in text
    broken = tmp_path / "compose.cpu.yml"
    broken.write_text(text.replace("devices: !reset []", "devices: []"))
    assert gpu_reservations(resolve(COMPOSE, broken)["services"][SERVICE])


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU)], ids=["gpu", "cpu"])
def test_compose_sets_only_settings(files: tuple[Path, ...]) -> None:
    names = environment(resolve(*files)["services"][SERVICE])
    assert [n for n in names if not is_setting(n)] == []


def test_dockerfile_sets_only_settings() -> None:
    names = [n for n in dockerfile.env() if n.startswith("GENSERVE_")]
    assert "GENSERVE_CHECK_CACHE_DIR" in names
    assert dockerfile.env()["GENSERVE_CHECK_CACHE_DIR"].startswith("/tmp/"), "the cache belongs on the /tmp volume"
    assert [n for n in names if not is_setting(n)] == []


def test_dockerfile_runs_the_service_as_a_user() -> None:
    text = "\n".join(dockerfile.instructions())
    assert dockerfile.service_uid() != 0
    assert re.search(r"^USER\s+(genserve|10001)\s*$", text, re.MULTILINE), "the image must not run as root"
    assert 'CMD ["/opt/venv/bin/python", "-m", "app"]' in text
