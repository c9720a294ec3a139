#!/usr/bin/env bash
# On the offline GPU machine, after setup.sh (call 1) and unpack.sh (this call or an earlier one): runs
# smollm2_dolly_methods_gpu.sh with the carried packages and data, then packs what the runs wrote, weights
# and teacher caches left out, into $OUT/runs.tgz (what a device call sends back), with the matrix log.
#
#   bash examples/experiments/offline_gpu/run_matrix.sh DEADLINE      # the GPU script's settings pass through:
#   RECORDS=docs/results/methods-h200/run-records.tar.xz FIRST=taid-pocl-s30 TIME_SKD=1 PART=skd SKD_WORKERS=1 \
#     bash examples/experiments/offline_gpu/run_matrix.sh 480
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: run_matrix.sh DEADLINE_SECONDS" >&2; exit 2; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" runs/gpu-logs
export PYTHONPATH=/tmp/site:$PWD/src POCL_SHARED_DATA=${POCL_SHARED_DATA:-/tmp/shared/data} PYTHONUNBUFFERED=1
export PYTHON=${PYTHON:-python3} DEADLINE=$1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
( while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; uptime; done ) \
  > "runs/gpu-logs/util-$(date +%s).log" 2>&1 &
monitor=$!
bash examples/experiments/smollm2_dolly_methods_gpu.sh
kill "$monitor" 2>/dev/null
find runs/matrix runs/gpu-logs -type f -size -3M ! -name '*.safetensors' ! -name '*.bin' ! -name '*.pt' \
  ! -name '*.pth' ! -path '*teacher_cache*' > /tmp/files.txt
tar -czf "$OUT/runs.tgz" -T /tmp/files.txt
if [ "$(stat -c %s "$OUT/runs.tgz")" -gt 15000000 ]; then   # 16 MiB per file comes back
  grep -E '\.(json|jsonl|log|md|yaml|csv|txt)$' /tmp/files.txt > /tmp/small.txt
  tar -czf "$OUT/runs.tgz" -T /tmp/small.txt
fi
ls -la "$OUT/runs.tgz"
cp runs/gpu-logs/matrix.log "$OUT/" 2>/dev/null
tail -40 runs/gpu-logs/matrix.log
