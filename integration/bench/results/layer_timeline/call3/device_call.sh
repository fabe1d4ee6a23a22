set -u
export LD_LIBRARY_PATH=.gpuwork/tl/lib
K=.gpuwork/tl ARMS="head ra16 ra32 sa32" THREADS="16 1" DTYPES=bf16 DEADLINE=200 bash integration/bench/results/scan_spread/run.sh /tmp/ra 3 > /dev/null 2>&1
python3 integration/bench/results/scan_spread/collate.py /tmp/ra
K=.gpuwork/tl ARMS="base head" THREADS="1 4 16" DTYPES="bf16 fp32" DEADLINE=170 bash integration/bench/results/scan_spread/run.sh /tmp/bh 2 > /dev/null 2>&1
python3 integration/bench/results/scan_spread/collate.py /tmp/bh
tar -C /tmp -czf $OUT/call3.tar.gz ra bh
