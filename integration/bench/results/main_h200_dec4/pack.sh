#!/usr/bin/env bash
# Packs what the GPU machine needs into /work/main/.gpuwork (ignored, carried).
set -euo pipefail
cd /work/main
B=/work/build_gpu; G=.gpuwork
rm -rf $G; mkdir -p $G/stage/prebuilt $G/stage/deps/usr/include $G/stage/deps/usr/lib/x86_64-linux-gnu $G/pack
for t in gpu_kernels_test gpu_apply_device_test gpu_selection_offload_test; do
  cp "$(find $B -name $t -type f -perm -u+x | head -1)" $G/stage/prebuilt/; done
for t in mempipe-bench mempipe-cpu-kernel-bench mempipe-membw; do
  f=$(find $B -name $t -type f -perm -u+x | head -1); [ -n "$f" ] && cp "$f" $G/stage/prebuilt/; done
find $B -name 'libmempipe_*.a' -exec cp {} $G/stage/prebuilt/ \;
PB=$(/work/venv/bin/python -c "import pybind11;print(pybind11.get_include())")
for f in bindings/module.cc bindings/dlpack_tensor.cc bindings/gpu_device.cc; do
  g++ -std=c++20 -M -DMEMPIPE_MODULE_GPU -I. -I/usr/include/python3.11 -I"$PB" -I/usr/local/cuda/include $f
done | tr ' \\' '\n\n' | grep -E "^/usr/include/(absl|boost|dlpack)/" | sort -u > /tmp/hdrs.txt
# absl whole (headers include each other through paths -M resolved once), boost as listed
cp -r /usr/include/absl /usr/include/dlpack $G/stage/deps/usr/include/
grep "^/usr/include/boost/" /tmp/hdrs.txt | while read -r h; do
  d=$G/stage/deps/usr/include/$(dirname "${h#/usr/include/}"); mkdir -p "$d"; cp "$h" "$d/"; done
L=$G/stage/deps/usr/lib/x86_64-linux-gnu
cp -a /usr/lib/x86_64-linux-gnu/libabsl_*.so* /usr/lib/x86_64-linux-gnu/libxrt*.so* $L/
for b in $G/stage/prebuilt/gpu_kernels_test $G/stage/prebuilt/mempipe-bench $L/libxrt_coreutil.so $L/libxrt_core.so; do
  ldd "$b" | awk '/=> \//{print $3}'; done | sort -u | grep -v -E "libabsl|libxrt|libc\.so|libm\.so|libstdc|libgcc|ld-linux|libpthread|libdl|librt" > /tmp/libs.txt || true
cat /tmp/libs.txt
while read -r l; do cp -L "$l" $L/; done < /tmp/libs.txt
git rev-parse --short HEAD > $G/stage/REV
tar -cJf $G/pack/bins.tar.xz -C $G/stage .
rm -rf $G/stage
du -sh $G/pack/bins.tar.xz
