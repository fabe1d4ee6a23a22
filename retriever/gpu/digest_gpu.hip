// Digest kernels (see the header).
//
//   BuildDigestsKernel        grid (page, seq): threads over (kv head, channel); tokens in order
//   append, three kernels in stream order (grid: tokens), bookkeeping in a [3, num_blocks]
//   int32 workspace:
//     ClearAppendTableKernel  resets the entries of the blocks the batch touches
//     AppendKvKernel          writes K/V rows; records each block's first / last token and
//                             latest reset (atomics)
//     FoldDigestsKernel       the last token of each block folds the block's tokens, in append
//                             order, into its digest
//   Before (one kernel), each token scanned the whole batch to learn whether it was its
//   block's last: O(tokens^2), ~10^12 slot reads for a 1M-token prefill.
#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "core/gpu/dispatch.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"
#include "retriever/gpu/digest_gpu.h"
#include "retriever/int8_quant.h"

namespace mempipe {
namespace {

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

// The per-block bookkeeping of one append, in the caller's workspace (int32 each,
// [num_blocks]): the last batch token in the block, the first one, and the latest reset (a
// token at offset 0). Only the entries of blocks that the batch touches are used; the first
// kernel sets them, so the workspace needs no initialization.
struct AppendTable {
  int* last;
  int* first;
  int* reset;
};

AppendTable Carve(void* workspace, int num_blocks) {
  int* w = static_cast<int*>(workspace);
  return {w, w + num_blocks, w + 2 * static_cast<size_t>(num_blocks)};
}

// 1/3: clears the entries of the blocks this batch touches (one thread per token).
__global__ void __launch_bounds__(kThreads)
    ClearAppendTableKernel(AppendTable tab, const int64_t* slots, int num_tokens, int64_t num_slots,
                           int block_size) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= num_tokens) return;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size;
  tab.last[block] = -1;
  tab.first[block] = INT_MAX;
  tab.reset[block] = -1;
}

// 2/3: writes token i's K/V rows (one thread block per token) and records it in its block's
// entry.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    AppendKvKernel(T* kv, AppendTable tab, const int64_t* slots, const T* key, const T* value,
                   int num_blocks, int block_size, int num_kv_heads, int head_dim,
                   size_t plane_elems) {
  const int i = blockIdx.x;
  const int64_t slot = slots[i];
  const int64_t num_slots = static_cast<int64_t>(num_blocks) * block_size;
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size;
  const int row = num_kv_heads * head_dim;
  if (kv != nullptr) {  // null: digests only (UpdateDigestsFromKeysGpu)
    T* kdst = kv + slot * row;
    for (int e = threadIdx.x; e < row; e += kThreads) {
      kdst[e] = key[static_cast<size_t>(i) * row + e];
      kdst[plane_elems + e] = value[static_cast<size_t>(i) * row + e];
    }
  }
  if (threadIdx.x == 0) {
    atomicMax(&tab.last[block], i);
    atomicMin(&tab.first[block], i);
    if (slot % block_size == 0) atomicMax(&tab.reset[block], i);
  }
}

// 3/3: the last token of each block in the batch folds the block's tokens, in append order,
// into its digest: from the latest reset (which restarts the digest at its key), else from
// the block's first token onto the stored digest. It scans the batch between that start and
// itself: the block's own tokens when they are contiguous in the batch (vLLM's order: a
// sequence's new tokens are consecutive), so the whole append reads each token a bounded
// number of times instead of once per later token.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    FoldDigestsKernel(T* digests, AppendTable tab, const int64_t* slots, const T* key,
                      int num_blocks, int block_size, int num_kv_heads, int head_dim) {
  const int i = blockIdx.x;
  const int64_t slot = slots[i];
  const int64_t num_slots = static_cast<int64_t>(num_blocks) * block_size;
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size;
  if (tab.last[block] != i) return;
  const int start = tab.reset[block];
  const int row = num_kv_heads * head_dim;
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
      j0 = tab.first[block];
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

// Int8 digests (retriever/int8_quant.h): re-quantizes every head of `block` from the exact
// digest, one 32-lane group per head. The magnitude reduces as the maximum of the |x| bit
// patterns (order-free and exact for non-negative floats; a pattern >= 0x7f800000 is a
// non-finite channel), then each lane codes its channels with the shared scale.
template <typename T>
__device__ void QuantizeBlock(const T* exact, int8_t* codes, float* scales, int block,
                              int num_kv_heads, int head_dim) {
  const int lane = threadIdx.x % kGpuLanes, group = threadIdx.x / kGpuLanes;
  const int row = num_kv_heads * head_dim;
  for (int h = group; h < num_kv_heads; h += kThreads / kGpuLanes) {
    const size_t omx = static_cast<size_t>(block) * 2 * row + static_cast<size_t>(h) * head_dim;
    const size_t omn = omx + row;
    uint32_t mag = 0;
    for (int c = lane; c < head_dim; c += kGpuLanes) {
      mag = max(mag, int8_digest::Bits(gpu::ToF32(exact[omx + c])) & 0x7fffffffu);
      mag = max(mag, int8_digest::Bits(gpu::ToF32(exact[omn + c])) & 0x7fffffffu);
    }
#pragma unroll
    for (int w = kGpuLanes / 2; w > 0; w /= 2) mag = max(mag, GpuShflXor32(mag, w));
    const float s = int8_digest::Scale(int8_digest::FromBits(mag), mag < 0x7f800000u);
    for (int c = lane; c < head_dim; c += kGpuLanes) {
      codes[omx + c] = int8_digest::QuantizeUp(gpu::ToF32(exact[omx + c]), s);
      codes[omn + c] = int8_digest::QuantizeDown(gpu::ToF32(exact[omn + c]), s);
    }
    if (lane == 0) scales[static_cast<size_t>(block) * num_kv_heads + h] = s;
  }
}

// After BuildDigestsKernel: grid (page, seq), as it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    QuantizeBuildKernel(const T* exact, int8_t* codes, float* scales, const int32_t* block_table,
                        const int32_t* seq_lens, int num_blocks, int block_size, int num_kv_heads,
                        int head_dim, int max_blocks_per_seq) {
  const int page = blockIdx.x, seq = blockIdx.y;
  const int len = seq_lens[seq];
  if (len <= 0 || page * block_size >= len) return;
  const int block = block_table[static_cast<size_t>(seq) * max_blocks_per_seq + page];
  if (block < 0 || block >= num_blocks) return;
  QuantizeBlock(exact, codes, scales, block, num_kv_heads, head_dim);
}

// After FoldDigestsKernel: the token that folded its block (the block's last in the batch)
// re-quantizes it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    QuantizeAppendKernel(const T* exact, int8_t* codes, float* scales, AppendTable tab,
                         const int64_t* slots, int num_blocks, int block_size, int num_kv_heads,
                         int head_dim) {
  const int i = blockIdx.x;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= static_cast<int64_t>(num_blocks) * block_size) return;
  const int block = static_cast<int>(slot / block_size);
  if (tab.last[block] != i) return;
  QuantizeBlock(exact, codes, scales, block, num_kv_heads, head_dim);
}

// The exact (native) digest that the max/min kernels write: the view itself for kNative.
DigestView ExactOf(const DigestView& d) {
  DigestView e = d;
  if (d.format == DigestFormat::kInt8) {
    e.data = d.exact;
    e.format = DigestFormat::kNative;
  }
  return e;
}

}  // namespace

absl::Status BuildDigestsGpu(const KvCacheView& cache, const BlockTableView& table,
                             const DigestView& digests, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(RequireTokenMajor(cache, "BuildDigestsGpu"));
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
  return gpu::DispatchDType(cache.dtype, [&]<typename T>() {
    const dim3 grid(table.max_blocks_per_seq, table.num_seqs);
    const DigestView exact = ExactOf(digests);
    BuildDigestsKernel<T><<<grid, kThreads, 0, static_cast<hipStream_t>(stream)>>>(
        static_cast<const T*>(cache.data), static_cast<T*>(exact.data), table.block_table,
        table.seq_lens, cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim,
        table.max_blocks_per_seq);
    MEMPIPE_RETURN_IF_ERROR(GpuLastError("BuildDigestsKernel launch"));
    if (digests.format != DigestFormat::kInt8) return absl::OkStatus();
    QuantizeBuildKernel<T><<<grid, kThreads, 0, static_cast<hipStream_t>(stream)>>>(
        static_cast<const T*>(exact.data), static_cast<int8_t*>(digests.data), digests.scales,
        table.block_table, table.seq_lens, cache.num_blocks, cache.block_size, cache.num_kv_heads,
        cache.head_dim, table.max_blocks_per_seq);
    return GpuLastError("QuantizeBuildKernel launch");
  });
}

namespace {

// The three append kernels; cache.data null: digests only.
absl::Status LaunchAppend(const KvCacheView& cache, const int64_t* slot_mapping, int num_tokens,
                          const void* key, const void* value, const DigestView& digests,
                          void* workspace, GpuStream stream) {
  const AppendTable tab = Carve(workspace, cache.num_blocks);
  const auto s = static_cast<hipStream_t>(stream);
  const int64_t num_slots = static_cast<int64_t>(cache.num_blocks) * cache.block_size;
  ClearAppendTableKernel<<<(num_tokens + kThreads - 1) / kThreads, kThreads, 0, s>>>(
      tab, slot_mapping, num_tokens, num_slots, cache.block_size);
  MEMPIPE_RETURN_IF_ERROR(GpuLastError("ClearAppendTableKernel launch"));
  return gpu::DispatchDType(cache.dtype, [&]<typename T>() {
    AppendKvKernel<T><<<num_tokens, kThreads, 0, s>>>(
        static_cast<T*>(cache.data), tab, slot_mapping, static_cast<const T*>(key),
        static_cast<const T*>(value), cache.num_blocks, cache.block_size, cache.num_kv_heads,
        cache.head_dim, cache.PlaneElems());
    MEMPIPE_RETURN_IF_ERROR(GpuLastError("AppendKvKernel launch"));
    const DigestView exact = ExactOf(digests);
    FoldDigestsKernel<T><<<num_tokens, kThreads, 0, s>>>(
        static_cast<T*>(exact.data), tab, slot_mapping, static_cast<const T*>(key),
        cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim);
    MEMPIPE_RETURN_IF_ERROR(GpuLastError("FoldDigestsKernel launch"));
    if (digests.format != DigestFormat::kInt8) return absl::OkStatus();
    QuantizeAppendKernel<T><<<num_tokens, kThreads, 0, s>>>(
        static_cast<const T*>(exact.data), static_cast<int8_t*>(digests.data), digests.scales, tab,
        slot_mapping, cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim);
    return GpuLastError("QuantizeAppendKernel launch");
  });
}

}  // namespace

size_t AppendWorkspaceBytes(const KvCacheView& cache) {
  return 3 * static_cast<size_t>(std::max(cache.num_blocks, 0)) * sizeof(int32_t);
}

absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache, const int64_t* slot_mapping,
                                   int num_tokens, const void* key, const void* value,
                                   const DigestView& digests, void* workspace,
                                   size_t workspace_bytes, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(RequireTokenMajor(cache, "AppendKvAndDigestsGpu"));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (slot_mapping == nullptr || key == nullptr || value == nullptr) {
    return absl::InvalidArgumentError("slot_mapping, key and value must not be null");
  }
  const size_t need = AppendWorkspaceBytes(cache);
  if (workspace == nullptr || workspace_bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("append workspace of ", workspace_bytes, " bytes is too small; need ", need));
  }
  return LaunchAppend(cache, slot_mapping, num_tokens, key, value, digests, workspace, stream);
}

absl::Status UpdateDigestsFromKeysGpu(const DigestView& digests, int block_size,
                                      const int64_t* slot_mapping, int num_tokens, const void* keys,
                                      void* workspace, size_t workspace_bytes, GpuStream stream) {
  // The cache view carries the shapes only (its data pointer is not written).
  const KvCacheView shapes{digests.data, digests.dtype,        digests.num_blocks,
                           block_size,   digests.num_kv_heads, digests.head_dim};
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(shapes));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(shapes, digests));
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (slot_mapping == nullptr || keys == nullptr) {
    return absl::InvalidArgumentError("slot_mapping and keys must not be null");
  }
  const size_t need = AppendWorkspaceBytes(shapes);
  if (workspace == nullptr || workspace_bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("append workspace of ", workspace_bytes, " bytes is too small; need ", need));
  }
  KvCacheView no_cache = shapes;
  no_cache.data = nullptr;
  return LaunchAppend(no_cache, slot_mapping, num_tokens, keys, nullptr, digests, workspace,
                      stream);
}

absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache, const int64_t* slot_mapping,
                                   int num_tokens, const void* key, const void* value,
                                   const DigestView& digests, GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(RequireTokenMajor(cache, "AppendKvAndDigestsGpu"));
  if (num_tokens <= 0) {
    return AppendKvAndDigestsGpu(cache, slot_mapping, num_tokens, key, value, digests, nullptr, 0,
                                 stream);
  }
  // A stream-ordered allocation from the device's pool: no host synchronization, and
  // capturable in a CUDA graph (as an allocation node).
  const auto s = static_cast<hipStream_t>(stream);
  const size_t bytes = AppendWorkspaceBytes(cache);
  void* workspace = nullptr;
  if (hipError_t e = hipMallocAsync(&workspace, bytes, s); e != hipSuccess) {
    return absl::InternalError(absl::StrCat(
        "append workspace of ", bytes, " bytes: hipMallocAsync failed: ", hipGetErrorString(e)));
  }
  const absl::Status status = AppendKvAndDigestsGpu(cache, slot_mapping, num_tokens, key, value,
                                                    digests, workspace, bytes, stream);
  if (hipError_t e = hipFreeAsync(workspace, s); e != hipSuccess && status.ok()) {
    return absl::InternalError(
        absl::StrCat("append workspace: hipFreeAsync failed: ", hipGetErrorString(e)));
  }
  return status;
}

}  // namespace mempipe
