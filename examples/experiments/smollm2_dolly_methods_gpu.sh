#!/usr/bin/env bash
# The issue-20 methods matrix (smollm2_dolly_methods.yaml: KD, TAID, SKD with and without POCL, POCL with an
# assistant teacher; FKL; 3 training seeds) on one CUDA GPU, as several runner processes side by side. Every
# step is resumable: run the same command again and finished runs and evaluations are skipped.
# docs/results.md quotes what this produced on one H200 (the script's own log, runs/gpu-logs/matrix.log,
# says how long each phase took).
#
#   examples/experiments/smollm2_dolly_methods_gpu.sh          # repository root, venv active, one GPU
#   DEADLINE=400 examples/experiments/smollm2_dolly_methods_gpu.sh   # stop the workers after 400 s
#   PART=main ...; then PART=skd ...      # the same in two calls (each under a device call's 10 minutes)
#   RECORDS=docs/results/methods-h200/run-records.tar.xz FIRST=taid-pocl-s30 ...
#       # continue the H200 matrix of 2026-12-04: its evaluated runs' records (no weights) are unpacked first, so
#       # only the runs it did not finish are trained (the models are made again: on the H200 they came out
#       # identical in two tries, docs/results.md); FIRST is the run that builds the shared teacher cache
#
# Phases (the runner's shared steps must not run twice at once, so they run alone first):
#   1. one process: GGUF -> checkpoint, init-student of the student and of the assistant, both healings;
#   2. one process: the shared ranking and $FIRST (default pocl-fkl-s10), which builds the shared teacher cache;
#   3. runner processes side by side, one list of runs each, seed by seed, so that a stop at DEADLINE leaves
#      paired rows; each `--only RUN` call trains RUN and evaluates it. PART=main: the 15 non-SKD runs and the
#      two reference models (6 processes); PART=skd: the 6 SKD runs (SKD_WORKERS processes); PART=all
#      (default): both sets at once, the SKD runs (the longest) one process each, so 12 processes (on
#      2026-12-04, with 8 processes and the sampler's old per-row CPU multinomial, an SKD step took 17-25 s on
#      one H200; docs/results.md has what the next try measured);
#   4. the tables (--table-only) over whatever finished.
set -uo pipefail
SPEC=${SPEC:-examples/experiments/smollm2_dolly_methods.yaml}
PY=${PYTHON:-python}
LOGS=${LOGS:-runs/gpu-logs}
DEADLINE=${DEADLINE:-0}                  # seconds after the start at which phase 3 is stopped; 0: never
PART=${PART:-all}                        # all, main (no SKD runs) or skd (the SKD runs only)
FIRST=${FIRST:-pocl-fkl-s10}             # phase 2's run (it builds the shared teacher cache before the workers)
RECORDS=${RECORDS:-}                     # a run-records archive to unpack first (never over an existing matrix)
SKD_WORKERS=${SKD_WORKERS:-3}            # PART=skd: processes for the 6 SKD runs (1, 2, 3 or 6), seed by seed
TIME_SKD=${TIME_SKD:-0}                  # 1: after phase 1, time one SKD call alone (benchmarks/skd_sampler.py)
case "$PART" in all|main|skd) ;; *) echo "PART must be all, main or skd (got $PART)" >&2; exit 2;; esac
case "$SKD_WORKERS" in 1|2|3|6) ;; *) echo "SKD_WORKERS must be 1, 2, 3 or 6 (got $SKD_WORKERS)" >&2; exit 2;; esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
mkdir -p "$LOGS"; rm -f "$LOGS/STOP"
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$LOGS/matrix.log"; }
run() { "$PY" -m pocl matrix "$SPEC" --no-progress "$@"; }

if [ -n "$RECORDS" ]; then
  if [ -e runs/matrix/smollm2-dolly-powered ]; then
    say "records: runs/matrix/smollm2-dolly-powered exists, $RECORDS not unpacked"
  else
    tar -xJf "$RECORDS" || { say "records: cannot unpack $RECORDS"; exit 1; }
    say "records: unpacked $RECORDS"
  fi
fi
say "phase 1: models"
if ! run --only teacher --no-eval > "$LOGS/prep.log" 2>&1; then
  say "phase 1 failed"; tail -40 "$LOGS/prep.log"; exit 1
fi
if [ "$TIME_SKD" = 1 ]; then
  M=runs/matrix/smollm2-dolly-powered/models
  "$PY" benchmarks/skd_sampler.py --device cuda --skip-old --repeats 2 --check-tokens 0 \
    --teacher "$M/teacher" --student "$M/heal/final" --data "${POCL_SHARED_DATA:-../shared/data}/dolly/train.jsonl" \
    --output "$LOGS/skd_sampler_cuda.json" > "$LOGS/skd_timing.log" 2>&1
  say "SKD call alone (8 prompts, 96 tokens): $(grep -h 'skd_new:' "$LOGS/skd_timing.log" | tr '\n' ' ')"
fi
say "phase 2: ranking, $FIRST (and the shared teacher cache)"
run --only "$FIRST" --no-eval > "$LOGS/first.log" 2>&1 || say "phase 2 failed (see $LOGS/first.log)"

say "phase 3: workers ($PART)"
worker() {  # worker NAME RUN...: train and evaluate each RUN in turn (a failed run does not stop the rest)
  local name=$1; shift
  for r in "$@"; do
    [ -e "$LOGS/STOP" ] && break
    if run --only "$r" >> "$LOGS/$name.log" 2>&1; then say "$name: $r done"; else say "$name: $r FAILED"; fi
  done
}
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
pids=()
if [ "$PART" = all ]; then
  for s in 10 20 30; do
    worker "skd-s$s" "skd-fkl-s$s" & pids+=($!)
    worker "skdpocl-s$s" "skd-pocl-fkl-s$s" & pids+=($!)
  done
elif [ "$PART" = skd ]; then
  skd_runs=(); for s in 10 20 30; do skd_runs+=("skd-fkl-s$s" "skd-pocl-fkl-s$s"); done
  per=$((6 / SKD_WORKERS))   # worker w takes runs w*per .. (w+1)*per - 1 of the list: a seed's pair stays together
  for ((w = 0; w < SKD_WORKERS; w++)); do
    worker "skd-w$w" "${skd_runs[@]:$((w * per)):$per}" & pids+=($!)
  done
fi
if [ "$PART" != skd ]; then
  worker kd       kd-fkl-s10 kd-fkl-s20 kd-fkl-s30 & pids+=($!)
  worker pocl     pocl-fkl-s10 pocl-fkl-s20 pocl-fkl-s30 & pids+=($!)
  worker taid     taid-s10 taid-s20 taid-s30 & pids+=($!)
  worker taidpocl taid-pocl-s10 taid-pocl-s20 taid-pocl-s30 & pids+=($!)
  worker assist   pocl-assistant-fkl-s10 pocl-assistant-fkl-s20 pocl-assistant-fkl-s30 & pids+=($!)
  worker refs     teacher student & pids+=($!)
fi
if [ "$DEADLINE" -gt 0 ]; then
  ( while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do sleep 2; done
    say "deadline: stopping the workers"; touch "$LOGS/STOP"
    # SIGTERM reaches each worker's runner (a child of the worker), which passes it to its pocl run (that
    # saves a checkpoint and exits); whatever of this script's process tree is left 20 s later is killed.
    # Only this script's processes: other pocl jobs on the machine are not touched.
    for p in "${pids[@]}"; do pkill -TERM -P "$p"; done; sleep 20
    for p in "${pids[@]}"; do kill -KILL $(descendants "$p") 2>/dev/null; done ) &
  watchdog=$!
fi
wait "${pids[@]}"
[ -n "${watchdog:-}" ] && { pkill -P "$watchdog"; kill "$watchdog"; } 2>/dev/null  # and its sleep
say "phase 4: tables"
run --table-only > "$LOGS/tables.log" 2>&1 || say "tables failed (see $LOGS/tables.log)"
say "done"
