#!/usr/bin/env bash
# The CUDA backend's tests and benchmark, in one run on a GPU machine (H200 image:
# python3 3.12 with CuPy, torch, transformers, Cython, nvcc). From the repo root:
#
#   bash benchmarks/gpu_prepare.sh        # here, first: stages .gpu/ (gguf wheel, vocab files)
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=590)
#
# `gpu_check.sh tests` or `gpu_check.sh bench` runs one of the two (after the build).
# Each stage has its own time limit (build 120 s, tests 240 s, benchmark 210 s) so
# the whole stays under the tool's 10 minutes; a failing stage does not stop the
# next. The tests' `emulated` variants (the kernels on the CPU emulator, already run
# on the CPU machines) are left out to save device time. Results in $OUT (./gpu-out when
# unset): summary.log, env.log, build.log, tests.log, bench.log, bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
what=${1:-all}
export PYTHONUNBUFFERED=1 PYFORGE_SHARED_DIR=$PWD/.gpu/shared PYFORGE_MODEL_CACHE=/tmp/pyforge-models
t0=$SECONDS
stage() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$OUT/summary.log"; }

stage "environment"
{
  nvidia-smi; $PY -V; nvcc --version | tail -1; gcc --version | head -1
  $PY -c 'import cupy, numpy; print("cupy", cupy.__version__, "numpy", numpy.__version__)'
  $PY -m pip list 2>/dev/null | grep -iE '^(cupy|torch|transformers|cython|numpy|tokenizers|jinja2|safetensors|pytest) '
} > "$OUT/env.log" 2>&1
if ! $PY -c 'import gguf' 2>/dev/null; then    # pure-Python wheels staged by gpu_prepare.sh
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl >> "$OUT/env.log" 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # pyforge from this tree, not installed

stage "build the native extensions"
timeout 120 $PY setup.py build_ext --inplace --parallel 16 > "$OUT/build.log" 2>&1
stage "build exit $?"

if [ "$what" != bench ]; then
  stage "tests: tests/cuda tests/backends"
  timeout 240 $PY -m pytest -q -s -rs -p no:cacheprovider -k "not emulated" tests/cuda tests/backends \
    > "$OUT/tests.log" 2>&1
  stage "tests exit $?: $(tail -1 "$OUT/tests.log")"
fi
if [ "$what" != tests ]; then
  stage "benchmark"
  timeout 210 $PY benchmarks/bench_cuda.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  stage "benchmark exit $?"
  grep -E '^(\||[^|]*copy bandwidth)' "$OUT/bench.log" >> "$OUT/summary.log"
fi
stage "done"
