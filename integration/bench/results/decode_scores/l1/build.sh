#!/usr/bin/env bash
# The L1 scores microbenchmark (l1_scores.txt). It includes attention/decode.cc directly, so it
# is built against a source tree: scores_microbench_base.cc.txt against a19a1f3 (the per-token
# scores), scores_microbench.cc.txt against 3538617 (token blocks). The SmolLM2 variants change
# the page (32 tokens, 3 heads, head_dim 64). Run from the repository root after a CPU build.
#   bash integration/bench/results/decode_scores/l1/build.sh <base-tree> <new-tree> <out-dir>
set -euo pipefail
base=$1 new=$2 out=$3 here=$(dirname "$0")
libs="$PWD/build/core/libmempipe_core.a -labsl_statusor -labsl_strings -labsl_str_format_internal
  -labsl_status -labsl_cord -labsl_int128 -labsl_throw_delegate -labsl_raw_logging_internal -lpthread"
smol='s/const int n = 16, G = 4, P = 8, cap = 128;/const int n = 32, G = 3, P = 4, cap = 128;/;
  s/constexpr int D = 128, ND = 8, NZ = 4;/constexpr int D = 64, ND = 4, NZ = 2;/;
  s/, ND, 4>(/, ND, 3>(/g; s/<NZ, 4>(/<NZ, 3>(/g'
mkdir -p "$out"
build() {  # source tree, microbench source, output
  c++ -march=sapphirerapids -I"$1" -O3 -DNDEBUG -ffp-contract=off -std=c++20 -w "$2" -o "$3" $libs
}
cp "$here/scores_microbench_base.cc.txt" "$out/base.cc"; sed -e "$smol" "$out/base.cc" > "$out/base_smol.cc"
cp "$here/scores_microbench.cc.txt" "$out/new.cc"; sed -e "$smol" "$out/new.cc" > "$out/new_smol.cc"
build "$base" "$out/base.cc" "$out/mb_base"; build "$base" "$out/base_smol.cc" "$out/mb_base_smol"
build "$new" "$out/new.cc" "$out/mb_v4"; build "$new" "$out/new_smol.cc" "$out/mb_v4_smol"
for i in 1 2 3; do for v in base v4; do
  echo "== llama $v: $("$out/mb_$v" | tr '\n' ' ')"; echo "== smol $v: $("$out/mb_${v}_smol" | tr '\n' ' ')"
done; done
