// Paged decode attention kernels (dense and sparse share one kernel; see the header).
//
//   grid (kv_head, split, seq) x 4 warps
//   ┌─ warp w takes tiles w, w+4, ... of the split's pages (tile = a few tokens of one page)
//   │   16-byte loads of K and V for the whole tile issued first (bytes in flight)
//   │   q·k over the lanes of one token row -> scores of the G query heads
//   │   online softmax per token sub-group ("stream"): m, l, acc[G][slice of head_dim]
//   └─ streams merged in shared memory -> out row (1 split) or fp32 partial + lse
//   PagedDecodeCombineKernel: merges the splits' partials by their lse.
#include "attention/gpu/paged_decode_gpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "backend/base/gpu_compat.h"
#include "backend/base/status_macros.h"

namespace mempipe {
namespace {

using gpu::BF16;
using gpu::F16;

constexpr int kMaxSplits = 128;
constexpr int kDecodeWarps = 4;
constexpr int kChunkPages = 256;
constexpr int kMinPagesPerSplit = 8;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeParams {
  const void* query;           // [num_seqs, num_heads, head_dim]
  void* out;                   // [num_seqs, num_heads, head_dim]
  const void* kv;              // [2, num_blocks, block_size, num_kv_heads, head_dim]
  const int32_t* block_table;  // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens;     // [num_seqs]
  const int32_t* pages;        // [num_seqs, num_kv_heads, max_selected]; null: dense
  const int32_t* counts;       // [num_seqs, num_kv_heads]; null: dense
  float* partial_out;          // [num_seqs, num_heads, num_splits, head_dim]
  float* partial_lse;          // [num_seqs, num_heads, num_splits], log2 domain
  size_t plane_elems;          // elements of the K plane
  int num_heads, num_kv_heads, num_blocks, block_size, max_blocks_per_seq, max_selected;
  int num_splits, items_per_split;
  float scale_log2;            // softmax scale * log2(e): exp2 replaces exp
};

// Launch geometry of one (dtype, head_dim, group) instance; everything below derives from it.
template <typename T, int kHeadDim, int kGroups>
struct DecodeConfig {
  static constexpr int kWarps = kDecodeWarps;
  static constexpr int kThreads = kWarps * kGpuLanes;
  static constexpr int kVec = gpu::kVec16<T>;                      // elements per 16 B
  static constexpr int kVecsPerRow = kHeadDim / kVec;              // 16 B vectors per row
  static constexpr int kLanesPerToken = kVecsPerRow < kGpuLanes ? kVecsPerRow : kGpuLanes;
  static constexpr int kVecsPerLane = kVecsPerRow / kLanesPerToken;
  static constexpr int kElems = kVecsPerLane * kVec;               // channels per lane
  static constexpr int kTokensPerStep = kGpuLanes / kLanesPerToken;
  // Token steps per tile: fewer for big groups, whose q and acc take the registers.
  // Two tiles are in flight per warp (double buffering), so 16-byte vectors of K and V per
  // lane and tile are capped at 16 (fp32 rows of 256 take two vectors per lane and token).
  static constexpr int kSteps = (kGroups >= 8 ? 2 : 4) / kVecsPerLane;
  static constexpr int kTileTokens = kSteps * kTokensPerStep;
  static constexpr int kStreams = kWarps * kTokensPerStep;
  static_assert(kVecsPerRow % kLanesPerToken == 0 && kSteps >= 1);
  static_assert(kTileTokens <= 64 && (kTileTokens & (kTileTokens - 1)) == 0);
  static_assert(kStreams * kGroups * kHeadDim * 4 <= 32 * 1024, "merge buffer over 32 KB");
};

template <typename T, int kHeadDim, int kGroups>
__global__ void __launch_bounds__(kDecodeWarps * kGpuLanes, kGroups >= 8 ? 2 : 3)
    PagedDecodeKernel(DecodeParams p) {
  using C = DecodeConfig<T, kHeadDim, kGroups>;
  constexpr int E = C::kElems;
  // KV heads vary fastest across the grid: the blocks reading one page (all its heads) run
  // together and share DRAM rows.
  const int kvh = blockIdx.x, split = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / kGpuLanes, lane = threadIdx.x % kGpuLanes;
  const int tok_sub = lane / C::kLanesPerToken, vlane = lane % C::kLanesPerToken;
  const int bs = p.block_size;

  const int seq_len = p.seq_lens[seq];
  const int num_pages = seq_len > 0 ? min((seq_len + bs - 1) / bs, p.max_blocks_per_seq) : 0;
  const int32_t* list = nullptr;
  int num_items = num_pages;
  if (p.pages != nullptr) {
    const size_t row = static_cast<size_t>(seq) * p.num_kv_heads + kvh;
    list = p.pages + row * p.max_selected;
    num_items = min(max(p.counts[row], 0), p.max_selected);
  }
  const int item_begin = split * p.items_per_split;
  const int item_end = min(num_items, item_begin + p.items_per_split);

  // Query rows of the group, pre-scaled so that exp2(q.k) is the softmax numerator.
  const size_t q_row0 = static_cast<size_t>(seq) * p.num_heads + kvh * kGroups;
  float q[kGroups][E];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int v = 0; v < C::kVecsPerLane; ++v) {
      const T* src = static_cast<const T*>(p.query) + (q_row0 + g) * kHeadDim +
                     (v * C::kLanesPerToken + vlane) * C::kVec;
      gpu::Unpack16<T>(*reinterpret_cast<const uint4*>(src), &q[g][v * C::kVec]);
#pragma unroll
      for (int e = 0; e < C::kVec; ++e) q[g][v * C::kVec + e] *= p.scale_log2;
    }
  }

  float m[kGroups], l[kGroups], acc[kGroups][E];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
  }

  const int tile_tokens = min(C::kTileTokens, bs);
  const int steps = tile_tokens / C::kTokensPerStep;
  const int tiles_per_page = bs / tile_tokens;
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads) * kHeadDim;
  const T* kv = static_cast<const T*>(p.kv) + static_cast<size_t>(kvh) * kHeadDim;
  const int32_t* table = p.block_table + static_cast<size_t>(seq) * p.max_blocks_per_seq;

  // Block ids of a chunk of the split's pages, staged in shared memory so that no tile waits
  // on a dependent table lookup.
  __shared__ int s_block[kChunkPages];
  __shared__ int s_valid[kChunkPages];  // valid tokens of the page; 0 skips it

  struct Tile {
    uint4 k[C::kSteps][C::kVecsPerLane];
    uint4 v[C::kSteps][C::kVecsPerLane];
    int valid;  // valid tokens of the tile, from its first
  };
  auto load = [&](int unit, Tile& t) {
    const int i = unit / tiles_per_page, sub = unit % tiles_per_page;
    t.valid = s_valid[i] - sub * tile_tokens;
    const T* kbase = kv + (static_cast<size_t>(s_block[i]) * bs + sub * tile_tokens) * token_stride;
#pragma unroll
    for (int s = 0; s < C::kSteps; ++s) {
      const int tok = s * C::kTokensPerStep + tok_sub;
      const bool ok = s < steps && tok < t.valid;
#pragma unroll
      for (int v = 0; v < C::kVecsPerLane; ++v) {
        const T* kp = kbase + tok * token_stride + (v * C::kLanesPerToken + vlane) * C::kVec;
        t.k[s][v] = ok ? *reinterpret_cast<const uint4*>(kp) : make_uint4(0, 0, 0, 0);
        t.v[s][v] =
            ok ? *reinterpret_cast<const uint4*>(kp + p.plane_elems) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto compute = [&](const Tile& t) {
    float score[C::kSteps][kGroups];
#pragma unroll
    for (int s = 0; s < C::kSteps; ++s) {
      float k[E];
#pragma unroll
      for (int v = 0; v < C::kVecsPerLane; ++v) gpu::Unpack16<T>(t.k[s][v], &k[v * C::kVec]);
      const bool ok = s < steps && s * C::kTokensPerStep + tok_sub < t.valid;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot += q[g][e] * k[e];
#pragma unroll
        for (int w = C::kLanesPerToken / 2; w > 0; w /= 2) dot += GpuShflXor32(dot, w);
        score[s][g] = ok ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int s = 0; s < C::kSteps; ++s) tile_max = fmaxf(tile_max, score[s][g]);
      if (tile_max == -INFINITY) continue;  // no valid token of this stream in the tile
      const float m_new = fmaxf(m[g], tile_max);
      const float corr = exp2f(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= corr;
      m[g] = m_new;
    }
#pragma unroll
    for (int s = 0; s < C::kSteps; ++s) {
      float v[E];
#pragma unroll
      for (int w = 0; w < C::kVecsPerLane; ++w) gpu::Unpack16<T>(t.v[s][w], &v[w * C::kVec]);
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float pr = score[s][g] == -INFINITY ? 0.0f : exp2f(score[s][g] - m[g]);
        l[g] += pr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] += pr * v[e];
      }
    }
  };

  for (int chunk = item_begin; chunk < item_end; chunk += kChunkPages) {
    const int n = min(kChunkPages, item_end - chunk);
    __syncthreads();  // the previous chunk's tiles have all read s_block
    for (int i = threadIdx.x; i < n; i += C::kThreads) {
      const int page = list != nullptr ? list[chunk + i] : chunk + i;
      const int block = page >= 0 && page < num_pages ? table[page] : -1;
      const bool ok = block >= 0 && block < p.num_blocks;
      s_block[i] = ok ? block : 0;
      s_valid[i] = ok ? min(bs, seq_len - page * bs) : 0;
    }
    __syncthreads();
    // Two tiles in flight per warp: the next one loads while this one computes.
    const int units = n * tiles_per_page;
    Tile a, b;
    int u = warp;
    if (u < units) load(u, a);
    for (; u < units; u += 2 * C::kWarps) {
      if (u + C::kWarps < units) load(u + C::kWarps, b);
      compute(a);
      if (u + 2 * C::kWarps < units) load(u + 2 * C::kWarps, a);
      if (u + C::kWarps < units) compute(b);
    }
  }

  // Merge the block's streams.
  __shared__ float s_m[C::kStreams][kGroups];
  __shared__ float s_l[C::kStreams][kGroups];
  __shared__ float s_acc[C::kStreams][kGroups][kHeadDim];
  const int stream = warp * C::kTokensPerStep + tok_sub;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (vlane == 0) {
      s_m[stream][g] = m[g];
      s_l[stream][g] = l[g];
    }
#pragma unroll
    for (int v = 0; v < C::kVecsPerLane; ++v) {
#pragma unroll
      for (int e = 0; e < C::kVec; ++e) {
        s_acc[stream][g][(v * C::kLanesPerToken + vlane) * C::kVec + e] = acc[g][v * C::kVec + e];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kGroups * kHeadDim; idx += C::kThreads) {
    const int g = idx / kHeadDim, c = idx % kHeadDim;
    float mx = -INFINITY;
    for (int st = 0; st < C::kStreams; ++st) mx = fmaxf(mx, s_m[st][g]);
    float sum_l = 0.0f, sum_a = 0.0f;
    if (mx != -INFINITY) {
      for (int st = 0; st < C::kStreams; ++st) {
        if (s_m[st][g] == -INFINITY) continue;
        const float w = exp2f(s_m[st][g] - mx);
        sum_l += w * s_l[st][g];
        sum_a += w * s_acc[st][g][c];
      }
    }
    const size_t row = q_row0 + g;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row * kHeadDim + c] =
          gpu::FromF32<T>(sum_l > 0.0f ? sum_a / sum_l : 0.0f);
    } else {
      const size_t prow = row * p.num_splits + split;
      p.partial_out[prow * kHeadDim + c] = sum_l > 0.0f ? sum_a / sum_l : 0.0f;
      if (c == 0) p.partial_lse[prow] = sum_l > 0.0f ? mx + log2f(sum_l) : -INFINITY;
    }
  }
}

// One block per (query head, sequence), one thread per channel.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) PagedDecodeCombineKernel(DecodeParams p) {
  const int head = blockIdx.x, seq = blockIdx.y, c = threadIdx.x;
  const size_t row = static_cast<size_t>(seq) * p.num_heads + head;
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_max;
  if (c == 0) {
    float mx = -INFINITY;
    for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.partial_lse[row * p.num_splits + s]);
    s_max = mx;
  }
  __syncthreads();
  for (int s = c; s < p.num_splits; s += kHeadDim) {
    const float lse = p.partial_lse[row * p.num_splits + s];
    s_w[s] = (lse == -INFINITY || s_max == -INFINITY) ? 0.0f : exp2f(lse - s_max);
  }
  __syncthreads();
  float sum_w = 0.0f, sum = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = s_w[s];
    if (w == 0.0f) continue;
    sum_w += w;
    sum += w * p.partial_out[(row * p.num_splits + s) * kHeadDim + c];
  }
  static_cast<T*>(p.out)[row * kHeadDim + c] = gpu::FromF32<T>(sum_w > 0.0f ? sum / sum_w : 0.0f);
}

struct SplitPlan {
  int num_splits;
  int items_per_split;
};

// At most one wave of blocks: the launch bounds keep 3 blocks per SM resident (2 for groups
// of 8), and a partial second wave would idle most SMs for a whole block's time.
SplitPlan PlanSplits(int num_seqs, int num_kv_heads, int groups, int max_items, int num_sms) {
  const int rows = std::max(num_seqs * num_kv_heads, 1);
  const int resident = std::max(num_sms, 1) * (groups >= 8 ? 2 : 3);
  int splits = std::max(resident / rows, 1);
  splits = std::min(splits, std::max((max_items + kMinPagesPerSplit - 1) / kMinPagesPerSplit, 1));
  splits = std::clamp(splits, 1, kMaxSplits);
  const int per = (std::max(max_items, 1) + splits - 1) / splits;
  return {(std::max(max_items, 1) + per - 1) / per, per};
}

int CachedSmCount() {
  static const int n = [] {
    absl::StatusOr<int> sms = GpuMultiprocessorCount();
    return sms.ok() ? *sms : 1;
  }();
  return n;
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int kHeadDim, int kGroups>
absl::Status LaunchTyped(const DecodeParams& p, int num_seqs, hipStream_t stream) {
  using C = DecodeConfig<T, kHeadDim, kGroups>;
  const dim3 grid(p.num_kv_heads, p.num_splits, num_seqs);
  PagedDecodeKernel<T, kHeadDim, kGroups><<<grid, C::kThreads, 0, stream>>>(p);
  if (p.num_splits > 1) {
    PagedDecodeCombineKernel<T, kHeadDim><<<dim3(p.num_heads, num_seqs), kHeadDim, 0, stream>>>(p);
  }
  return GpuLastError("paged decode launch");
}

template <typename T, int kHeadDim>
absl::Status DispatchGroups(const DecodeParams& p, int groups, int num_seqs, hipStream_t s) {
  switch (groups) {
    case 1: return LaunchTyped<T, kHeadDim, 1>(p, num_seqs, s);
    case 2: return LaunchTyped<T, kHeadDim, 2>(p, num_seqs, s);
    case 4: return LaunchTyped<T, kHeadDim, 4>(p, num_seqs, s);
    case 8: return LaunchTyped<T, kHeadDim, 8>(p, num_seqs, s);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("GQA group size (num_heads / num_kv_heads) must be 1, 2, 4 or 8, got ",
                       groups));
  }
}

template <typename T>
absl::Status DispatchHeadDim(const DecodeParams& p, int head_dim, int groups, int num_seqs,
                             hipStream_t s) {
  switch (head_dim) {
    case 64: return DispatchGroups<T, 64>(p, groups, num_seqs, s);
    case 128: return DispatchGroups<T, 128>(p, groups, num_seqs, s);
    case 256: return DispatchGroups<T, 256>(p, groups, num_seqs, s);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("head_dim must be 64, 128 or 256, got ", head_dim));
  }
}

absl::Status Launch(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                    const PageList* pages, float scale, void* workspace, size_t workspace_bytes,
                    GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  if (io.query == nullptr || io.out == nullptr || table.block_table == nullptr ||
      table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("query, out, block_table and seq_lens must not be null");
  }
  if (io.dtype != cache.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("query dtype ", DTypeName(io.dtype),
                                                   " differs from the cache's ",
                                                   DTypeName(cache.dtype)));
  }
  if (io.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("query head_dim ", io.head_dim,
                                                   " differs from the cache's ", cache.head_dim));
  }
  if (io.num_heads <= 0 || io.num_heads % cache.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_heads ", io.num_heads, " must be a positive multiple of num_kv_heads ",
                     cache.num_kv_heads));
  }
  if (io.num_seqs <= 0 || io.num_seqs != table.num_seqs || table.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs ", io.num_seqs, " must be positive and equal the block table's ",
                     table.num_seqs, " (max_blocks_per_seq ", table.max_blocks_per_seq, ")"));
  }
  if (io.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("num_seqs ", io.num_seqs, " exceeds 65535"));
  }
  if (!Aligned16(io.query) || !Aligned16(io.out) || !Aligned16(cache.data)) {
    return absl::InvalidArgumentError("query, out and cache pointers must be 16-byte aligned");
  }
  int max_items = table.max_blocks_per_seq;
  if (pages != nullptr) {
    if (pages->pages == nullptr || pages->counts == nullptr) {
      return absl::InvalidArgumentError("selected pages and counts must not be null");
    }
    if (pages->num_kv_heads != cache.num_kv_heads || pages->max_selected <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "selection has ", pages->num_kv_heads, " KV heads and max_selected ",
          pages->max_selected, "; expected ", cache.num_kv_heads, " and >= 1"));
    }
    max_items = pages->max_selected;
  }
  const SplitPlan plan = PlanSplits(io.num_seqs, cache.num_kv_heads,
                                    io.num_heads / cache.num_kv_heads, max_items, CachedSmCount());
  const size_t need = PagedDecodeWorkspaceBytes(io.num_seqs, io.num_heads, cache.num_kv_heads,
                                                max_items);
  if (plan.num_splits > 1 && (workspace == nullptr || workspace_bytes < need)) {
    return absl::InvalidArgumentError(absl::StrCat("workspace of ", workspace_bytes,
                                                   " bytes is too small; need ", need));
  }
  DecodeParams p{};
  p.query = io.query;
  p.out = io.out;
  p.kv = cache.data;
  p.block_table = table.block_table;
  p.seq_lens = table.seq_lens;
  p.pages = pages != nullptr ? pages->pages : nullptr;
  p.counts = pages != nullptr ? pages->counts : nullptr;
  const size_t partial_elems =
      static_cast<size_t>(io.num_seqs) * io.num_heads * plan.num_splits * io.head_dim;
  p.partial_out = static_cast<float*>(workspace);
  p.partial_lse = plan.num_splits > 1 ? p.partial_out + partial_elems : nullptr;
  p.plane_elems = cache.PlaneElems();
  p.num_heads = io.num_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.num_blocks = cache.num_blocks;
  p.block_size = cache.block_size;
  p.max_blocks_per_seq = table.max_blocks_per_seq;
  p.max_selected = pages != nullptr ? pages->max_selected : 0;
  p.num_splits = plan.num_splits;
  p.items_per_split = plan.items_per_split;
  p.scale_log2 = scale * kLog2e;
  const int groups = io.num_heads / cache.num_kv_heads;
  const auto s = static_cast<hipStream_t>(stream);
  switch (cache.dtype) {
    case DType::kFloat32: return DispatchHeadDim<float>(p, io.head_dim, groups, io.num_seqs, s);
    case DType::kFloat16: return DispatchHeadDim<F16>(p, io.head_dim, groups, io.num_seqs, s);
    case DType::kBFloat16: return DispatchHeadDim<BF16>(p, io.head_dim, groups, io.num_seqs, s);
  }
  return absl::InvalidArgumentError("unknown dtype");
}

}  // namespace

size_t PagedDecodeWorkspaceBytes(int num_seqs, int num_heads, int num_kv_heads, int max_items) {
  const SplitPlan plan = PlanSplits(num_seqs, num_kv_heads,
                                    num_heads / std::max(num_kv_heads, 1), max_items,
                                    CachedSmCount());
  if (plan.num_splits <= 1) return 0;
  // head_dim is at most 256; one extra float per row for the lse.
  return static_cast<size_t>(std::max(num_seqs, 0)) * std::max(num_heads, 0) * plan.num_splits *
         (256 + 1) * sizeof(float);
}

absl::Status DenseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                            const BlockTableView& table, float scale, void* workspace,
                            size_t workspace_bytes, GpuStream stream) {
  return Launch(io, cache, table, nullptr, scale, workspace, workspace_bytes, stream);
}

absl::Status SparseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                             const BlockTableView& table, const PageList& pages, float scale,
                             void* workspace, size_t workspace_bytes, GpuStream stream) {
  return Launch(io, cache, table, &pages, scale, workspace, workspace_bytes, stream);
}

}  // namespace mempipe
