#!/usr/bin/env bash
set -e
tree=${1:?tree} out=${2:?out} src=${3:?src} lib=/work/build
libs="$lib/attention/libmempipe_attention.a $lib/core/libmempipe_core.a -labsl_statusor
  -labsl_strings -labsl_str_format_internal -labsl_status -labsl_cord -labsl_int128
  -labsl_throw_delegate -labsl_raw_logging_internal -labsl_time -labsl_time_zone
  -labsl_synchronization -labsl_base -labsl_spinlock_wait -lpthread"
c++ -I"$tree" -I/work/build -O3 -DNDEBUG -ffp-contract=off -std=c++20 -w "$src" -o "$out" $libs
