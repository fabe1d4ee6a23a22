#!/usr/bin/env bash
# MEMPIPE_KV_COLLAPSE_SHARE on the Zen 5 build VM, 2026-12-05, in the order it ran.
# Run from the repository root: bash integration/bench/results/collapse_share/run.sh OUTDIR
set -uo pipefail
out=$1
bench() { python integration/bench/vllm_cpu_bench.py --batch 4 --new-tokens 32 "$@"; }
prof() {  # prof NAME VAR=VALUE BACKEND DTYPE LENGTH NEW_TOKENS
  env "$2" MEMPIPE_CONFIG=budget=512,page_size=32,dense_layers=2 python \
    integration/bench/vllm_cpu_profile.py --backend "$3" --dtype "$4" --length "$5" --batch 4 \
    --new-tokens "$6" --json "$out/$1.json" > "$out/$1.log" 2>&1
}
# 1. Share 0.05 (the first default), fp32 first prefill at 2K and 4K, with share 1 (each page
#    before its first write, what 183c7fb did) and advise beside (r1_variants), then rounds 2-3.
bench --rows fp32:2048,fp32:4096 --variant share1:MEMPIPE_KV_COLLAPSE_SHARE=1 \
  --variant advise:MEMPIPE_KV_HUGE_PAGES=advise --json "$out/r1_variants.json" > "$out/r1_variants.log" 2>&1
for r in 2 3; do bench --rows fp32:2048,fp32:4096 --json "$out/r$r.json" > "$out/r$r.log" 2>&1; done
# 2. The worker's timers over 256 decode steps, bf16 4 x 6144: share 0.05, share 1 and advise,
#    then advise, share 1 and share 0.05 between two more runs of share 0.05.
prof prof_6k_share005_r1 MEMPIPE_KV_COLLAPSE_SHARE=0.05 CUSTOM bf16 6144 256
prof prof_6k_share1_r1 MEMPIPE_KV_COLLAPSE_SHARE=1 CUSTOM bf16 6144 256
prof prof_6k_advise_r1 MEMPIPE_KV_HUGE_PAGES=advise CUSTOM bf16 6144 256
prof prof_6k_share005_r2 MEMPIPE_KV_COLLAPSE_SHARE=0.05 CUSTOM bf16 6144 256
prof prof_6k_advise_r2 MEMPIPE_KV_HUGE_PAGES=advise CUSTOM bf16 6144 256
prof prof_6k_share1_r2 MEMPIPE_KV_COLLAPSE_SHARE=1 CUSTOM bf16 6144 256
prof prof_6k_share005_r3 MEMPIPE_KV_COLLAPSE_SHARE=0.05 CUSTOM bf16 6144 256
# 3. fp32 4 x 2048 again (share 0.05), rounds 4-6, the engine that runs first alternating.
for r in 4 5 6; do
  order=CPU_ATTN,CUSTOM; [ $((r % 2)) = 0 ] && order=CUSTOM,CPU_ATTN
  bench --rows fp32:2048 --backends $order --json "$out/r$r.json" > "$out/r$r.log" 2>&1
done
# 4. The worker's timers of that prefill: CPU_ATTN, mempipe (share 0.05), mempipe without huge
#    pages (off), twice.
for r in 1 2; do
  prof p2k_CPU_ATTN_r$r X=1 CPU_ATTN fp32 2048 32
  prof p2k_CUSTOM_r$r X=1 CUSTOM fp32 2048 32
  prof p2k_CUSTOM_off_r$r MEMPIPE_KV_HUGE_PAGES=off CUSTOM fp32 2048 32
done
# 5. The default now 0.02: three rounds of fp32 2K, fp32 4K and bf16 2K, the order alternating.
for r in 1 2 3; do
  order=CPU_ATTN,CUSTOM; [ $((r % 2)) = 0 ] && order=CUSTOM,CPU_ATTN
  bench --rows fp32:2048,fp32:4096,bf16:2048 --backends $order --json "$out/final_r$r.json" \
    > "$out/final_r$r.log" 2>&1
done
# 6. fp32 4 x 2048 with two warm prefills after each engine's decode (the engines' later
#    requests, one-time costs paid), two rounds, the order swapped.
for r in 1 2; do
  order=CUSTOM,CPU_ATTN; [ $r = 2 ] && order=CPU_ATTN,CUSTOM
  bench --rows fp32:2048 --warm-prefills 2 --backends $order --json "$out/warm_r$r.json" \
    > "$out/warm_r$r.log" 2>&1
done
