#!/usr/bin/env bash
# The timeline of README.md on a machine: layer_timeline at each of THREADS (default
# "16 8 4 2 1") for each of DTYPES (default "bf16 fp32"), LAYERS layers (default 64, 1.2 GiB of
# bf16 KV) and PASSES passes (default 5); the events of every run go to OUT/<dtype>_t<threads>.csv,
# and everything is tarred into OUT/timeline.tar.gz (a device reply returns at most 8 files).
#   K=DIR OUT=DIR bash device.sh
# K holds layer_timeline and, where the machine lacks Abseil, lib/ with the libraries `ldd` lists.
set -uo pipefail
K=${K:?directory of layer_timeline}; O=${OUT:?output directory}; mkdir -p "$O/tl"
export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
{ lscpu; uptime; } > "$O/tl/machine.txt"
for dt in ${DTYPES:-bf16 fp32}; do
  for t in ${THREADS:-16 8 4 2 1}; do
    echo "== $dt $t threads" >&2
    timeout 300 "$K/layer_timeline" "$t" "$dt" "${LAYERS:-64}" "${PASSES:-5}" \
      "$O/tl/${dt}_t$t.csv" > "$O/tl/${dt}_t$t.txt" 2> "$O/tl/${dt}_t$t.err"
    cat "$O/tl/${dt}_t$t.txt"
  done
done
tar -C "$O" -czf "$O/timeline.tar.gz" tl && rm -rf "$O/tl"
