#!/usr/bin/env bash
# One-command verification on a GPU machine: build lrsparse with its CUDA kernels, run the whole test suite and,
# when benchmarks/ops.py exists, the GPU op benchmarks. Everything it produces goes to the folder given as $1.
#
#   benchmarks/gpu_verify.sh results/gpu-h100        # PYTHON=/path/to/python to pick the interpreter
#
# Needs: a CUDA build of torch and a visible GPU, nvcc on PATH, and the build/test dependencies already installed
# in that interpreter (scikit-build-core, pybind11, cmake, ninja, pytest, ...): nothing is downloaded.
# Exit status: 0 only if the build, the CUDA compile check, the tests and (when compute-sanitizer is found) the
# memcheck/racecheck runs all passed (benchmarks are informative).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTPUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }

step "environment"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 || echo "nvcc not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  step "FAILED: $PY has no CUDA torch or no visible GPU (see environment.txt)"
  exit 1
fi

step "raw kernels compile check (make cuda-check)"
if ! make cuda-check > "$OUT/cuda_check.log" 2>&1; then step "FAILED: make cuda-check"; status=1; fi

step "build with LRSPARSE_CUDA=ON"
# An in-place CPU build (make dev) would shadow the one installed here.
rm -f python/lrsparse/_C*.so
if ! LRSPARSE_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  step "FAILED: build (see build.log)"
  exit 1
fi
if ! "$PY" -c "import lrsparse.ops as o; print(o.BUILD_INFO); assert o.BUILD_INFO['cuda'], 'built without CUDA'" \
    >> "$OUT/summary.txt" 2>&1; then
  step "FAILED: the installed extension has no CUDA kernels"
  exit 1
fi

step "test suite"
"$PY" -m pytest tests -q -rs --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
test_rc=$?
tail -n 15 "$OUT/pytest.log" >> "$OUT/summary.txt"
if [ $test_rc -ne 0 ]; then step "FAILED: tests (exit $test_rc, see pytest.log)"; status=1; fi

# The CUDA op tests under compute-sanitizer: memcheck (out-of-bounds and misaligned accesses) over all of them, with
# torch's caching allocator off so that an overrun past a tensor is not hidden inside a larger cached block;
# racecheck (shared-memory races) over the kernels that use shared memory (top-k threshold and apply), since it is
# much slower. Not yet run on a GPU: a report may need judging before it is taken as a kernel bug.
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then SANITIZER=/usr/local/cuda/bin/compute-sanitizer; fi
if [ -n "$SANITIZER" ]; then
  step "compute-sanitizer memcheck (tests/test_cuda_ops.py)"
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 \
      "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider > "$OUT/memcheck.log" 2>&1; then
    step "FAILED: memcheck (see memcheck.log)"; status=1
  fi
  step "compute-sanitizer racecheck (top-k threshold and apply tests)"
  if ! "$SANITIZER" --tool racecheck --error-exitcode 99 \
      "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider -k "topk or apply" > "$OUT/racecheck.log" 2>&1; then
    step "FAILED: racecheck (see racecheck.log)"; status=1
  fi
else
  step "NOT RUN: compute-sanitizer not found (PATH, /usr/local/cuda/bin); the sanitizer checks are missing from this result"
fi

if [ -f benchmarks/ops.py ]; then
  step "op benchmarks"
  bench_args=(--json "$OUT/ops_gpu.json" --markdown "$OUT/ops_gpu.md")
  if "$PY" benchmarks/ops.py --help 2>/dev/null | grep -q -- "--device"; then
    bench_args+=(--device cuda)
  else
    step "note: benchmarks/ops.py has no --device option; it runs on its default device"
  fi
  if ! "$PY" benchmarks/ops.py "${bench_args[@]}" > "$OUT/bench.log" 2>&1; then
    step "benchmarks failed (see bench.log); not counted in the exit status"
  fi
else
  step "benchmarks/ops.py not found: no benchmarks"
fi

step "done, exit status $status (outputs in $OUT)"
exit $status
