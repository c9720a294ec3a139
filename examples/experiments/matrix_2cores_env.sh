# Sourced by the *_2cores.sh scripts after they set SPEC: strict mode, one torch thread per process (two
# processes share the two cores), and run ARGS... = `pocl matrix $SPEC --no-progress ARGS...`.
# PYTHON picks the interpreter (default: python).
set -euo pipefail
: "${SPEC:?set SPEC (the matrix spec) before sourcing matrix_2cores_env.sh}"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
run() { "$PY" -m pocl matrix "$SPEC" --no-progress "$@"; }
mkdir -p runs
