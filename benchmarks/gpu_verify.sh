#!/usr/bin/env bash
# GPU verification in two prepared commands, sized for a lent GPU machine (15 minutes of device time in all, at most
# 10 per command, results back only as a few flat files). Run both back to back on one machine start:
#
#   benchmarks/gpu_verify.sh ops OUT       # <= 5 min: build with CUDA (sm_90), CUDA tests, compute-sanitizer,
#                                          #   GPU op benchmarks (eager, torch.compile, HBM bandwidth, GEMM rate)
#   benchmarks/gpu_verify.sh quality OUT   # <= 6 min: GPU inference (dense vs keep 0.25, bf16, eager / compile /
#                                          #   CUDA graphs) then quality-grid runs, one process per task sharing the GPU
#
# `--dry-run` before the mode runs the same steps on this CPU machine on tiny inputs (no build: the in-place build
# of `make dev`; the CUDA tests skip), so the scripts are tested before GPU time is spent. The quality runs read
# `.gpu_carry/` (benchmarks/prepare_gpu_carry.py: GLUE TSVs and MiniLM in fp16), which the device tool's `carry`
# takes along. OUT gets summary.txt, the result JSON files and logs.tar.gz; merge the quality rows at home with
# `python benchmarks/quality.py --merge OUT/quality_*.json`.
# Needs on the GPU machine: a CUDA torch, nvcc, and the build/test dependencies in PYTHON (nothing is downloaded).
# Exit status: 0 only if every checked step passed (benchmark and quality timings are informative).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 2 ] || { [ "$1" != ops ] && [ "$1" != quality ]; }; then
  echo "usage: $0 [--dry-run] ops|quality OUTPUT_DIR" >&2
  exit 2
fi
MODE="$1"
mkdir -p "$2" || exit 2
OUT="$(cd "$2" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
LOGS="$(mktemp -d)"
status=0
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }
finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  step "done: $MODE, exit status $status (results in $OUT)"
  exit $status
}
if [ $DRY = 1 ]; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE=cpu
else
  DEVICE=cuda
fi

step "environment ($MODE$([ $DRY = 1 ] && echo ', dry run'))"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 || echo "nvcc not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  step "FAILED: $PY has no CUDA torch or no visible GPU (see environment.txt)"
  status=1
  finish
fi

if [ "$MODE" = ops ]; then
  if [ $DRY = 0 ]; then
    step "build with LRSPARSE_CUDA=ON (sm_90)"
    rm -f python/lrsparse/_C*.so  # an in-place CPU build would shadow the one installed here
    if ! LRSPARSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps \
        -Ccmake.define.LRSPARSE_CUDA_ARCHITECTURES=90 -e . > "$LOGS/build.log" 2>&1; then
      step "FAILED: build (see build.log in logs.tar.gz)"; status=1; finish
    fi
    export LRSPARSE_EXPECT_CUDA_BUILD=1  # tests/test_build.py: CUDA kernels must be registered
  fi
  "$PY" -c "import lrsparse; print(lrsparse.BUILD_INFO)" >> "$OUT/summary.txt" 2>&1

  step "CUDA-facing tests"
  # test_precision's pipeline run needs the MiniLM package and the data, which the GPU machine has not.
  "$PY" -m pytest tests/test_cuda_ops.py tests/test_build.py tests/test_op_devices.py tests/test_precision.py -q -rs \
      -p no:cacheprovider -k "not short_real_run" > "$LOGS/pytest.log" 2>&1
  rc=$?
  tail -n 5 "$LOGS/pytest.log" >> "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then step "FAILED: tests (exit $rc)"; status=1; fi

  # memcheck (out-of-bounds, misaligned accesses) with torch's caching allocator off, so that an overrun past a tensor
  # is not hidden inside a larger cached block; racecheck (shared-memory races) on the kernels that use shared memory.
  SANITIZER="$(command -v compute-sanitizer || true)"
  if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then SANITIZER=/usr/local/cuda/bin/compute-sanitizer; fi
  if [ $DRY = 1 ]; then
    step "compute-sanitizer: not run in a dry run"
  elif [ -n "$SANITIZER" ]; then
    step "compute-sanitizer memcheck (tests/test_cuda_ops.py, 150 s at most)"
    if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 "$SANITIZER" --tool memcheck --error-exitcode 99 \
        "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider > "$LOGS/memcheck.log" 2>&1; then
      step "FAILED or timed out: memcheck (see memcheck.log)"; status=1
    fi
    step "compute-sanitizer racecheck (top-k threshold and apply tests, 60 s at most)"
    if ! timeout 60 "$SANITIZER" --tool racecheck --error-exitcode 99 \
        "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider -k "topk or apply" > "$LOGS/racecheck.log" 2>&1; then
      step "FAILED or timed out: racecheck (see racecheck.log)"; status=1
    fi
  else
    step "NOT RUN: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  fi

  step "op benchmarks ($DEVICE)"
  only=()
  if [ $DRY = 1 ]; then only=(--only accumulate_importance --no-compile); fi
  if ! timeout 120 "$PY" benchmarks/ops.py --quick --device "$DEVICE" "${only[@]}" --json "$OUT/ops_$DEVICE.json" \
      --markdown "$OUT/ops_$DEVICE.md" > "$LOGS/bench.log" 2>&1; then
    step "benchmarks failed or timed out (see bench.log); not counted in the exit status"
  fi
  finish
fi

# ---------------------------------------------------------------------------------------------------- quality
CARRY="${CARRY:-.gpu_carry}"
if [ ! -d "$CARRY/glue" ] || [ ! -d "$CARRY/minilm" ]; then
  step "FAILED: $CARRY/glue and $CARRY/minilm missing: run benchmarks/prepare_gpu_carry.py and carry $CARRY"
  status=1
  finish
fi
WORK="$(mktemp -d)"
if [ $DRY = 1 ]; then
  inference=(--one-process --device cpu --dtype fp32 --modes eager --rounds 1 --min-time 0.05 --seq-len 16)
  quality=(--device cpu --precision fp32 --train-samples 64 --eval-samples 32 --dense-epochs 0.25 --prune-epochs 0.5
           --mixed-epochs 0.25 --max-seq-len 32 --threads 1)
  QUALITY_SECONDS=600
else
  inference=(--device cuda --dtype bf16 --rounds 3 --min-time 0.2)
  quality=(--device cuda --precision bf16 --sst2-train-samples 20000)
  QUALITY_SECONDS="${QUALITY_SECONDS:-270}"
fi

step "inference: dense vs keep 0.25 ($DEVICE)"
if ! timeout 60 "$PY" benchmarks/inference.py --model "$CARRY/minilm" --keeps 0.25 "${inference[@]}" \
    --json "$OUT/inference_$DEVICE.json" > "$LOGS/inference.log" 2>&1; then
  step "inference failed or timed out (see inference.log); not counted in the exit status"
fi

# One process per task on the one GPU (the small model leaves it mostly idle); each stops after QUALITY_SECONDS and
# keeps the rows of the runs it finished (dense first, then svd and lpaf from that dense checkpoint).
step "quality runs: dense, svd, lpaf at keep 0.25, seed 0, one process per task, ${QUALITY_SECONDS} s"
declare -A pids
for task in sst2 mrpc cola stsb; do
  timeout "$QUALITY_SECONDS" "$PY" benchmarks/quality.py --tasks "$task" --presets dense svd lpaf --keeps 0.25 \
      --seeds 0 --model "$CARRY/minilm" --data-dir "$CARRY/glue" --work-dir "$WORK/runs" \
      --out "$OUT/quality_$task" --no-render "${quality[@]}" > "$LOGS/quality_$task.log" 2>&1 &
  pids[$task]=$!
done
for task in sst2 mrpc cola stsb; do
  wait "${pids[$task]}"
  rc=$?
  if [ $rc -eq 124 ]; then
    step "quality $task: stopped at ${QUALITY_SECONDS} s (its finished runs are kept)"
  elif [ $rc -ne 0 ]; then
    step "FAILED: quality $task (exit $rc, see quality_$task.log)"; status=1
  fi
done
for task in sst2 mrpc cola stsb; do
  if [ -f "$OUT/quality_$task.json" ]; then
    "$PY" -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']; print(sys.argv[2], len(rows), 'rows:', \
', '.join(f\"{r['preset']} {100 * r['main']:.1f}\" for r in rows))" "$OUT/quality_$task.json" "$task" \
        >> "$OUT/summary.txt" 2>&1
  else
    step "quality $task: no finished run"
  fi
done
finish
