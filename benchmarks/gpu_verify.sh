#!/usr/bin/env bash
# GPU verification, sized for a lent GPU machine (15 minutes of device time in all, one to two of them to start the
# machine, at most 10 per command, a machine given back 30 s after its last command, at most 8 flat result files):
#
#   benchmarks/gpu_verify.sh all OUT       # <= 9.5 min, the one command to spend a lease on: build, then the quality
#                                          #   grid (as `grid` below) in the background from the start, sharing the
#                                          #   GPU with the CUDA tests and compute-sanitizer and stopped (SIGSTOP)
#                                          #   while the op benchmarks and the inference measurement time the GPU;
#                                          #   each step's time capped so that the whole run ends inside
#                                          #   BUDGET_SECONDS (default 570)
#   benchmarks/gpu_verify.sh ops OUT       # <= 5 min: build with CUDA (sm_90), CUDA tests, GPU op benchmarks
#                                          #   (eager, torch.compile, HBM bandwidth, GEMM rate), compute-sanitizer
#   benchmarks/gpu_verify.sh quality OUT   # <= 6 min: GPU inference (dense vs keep 0.25, bf16, eager / compile /
#                                          #   CUDA graphs) then quality-grid runs, one process per task sharing the GPU
#                                          #   (needs the CUDA build of an `ops` run on the same machine)
#   benchmarks/gpu_verify.sh grid OUT      # <= 9.5 min (BUDGET_SECONDS): build, then the quality grid of issue 13:
#                                          #   one job per task and seed (QUALITY_TASKS, QUALITY_SEEDS: 0 1 2), each
#                                          #   running in order the keep-0.25 presets (dense lpaf svd fwsvd), the
#                                          #   LPAF ablations (QUALITY_ABLATION_TASKS: mrpc stsb), keeps 0.5 and 0.1
#                                          #   then recipe variants (QUALITY_PHASES: grid convergence ablations
#                                          #   keeps variants; convergence: dense trained 6 epochs, not 3);
#                                          #   bf16; SST-2 on 10,000
#                                          #   sentences; a later `all` or `grid` call on the same machine resumes
#                                          #   what did not finish (QUALITY_WORK_DIR, default
#                                          #   /tmp/lrsparse_quality_grid)
#
# `--dry-run` before the mode runs the same steps on this CPU machine on tiny inputs (no build: the in-place build
# of `make dev`; the CUDA tests skip; no time budget), so the script is tested before GPU time is spent. The quality
# runs read `.gpu_carry/` (benchmarks/prepare_gpu_carry.py: GLUE TSVs and MiniLM in fp16), which the device tool's
# `carry` takes along. OUT gets at most six files: summary.txt, ops_DEVICE.{json,md}, inference_DEVICE.json,
# quality_runs.tar.gz (one quality JSON per task, seed and phase: merge them at home with
# `python benchmarks/quality.py --merge quality_*.json --out ...`) and logs.tar.gz (every step's log, environment.txt).
# Needs on the GPU machine: a CUDA torch, nvcc, and the build/test dependencies in PYTHON (nothing is downloaded).
# Exit status: 0 only if every checked step passed (benchmark and quality timings are informative).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 2 ] || { [ "$1" != ops ] && [ "$1" != quality ] && [ "$1" != all ] && [ "$1" != grid ]; }; then
  echo "usage: $0 [--dry-run] all|ops|quality|grid OUTPUT_DIR" >&2
  exit 2
fi
MODE="$1"
mkdir -p "$2" || exit 2
OUT="$(cd "$2" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d)"
CARRY="${CARRY:-.gpu_carry}"
status=0
case "$MODE" in all | grid) default_budget=570 ;; ops) default_budget=290 ;; *) default_budget=350 ;; esac
BUDGET="${BUDGET_SECONDS:-$default_budget}"
if [ $DRY = 1 ]; then BUDGET=100000; fi
START=$SECONDS

step() { echo "== $(date -u +%H:%M:%S) +$((SECONDS - START))s $*" | tee -a "$OUT/summary.txt"; }
finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  step "done: $MODE, exit status $status (results in $OUT)"
  exit $status
}
# seconds a step may take: its own cap, but never past the budget less what the later steps reserve
cap() {
  local own=$1 left=$((BUDGET - (SECONDS - START) - $2))
  left=$((own < left ? own : left))
  echo $((left > 5 ? left : 5))  # timeout 0 would mean no limit
}
if [ $DRY = 1 ]; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  DEVICE=cpu
else
  DEVICE=cuda
fi

step "environment ($MODE$([ $DRY = 1 ] && echo ', dry run'), budget ${BUDGET} s)"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 || echo "nvcc not found"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$LOGS/environment.txt" 2>&1
grep -E "^torch|H200|H100|release|Driver" "$LOGS/environment.txt" | tee -a "$OUT/summary.txt"
if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  step "FAILED: $PY has no CUDA torch or no visible GPU (environment.txt in logs.tar.gz)"
  status=1
  finish
fi
if [ "$MODE" != ops ] && { [ ! -d "$CARRY/glue" ] || [ ! -d "$CARRY/minilm" ]; }; then
  step "FAILED: $CARRY/glue and $CARRY/minilm missing: run benchmarks/prepare_gpu_carry.py and carry $CARRY"
  status=1
  finish
fi

run_build() {
  if [ $DRY = 0 ]; then
    step "build with LRSPARSE_CUDA=ON (sm_90)"
    rm -f python/lrsparse/_C*.so  # an in-place CPU build would shadow the one installed here
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 LRSPARSE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" timeout "$(cap 240 300)" \
        "$PY" -m pip install --no-build-isolation --no-deps \
          -Cbuild.verbose=true -Ccmake.define.LRSPARSE_CUDA_ARCHITECTURES=90 -e . > "$LOGS/build.log" 2>&1; then
      step "FAILED: build (the end of build.log follows)"; tail -n 60 "$LOGS/build.log"; status=1; finish
    fi
    export LRSPARSE_EXPECT_CUDA_BUILD=1  # tests/test_build.py: CUDA kernels must be registered
  fi
  "$PY" -c "import lrsparse; print(lrsparse.BUILD_INFO)" 2>&1 | tee -a "$OUT/summary.txt"
  # Which C++ runtime symbols the extension defines itself (a second copy of libstdc++'s would be a bug).
  local so
  so="$("$PY" -c "import lrsparse._C as c; print(c.__file__)" 2>/dev/null)"
  if [ -n "$so" ]; then
    { ldd "$so"; nm -D --defined-only -C "$so"; } > "$LOGS/extension_symbols.txt" 2>&1
    echo "extension: $(grep -c "std::" "$LOGS/extension_symbols.txt") std:: symbols defined" | tee -a "$OUT/summary.txt"
  fi
}

# One pytest process per file, so that a crash (a segfault kills the process) hides no other file's results; a
# crashed test is named from faulthandler's stack, deselected and its file run again (three crashes at most), so
# the rest of the file still runs. CRASHED collects the crashed tests for the sanitizer runs.
CRASHED=""
run_tests() {
  step "CUDA-facing tests"
  local file rc tries crashed deselect log
  # test_precision's pipeline run needs the MiniLM package and the data, which the GPU machine has not.
  for file in tests/test_cuda_ops.py tests/test_build.py tests/test_op_devices.py tests/test_precision.py; do
    deselect="short_real_run"
    for tries in 1 2 3 4; do
      log="$LOGS/pytest_$(basename "$file" .py)_$tries.log"
      timeout "$(cap 100 300)" "$PY" -X faulthandler -m pytest "$file" -q -rs -p no:cacheprovider \
          -k "not ($deselect)" > "$log" 2>&1
      rc=$?
      if [ $rc -lt 128 ] || [ $tries -eq 4 ]; then break; fi
      crashed="$(grep -A1 -E "^  File .*/$(basename "$file")\"" "$log" | grep -oE "in test_[A-Za-z0-9_]+" | head -n 1 \
                 | cut -c4-)"
      if [ -z "$crashed" ]; then break; fi
      step "CRASH (signal $((rc - 128))) in $file::$crashed; running the file again without it"
      deselect="$deselect or $crashed"
      CRASHED="${CRASHED:+$CRASHED or }$crashed"
    done
    echo "$file: $(tail -n 1 "$log")" | tee -a "$OUT/summary.txt"
    if [ $rc -ne 0 ]; then
      step "FAILED: $file (exit $rc); failures:"; grep -E "^(FAILED|ERROR)" "$log" | head -n 30
      status=1
    fi
  done
  if [ -n "$CRASHED" ]; then step "FAILED: crashed tests: $CRASHED"; status=1; fi
}

run_bench() {
  step "op benchmarks ($DEVICE)"
  local only=()
  if [ $DRY = 1 ]; then only=(--only accumulate_importance --no-compile); fi
  if ! timeout "$(cap 110 150)" "$PY" benchmarks/ops.py --quick --device "$DEVICE" "${only[@]}" \
      --json "$OUT/ops_$DEVICE.json" --markdown "$OUT/ops_$DEVICE.md" > "$LOGS/bench.log" 2>&1; then
    step "benchmarks failed or timed out; not counted in the exit status; the end of bench.log:"
    tail -n 15 "$LOGS/bench.log"
  fi
  grep -E "^machine|lrsparse .* ms" "$LOGS/bench.log" | cut -c1-200 | tee -a "$OUT/summary.txt"
}

# memcheck (out-of-bounds, misaligned accesses) with torch's caching allocator off, so that an overrun past a tensor
# is not hidden inside a larger cached block; racecheck (shared-memory races) on the kernels that use shared memory.
run_sanitizer() {
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || true)"
  if [ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then sanitizer=/usr/local/cuda/bin/compute-sanitizer; fi
  if [ $DRY = 1 ]; then step "compute-sanitizer: not run in a dry run"; return; fi
  if [ -z "$sanitizer" ]; then step "NOT RUN: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; return; fi
  step "compute-sanitizer memcheck (tests/test_cuda_ops.py)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 100 60)" "$sanitizer" --tool memcheck --error-exitcode 99 \
      "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider -k "not (${CRASHED:-nothing_crashed})" \
      > "$LOGS/memcheck.log" 2>&1
  local rc=$?
  tail -n 4 "$LOGS/memcheck.log" | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then step "FAILED or timed out: memcheck (exit $rc)"; status=1; fi
  step "compute-sanitizer racecheck (top-k threshold and apply tests)"
  timeout "$(cap 40 15)" "$sanitizer" --tool racecheck --error-exitcode 99 \
      "$PY" -m pytest tests/test_cuda_ops.py -q -x -p no:cacheprovider -k "(topk or apply) and not (${CRASHED:-nothing_crashed})" > "$LOGS/racecheck.log" 2>&1
  rc=$?
  tail -n 4 "$LOGS/racecheck.log" | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then step "FAILED or timed out: racecheck (exit $rc)"; status=1; fi
}

run_inference() {
  local args
  if [ $DRY = 1 ]; then
    args=(--one-process --device cpu --dtype fp32 --modes eager --rounds 1 --min-time 0.05 --seq-len 16
          --rank-multiples 1 8)
  else
    # batch 256: where the thin GEMMs of the low-rank model stop being latency-bound on a large GPU
    # ranks x8: whether tensor-core-friendly shapes close the gap (compile mode dropped: CUDA graphs compile too)
    args=(--device cuda --dtype bf16 --rounds 3 --min-time 0.2 --batch-sizes 32 256 1 --rank-multiples 1 8
          --modes eager cudagraphs)
  fi
  step "inference: dense vs keep 0.25 ($DEVICE)"
  if ! timeout "$(cap 150 90)" "$PY" benchmarks/inference.py --model "$CARRY/minilm" --keeps 0.25 "${args[@]}" \
      --json "$OUT/inference_$DEVICE.json" > "$LOGS/inference.log" 2>&1; then
    step "inference failed or timed out; not counted in the exit status; the end of inference.log:"
    tail -n 15 "$LOGS/inference.log"
  fi
  grep -E "speedup|seq_per_s" "$LOGS/inference.log" | cut -c1-240 | tee -a "$OUT/summary.txt"
}

# The quality grid of issue 13: one background job per (task, seed) on the one GPU (the small model leaves it mostly
# idle), each running its runs in order of need: the keep-0.25 presets (QUALITY_PRESETS, dense first; every
# compressed run starts from the seed-0 dense checkpoint, which the task's first job trains and the others wait
# for), then the dense model trained twice as long (has the baseline converged?), then on QUALITY_ABLATION_TASKS
# the LPAF ablations (one component removed at a time), then keeps 0.5 and 0.1
# for lpaf and svd, then on the ablation tasks the candidates for the default recipe (VARIANTS). QUALITY_PHASES
# picks among "grid convergence ablations keeps variants". Every job stops at the budget and keeps the
# rows of the runs it finished; the work folder QUALITY_WORK_DIR (default /tmp/lrsparse_quality_grid) lets a later
# call on the same machine resume the unfinished ones. pause_quality / resume_quality stop the jobs (SIGSTOP) while
# the benchmarks time the GPU.
read -ra QUALITY_TASKS <<< "${QUALITY_TASKS:-sst2 mrpc cola stsb}"
ABLATIONS=("no-prune pruner=none" "no-activation factorizer=svd" "no-mixed mixed_rank=none")
# candidates for the default recipe: distillation from the dense model, the activation-aware factorizer with the
# importance weighting of the rows, the previous default (sparsity-aware), per-forward stochastic replacement
VARIANTS=("kd --distill-weight 0.5 --distill-hidden-weight 1.0" "act-importance --set factorizer=activation-importance"
          "sparsity-aware --set factorizer=sparsity-aware"
          "stochastic --mixed-rank stochastic")
DEFAULT_PHASES="grid convergence ablations keeps variants"
QUALITY_JOBS=()
declare -A QUALITY_PIDS
QUALITY_WORK=""
QUALITY_DEADLINE=0

quality_run() {  # OUT_NAME, then quality.py's own arguments
  local name=$1 left=$((QUALITY_DEADLINE - SECONDS))
  shift
  if [ $left -lt 20 ]; then return 124; fi
  timeout "$left" "$PY" benchmarks/quality.py --model "$CARRY/minilm" --data-dir "$CARRY/glue" \
      --work-dir "$QUALITY_WORK/runs" --out "$QUALITY_WORK/quality_$name" --no-render "${QUALITY_ARGS[@]}" "$@" \
      >> "$LOGS/quality_$name.log" 2>&1
}

quality_job() {  # TASK SEED; a failed run is reported by wait_quality, the budget's end stops the job
  local task=$1 seed=$2 ablation variant setting
  local phases=" ${QUALITY_PHASES:-$DEFAULT_PHASES} "
  if [[ $phases == *" grid "* ]]; then
    # shellcheck disable=SC2086  # presets: one word each
    quality_run "${task}_s${seed}" --tasks "$task" --seeds "$seed" --keeps 0.25 --presets $QUALITY_PRESETS_LIST
    if [ $? -eq 124 ]; then return; fi
  fi
  if [[ $phases == *" convergence "* ]]; then  # has the dense baseline converged? the same, trained twice as long
    quality_run "${task}_s${seed}_dense_long" --tasks "$task" --seeds "$seed" --presets dense \
      --dense-epochs "$DENSE_CHECK_EPOCHS"
    if [ $? -eq 124 ]; then return; fi
  fi
  if [[ $phases == *" ablations "* ]] && [[ " ${QUALITY_ABLATION_TASKS:-mrpc stsb} " == *" $task "* ]]; then
    for ablation in "${ABLATIONS[@]}"; do
      read -r variant setting <<< "$ablation"
      quality_run "${task}_s${seed}_$variant" --tasks "$task" --seeds "$seed" --keeps 0.25 --presets lpaf \
        --variant "$variant" --set "$setting"
      if [ $? -eq 124 ]; then return; fi
    done
  fi
  if [[ $phases == *" keeps "* ]]; then
    quality_run "${task}_s${seed}_keeps" --tasks "$task" --seeds "$seed" --keeps 0.5 0.1 --presets lpaf svd
    if [ $? -eq 124 ]; then return; fi
  fi
  if [[ $phases == *" variants "* ]] && [[ " ${QUALITY_ABLATION_TASKS:-mrpc stsb} " == *" $task "* ]]; then
    for ablation in "${VARIANTS[@]}"; do
      read -r variant setting <<< "$ablation"
      # shellcheck disable=SC2086  # setting: the variant's options, one word each
      quality_run "${task}_s${seed}_$variant" --tasks "$task" --seeds "$seed" --keeps 0.25 --presets lpaf \
        --variant "$variant" $setting
      if [ $? -eq 124 ]; then return; fi
    done
  fi
}

start_quality() {
  local seconds task seed job
  if [ $DRY = 1 ]; then
    QUALITY_ARGS=(--device cpu --precision fp32 --train-samples 64 --eval-samples 32 --dense-epochs 0.25
                  --prune-epochs 0.5 --mixed-epochs 0.25 --max-seq-len 32 --threads 1)
    DENSE_CHECK_EPOCHS=0.5
    seconds=100000
  else
    QUALITY_ARGS=(--device cuda --precision bf16 --sst2-train-samples "${QUALITY_SST2_SAMPLES:-20000}" --threads 1)
    DENSE_CHECK_EPOCHS=6
    seconds="$(cap 100000 15)"
  fi
  if [ "$seconds" -lt 60 ]; then step "quality runs: NOT RUN (${seconds} s left of the budget)"; return; fi
  QUALITY_PRESETS_LIST="${QUALITY_PRESETS:-dense svd lpaf}"
  QUALITY_DEADLINE=$((SECONDS + seconds))
  QUALITY_WORK="${QUALITY_WORK_DIR:-$(mktemp -d)}"
  mkdir -p "$QUALITY_WORK"
  step "quality runs in the background, ${seconds} s: phases ${QUALITY_PHASES:-$DEFAULT_PHASES}; presets" \
       "$QUALITY_PRESETS_LIST at keep 0.25; seeds ${QUALITY_SEEDS:-0}; one job per task and seed; work $QUALITY_WORK"
  for seed in ${QUALITY_SEEDS:-0}; do
    for task in "${QUALITY_TASKS[@]}"; do
      job="${task}_s$seed"
      quality_job "$task" "$seed" &
      QUALITY_PIDS[$job]=$!
      QUALITY_JOBS+=("$job")
    done
  done
}

# SIGSTOP/SIGCONT to the jobs' Python processes (not to `timeout`, whose deadline keeps running: the budget holds).
signal_quality() {
  local pids
  pids="$(pgrep -f "benchmarks/quality.py --model $CARRY/minilm" || true)"
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086  # one pid a word
    kill "-$1" $pids 2>/dev/null
  fi
}
pause_quality() { if [ -n "$QUALITY_WORK" ]; then step "quality runs paused while the GPU is timed"; signal_quality STOP; fi; }
resume_quality() { if [ -n "$QUALITY_WORK" ]; then step "quality runs resumed"; signal_quality CONT; fi; }

wait_quality() {
  local job file
  if [ -z "$QUALITY_WORK" ]; then return; fi
  for job in "${QUALITY_JOBS[@]}"; do
    wait "${QUALITY_PIDS[$job]}"
  done
  step "quality runs ended (budget or done); rows finished, per job and phase:"
  for file in "$QUALITY_WORK"/quality_*.json; do
    [ -f "$file" ] || continue
    "$PY" -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']; print(sys.argv[2], len(rows), 'rows:', \
', '.join(f\"{r['preset']}{'+' + r['variant'] if r.get('variant') else ''} k{r['keep']} {100 * r['main']:.1f}\" \
for r in rows))" "$file" "$(basename "$file" .json)" 2>&1 | tee -a "$OUT/summary.txt"
  done
  for file in $(grep -l "^Traceback" "$LOGS"/quality_*.log 2>/dev/null); do
    step "FAILED: $(basename "$file" .log); the end of its log:"; tail -n 15 "$file"; status=1
  done
  (cd "$QUALITY_WORK" && ls quality_*.json > /dev/null 2>&1 && tar -czf "$OUT/quality_runs.tar.gz" quality_*.json)
}

case "$MODE" in
  ops) run_build; run_tests; run_bench; run_sanitizer ;;
  quality) run_inference; start_quality; wait_quality ;;
  all)
    # The grid shares the GPU with the tests and the sanitizers (whose timings matter to nobody) and stops while
    # the benchmarks and the inference measurement time it.
    QUALITY_SEEDS="${QUALITY_SEEDS:-0 1 2}" QUALITY_PRESETS="${QUALITY_PRESETS:-dense lpaf svd fwsvd}"
    QUALITY_SST2_SAMPLES="${QUALITY_SST2_SAMPLES:-10000}" QUALITY_WORK_DIR="${QUALITY_WORK_DIR:-/tmp/lrsparse_quality_grid}"
    run_build; start_quality; run_tests; pause_quality; run_bench; run_inference; resume_quality; run_sanitizer
    wait_quality ;;
  grid)
    QUALITY_SEEDS="${QUALITY_SEEDS:-0 1 2}" QUALITY_PRESETS="${QUALITY_PRESETS:-dense lpaf svd fwsvd}"
    QUALITY_SST2_SAMPLES="${QUALITY_SST2_SAMPLES:-10000}" QUALITY_WORK_DIR="${QUALITY_WORK_DIR:-/tmp/lrsparse_quality_grid}"
    run_build; start_quality; wait_quality ;;
esac
finish
