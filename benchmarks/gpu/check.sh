#!/usr/bin/env bash
# Every GPU check of the project in one command, for one call of the device machine (15 minutes of
# device time in all; this fits in 8). It writes its results under $OUT (a folder of ./runs/gpu-check
# when OUT is unset), at most 8 files, none deeper than $OUT/*:
#
#   summary.md   the device, the software, each step's exit status and seconds, then every step's report
#   tests.log    1. the test suite (tests/app and tests/models) with GENSERVE_DEVICE=$DEVICE
#   service.md   2. the service on the shipped weights: start-up time, every endpoint once, and
#                5. the batch-invariance verdicts (GET /config's pass_sizes); with CUDA graphs on,
#                   the same answers compared byte for byte (service.json holds it all as JSON)
#   peers.md     3. python -m benchmarks.peers (its output): this service vs the plain endpoint vs LitServe
#                   (when carried), concurrency 1 and 32, its three workloads
#   graphs.md    4. CUDA graphs vs eager per operation and pass size: speed-up, same outputs
#
# On the GPU machine (no package registry; python3 there is 3.12 with torch 2.11):
#   benchmarks/gpu/wheels.sh                      # here, once: the wheels it lacks, in .whl/
#   device run, carry [".whl"]:  bash benchmarks/gpu/check.sh
# Here, on the CPU, end to end in about a minute (.ci/run does this):
#   GENSERVE_DEVICE=cpu CHECK_QUICK=1 bash benchmarks/gpu/check.sh
#
# Steps run in order, each under its own time limit (CHECK_<STEP>_S), and a failed step does not stop
# the next. Pick steps by name: `bash benchmarks/gpu/check.sh service graphs` (a rerun of two).
# The exit status is 0 only when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE="${GENSERVE_DEVICE:-cuda}"
QUICK="${CHECK_QUICK:-0}"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests service peers graphs)

if [ "$QUICK" = 1 ]; then  # the dry run: every step, as small as still says something
    : "${CHECK_TESTS_S:=120}" "${CHECK_SERVICE_S:=240}" "${CHECK_PEERS_S:=240}" "${CHECK_GRAPHS_S:=120}"
    TESTS=(tests/app/test_graphs.py)
    PEERS_ARGS=(--concurrency 1 4 --duration 0.5 --warmup 0.2)
    GRAPH_ARGS=(--sizes 1 4 --repeats 2 --warmup 1 --models vae_conv vqvae --threads 1)
else  # the GPU budget: 8 minutes in all
    : "${CHECK_TESTS_S:=170}" "${CHECK_SERVICE_S:=100}" "${CHECK_PEERS_S:=130}" "${CHECK_GRAPHS_S:=60}"
    # schemathesis and selenium are not carried; --durations says where the time went
    TESTS=(tests/app tests/models --ignore=tests/app/test_browser.py --ignore=tests/app/test_schema_fuzz.py --durations=15)
    PEERS_ARGS=(--concurrency 1 32 --duration 3 --warmup 1)
    GRAPH_ARGS=(--sizes 1 8 32 --repeats 10)
fi

# The wheels this machine lacks (benchmarks/gpu/wheels.sh), installed where nothing else is touched.
if [ -d .whl ] && ! "$PY" -c "import fastapi, uvicorn, pydantic_settings" 2>/dev/null; then
    site="${TMPDIR:-/tmp}/genserve-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || echo "check.sh: installing .whl/ failed" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

summary="$OUT/summary.md"
{
    echo "# GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE$([ "$QUICK" = 1 ] && echo ' (quick dry run)')"
    echo
    echo '```'
    "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
for name in ("fastapi", "uvicorn", "pydantic", "starlette", "litserve"):
    try:
        import importlib.metadata as m
        print(f"{name} {m.version(name)}")
    except Exception:
        print(f"{name}: not installed")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo '```'
    echo
    echo "| step | exit status | seconds |"
    echo "|---|---|---|"
} >"$summary" 2>&1

failed=0
run_step() {  # name, limit in seconds, command...: runs it, logs it, adds a summary row
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - began))
    local status=$rc
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="$rc (over ${limit} s)"
    echo "| $name | $status | $took |" >>"$summary"
    echo "== $name: exit $rc after ${took} s"
    [ $rc -ne 0 ] && failed=1
    return 0
}

export PYTHONUNBUFFERED=1
for step in "${STEPS[@]}"; do
    case "$step" in
        tests)
            run_step "1. tests, GENSERVE_DEVICE=$DEVICE" "$CHECK_TESTS_S" \
                env GENSERVE_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$OUT/tests.log" 2>&1
            tail -n 15 "$OUT/tests.log"
            ;;
        service)
            # --graphs: a second service with GENSERVE_CUDA_GRAPHS=true, the same answers compared (on
            # the CPU it records nothing, so the dry run checks the comparison's plumbing)
            run_step "2+5. service on the shipped weights" "$CHECK_SERVICE_S" \
                "$PY" -m benchmarks.gpu.service --device "$DEVICE" --out "$OUT" --graphs --startup-timeout 90
            ;;
        peers)
            servers=()  # LitServe only where it was carried (wheels.sh fetches it)
            "$PY" -c "import litserve" 2>/dev/null || servers=(--servers ours plain)
            run_step "3. peers" "$CHECK_PEERS_S" \
                "$PY" -m benchmarks.peers --device "$DEVICE" "${servers[@]}" "${PEERS_ARGS[@]}" >"$OUT/peers.md" 2>&1
            tail -n 25 "$OUT/peers.md"
            ;;
        graphs)
            run_step "4. CUDA graphs vs eager" "$CHECK_GRAPHS_S" \
                "$PY" -m benchmarks.gpu.graphs --device "$DEVICE" "${GRAPH_ARGS[@]}" --out "$OUT"
            ;;
        *)
            echo "check.sh: unknown step $step (tests, service, peers, graphs)" >&2
            failed=1
            ;;
    esac
done

{
    echo
    for f in service.md peers.md graphs.md; do
        [ "$f" = peers.md ] && echo "## peers (the output of python -m benchmarks.peers: markdown tables)"
        [ -f "$OUT/$f" ] && { cat "$OUT/$f"; echo; }
    done
    echo "## tests (last lines of tests.log)"
    echo '```'
    [ -f "$OUT/tests.log" ] && tail -n 30 "$OUT/tests.log"
    echo '```'
} >>"$summary"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $failed
