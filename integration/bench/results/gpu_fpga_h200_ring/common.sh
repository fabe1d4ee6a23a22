# Sourced by the device scripts: unpack, environment, module build (kept in .gpuwork/site).
set -o pipefail
for f in .gpuwork/final/pack/*.tar.xz; do tar -xJf "$f" -C .gpuwork/final; done
D=$PWD/.gpuwork/deps/usr; P=$PWD/.gpuwork/final/prebuilt
export CMAKE_PREFIX_PATH=$D LD_LIBRARY_PATH=$D/lib/x86_64-linux-gnu:$P/libs CPATH=$D/include \
       PYTHONUNBUFFERED=1 MEMPIPE_ABSL_LIBDIR=$D/lib/x86_64-linux-gnu
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/r/device.txt
echo "main at $(cat .gpuwork/final/REV); host $(nproc) cores" | tee -a $OUT/r/device.txt
T0=$SECONDS
SITE=$PWD/.gpuwork/site
build_module() {
  if [ -f $SITE/.rev ] && [ "$(cat $SITE/.rev)" = "$(cat .gpuwork/final/REV)" ]; then
    echo "[t] module reused from the previous call"; return; fi
  MEMPIPE_PREBUILT=$P MEMPIPE_STAGES="build" MEMPIPE_SITE=$SITE \
    bash integration/bench/run_gpu_suite.sh /tmp/o > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
  cp .gpuwork/final/REV $SITE/.rev; echo "[t] module built at $((SECONDS-T0)) s"
}
finish() { tar -czf $OUT/results.tgz -C $OUT r; }
