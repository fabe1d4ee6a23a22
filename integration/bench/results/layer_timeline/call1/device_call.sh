set -u
K=.gpuwork/tl OUT=$OUT THREADS="16 8 4 1" DTYPES=bf16 bash integration/bench/results/layer_timeline/device.sh
mv $OUT/timeline.tar.gz $OUT/timeline_bf16.tar.gz
K=.gpuwork/tl OUT=$OUT THREADS="16" DTYPES=fp32 bash integration/bench/results/layer_timeline/device.sh
mv $OUT/timeline.tar.gz $OUT/timeline_fp32.tar.gz
K=.gpuwork/tl THREADS="16 1" DTYPES=bf16 DEADLINE=200 bash integration/bench/results/scan_spread/run.sh /tmp/topk 3 > /dev/null 2>&1
python3 integration/bench/results/scan_spread/collate.py /tmp/topk
tar -C /tmp -czf $OUT/topk_h.tar.gz topk
