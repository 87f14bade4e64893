#!/usr/bin/env bash
# Bitwise-equivalence check of two lrsparse versions: every preset through `lrsparse compress` on a small SST-2
# budget, 1 thread, fixed seed. Run it once per version, then compare the two folders:
#   bash benchmarks/api_equivalence/run.sh /tmp/before .venv/bin/python         # e.g. installed lrsparse 0.1
#   PYTHONPATH=python bash benchmarks/api_equivalence/run.sh /tmp/after .venv/bin/python
#   .venv/bin/python benchmarks/api_equivalence/compare.py /tmp/before /tmp/after
# DATA: the GLUE folder (default ../shared/data/glue).
set -euo pipefail
out=$1; py=$2
for method in lpaf svd fwsvd magnitude-svd prune-only; do
  $py -m lrsparse.cli compress --task sst2 --keep 0.3 --method $method --data-dir ${DATA:-../shared/data/glue} \
    --output $out/$method --max-train-samples 256 --max-eval-samples 128 --max-seq-len 64 --epochs 1 \
    --seed 0 --threads 1 --factorization-iters 10 --checkpoint-every 0 --no-inspect --overwrite 2>&1 | grep -v Warning | tail -2
done
