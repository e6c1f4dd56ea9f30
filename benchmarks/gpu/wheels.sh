#!/usr/bin/env bash
# Fill .whl/ (repo root) with the wheels a GPU machine without a package registry lacks.
#
#   bash benchmarks/gpu/wheels.sh          # run here, where PyPI is reachable; from any folder
#
# The GPU machine: CPython 3.12 x86-64 (/opt/torch/.venv/bin/python3), torch 2.11.0,
# torchvision 0.26.0, numpy, pillow, safetensors, anyio, click, h11, httpx, pytest, pyyaml,
# uvloop, typing-extensions, annotated-doc, hypothesis ... already installed, and no fastapi,
# pydantic, uvicorn & co. There (the repo copied with .whl/ carried along):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# What is fetched (only these: one version each, never torch / torchvision / numpy / pillow /
# safetensors or another package the GPU machine already has):
#   - the runtime dependencies of pyproject.toml missing there, with their missing requirements
#     (fastapi 0.165 needs opentelemetry-api; asgi-lifespan needs sniffio);
#   - the test ones the suite needs (pytest-asyncio, asgi-lifespan; not schemathesis or selenium:
#     run pytest there with --ignore=tests/app/test_schema_fuzz.py, test_browser.py skips itself);
#   - httptools (uvicorn[standard]'s HTTP parser, used by the benchmarks);
#   - litserve 0.2.19 (the `bench` extra, benchmarks/peers.py) and pyzmq, its missing requirement
#     (uvicorn[standard]'s websockets / watchfiles are left out: neither is used).
# Each is pinned to the version installed in the repo's .venv, so the GPU runs what was tested
# here; the few the .venv may lack (httptools, pyzmq, litserve) fall back to the pins below.
# At the end the script checks every wheel's Requires-Dist against .whl/ plus the GPU machine's
# packages, prints what was fetched and the total size, and fails over 12 MiB.
set -euo pipefail
shopt -s nocaseglob  # wheel names: pyzmq, PyYAML ...

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"
PIP_PY="${PIP_PYTHON:-python3}"  # any python3 with pip: it only downloads
MAX_MIB=12

# name  fallback-version ("-": must be installed in .venv)
PACKAGES="
fastapi -
starlette -
uvicorn -
pydantic -
pydantic-core -
pydantic-settings -
python-dotenv -
annotated-types -
typing-inspection -
python-multipart -
orjson -
python-json-logger -
fastapi-offline -
opentelemetry-api -
pytest-asyncio -
asgi-lifespan -
sniffio -
httptools 0.9.0
litserve 0.2.19
pyzmq 27.3.0
"
# Already on the GPU machine (or deliberately not shipped): a requirement on one of these is met.
GPU_HAS="torch torchvision numpy pillow safetensors absl-py accelerate aiofiles anyio attrs certifi
click filelock h11 httpcore httpx hypothesis idna iniconfig jinja2 packaging pluggy prometheus-client
psutil pytest pytest-xdist pytest-timeout pyyaml requests rich tqdm typing-extensions uvloop
werkzeug annotated-doc"

[ -x "$VENV_PY" ] || { echo "wheels.sh: $VENV_PY missing: the versions are read from the repo's .venv" >&2; exit 1; }

installed_version() {  # prints the .venv's version of $1, or nothing
    "$VENV_PY" - "$1" <<'PY'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PY
}

# Keep .whl/ out of git without touching .gitignore.
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
touch "$EXCLUDE"
grep -qxF '/.whl/' "$EXCLUDE" || echo '/.whl/' >>"$EXCLUDE"

rm -rf .whl
mkdir .whl

BASE_PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
MORE_PLATFORMS=(manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

download() {  # download NAME==VERSION PLATFORM...
    local spec="$1"; shift
    local args=()
    for p in "$@"; do args+=(--platform "$p"); done
    "$PIP_PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${args[@]}" -d .whl "$spec" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    # pip's exit status is lost in the pipe: report whether a wheel of that name arrived
    local norm
    norm="$(echo "${spec%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z')"
    compgen -G ".whl/${norm}-${spec##*==}-*.whl" >/dev/null
}

while read -r name fallback; do
    [ -n "$name" ] || continue
    version="$(installed_version "$name")"
    if [ -z "$version" ]; then
        if [ "$fallback" = "-" ]; then
            echo "wheels.sh: $name is not installed in .venv (pip install -e '.[test]')" >&2
            exit 1
        fi
        version="$fallback"
    fi
    if ! download "$name==$version" "${BASE_PLATFORMS[@]}"; then
        echo "wheels.sh: no wheel for $name==$version on manylinux <= 2.28; trying newer glibc tags" >&2
        download "$name==$version" "${BASE_PLATFORMS[@]}" "${MORE_PLATFORMS[@]}" \
            || { echo "wheels.sh: no cp312 / py3 wheel for $name==$version" >&2; exit 1; }
    fi
done <<<"$PACKAGES"

# One version per package, every requirement met by .whl/ or by the GPU machine.
"$VENV_PY" - .whl "$GPU_HAS" <<'PY'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, gpu_has = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
wheels = {}
for whl in sorted(folder.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    if name in wheels:
        sys.exit(f"wheels.sh: two versions of {name} in .whl/: {wheels[name][0]} and {version}")
    wheels[name] = (version, whl)
missing = []
for name, (version, whl) in wheels.items():
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in wheels:
            if not req.specifier.contains(wheels[dep][0], prereleases=True):
                missing.append(f"{name} {version} needs {req}, .whl/ has {dep} {wheels[dep][0]}")
        elif dep not in gpu_has:
            missing.append(f"{name} {version} needs {req}: neither in .whl/ nor on the GPU machine")
for m in missing:
    print("wheels.sh:", m, file=sys.stderr)
if missing:
    sys.exit(1)
print("fetched:", ", ".join(f"{n} {v}" for n, (v, _) in sorted(wheels.items())))
PY

bytes="$(du -cb .whl/*.whl | tail -1 | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')"
echo "$(ls .whl/*.whl | wc -l) wheels in $ROOT/.whl: $mib MiB"
if awk -v b="$bytes" -v m="$MAX_MIB" 'BEGIN { exit !(b > m * 1048576) }'; then
    echo "wheels.sh: .whl/ is $mib MiB, over the $MAX_MIB MiB limit" >&2
    exit 1
fi
