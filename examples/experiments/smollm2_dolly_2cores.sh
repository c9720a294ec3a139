#!/usr/bin/env bash
# The SmolLM2/Dolly matrix (smollm2_dolly.yaml) on a 2-core machine: two runner processes of one torch
# thread each, in the order that fills the results table seed by seed, so that a run stopped early still
# leaves finished rows. Every step is resumable: run the same command again and finished runs and
# evaluations are skipped. docs/results.md quotes what this produced.
#
#   examples/experiments/smollm2_dolly_2cores.sh            # from the repository root, with the venv active
#
# Logs: runs/matrix-smollm2-dolly-{prep,a,b}.log and runs/matrix/smollm2-dolly/logs/RUN.log.
SPEC=examples/experiments/smollm2_dolly.yaml
source "$(dirname "$0")/matrix_2cores_env.sh"   # strict mode, 1 thread per process, run()

# 1. One process: the teacher's GGUF -> HF checkpoint, pocl init-student, the healing SFT, the shared
#    ranking, and the first POCL run (the two runners below must not prepare or rank at the same time).
run --only pocl-fkl-s10 --no-eval > runs/matrix-smollm2-dolly-prep.log 2>&1

# 2. Two processes: (a) the plain-KD runs and half of the ablations, (b) the POCL runs, the other half
#    of the ablations and the two reference models.
(
  for s in 10 20 30; do run --only "kd-*-s$s"; done
  run --only 'pocl-srkl-random-s*' 'pocl-srkl-reverse-s*' 'pocl-srkl-const_t-s*'
) > runs/matrix-smollm2-dolly-a.log 2>&1 &
(
  for s in 10 20 30; do run --only "pocl-fkl-s$s" "pocl-rkl-s$s" "pocl-jsd-s$s" "pocl-srkl-s$s"; done
  run --only 'pocl-srkl-t_max_4-s*' 'pocl-srkl-rouge-s*' 'pocl-srkl-loss-s*'
  run --only teacher student
) > runs/matrix-smollm2-dolly-b.log 2>&1 &
wait

# 3. The table of everything (no training, no evaluation).
run --table-only
