#!/usr/bin/env bash
# The L1 microbenchmarks of one SmolLM2 page (32 tokens, 3 query heads, head_dim 64) for the AVX2
# kernel: they include attention/decode.cc, so each is built against a source tree (base: c3221e6,
# new: this commit), linked against a CPU build's libraries (LIBTREE/build).
#   build.sh TREE OUT SOURCE [LIBTREE]
set -e
tree=${1:?source tree} out=${2:?output} src=${3:?source} lib=${4:-$1}
libs="$lib/build/attention/libmempipe_attention.a $lib/build/core/libmempipe_core.a -labsl_statusor
  -labsl_strings -labsl_str_format_internal -labsl_status -labsl_cord -labsl_int128
  -labsl_throw_delegate -labsl_raw_logging_internal -labsl_time -labsl_time_zone
  -labsl_synchronization -labsl_base -labsl_spinlock_wait -lpthread"
c++ -march=x86-64-v3 -I"$tree" -O3 -DNDEBUG -ffp-contract=off -std=c++20 -w "$src" -o "$out" $libs
