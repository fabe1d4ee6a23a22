#!/usr/bin/env bash
# A/B of the portable kernel (--cpu_kernel=portable), the build before (kb_old) and after
# (kb_new) PrefetchPage became always_inline, alternated: SmolLM2 4 x 6K bf16 and fp32,
# Llama-3-8B 1 x 32K bf16; 2 threads.
#   ab.sh DIR_WITH_kb_old_AND_kb_new OUT ROUNDS
set -uo pipefail
B=$1; O=$2; R=${3:-3}
mkdir -p "$O"
S=(--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head --threads=2 --passes=7 --cpu_kernel=portable)
for r in $(seq 1 "$R"); do
  for v in old new; do
    for dt in bf16 fp32; do
      "$B/kb_$v" "${S[@]}" --dtype=$dt 2>&1 | grep -v '^\[' > "$O/smol_${dt}_${v}_$r.log"
    done
    "$B/kb_$v" --kv_layout=head --threads=2 --passes=5 --cpu_kernel=portable 2>&1 | grep -v '^\[' > "$O/smol_llama_${v}_$r.log"
    echo "round $r $v done $(date -u +%H:%M:%S)"
  done
done
