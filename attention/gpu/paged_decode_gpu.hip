// Paged decode attention kernels (dense and sparse share one kernel; see the header).
//
//   grid (kv head x sub-block, split, seq) x 4 warps
//   ┌─ warp w takes tiles w, w+4, ... of the split's pages (tile = a few tokens of one page)
//   │   16-byte loads of K and V for the whole tile issued first (bytes in flight)
//   │   q·k over the lanes of one token row -> scores of the block's query heads
//   │   online softmax per token sub-group ("stream"): m, l, acc[G][slice of head_dim]
//   └─ streams merged in shared memory -> out row (1 split) or fp32 partial + lse
//   PagedDecodeCombineKernel: merges the splits' partials by their lse.
// fp16/bf16 on CUDA take PagedDecodeMmaKernel instead: the same grid and merge, but q.k and
// p.v of a 16-token tile as tensor-core products (see its comment).
// A block serves up to 8 query heads of one KV head; groups of 12 and 16 take 2 blocks per KV
// head (decode_device.h). What both kernels share (page resolution, the tile loop, the merge)
// lives in attention/gpu/decode_device.h; the dtype x head_dim x group dispatch is
// core/gpu/dispatch.h's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/gpu/decode_device.h"
#include "attention/gpu/paged_decode_gpu.h"
#include "core/gpu/dispatch.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

using decode_gpu::BlockHeads;
using decode_gpu::DecodeParams;
using decode_gpu::ForEachTile;
using decode_gpu::kMaxSplits;
using decode_gpu::MergeStates;
using decode_gpu::ResolveHeads;
using decode_gpu::ResolveSplit;
using decode_gpu::SplitItems;
using decode_gpu::StoreMerged;
using decode_gpu::SubBlocks;

constexpr int kDecodeWarps = 4;
constexpr int kMinPagesPerSplit = 8;
constexpr float kLog2e = 1.4426950408889634f;

// Launch geometry of one (dtype, head_dim, heads-per-block) instance of the CUDA-core kernel;
// everything below derives from it.
template <typename T, int kHeadDim, int kGroups>
struct DecodeConfig {
  static constexpr int kWarps = kDecodeWarps;
  static constexpr int kThreads = kWarps * kGpuLanes;
  // Resident blocks per SM (the __launch_bounds__ and the split planner's wave size): 5 or
  // more heads per block keep q and acc of that many heads in registers.
  static constexpr int kMinBlocksPerSm = kGroups >= 5 ? 2 : 3;
  static constexpr int kVec = gpu::kVec16<T>;          // elements per 16 B
  static constexpr int kVecsPerRow = kHeadDim / kVec;  // 16 B vectors per row
  static constexpr int kLanesPerToken = kVecsPerRow < kGpuLanes ? kVecsPerRow : kGpuLanes;
  static constexpr int kVecsPerLane = kVecsPerRow / kLanesPerToken;
  static constexpr int kElems = kVecsPerLane * kVec;  // channels per lane
  static constexpr int kTokensPerStep = kGpuLanes / kLanesPerToken;
  // Token steps per tile: fewer for big groups, whose q and acc take the registers.
  // Two tiles are in flight per warp (double buffering), so 16-byte vectors of K and V per
  // lane and tile are capped at 16 (fp32 rows of 256 take two vectors per lane and token).
  static constexpr int kSteps = (kGroups >= 5 ? 2 : 4) / kVecsPerLane;
  static constexpr int kTileTokens = kSteps * kTokensPerStep;
  static constexpr int kStreams = kWarps * kTokensPerStep;
  static_assert(kVecsPerRow % kLanesPerToken == 0 && kSteps >= 1);
  static_assert(kTileTokens <= 64 && (kTileTokens & (kTileTokens - 1)) == 0);
  static_assert(kStreams * kGroups * kHeadDim * 4 <= 32 * 1024, "merge buffer over 32 KB");
};

template <typename T, int kHeadDim, int kGroups>
// (Parenthesized: HIP's __launch_bounds__ is a macro, and template commas would split it.)
__global__ void __launch_bounds__((DecodeConfig<T, kHeadDim, kGroups>::kThreads),
                                  (DecodeConfig<T, kHeadDim, kGroups>::kMinBlocksPerSm))
    PagedDecodeKernel(DecodeParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  using C = DecodeConfig<T, kHeadDim, kGroups>;
  constexpr int E = C::kElems;
  // KV heads vary fastest across the grid: the blocks reading one page (all its heads) run
  // together and share DRAM rows.
  const int split = blockIdx.y, seq = blockIdx.z;
  const BlockHeads heads = ResolveHeads<kGroups>(p, seq);
  const int warp = threadIdx.x / kGpuLanes, lane = threadIdx.x % kGpuLanes;
  const int tok_sub = lane / C::kLanesPerToken, vlane = lane % C::kLanesPerToken;
  const int bs = p.block_size;
  const SplitItems items = ResolveSplit(p, seq, heads.kvh, split);

  // Query rows of the block, pre-scaled so that exp2(q.k) is the softmax numerator.
  const size_t q_row0 = heads.q_row0;
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
  const T* kv = static_cast<const T*>(p.kv) + static_cast<size_t>(heads.kvh) * kHeadDim;

  struct Tile {
    uint4 k[C::kSteps][C::kVecsPerLane];
    uint4 v[C::kSteps][C::kVecsPerLane];
    int valid;  // valid tokens of the tile, from its first
  };
  auto load = [&](int block, int sub, int valid, Tile& t) {
    t.valid = valid;
    const T* kbase = kv + (static_cast<size_t>(block) * bs + sub * tile_tokens) * token_stride;
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
  auto compute = [&](Tile& t) {
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
  ForEachTile<C::kWarps, true, Tile>(p, items, seq, tiles_per_page, tile_tokens, load, compute);

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
    float value, lse;
    MergeStates(
        C::kStreams, [&](int st) { return s_m[st][g]; }, [&](int st) { return s_l[st][g]; },
        [&](int st) { return s_acc[st][g][c]; }, &value, &lse);
    StoreMerged<T, kHeadDim>(p, q_row0 + g, split, c, value, lse);
  }
}

// Tensor-core variant for fp16/bf16 (CUDA; see gpu::kHasMma16816). The CUDA-core kernel above
// spends ~130 warp instructions per KB of K+V on per-token shuffle reductions; here one warp
// handles a tile of 16 tokens with m16n8k16 products:
//   S  = Q K^T : M = the block's query heads (rows >= kGroups zero), N = 8 tokens, K = 16 ch
//   O^T += V^T P^T : M = 16 channels, N = 8 heads, K = the tile's 16 tokens
// The S accumulators of a lane (head lane/4, tokens 2t, 2t+1, 8+2t, 9+2t) are exactly its P^T
// operand, so P stays in registers. Channels are permuted alike in q and k (any permutation
// leaves q.k unchanged), which lets each lane feed the mma straight from 16-byte loads:
// k-steps 2i and 2i+1 take words 0,1 and 2,3 of vector t + 4i of the lane's token row. V^T is
// formed by pairing the same channel of two tokens with a byte permute. P enters the product
// rounded to T (as in FlashAttention); scores, softmax and accumulation stay fp32.
// head_dim 256: a tile's K and V take 128 registers per lane, so two tiles cannot be in
// flight; each tile loads K, computes S, then loads V (kSplitLoad), single-buffered.
template <typename T, int kHeadDim>
struct MmaDecodeConfig {
  static constexpr int kWarps = kDecodeWarps;
  static constexpr int kThreads = kWarps * kGpuLanes;
  // Resident blocks per SM (the __launch_bounds__ and the split planner's wave size): the two
  // tiles in flight per warp take ~200 registers per lane, and 8 warps per SM already keep
  // 128 KB of K+V loads in flight.
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr bool kSplitLoad = kHeadDim > 128;
  static constexpr int kTileTokens = 16;
  static constexpr int kRowVecs = kHeadDim / 8;   // 16-byte vectors per K/V row
  static constexpr int kKVecs = kRowVecs / 4;     // per lane and K row (4 lanes share a row)
  static constexpr int kVVecs = kRowVecs / 8;     // per lane and V row (8 lanes share a row)
  static constexpr int kKSteps = kHeadDim / 16;   // of S = Q K^T
  static constexpr int kMBlocks = kHeadDim / 16;  // of O^T = V^T P^T
  static_assert(sizeof(T) == 2 && (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256));
  static_assert(kWarps * decode_gpu::kMaxHeadsPerBlock * kHeadDim * 4 <= 32 * 1024);
};

// The tensor-core kernel serves fp16/bf16 where the platform has the m16n8k16 mma (CUDA);
// fp32 and HIP take the CUDA-core kernel.
template <typename T, int kHeadDim>
inline constexpr bool kUseMma = gpu::kHasMma16816 && sizeof(T) == 2;

template <typename T, int kHeadDim, int kGroups>
__global__ void __launch_bounds__((MmaDecodeConfig<T, kHeadDim>::kThreads),
                                  (MmaDecodeConfig<T, kHeadDim>::kMinBlocksPerSm))
    PagedDecodeMmaKernel(DecodeParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  using C = MmaDecodeConfig<T, kHeadDim>;
  static_assert(kGroups <= 8, "the mma's N dimension holds 8 heads");
  const int split = blockIdx.y, seq = blockIdx.z;
  const BlockHeads heads = ResolveHeads<kGroups>(p, seq);
  const int warp = threadIdx.x / kGpuLanes, lane = threadIdx.x % kGpuLanes;
  const int r = lane / 4, t = lane % 4;  // fragment row group and k pair
  const int bs = p.block_size;
  const SplitItems items = ResolveSplit(p, seq, heads.kvh, split);

  // Q fragments (A of S), unscaled so that they stay exact in T; lane row r = query head r.
  const size_t q_row0 = heads.q_row0;
  uint32_t qa[C::kKSteps][2];
#pragma unroll
  for (int i = 0; i < C::kKVecs; ++i) {
    const uint4 w = r < kGroups
                        ? *reinterpret_cast<const uint4*>(static_cast<const T*>(p.query) +
                                                          (q_row0 + r) * kHeadDim + (t + 4 * i) * 8)
                        : make_uint4(0, 0, 0, 0);
    qa[2 * i][0] = w.x;
    qa[2 * i][1] = w.y;
    qa[2 * i + 1][0] = w.z;
    qa[2 * i + 1][1] = w.w;
  }

  // acc[j]: O^T of channels (8u + 2q, 8u + 2q + 1), u = r + 8 (j / 4), q = j % 4, for heads
  // 2t (d0, d2) and 2t + 1 (d1, d3). m: running max of head r (log2 domain, scaled); l: this
  // lane's part of head r's denominator (its 4 tokens of every tile).
  float acc[C::kMBlocks][4];
#pragma unroll
  for (int j = 0; j < C::kMBlocks; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;

  const int tiles_per_page = bs / C::kTileTokens;
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads) * kHeadDim;
  const T* kv = static_cast<const T*>(p.kv) + static_cast<size_t>(heads.kvh) * kHeadDim;

  struct Tile {
    uint4 k[2][C::kKVecs];  // K rows r and r + 8 of the tile, vectors t + 4i
    uint4 v[4][C::kVVecs];  // V rows 2t, 2t + 1, 2t + 8, 2t + 9, vectors r + 8i
    const T* base;          // the tile's first token row (K plane)
    int valid;
  };
  auto load_v = [&](Tile& tl) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int tok = 2 * t + (j & 1) + 8 * (j >> 1);
      const bool ok = tok < tl.valid;
#pragma unroll
      for (int x = 0; x < C::kVVecs; ++x) {
        tl.v[j][x] = ok ? *reinterpret_cast<const uint4*>(tl.base + p.plane_elems +
                                                          tok * token_stride + (r + 8 * x) * 8)
                        : make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto load = [&](int block, int sub, int valid, Tile& tl) {
    tl.valid = valid;
    tl.base = kv + (static_cast<size_t>(block) * bs + sub * C::kTileTokens) * token_stride;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int tok = r + 8 * b;
      const bool ok = tok < tl.valid;  // unused slots may hold NaN: never let them in
#pragma unroll
      for (int x = 0; x < C::kKVecs; ++x) {
        tl.k[b][x] =
            ok ? *reinterpret_cast<const uint4*>(tl.base + tok * token_stride + (t + 4 * x) * 8)
               : make_uint4(0, 0, 0, 0);
      }
    }
    if constexpr (!C::kSplitLoad) load_v(tl);
  };
  auto compute = [&](Tile& tl) {
    if (tl.valid <= 0) return;  // uniform over the warp
    float s[2][4];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      s[b][0] = s[b][1] = s[b][2] = s[b][3] = 0.0f;
#pragma unroll
      for (int x = 0; x < C::kKVecs; ++x) {
        gpu::Mma16816<T>(s[b], qa[2 * x][0], 0u, qa[2 * x][1], 0u, tl.k[b][x].x, tl.k[b][x].y);
        gpu::Mma16816<T>(s[b], qa[2 * x + 1][0], 0u, qa[2 * x + 1][1], 0u, tl.k[b][x].z,
                         tl.k[b][x].w);
      }
    }
    // s[b][e]: head r, token 8b + 2t + e.
    float sc[4];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[2 * b + e] = 8 * b + 2 * t + e < tl.valid ? s[b][e] * p.scale_log2 : -INFINITY;
      }
    }
    float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
    mx = fmaxf(mx, GpuShflXor32(mx, 1));
    mx = fmaxf(mx, GpuShflXor32(mx, 2));
    const float m_new = fmaxf(m, mx);  // finite: token 0 of the tile is valid
    const float corr = exp2f(m - m_new);
    m = m_new;
    float pr[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) pr[e] = exp2f(sc[e] - m_new);
    l = l * corr + ((pr[0] + pr[1]) + (pr[2] + pr[3]));
    if constexpr (C::kSplitLoad) load_v(tl);
    const uint32_t pb0 = gpu::PackPair<T>(pr[0], pr[1]);
    const uint32_t pb1 = gpu::PackPair<T>(pr[2], pr[3]);
    // The accumulator columns are heads 2t and 2t + 1, whose rows live in lanes 8t and 8t + 4.
    const float corr0 = GpuShfl32(corr, 8 * t), corr1 = GpuShfl32(corr, 8 * t + 4);
#pragma unroll
    for (int x = 0; x < C::kVVecs; ++x) {
      const uint32_t* v0 = reinterpret_cast<const uint32_t*>(&tl.v[0][x]);
      const uint32_t* v1 = reinterpret_cast<const uint32_t*>(&tl.v[1][x]);
      const uint32_t* v2 = reinterpret_cast<const uint32_t*>(&tl.v[2][x]);
      const uint32_t* v3 = reinterpret_cast<const uint32_t*>(&tl.v[3][x]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float(&d)[4] = acc[4 * x + q];
        d[0] *= corr0;
        d[1] *= corr1;
        d[2] *= corr0;
        d[3] *= corr1;
        // Rows: channel 8u + 2q (a0, a2) and 8u + 2q + 1 (a1, a3); k: tokens 2t, 2t + 1
        // (a0, a1) and 2t + 8, 2t + 9 (a2, a3).
        gpu::Mma16816<T>(d, __byte_perm(v0[q], v1[q], 0x5410), __byte_perm(v0[q], v1[q], 0x7632),
                         __byte_perm(v2[q], v3[q], 0x5410), __byte_perm(v2[q], v3[q], 0x7632), pb0,
                         pb1);
      }
    }
  };

  ForEachTile<C::kWarps, !C::kSplitLoad, Tile>(p, items, seq, tiles_per_page, C::kTileTokens, load,
                                               compute);

  // Merge the warps: head r's denominator is the sum over its 4 lanes.
  l += GpuShflXor32(l, 1);
  l += GpuShflXor32(l, 2);
  __shared__ float s_m[C::kWarps][kGroups];
  __shared__ float s_l[C::kWarps][kGroups];
  __shared__ float s_acc[C::kWarps][kGroups][kHeadDim];
  if (t == 0 && r < kGroups) {
    s_m[warp][r] = m;
    s_l[warp][r] = l;
  }
#pragma unroll
  for (int j = 0; j < C::kMBlocks; ++j) {
    const int c = 8 * (r + 8 * (j / 4)) + 2 * (j % 4);
    if (2 * t < kGroups) {
      s_acc[warp][2 * t][c] = acc[j][0];
      s_acc[warp][2 * t][c + 1] = acc[j][2];
    }
    if (2 * t + 1 < kGroups) {
      s_acc[warp][2 * t + 1][c] = acc[j][1];
      s_acc[warp][2 * t + 1][c + 1] = acc[j][3];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kGroups * kHeadDim; idx += C::kThreads) {
    const int g = idx / kHeadDim, c = idx % kHeadDim;
    float value, lse;
    MergeStates(
        C::kWarps, [&](int w) { return s_m[w][g]; }, [&](int w) { return s_l[w][g]; },
        [&](int w) { return s_acc[w][g][c]; }, &value, &lse);
    StoreMerged<T, kHeadDim>(p, q_row0 + g, split, c, value, lse);
  }
}

// One block per (query head, sequence), one thread per channel: the splits' partials merged
// by their log-sum-exp (each partial is normalized: its denominator is 1).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) PagedDecodeCombineKernel(DecodeParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  const int head = blockIdx.x, seq = blockIdx.y, c = threadIdx.x;
  const size_t row = static_cast<size_t>(seq) * p.num_heads + head;
  __shared__ float s_lse[kMaxSplits];
  for (int s = c; s < p.num_splits; s += kHeadDim) s_lse[s] = p.partial_lse[row * p.num_splits + s];
  __syncthreads();
  float value, lse;
  MergeStates(
      p.num_splits, [&](int s) { return s_lse[s]; }, [](int) { return 1.0f; },
      [&](int s) { return p.partial_out[(row * p.num_splits + s) * kHeadDim + c]; }, &value, &lse);
  static_cast<T*>(p.out)[row * kHeadDim + c] = gpu::FromF32<T>(value);
}

// The kernel Launch picks for (T, kHeadDim) with kHeads heads per block, and its residency.
template <typename T, int kHeadDim, int kHeads>
constexpr int MinBlocksPerSm() {
  if constexpr (kUseMma<T, kHeadDim>) {
    return MmaDecodeConfig<T, kHeadDim>::kMinBlocksPerSm;
  } else {
    return DecodeConfig<T, kHeadDim, kHeads>::kMinBlocksPerSm;
  }
}
// PagedDecodeWorkspaceBytes knows neither dtype nor head_dim: it sizes for every residency in
// use, which the configs above keep to these two.
constexpr int kResidencies[] = {2, 3};

struct SplitPlan {
  int num_splits;
  int items_per_split;
};

// Blocks fill whole waves (blocks_per_sm resident per SM): a partial last wave would idle most
// SMs for a whole block's time. Few rows: one wave of resident / rows splits. Many rows (e.g.
// 168 rows on 264 slots, 64% busy with one split): the fewest splits whose waves are >= 90%
// full (3 splits: 504 blocks on 2 x 264 slots), else the fullest. A row is one thread block of
// a split: (sequence, KV head, sub-block).
SplitPlan PlanSplits(int num_rows, int blocks_per_sm, int max_items, int num_sms) {
  const int rows = std::max(num_rows, 1);
  const int resident = std::max(num_sms, 1) * blocks_per_sm;
  const int cap =
      std::clamp((max_items + kMinPagesPerSplit - 1) / kMinPagesPerSplit, 1, kMaxSplits);
  auto fill = [&](int s) {
    const int64_t blocks = static_cast<int64_t>(rows) * s;
    return static_cast<double>(blocks) / (((blocks + resident - 1) / resident) * resident);
  };
  int splits = std::min(std::max(resident / rows, 1), cap);
  if (fill(splits) < 0.9) {
    int best = splits;
    for (int s = splits + 1; s <= cap; ++s) {
      if (fill(s) >= 0.9) {
        best = s;
        break;
      }
      if (fill(s) > fill(best)) best = s;
    }
    splits = best;
  }
  const int per = (std::max(max_items, 1) + splits - 1) / splits;
  return {(std::max(max_items, 1) + per - 1) / per, per};
}

int BlockRows(int num_seqs, int num_heads, int num_kv_heads) {
  const int group = num_kv_heads > 0 ? num_heads / num_kv_heads : 1;
  return num_seqs * num_kv_heads * SubBlocks(std::max(group, 1));
}

int CachedSmCount() {
  static const int n = [] {
    absl::StatusOr<int> sms = GpuMultiprocessorCount();
    return sms.ok() ? *sms : 1;
  }();
  return n;
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Plans the splits for this instance's residency, checks the workspace and launches.
template <typename T, int kHeadDim, int kGroup>
absl::Status LaunchTyped(DecodeParams p, int num_seqs, int max_items, void* workspace,
                         size_t workspace_bytes, hipStream_t stream) {
  constexpr int kSubs = SubBlocks(kGroup);
  constexpr int kHeads = kGroup / kSubs;  // query heads per thread block
  const SplitPlan plan =
      PlanSplits(num_seqs * p.num_kv_heads * kSubs, MinBlocksPerSm<T, kHeadDim, kHeads>(),
                 max_items, CachedSmCount());
  const size_t need = PagedDecodeWorkspaceBytes(num_seqs, p.num_heads, p.num_kv_heads, max_items);
  if (plan.num_splits > 1 && (workspace == nullptr || workspace_bytes < need)) {
    return absl::InvalidArgumentError(
        absl::StrCat("workspace of ", workspace_bytes, " bytes is too small; need ", need));
  }
  const size_t partial_elems =
      static_cast<size_t>(num_seqs) * p.num_heads * plan.num_splits * kHeadDim;
  p.partial_out = static_cast<float*>(workspace);
  p.partial_lse = plan.num_splits > 1 ? p.partial_out + partial_elems : nullptr;
  p.group = kGroup;
  p.sub_blocks = kSubs;
  p.num_splits = plan.num_splits;
  p.items_per_split = plan.items_per_split;
  const dim3 grid(p.num_kv_heads * kSubs, p.num_splits, num_seqs);
  if constexpr (kUseMma<T, kHeadDim>) {
    PagedDecodeMmaKernel<T, kHeadDim, kHeads>
        <<<grid, MmaDecodeConfig<T, kHeadDim>::kThreads, 0, stream>>>(p);
  } else {
    PagedDecodeKernel<T, kHeadDim, kHeads>
        <<<grid, DecodeConfig<T, kHeadDim, kHeads>::kThreads, 0, stream>>>(p);
  }
  if (p.num_splits > 1) {
    PagedDecodeCombineKernel<T, kHeadDim><<<dim3(p.num_heads, num_seqs), kHeadDim, 0, stream>>>(p);
  }
  return GpuLastError("paged decode launch");
}

absl::Status Launch(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                    const PageList* pages, float scale, void* workspace, size_t workspace_bytes,
                    GpuStream stream, DevicePredicate predicate) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  if (io.query == nullptr || io.out == nullptr || table.block_table == nullptr ||
      table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("query, out, block_table and seq_lens must not be null");
  }
  if (io.dtype != cache.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query dtype ", DTypeName(io.dtype), " differs from the cache's ", DTypeName(cache.dtype)));
  }
  if (io.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("query head_dim ", io.head_dim, " differs from the cache's ", cache.head_dim));
  }
  if (io.num_heads <= 0 || io.num_heads % cache.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_heads ", io.num_heads,
                                                   " must be a positive multiple of num_kv_heads ",
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
      return absl::InvalidArgumentError(
          absl::StrCat("selection has ", pages->num_kv_heads, " KV heads and max_selected ",
                       pages->max_selected, "; expected ", cache.num_kv_heads, " and >= 1"));
    }
    max_items = pages->max_selected;
  }
  DecodeParams p{};
  p.query = io.query;
  p.out = io.out;
  p.kv = cache.data;
  p.block_table = table.block_table;
  p.seq_lens = table.seq_lens;
  p.pages = pages != nullptr ? pages->pages : nullptr;
  p.counts = pages != nullptr ? pages->counts : nullptr;
  p.plane_elems = cache.PlaneElems();
  p.num_heads = io.num_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.num_blocks = cache.num_blocks;
  p.block_size = cache.block_size;
  p.max_blocks_per_seq = table.max_blocks_per_seq;
  p.max_selected = pages != nullptr ? pages->max_selected : 0;
  p.scale_log2 = scale * kLog2e;
  p.run_flag = predicate.flag;
  p.run_when_zero = predicate.run_when_zero;
  return gpu::DispatchShape(cache.dtype, io.head_dim, io.num_heads / cache.num_kv_heads,
                            [&]<typename T, int kHeadDim, int kGroup>() {
                              return LaunchTyped<T, kHeadDim, kGroup>(
                                  p, io.num_seqs, max_items, workspace, workspace_bytes,
                                  static_cast<hipStream_t>(stream));
                            });
}

}  // namespace

size_t PagedDecodeWorkspaceBytes(int num_seqs, int num_heads, int num_kv_heads, int max_items) {
  // dtype and head_dim are not known here: the largest plan of the residencies that a launch
  // may use.
  const int rows = BlockRows(std::max(num_seqs, 0), num_heads, num_kv_heads);
  int splits = 1;
  for (int blocks_per_sm : kResidencies) {
    splits =
        std::max(splits, PlanSplits(rows, blocks_per_sm, max_items, CachedSmCount()).num_splits);
  }
  if (splits <= 1) return 0;
  // head_dim is at most 256; one extra float per row for the lse.
  return static_cast<size_t>(std::max(num_seqs, 0)) * std::max(num_heads, 0) * splits * (256 + 1) *
         sizeof(float);
}

absl::Status ValidateDecodeInputsGpu(const DecodeIo& io, const KvCacheView& cache,
                                     const BlockTableView& table, const PageList* pages,
                                     GpuStream stream) {
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTableShape(table));
  MEMPIPE_RETURN_IF_ERROR(RequireTokenMajor(cache, "GPU decode"));
  const size_t cells = static_cast<size_t>(table.num_seqs) * table.max_blocks_per_seq;
  std::vector<int32_t> block_table(cells), seq_lens(table.num_seqs);
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostSync(block_table.data(), table.block_table, cells * sizeof(int32_t), stream));
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostSync(seq_lens.data(), table.seq_lens, seq_lens.size() * sizeof(int32_t), stream));
  const BlockTableView host{block_table.data(), seq_lens.data(), table.num_seqs,
                            table.max_blocks_per_seq};
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, host));
  if (pages == nullptr) return absl::OkStatus();
  if (pages->pages == nullptr || pages->counts == nullptr || pages->num_kv_heads <= 0 ||
      pages->max_selected <= 0) {
    return ValidatePageList(*pages, host, cache);  // names the bad field
  }
  const size_t rows = static_cast<size_t>(table.num_seqs) * pages->num_kv_heads;
  std::vector<int32_t> list(rows * pages->max_selected), counts(rows);
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostSync(list.data(), pages->pages, list.size() * sizeof(int32_t), stream));
  MEMPIPE_RETURN_IF_ERROR(
      CopyToHostSync(counts.data(), pages->counts, counts.size() * sizeof(int32_t), stream));
  const PageList host_pages{list.data(), counts.data(), pages->num_kv_heads, pages->max_selected};
  return ValidatePageList(host_pages, host, cache);
}

absl::Status DenseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                            const BlockTableView& table, float scale, void* workspace,
                            size_t workspace_bytes, GpuStream stream, DevicePredicate predicate) {
  return Launch(io, cache, table, nullptr, scale, workspace, workspace_bytes, stream, predicate);
}

absl::Status SparseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                             const BlockTableView& table, const PageList& pages, float scale,
                             void* workspace, size_t workspace_bytes, GpuStream stream,
                             DevicePredicate predicate) {
  return Launch(io, cache, table, &pages, scale, workspace, workspace_bytes, stream, predicate);
}

}  // namespace mempipe
