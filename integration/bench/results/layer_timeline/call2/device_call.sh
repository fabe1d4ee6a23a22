set -u
export LD_LIBRARY_PATH=.gpuwork/tl/lib
mkdir -p /tmp/tl2
.gpuwork/tl/retriever_select_test --gtest_repeat=3 > /tmp/tl2/select_test.log 2>&1; echo "select_test rc=$? $(grep -c '^\[  PASSED' /tmp/tl2/select_test.log) passes"
for t in 16 8; do
  for a in "" _seq; do
    .gpuwork/tl/layer_timeline$a $t bf16 64 5 /tmp/tl2/bf16_t${t}${a}.csv > /tmp/tl2/bf16_t${t}${a}.txt 2>/dev/null
  done
done
.gpuwork/tl/layer_timeline 16 fp32 64 5 /tmp/tl2/fp32_t16.csv > /tmp/tl2/fp32_t16.txt 2>/dev/null
.gpuwork/tl/layer_timeline_seq 16 fp32 64 5 /tmp/tl2/fp32_t16_seq.csv > /tmp/tl2/fp32_t16_seq.txt 2>/dev/null
lscpu > /tmp/tl2/lscpu.txt; uptime > /tmp/tl2/uptime.txt
python3 integration/bench/results/layer_timeline/timeline.py /tmp/tl2
K=.gpuwork/tl ARMS="new seq" THREADS="16 8" DTYPES="bf16 fp32" DEADLINE=230 bash integration/bench/results/scan_spread/run.sh /tmp/kb2 3 > /dev/null 2>&1
K=.gpuwork/tl ARMS="new seq" SHAPES=llama THREADS="16" DTYPES="bf16" DEADLINE=60 bash integration/bench/results/scan_spread/run.sh /tmp/kb2l 2 > /dev/null 2>&1
python3 integration/bench/results/scan_spread/collate.py /tmp/kb2 /tmp/kb2l
tar -C /tmp -czf $OUT/tl2.tar.gz tl2 kb2 kb2l
