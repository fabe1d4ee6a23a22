// See legacy_append_gpu.h: the pre-fix quadratic kernel, for the benchmark's baseline row.
#include "absl/strings/str_cat.h"
#include "core/gpu/dispatch.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"
#include "integration/bench/legacy_append_gpu.h"

namespace mempipe::bench {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void Widen(T k, T& mx, T& mn) {
  const float kf = gpu::ToF32(k);
  if (kf > gpu::ToF32(mx)) mx = k;
  if (kf < gpu::ToF32(mn)) mn = k;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    AppendKvAndDigestsKernel(T* kv, T* digests, const int64_t* slots, int num_tokens, const T* key,
                             const T* value, int num_blocks, int block_size, int num_kv_heads,
                             int head_dim, size_t plane_elems) {
  const int i = blockIdx.x;
  const int64_t slot = slots[i];
  const int64_t num_slots = static_cast<int64_t>(num_blocks) * block_size;
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size;
  const int row = num_kv_heads * head_dim;
  T* kdst = kv + slot * row;
  for (int e = threadIdx.x; e < row; e += kThreads) {
    kdst[e] = key[static_cast<size_t>(i) * row + e];
    kdst[plane_elems + e] = value[static_cast<size_t>(i) * row + e];
  }

  // Only the last token of the batch that lands in this block updates its digest.
  __shared__ int s_later;
  __shared__ int s_start;
  if (threadIdx.x == 0) {
    s_later = 0;
    s_start = -1;
  }
  __syncthreads();
  for (int j = i + 1 + threadIdx.x; j < num_tokens; j += kThreads) {
    const int64_t sj = slots[j];
    if (sj >= 0 && sj < num_slots && sj / block_size == block) s_later = 1;
  }
  // The latest reset (offset 0) of this block at or before token i starts the fold.
  for (int j = threadIdx.x; j <= i; j += kThreads) {
    const int64_t sj = slots[j];
    if (sj >= 0 && sj < num_slots && sj / block_size == block && sj % block_size == 0) {
      atomicMax(&s_start, j);
    }
  }
  __syncthreads();
  if (s_later) return;
  const int start = s_start;
  T* dmx = digests + block * 2 * row;
  T* dmn = dmx + row;
  for (int e = threadIdx.x; e < row; e += kThreads) {
    T mx, mn;
    int j0;
    if (start >= 0) {
      mx = mn = key[static_cast<size_t>(start) * row + e];
      j0 = start + 1;
    } else {
      mx = dmx[e];
      mn = dmn[e];
      j0 = 0;
    }
    for (int j = j0; j <= i; ++j) {
      const int64_t sj = slots[j];
      if (sj >= 0 && sj < num_slots && sj / block_size == block) {
        Widen(key[static_cast<size_t>(j) * row + e], mx, mn);
      }
    }
    dmx[e] = mx;
    dmn[e] = mn;
  }
}

}  // namespace

absl::Status LegacyAppendKvAndDigestsGpu(const KvCacheView& cache, const int64_t* slot_mapping,
                                         int num_tokens, const void* key, const void* value,
                                         const DigestView& digests, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  if (num_tokens <= 0) return absl::OkStatus();
  return gpu::DispatchDType(cache.dtype, [&]<typename T>() {
    AppendKvAndDigestsKernel<T><<<num_tokens, kThreads, 0, static_cast<hipStream_t>(stream)>>>(
        static_cast<T*>(cache.data), static_cast<T*>(digests.data), slot_mapping, num_tokens,
        static_cast<const T*>(key), static_cast<const T*>(value), cache.num_blocks,
        cache.block_size, cache.num_kv_heads, cache.head_dim, cache.PlaneElems());
    return GpuLastError("legacy AppendKvAndDigestsKernel launch");
  });
}

}  // namespace mempipe::bench
