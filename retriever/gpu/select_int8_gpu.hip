// The int8-digest score kernel (see the header).
//
//   ScoreInt8Kernel  grid (kv head, chunk of 256 pages, seq) x 8 groups of 32 lanes
//     the group's queries in shared memory; warp w scores pages [32 w, 32 w + 32) of the chunk
//     one at a time: lane l loads the codes of channels l, l + 32, ... (a 32-byte segment per
//     row and step), dequantizes them with the page's scale, sums max(q hi, q lo) over its
//     channels in increasing order, xor-butterflies the 32 lane sums and aggregates the heads of
//     the group in order -> one fp32 score per page, plus the per-32-page maximum of the middle
//     pages' order keys for SelectPagesKernel.
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/gpu/dispatch.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"
#include "retriever/gpu/select_int8_gpu.h"
#include "retriever/int8_quant.h"

namespace mempipe {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kGpuLanes;
constexpr int kPagesPerBlock = kWarps * kGpuLanes;

struct Int8ScoreParams {
  const void* query;           // [num_seqs, num_heads, head_dim] in the cache dtype
  const int8_t* codes;         // [num_blocks, 2, num_kv_heads, head_dim]
  const float* scales;         // [num_blocks, num_kv_heads]
  const int32_t* block_table;  // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens;     // [num_seqs]
  float* scores;               // [num_seqs, num_kv_heads, max_blocks_per_seq]
  uint32_t* group_max;         // [num_seqs, num_kv_heads, num_groups] or null
  int num_heads, num_kv_heads, num_blocks, block_size, max_blocks_per_seq;
  int num_groups, sinks, locals;
  int aggregation;
  const int32_t* run_flag;  // DevicePredicate: [1] or null
  int run_when_zero;
};

// select_gpu.hip's order key: NaN as -inf, -0 as +0; every real key is above 0.
__device__ __forceinline__ uint32_t OrderKey(float f) {
  if (f != f) f = -INFINITY;
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T, int kHeadDim, int kGroups>
__global__ void __launch_bounds__(kThreads) ScoreInt8Kernel(Int8ScoreParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  constexpr int J = kHeadDim / kGpuLanes;
  const int kvh = blockIdx.x, chunk = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / kGpuLanes, lane = threadIdx.x % kGpuLanes;
  const int len = p.seq_lens[seq];
  const int num_pages =
      len > 0 ? min((len + p.block_size - 1) / p.block_size, p.max_blocks_per_seq) : 0;
  const int chunk_begin = chunk * kPagesPerBlock;
  const int chunk_end = min(chunk_begin + kPagesPerBlock, p.max_blocks_per_seq);

  __shared__ float s_q[kGroups][kHeadDim];
  const T* qrow = static_cast<const T*>(p.query) +
                  (static_cast<size_t>(seq) * p.num_heads + kvh * kGroups) * kHeadDim;
  for (int i = threadIdx.x; i < kGroups * kHeadDim; i += kThreads) {
    s_q[i / kHeadDim][i % kHeadDim] = gpu::ToF32(qrow[i]);
  }
  __syncthreads();

  const int32_t* table = p.block_table + static_cast<size_t>(seq) * p.max_blocks_per_seq;
  const size_t row = static_cast<size_t>(p.num_kv_heads) * kHeadDim;
  float* out = p.scores + (static_cast<size_t>(seq) * p.num_kv_heads + kvh) * p.max_blocks_per_seq;
  const bool is_max = p.aggregation == static_cast<int>(GroupAggregation::kMax);
  const int mid_lo = p.sinks, mid_hi = num_pages - p.locals;
  const int w0 = chunk_begin + warp * kGpuLanes, w1 = min(w0 + kGpuLanes, chunk_end);
  uint32_t group_max = 0;
  for (int page = w0; page < w1; ++page) {
    int block = page < num_pages ? table[page] : -1;
    if (block >= p.num_blocks) block = -1;
    float agg = -INFINITY;
    if (block >= 0) {
      const int8_t* qmx = p.codes + static_cast<size_t>(block) * 2 * row + kvh * kHeadDim;
      const int8_t* qmn = qmx + row;
      const float sc = p.scales[static_cast<size_t>(block) * p.num_kv_heads + kvh];
      float hi[J], lo[J];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        hi[j] = int8_digest::Dequantize(qmx[lane + j * kGpuLanes], sc);
        lo[j] = int8_digest::Dequantize(qmn[lane + j * kGpuLanes], sc);
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const float qc = s_q[g][lane + j * kGpuLanes];
          const float a = __fmul_rn(qc, hi[j]);
          const float b = __fmul_rn(qc, lo[j]);
          s = __fadd_rn(s, a > b ? a : b);
        }
#pragma unroll
        for (int stride = kGpuLanes / 2; stride > 0; stride /= 2) {
          s = __fadd_rn(s, GpuShflXor32(s, stride));
        }
        if (g == 0) {
          agg = s;
        } else if (is_max) {
          agg = s > agg ? s : agg;
        } else {
          agg = __fadd_rn(agg, s);
        }
      }
    }
    if (lane == 0) {
      out[page] = agg;
      if (block >= 0 && page >= mid_lo && page < mid_hi) group_max = max(group_max, OrderKey(agg));
    }
  }
  if (p.group_max != nullptr && w0 < p.max_blocks_per_seq && lane == 0) {
    p.group_max[(static_cast<size_t>(seq) * p.num_kv_heads + kvh) * p.num_groups + chunk * kWarps +
                warp] = group_max;
  }
}

}  // namespace

absl::Status ComputeRelevancyInt8Gpu(const QueryView& query, const KvCacheView& cache,
                                     const DigestView& digests, const BlockTableView& table,
                                     GroupAggregation agg, float* scores, uint32_t* group_max,
                                     int sinks, int locals, GpuStream stream,
                                     DevicePredicate predicate) {
  MEMPIPE_RETURN_IF_ERROR(ValidateGroupAggregation(agg));
  KvCacheView shapes = cache;
  if (shapes.data == nullptr) shapes.data = digests.data;  // only shapes are checked
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(shapes));
  if (digests.format != DigestFormat::kInt8 || digests.data == nullptr ||
      digests.scales == nullptr) {
    return absl::InvalidArgumentError(
        "ComputeRelevancyInt8Gpu needs int8 digests with codes and scales");
  }
  if (digests.num_blocks != cache.num_blocks || digests.num_kv_heads != cache.num_kv_heads ||
      digests.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("int8 digests [", digests.num_blocks, ", 2, ", digests.num_kv_heads, ", ",
                     digests.head_dim, "] do not match the cache (", cache.num_blocks, " blocks, ",
                     cache.num_kv_heads, " KV heads, head_dim ", cache.head_dim, ")"));
  }
  if (table.block_table == nullptr || table.seq_lens == nullptr || table.num_seqs <= 0 ||
      table.max_blocks_per_seq <= 0 || table.num_seqs > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table needs non-null pointers and sizes in range, got ", table.num_seqs,
                     " x ", table.max_blocks_per_seq));
  }
  if (query.data == nullptr || scores == nullptr) {
    return absl::InvalidArgumentError("query and scores must not be null");
  }
  if (query.dtype != cache.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("query dtype ", DTypeName(query.dtype),
                                                   " differs from the cache's ",
                                                   DTypeName(cache.dtype)));
  }
  if (query.num_seqs != table.num_seqs || query.head_dim != cache.head_dim ||
      query.num_heads <= 0 || query.num_heads % cache.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("query [", query.num_seqs, ", ", query.num_heads, ", ", query.head_dim,
                     "] does not fit ", table.num_seqs, " sequences, ", cache.num_kv_heads,
                     " KV heads, head_dim ", cache.head_dim));
  }
  Int8ScoreParams p{};
  p.query = query.data;
  p.codes = static_cast<const int8_t*>(digests.data);
  p.scales = digests.scales;
  p.block_table = table.block_table;
  p.seq_lens = table.seq_lens;
  p.scores = scores;
  p.group_max = group_max;
  p.num_heads = query.num_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.num_blocks = cache.num_blocks;
  p.block_size = cache.block_size;
  p.max_blocks_per_seq = table.max_blocks_per_seq;
  p.num_groups = (table.max_blocks_per_seq + kGpuLanes - 1) / kGpuLanes;
  p.sinks = sinks;
  p.locals = locals;
  p.aggregation = static_cast<int>(agg);
  p.run_flag = predicate.flag;
  p.run_when_zero = predicate.run_when_zero ? 1 : 0;
  const dim3 grid(cache.num_kv_heads,
                  (table.max_blocks_per_seq + kPagesPerBlock - 1) / kPagesPerBlock, table.num_seqs);
  return gpu::DispatchShape(cache.dtype, query.head_dim, query.num_heads / cache.num_kv_heads,
                            [&]<typename T, int kHeadDim, int kGroups>() {
                              ScoreInt8Kernel<T, kHeadDim, kGroups>
                                  <<<grid, kThreads, 0, static_cast<hipStream_t>(stream)>>>(p);
                              return GpuLastError("ScoreInt8Kernel launch");
                            });
}

}  // namespace mempipe
