// Digest kernels (see the header).
//
//   BuildDigestsKernel        grid (page, seq): threads over (kv head, channel); tokens in order
//   AppendKvAndDigestsKernel  grid (token): write K/V rows; the last token of each block in the
//                             batch folds that block's tokens, in append order, into its digest
#include "absl/strings/str_cat.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"
#include "retriever/gpu/digest_gpu.h"

namespace mempipe {
namespace {

using gpu::BF16;
using gpu::F16;

constexpr int kThreads = 256;

// The CPU's WidenRow, element-wise: strict comparisons, so ties keep the older value.
template <typename T>
__device__ __forceinline__ void Widen(T k, T& mx, T& mn) {
  const float kf = gpu::ToF32(k);
  if (kf > gpu::ToF32(mx)) mx = k;
  if (kf < gpu::ToF32(mn)) mn = k;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    BuildDigestsKernel(const T* kv, T* digests, const int32_t* block_table, const int32_t* seq_lens,
                       int num_blocks, int block_size, int num_kv_heads, int head_dim,
                       int max_blocks_per_seq) {
  const int page = blockIdx.x, seq = blockIdx.y;
  const int len = seq_lens[seq];
  if (len <= 0 || page * block_size >= len) return;
  const int block = block_table[static_cast<size_t>(seq) * max_blocks_per_seq + page];
  if (block < 0 || block >= num_blocks) return;
  const int n = min(block_size, len - page * block_size);
  const int row = num_kv_heads * head_dim;
  const T* kb = kv + static_cast<size_t>(block) * block_size * row;
  T* dg = digests + static_cast<size_t>(block) * 2 * row;
  for (int i = threadIdx.x; i < row; i += kThreads) {
    T mx = kb[i], mn = kb[i];
    for (int t = 1; t < n; ++t) Widen(kb[static_cast<size_t>(t) * row + i], mx, mn);
    dg[i] = mx;
    dg[row + i] = mn;
  }
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

template <typename Fn>
absl::Status DispatchGpuType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn.template operator()<float>();
    case DType::kFloat16:
      return fn.template operator()<F16>();
    case DType::kBFloat16:
      return fn.template operator()<BF16>();
  }
  return absl::InvalidArgumentError("unknown dtype");
}

}  // namespace

absl::Status BuildDigestsGpu(const KvCacheView& cache, const BlockTableView& table,
                             const DigestView& digests, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  if (table.block_table == nullptr || table.seq_lens == nullptr || table.num_seqs <= 0 ||
      table.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table needs non-null pointers and positive sizes, got ", table.num_seqs,
                     " x ", table.max_blocks_per_seq));
  }
  if (table.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("num_seqs ", table.num_seqs, " exceeds 65535"));
  }
  return DispatchGpuType(cache.dtype, [&]<typename T>() {
    const dim3 grid(table.max_blocks_per_seq, table.num_seqs);
    BuildDigestsKernel<T><<<grid, kThreads, 0, static_cast<hipStream_t>(stream)>>>(
        static_cast<const T*>(cache.data), static_cast<T*>(digests.data), table.block_table,
        table.seq_lens, cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim,
        table.max_blocks_per_seq);
    return GpuLastError("BuildDigestsKernel launch");
  });
}

absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache, const int64_t* slot_mapping,
                                   int num_tokens, const void* key, const void* value,
                                   const DigestView& digests, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (slot_mapping == nullptr || key == nullptr || value == nullptr) {
    return absl::InvalidArgumentError("slot_mapping, key and value must not be null");
  }
  return DispatchGpuType(cache.dtype, [&]<typename T>() {
    AppendKvAndDigestsKernel<T><<<num_tokens, kThreads, 0, static_cast<hipStream_t>(stream)>>>(
        static_cast<T*>(cache.data), static_cast<T*>(digests.data), slot_mapping, num_tokens,
        static_cast<const T*>(key), static_cast<const T*>(value), cache.num_blocks,
        cache.block_size, cache.num_kv_heads, cache.head_dim, cache.PlaneElems());
    return GpuLastError("AppendKvAndDigestsKernel launch");
  });
}

}  // namespace mempipe
