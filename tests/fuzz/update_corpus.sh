#!/usr/bin/env bash
# Minimizes a campaign's working corpora into the repo's (tests/fuzz/corpus/<target>/): only
# inputs that add coverage are kept (libFuzzer -merge=1), so the committed corpora stay small.
#   bash tests/fuzz/update_corpus.sh <build-dir> <campaign-out-dir> [target ...]
set -euo pipefail
build=$1 out=$2
shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(paged_kv_fuzz digest_fuzz select_fuzz decode_fuzz config_fuzz xclbin_fuzz)
for t in "${targets[@]}"; do
  [ -d "$out/corpus/$t" ] || continue
  mkdir -p "tests/fuzz/corpus/$t"
  ASAN_OPTIONS=detect_leaks=0 "$build/tests/fuzz/$t" -merge=1 "tests/fuzz/corpus/$t" \
    "$out/corpus/$t" >/dev/null 2>&1
  echo "$t: $(ls "tests/fuzz/corpus/$t" | wc -l) inputs, $(du -sk "tests/fuzz/corpus/$t" | cut -f1) KiB"
done
