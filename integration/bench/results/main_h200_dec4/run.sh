#!/usr/bin/env bash
# Session script: the committed GPU verification of this tree on the H200, then the host
# kernels at SmolLM2 4 x 6K (issue 16's shape) on the same machine's CPU.
set -uo pipefail
tar -xJf .gpuwork/pack/bins.tar.xz -C .gpuwork || exit 1
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/prebuilt
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu CPATH=$D/include PYTHONUNBUFFERED=1 \
       MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu MEMPIPE_XRT_LIBDIR=$D/lib/x86_64-linux-gnu
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "binaries and tree at $(cat .gpuwork/REV) (+ uncommitted: $(git status --short 2>/dev/null | wc -l) paths)"
  nproc; grep -m1 'model name' /proc/cpuinfo
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } | tee $OUT/device.txt
T0=$SECONDS
MEMPIPE_VERIFY_BENCH="32768:1:32 131072:1:32" timeout 420 bash integration/bench/run_gpu_verify.sh $P $OUT/verify > $OUT/run_gpu_verify.log 2>&1
echo "run_gpu_verify rc=$? at $((SECONDS-T0)) s" | tee -a $OUT/run_gpu_verify.log
S="--num_heads=9 --num_kv_heads=3 --head_dim=64 --page_size=32 --context=6144 --budget=512 --seqs=4 --kv_layout=head"
mkdir -p $OUT/kb
for r in 1 2; do for th in 16 2; do for dt in bf16 fp32; do
  [ $((SECONDS-T0)) -gt 540 ] && break 3
  timeout 60 $P/mempipe-cpu-kernel-bench $S --dtype=$dt --threads=$th --passes=7 2>&1 | grep -v '^\[' > $OUT/kb/smol_${dt}_t${th}_$r.log
  echo "kb $dt t$th r$r rc=$? at $((SECONDS-T0)) s" >> $OUT/kb/runs.txt
done; done; done
tail -2 $OUT/run_gpu_verify.log; cat $OUT/kb/runs.txt
