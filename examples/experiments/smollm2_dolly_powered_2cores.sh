#!/usr/bin/env bash
# The powered SmolLM2/Dolly matrix (smollm2_dolly_powered.yaml, issue 18) on a 2-core machine: two runner
# processes of one torch thread each. Every step is resumable: run the same command again and finished
# runs and evaluations are skipped (a matrix that needs more than one sitting carries over this way).
# docs/results.md quotes what this produced.
#
#   examples/experiments/smollm2_dolly_powered_2cores.sh      # from the repository root, venv active
#
# Logs: runs/powered-{prep,pilot-a,pilot-b,a,b}.log and runs/matrix/smollm2-dolly-powered/logs/RUN.log.
SPEC=examples/experiments/smollm2_dolly_powered.yaml
source "$(dirname "$0")/matrix_2cores_env.sh"   # strict mode, 1 thread per process, run()

# 1. One process: GGUF -> checkpoint, pocl init-student, the healing SFT (no POCL run: no ranking yet).
run --only teacher --no-eval > runs/powered-prep.log 2>&1

# 2. The pilot of the power sizing: two plain-KD SRKL runs that differ only by the training seed,
#    trained side by side, then each evaluated with two sampling seeds into OUTPUT/pilot/ (the matrix
#    evaluates them again with its own settings in step 4).
OUT=runs/matrix/smollm2-dolly-powered
EVAL=${POCL_SHARED_DATA:-../shared/data}/eval
run --only kd-srkl-s10 --no-eval > runs/powered-pilot-a.log 2>&1 &
run --only kd-srkl-s20 --no-eval > runs/powered-pilot-b.log 2>&1 &
wait
for s in 10 20; do
  "$PY" -m pocl eval --model "kd-srkl-s$s=$OUT/runs/kd-srkl-s$s/final" --data "Dolly=$EVAL/dolly.jsonl" \
    --data "SelfInst=$EVAL/self_inst.jsonl" --data "Vicuna=$EVAL/vicuna.jsonl" --max-samples 80 --seeds 10 20 \
    --max-new-tokens 96 --batch-size 16 --max-prompt-length 256 --dtype bfloat16 --no-progress \
    --output-dir "$OUT/pilot/kd-srkl-s$s" > "runs/powered-pilot-eval-s$s.log" 2>&1 &
done
wait

# 3. The sizing (benchmarks/results/experiment_power.json; docs/results.md, "Sizing"): the variance
#    components of the pilot's null difference, the seed spread of the earlier matrix, the measured
#    costs (seconds per sample pass: train_seconds / samples trained in the pilot runs' summary.json;
#    seconds per run outside training: the runner's "done in" minus train_seconds, after the first run
#    has built the shared teacher cache). It chose the spec's eval section (80 prompts, 1 seed).
"$PY" benchmarks/experiment_sizing.py power \
  --pilot "$OUT/pilot/kd-srkl-s10:kd-srkl-s10" "$OUT/pilot/kd-srkl-s20:kd-srkl-s20" \
  --previous docs/results/results.json --train-seconds-per-sample 0.747 --run-overhead-seconds 25 \
  --train-runs 29 --training-seeds 3 5

# 4. Two processes, seed by seed so that a run stopped early still leaves paired rows: (a) plain KD,
#    three ablations and the teacher, (b) KD + POCL (the first POCL run makes the shared ranking), two
#    ablations and the initial student.
(
  for s in 10 20 30; do run --only "kd-srkl-s$s" "kd-fkl-s$s" "kd-rkl-s$s" "kd-jsd-s$s"; done
  run --only 'pocl-srkl-random-s*' 'pocl-srkl-reverse-s*' 'pocl-srkl-const_t-s*'
  run --only teacher
) > runs/powered-a.log 2>&1 &
(
  for s in 10 20 30; do run --only "pocl-srkl-s$s" "pocl-fkl-s$s" "pocl-rkl-s$s" "pocl-jsd-s$s"; done
  run --only 'pocl-srkl-rouge-s*' 'pocl-srkl-loss-s*'
  run --only student
) > runs/powered-b.log 2>&1 &
wait

# 5. The tables, intervals and plots of everything (no training, no evaluation), copied into docs/.
run --table-only --export docs/results/powered
