#!/usr/bin/env bash
# H200 host, CPU only: DecodeChunkPages (kb_new) against 512-token chunks (kb_base), alternated;
# first the new decode tests in 16 shards.
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/x
mkdir -p $OUT/r; T0=$SECONDS
lscpu > $OUT/r/lscpu.txt
$X/kb_new --help >/dev/null 2>&1
for i in $(seq 0 15); do
  GTEST_TOTAL_SHARDS=16 GTEST_SHARD_INDEX=$i timeout 200 $X/dt --gtest_brief=1 \
    --gtest_filter='*DecodeTest.*:DecodeChunk*' > $OUT/r/dt_$i.txt 2>&1 &
done
wait
grep -h "tests from .* ran\|FAILED" $OUT/r/dt_*.txt | sort | uniq -c > $OUT/r/dt_summary.txt
echo "decode tests done at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
for t in ${THREADS:-16 4}; do
  timeout ${LIMIT:-240} bash integration/bench/results/small_batches/run.sh $X/kb_base $X/kb_new \
    $OUT/r/t$t $t ${ROUNDS:-3} 2>> $OUT/r/runs.txt
  echo "t$t rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
done
tar -czf $OUT/run.tgz -C $OUT r && rm -rf $OUT/r; echo done
