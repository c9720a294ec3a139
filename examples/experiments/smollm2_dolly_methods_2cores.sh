#!/usr/bin/env bash
# The methods matrix of issue 20 (smollm2_dolly_methods.yaml: KD, TAID, Speculative KD and an assistant
# teacher, each with and without POCL, and POCL at constant T; 3 seeds) on a 2-core CPU: two runner processes
# of one torch thread each, about 1 h 40 min here. Every step is resumable: run the same command again and
# finished runs and evaluations are skipped. docs/results.md ("... on this CPU, 3 seeds") quotes what this produced.
#
#   examples/experiments/smollm2_dolly_methods_2cores.sh      # from the repository root, venv active
#
# Logs: runs/methods-{prep,skd-a,skd-b,cache,a,b}.log and runs/matrix/smollm2-dolly-powered/logs/RUN.log.
SPEC=examples/experiments/smollm2_dolly_methods.yaml
source "$(dirname "$0")/matrix_2cores_env.sh"   # strict mode, 1 thread per process, run()

# 1. One process: GGUF -> checkpoint, the 10-layer student and the 20-layer assistant (pocl init-student),
#    both healed by SFT on the Dolly dev rows.
run --only teacher --no-eval > runs/methods-prep.log 2>&1

# 2. The SKD runs first, the longest (about 13 min of training each here): plain SKD in one process, SKD
#    inside POCL in the other (its first run makes the shared ranking). They use no teacher cache.
run --only 'skd-fkl-s*' > runs/methods-skd-a.log 2>&1 &
run --only 'skd-pocl-fkl-s*' > runs/methods-skd-b.log 2>&1 &
wait

# 3. One run alone builds the shared teacher cache (two processes must not build the same cache at once).
run --only taid-s10 > runs/methods-cache.log 2>&1

# 4. The rest in two processes: (a) TAID, TAID+POCL, the teacher's evaluation, then plain KD; (b) the
#    initial student's evaluation, KD+POCL, KD+POCL with the assistant teacher in stages 1-2, then the
#    ablation (KD+POCL at constant T).
( run --only 'taid-s*' 'taid-pocl-s*' teacher; run --only 'kd-fkl-s*' ) > runs/methods-a.log 2>&1 &
( run --only student 'pocl-fkl-s*' 'pocl-assistant-*'; run --only 'pocl-fkl-const_t-*' ) > runs/methods-b.log 2>&1 &
wait

# 5. The tables, intervals and plots of everything (no training, no evaluation), copied into docs/.
run --table-only --export docs/results/methods
