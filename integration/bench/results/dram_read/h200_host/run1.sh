#!/usr/bin/env bash
# H200 host, CPU only: the STREAM-like read over buffer sizes (mempipe-membw as mw), then the
# kernels (mempipe-cpu-kernel-bench as kb) with the read and the layers sized past the L3
# (the defaults since this commit) beside the old sizes (--read_mib=256, --layers=8 / 2 / 16).
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
lscpu > $OUT/r/lscpu.txt
grep . /sys/devices/system/cpu/cpu0/cache/index*/{level,type,size} > $OUT/r/caches.txt 2>&1
timeout 150 $X/mw --mib=64,128,256,384,512,1024,2048,4096 --threads=1,8,16 > $OUT/r/membw_1.txt 2>/dev/null
echo "membw rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
k() { local n=$1; shift
  timeout 100 $X/kb --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4"
for r in 1 2 3; do
  k llama1_t16_new_$r --threads=16
  k llama1_t16_old_$r --threads=16 --layers=8 --read_mib=256
  k llama4_t16_new_$r --seqs=4 --threads=16
  k llama4_t16_old_$r --seqs=4 --threads=16 --layers=4 --read_mib=512
  k smol4_bf16_t16_new_$r $S --dtype=bf16 --threads=16
  k smol4_bf16_t16_old_$r $S --dtype=bf16 --threads=16 --layers=16 --read_mib=256
  k smol4_fp32_t16_new_$r $S --dtype=fp32 --threads=16
  k llama1_t1_new_$r --threads=1
  k llama1_t1_old_$r --threads=1 --layers=2 --read_mib=256
  k smol4_bf16_t1_new_$r $S --dtype=bf16 --threads=1
  [ $((SECONDS-T0)) -gt 420 ] && break
done
timeout 100 $X/mw --mib=256,512,2048 --threads=1,16 > $OUT/r/membw_2.txt 2>/dev/null
echo "membw2 rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
tar -czf $OUT/run.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
