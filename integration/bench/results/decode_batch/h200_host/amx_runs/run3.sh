#!/usr/bin/env bash
export LD_LIBRARY_PATH=$PWD/.gpuwork/deps/lib
X=$PWD/.gpuwork/xeon
mkdir -p $OUT/r; T0=$SECONDS
timeout 300 $X/decode_test --gtest_brief=1 > $OUT/r/decode_test.txt 2>&1; echo "decode_test rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt
tail -3 $OUT/r/decode_test.txt
$X/mb3 | tee $OUT/r/mb3.txt; $X/mb3 >> $OUT/r/mb3.txt
k() { local n=$1 b=$2; shift 2
  timeout 120 $X/$b --passes=5 --kv_layout=head "$@" 2>&1 | grep -v '^\[' > $OUT/r/$n.log
  echo "$n rc=$? at $((SECONDS-T0)) s" >> $OUT/r/runs.txt; }
for r in 1 2 3; do
  for b in kb_new kb_amx2; do
    k llama_${b}_$r $b --threads=16 --layers=8
    k llama_t1_${b}_$r $b --threads=1 --layers=4
  done
done
tar -czf $OUT/run3.tgz -C $OUT r; tail -1 $OUT/r/runs.txt
