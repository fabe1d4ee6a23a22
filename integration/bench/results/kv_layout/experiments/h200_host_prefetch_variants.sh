#!/usr/bin/env bash
# H200 host, CPU only: head-major KV layout (each KV head's page contiguous) against the
# token-major one, pages 16/32/64, 16 threads; XHM_PF 0 = rows spread over the scores, 1 =
# burst at page start, 2 = none.
D=$PWD/.gpuwork/deps/usr
export LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu
X=$PWD/.gpuwork/final/xeon
mkdir -p $OUT/r; T0=$SECONDS
k() {  # name args...
  local n=$1; shift
  timeout 120 $X/hm --passes=5 "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
}
for r in 1 2; do
  for pg in 16 32 64; do
    k tm_p${pg}_$r --threads=16 --layers=8 --page_size=$pg --kv_layout=token
    XHM_PF=0 k hm0_p${pg}_$r --threads=16 --layers=8 --page_size=$pg --kv_layout=head
    XHM_PF=1 k hm1_p${pg}_$r --threads=16 --layers=8 --page_size=$pg --kv_layout=head
  done
done
XHM_PF=2 k hm2_p16 --threads=16 --layers=8 --page_size=16 --kv_layout=head
cd $OUT/r && for f in *.log; do echo "== $f"; grep -E "CPU time|attention" $f | sed 's/per layer, best of 5 passes, CPU time per thread; % of the read bandwidth (STREAM-like, //'; done > summary.txt
tar -czf $OUT/hm.tgz -C $OUT r; cat summary.txt
