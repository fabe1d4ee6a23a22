// Relevancy and top-k kernels (see the header).
//
//   ScorePagesKernel   grid (kv head, page chunk, seq) x 8 groups of 32 lanes
//     lane l holds channels l, l+32, ... of the group's queries; per page it loads the max/min
//     rows (4 pages in flight per group), sums its channels in order, xor-butterflies the 32
//     lane sums and aggregates the group's heads in head order -> one fp32 score per page
//   SelectPagesKernel  grid (kv head, seq) x 1024 threads
//     key = order-preserving bits of the score (NaN -> -inf, -0 -> +0, as the CPU compares)
//     min/max of keys -> radix select, 8 bits a pass below the shared prefix -> threshold T and
//     the number of ties at T to keep -> ordered compaction (per-thread runs + block scan)
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/gpu/dispatch.h"
#include "core/gpu/gpu_compat.h"
#include "core/status_macros.h"
#include "retriever/gpu/select_gpu.h"
#include "retriever/gpu/select_int8_gpu.h"

namespace mempipe {
namespace {

constexpr int kScoreWarps = 8;
constexpr int kScoreThreads = kScoreWarps * kGpuLanes;
constexpr int kPagesPerScoreBlock = 256;
constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / kGpuLanes;

struct ScoreParams {
  const int32_t* run_flag;  // DevicePredicate: [1] or null
  int run_when_zero;
  const void* query;           // [num_seqs, num_heads, head_dim]
  const void* digests;         // [num_blocks, 2, num_kv_heads, head_dim]
  const int32_t* block_table;  // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens;     // [num_seqs]
  float* scores;               // [num_seqs, num_kv_heads, max_blocks_per_seq]
  uint32_t* group_max;         // [num_seqs, num_kv_heads, num_groups] or null: per 32 pages,
                               // the largest key of a middle page (0: none)
  int num_heads, num_kv_heads, num_blocks, block_size, max_blocks_per_seq;
  int num_groups, sinks, locals;
  int aggregation;  // GroupAggregation
};

// Order-preserving key of a score as the CPU ranks it: NaN as -inf, -0 equal to +0. Every
// real key is above 0, which therefore marks "no page".
__device__ __forceinline__ uint32_t ScoreKey(float f) {
  if (f != f) f = -INFINITY;
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Geometry of one (head_dim, group) instance.
template <int kHeadDim, int kGroups>
struct ScoreConfig {
  static constexpr int kChannels = kHeadDim / kGpuLanes;  // channels per lane
  // Pages per batch: each lane holds its channel sums of the whole batch, so that the
  // butterfly can exchange halves (one shuffle per page instead of five).
  // Batch sized so that its digest values take 32 registers (16 channels of max and min).
  static constexpr int kBatch = 16 / kChannels < 8 ? 16 / kChannels : 8;
  static constexpr int kLogBatch = kBatch == 8 ? 3 : (kBatch == 4 ? 2 : 1);
  static_assert(kGpuLanes % kBatch == 0 && kPagesPerScoreBlock == kScoreWarps * kGpuLanes);
  // Groups of 1, 2, 4 (any head_dim), 8 and small odd groups keep the queries in registers;
  // larger ones (q and its sign mask would take over 80 registers) read them from shared
  // memory.
  static constexpr bool kQShared = kGroups > 8 || (kGroups != 8 && kGroups * kChannels > 32);
  // Resident blocks per SM: the __launch_bounds__ of ScorePagesKernel.
  static constexpr int kMinBlocksPerSm = kGroups >= 5 ? 2 : 3;
};

template <typename T, int kHeadDim, int kGroups>
__global__ void __launch_bounds__(kScoreThreads, (ScoreConfig<kHeadDim, kGroups>::kMinBlocksPerSm))
    ScorePagesKernel(ScoreParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  using C = ScoreConfig<kHeadDim, kGroups>;
  constexpr int J = C::kChannels;
  constexpr int P = C::kBatch;
  // KV heads vary fastest across the grid, so the blocks reading one digest block (all its
  // heads) run together and share DRAM rows.
  const int kvh = blockIdx.x, chunk = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / kGpuLanes, lane = threadIdx.x % kGpuLanes;
  const int len = p.seq_lens[seq];
  const int num_pages =
      len > 0 ? min((len + p.block_size - 1) / p.block_size, p.max_blocks_per_seq) : 0;
  const int chunk_begin = chunk * kPagesPerScoreBlock;
  const int chunk_end = min(chunk_begin + kPagesPerScoreBlock, p.max_blocks_per_seq);

  __shared__ int s_block[kPagesPerScoreBlock];  // -1: no valid page
  const int32_t* table = p.block_table + static_cast<size_t>(seq) * p.max_blocks_per_seq;
  for (int i = threadIdx.x; i < kPagesPerScoreBlock; i += kScoreThreads) {
    const int page = chunk_begin + i;
    const int block = page < num_pages ? table[page] : -1;
    s_block[i] = block >= 0 && block < p.num_blocks ? block : -1;
  }

  // use_max[g][j]: all ones where q >= 0. For finite values the reference's
  // max(q * mx, q * mn) is then q * (q >= 0 ? mx : mn) up to the sign of a zero, which no lane
  // sum starting at +0 can tell apart; one bit-select replaces a product and a max.
  // With C::kQShared the queries live in s_q and both are formed per use.
  constexpr int kRegGroups = C::kQShared ? 1 : kGroups;
  float q[kRegGroups][J];
  uint32_t use_max[kRegGroups][J];
  __shared__ float s_q[C::kQShared ? kGroups : 1][C::kQShared ? kHeadDim : 1];
  const T* qrow = static_cast<const T*>(p.query) +
                  (static_cast<size_t>(seq) * p.num_heads + kvh * kGroups) * kHeadDim;
  if constexpr (C::kQShared) {
    for (int i = threadIdx.x; i < kGroups * kHeadDim; i += kScoreThreads) {
      s_q[i / kHeadDim][i % kHeadDim] = gpu::ToF32(qrow[i]);
    }
  } else {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        q[g][j] = gpu::ToF32(qrow[g * kHeadDim + lane + j * kGpuLanes]);
        use_max[g][j] = q[g][j] >= 0.0f ? 0xffffffffu : 0u;
      }
    }
  }
  const T* dg = static_cast<const T*>(p.digests) + static_cast<size_t>(kvh) * kHeadDim + lane;
  const size_t block_stride = 2 * static_cast<size_t>(p.num_kv_heads) * kHeadDim;
  const size_t min_off = static_cast<size_t>(p.num_kv_heads) * kHeadDim;
  float* out = p.scores + (static_cast<size_t>(seq) * p.num_kv_heads + kvh) * p.max_blocks_per_seq;
  const bool is_max = p.aggregation == static_cast<int>(GroupAggregation::kMax);
  __syncthreads();

  // Warp w scores the 32 pages [32 w, 32 w + 32) of the chunk, P at a time.
  const int mid_lo = p.sinks, mid_hi = num_pages - p.locals;
  uint32_t group_max = 0;
  const int group_end = min(warp * kGpuLanes + kGpuLanes, chunk_end - chunk_begin);
  // Digest rows of the batch `ahead` pages on go to L2 one line per lane, so more bytes are
  // in flight than the batch's registers hold.
  constexpr int kLineElems = 128 / sizeof(T);
  constexpr int kLinesPerRow = kHeadDim / kLineElems > 0 ? kHeadDim / kLineElems : 1;
  static_assert(P * 2 * kLinesPerRow <= kGpuLanes);
  const T* dg_head = static_cast<const T*>(p.digests) + static_cast<size_t>(kvh) * kHeadDim;
  auto prefetch = [&](int b) {
    const int u = lane / (2 * kLinesPerRow), rem = lane % (2 * kLinesPerRow);
    if (u < P && b + u < group_end) {
      const int block = s_block[b + u];
      if (block >= 0) {
        GpuPrefetchL2(dg_head + block * block_stride + (rem / kLinesPerRow) * min_off +
                      (rem % kLinesPerRow) * kLineElems);
      }
    }
  };
  prefetch(warp * kGpuLanes + P);
  for (int b0 = warp * kGpuLanes; b0 < group_end; b0 += P) {
    prefetch(b0 + 2 * P);
    T mx[P][J], mn[P][J];
#pragma unroll
    for (int u = 0; u < P; ++u) {
      const int block = s_block[b0 + u];
      const T* row = dg + max(block, 0) * block_stride;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if (block >= 0) {
          mx[u][j] = row[j * kGpuLanes];
          mn[u][j] = row[min_off + j * kGpuLanes];
        }
      }
    }
    float agg = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      float qg[J];
      uint32_t um[J];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if constexpr (C::kQShared) {
          qg[j] = s_q[g][lane + j * kGpuLanes];
          um[j] = qg[j] >= 0.0f ? 0xffffffffu : 0u;
        } else {
          qg[j] = q[g][j];
          um[j] = use_max[g][j];
        }
      }
      // Lane sums in the canonical order of relevancy.h; __fmul_rn/__fadd_rn are never fused.
      float v[P];
#pragma unroll
      for (int u = 0; u < P; ++u) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const uint32_t bound = (__float_as_uint(gpu::ToF32(mx[u][j])) & um[j]) |
                                 (__float_as_uint(gpu::ToF32(mn[u][j])) & ~um[j]);
          s = __fadd_rn(s, __fmul_rn(qg[j], __uint_as_float(bound)));
        }
        v[u] = s;
      }
      // Butterfly 16, 8, ..., 1 over the 32 lanes for all P pages at once: while a lane
      // holds several pages it keeps half of them and trades the other half with its partner,
      // so each addition pairs the same lanes as the reference tree (addition commutes).
      int count = P;
#pragma unroll
      for (int stride = kGpuLanes / 2; stride > 0; stride /= 2) {
        if (count > 1) {
          const bool upper = lane & stride;
          const int half = count / 2;
#pragma unroll
          for (int i = 0; i < half; ++i) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = __fadd_rn(keep, GpuShflXor32(send, stride));
          }
          count = half;
        } else {
          v[0] = __fadd_rn(v[0], GpuShflXor32(v[0], stride));
        }
      }
      if (g == 0) {
        agg = v[0];
      } else if (is_max) {
        agg = v[0] > agg ? v[0] : agg;
      } else {
        agg = __fadd_rn(agg, v[0]);
      }
    }
    // Lane k * 32 / P holds page k of the batch.
    if ((lane & ((kGpuLanes / P) - 1)) == 0) {
      const int i = b0 + (lane >> (5 - C::kLogBatch));
      const int page = chunk_begin + i;
      if (page < chunk_end) {
        out[page] = s_block[i] >= 0 ? agg : -INFINITY;
        if (s_block[i] >= 0 && page >= mid_lo && page < mid_hi) {
          group_max = max(group_max, ScoreKey(agg));
        }
      }
    }
  }
  if (p.group_max != nullptr && chunk_begin + warp * kGpuLanes < p.max_blocks_per_seq) {
#pragma unroll
    for (int w = kGpuLanes / 2; w > 0; w /= 2)
      group_max = max(group_max, GpuShflXor32(group_max, w));
    if (lane == 0) {
      p.group_max[(static_cast<size_t>(seq) * p.num_kv_heads + kvh) * p.num_groups +
                  chunk * kScoreWarps + warp] = group_max;
    }
  }
}

struct SelectParams {
  const int32_t* run_flag;  // DevicePredicate: [1] or null
  int run_when_zero;
  const float* scores;        // [num_seqs, num_kv_heads, max_blocks_per_seq]
  const uint32_t* group_max;  // [num_seqs, num_kv_heads, num_groups] (ScorePagesKernel)
  const int32_t* seq_lens;    // [num_seqs]
  int32_t* pages;             // [num_seqs, num_kv_heads, max_selected]
  int32_t* counts;            // [num_seqs, num_kv_heads]
  int num_kv_heads, max_blocks_per_seq, block_size, max_selected, num_groups;
  int k, sinks, locals;
};

constexpr int kCandidateCap = 4096;

// Exclusive prefix sum over the block; `scratch` holds kSelectWarps ints. Ends synchronized.
__device__ int BlockExclusiveScan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % kGpuLanes, warp = threadIdx.x / kGpuLanes;
  int incl = v;
#pragma unroll
  for (int d = 1; d < kGpuLanes; d *= 2) {
    const int o = GpuShflUp32(incl, d);
    if (lane >= d) incl += o;
  }
  if (lane == kGpuLanes - 1) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kSelectWarps ? scratch[lane] : 0;
#pragma unroll
    for (int d = 1; d < kGpuLanes; d *= 2) {
      const int o = GpuShflUp32(w, d);
      if (lane >= d) w += o;
    }
    if (lane < kSelectWarps) scratch[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int warp_before = warp > 0 ? scratch[warp - 1] : 0;
  *total = scratch[kSelectWarps - 1];
  __syncthreads();
  return warp_before + incl - v;
}

// Radix select over keys key_at(0 .. n-1), called by the whole block: returns the threshold T
// and `take`, the number of keys equal to T that complete the `want` largest
// (count(key > T) + take == want, 1 <= take). Digits of 8 bits start below the bits that the
// smallest and largest key share.
template <typename KeyAt>
__device__ void RadixSelect(KeyAt key_at, int n, int want, uint32_t* threshold, int* take) {
  __shared__ uint32_t s_min, s_max, s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_hist[256];
  const int tid = threadIdx.x, lane = tid % kGpuLanes, warp = tid / kGpuLanes;
  uint32_t kmin = 0xffffffffu, kmax = 0;
  for (int i = tid; i < n; i += kSelectThreads) {
    const uint32_t key = key_at(i);
    kmin = min(kmin, key);
    kmax = max(kmax, key);
  }
#pragma unroll
  for (int w = kGpuLanes / 2; w > 0; w /= 2) {
    kmin = min(kmin, GpuShflXor32(kmin, w));
    kmax = max(kmax, GpuShflXor32(kmax, w));
  }
  if (tid == 0) {
    s_min = 0xffffffffu;
    s_max = 0;
  }
  __syncthreads();
  if (lane == 0) {
    atomicMin(&s_min, kmin);
    atomicMax(&s_max, kmax);
  }
  __syncthreads();
  kmin = s_min;
  kmax = s_max;
  int remaining = want;
  if (kmin == kmax) {
    *threshold = kmin;
    *take = remaining;
    __syncthreads();
    return;
  }
  const int common = __clz(kmin ^ kmax);
  uint32_t mask = common > 0 ? 0xffffffffu << (32 - common) : 0u;
  uint32_t prefix = kmax & mask;
  int pos = 32 - common;
  while (pos > 0) {
    const int width = pos < 8 ? pos : 8;
    const int shift = pos - width;
    const uint32_t digit_mask = (1u << width) - 1u;
    for (int i = tid; i < 256; i += kSelectThreads) s_hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kSelectThreads) {
      const uint32_t key = key_at(i);
      if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & digit_mask], 1);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns bins [8l, 8l + 8); find the bin holding the remaining-th largest key.
      int bins[8];
      int lane_sum = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        bins[b] = s_hist[lane * 8 + b];
        lane_sum += bins[b];
      }
      int incl = lane_sum;  // keys in bins of lanes >= this one
#pragma unroll
      for (int d = 1; d < kGpuLanes; d *= 2) {
        const int o = GpuShflDown32(incl, d);
        if (lane + d < kGpuLanes) incl += o;
      }
      const int above = incl - lane_sum;
      if (above < remaining && remaining <= incl) {
        int cum = above;
        for (int b = 7; b >= 0; --b) {
          if (cum + bins[b] >= remaining) {
            s_prefix = prefix | (static_cast<uint32_t>(lane * 8 + b) << shift);
            s_remaining = remaining - cum;
            break;
          }
          cum += bins[b];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= digit_mask << shift;
    pos = shift;
    __syncthreads();
  }
  *threshold = prefix;
  *take = remaining;
}

// Writes, in index order, the pages i of [begin, end) with keep(i) to out[0, ...). Each thread
// owns a contiguous run; `tie(i)` pages are kept only while fewer than `take` ties precede.
template <typename KeyOf, typename IndexOf>
__device__ void OrderedCompaction(int begin, int end, KeyOf key_of, IndexOf index_of,
                                  uint32_t threshold, int take, int32_t* out, int* scratch) {
  const int tid = threadIdx.x;
  const int len = max(end - begin, 0);
  const int run = (len + kSelectThreads - 1) / kSelectThreads;
  const int r0 = begin + min(tid * run, len), r1 = begin + min(tid * run + run, len);
  int strict = 0, ties = 0;
  for (int i = r0; i < r1; ++i) {
    const uint32_t key = key_of(i);
    strict += key > threshold;
    ties += key == threshold;
  }
  int total;
  int strict_before = BlockExclusiveScan(strict, scratch, &total);
  int ties_before = BlockExclusiveScan(ties, scratch, &total);
  for (int i = r0; i < r1; ++i) {
    const uint32_t key = key_of(i);
    const bool tie = key == threshold;
    const bool keep = key > threshold || (tie && ties_before < take);
    if (keep) out[strict_before + min(ties_before, take)] = index_of(i);
    strict_before += keep && !tie;
    ties_before += tie;
  }
}

//   1. floor F: the want-th largest of the 32-page group maxima (ScorePagesKernel), when there
//      are that many groups; at least `want` middle pages score >= F, so the threshold does too
//   2. candidates: middle pages with key >= F, gathered in index order into shared memory
//      (warp segments, ballots); typically a few hundred out of tens of thousands
//   3. exact radix select among the candidates, then ordered compaction of the candidates.
// When the candidates overflow shared memory the same select and compaction run over the
// whole row in global memory.
__global__ void __launch_bounds__(kSelectThreads) SelectPagesKernel(SelectParams p) {
  if (gpu::SkipLaunch(p.run_flag, p.run_when_zero)) return;
  const int kvh = blockIdx.x, seq = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % kGpuLanes, warp = tid / kGpuLanes;
  const size_t row = static_cast<size_t>(seq) * p.num_kv_heads + kvh;
  const float* sc = p.scores + row * p.max_blocks_per_seq;
  int32_t* outp = p.pages + row * p.max_selected;
  const int len = p.seq_lens[seq];
  const int n = len > 0 ? min((len + p.block_size - 1) / p.block_size, p.max_blocks_per_seq) : 0;

  if (n <= p.k) {
    for (int i = tid; i < p.max_selected; i += kSelectThreads) outp[i] = i < n ? i : -1;
    if (tid == 0) p.counts[row] = n;
    return;
  }
  const int lo = p.sinks, hi = n - p.locals, want = p.k - p.sinks - p.locals;
  __shared__ uint32_t s_keys[kCandidateCap];
  __shared__ int s_idx[kCandidateCap];
  __shared__ int s_scan[kSelectWarps];

  for (int i = tid; i < lo; i += kSelectThreads) outp[i] = i;
  for (int i = hi + tid; i < n; i += kSelectThreads) outp[lo + want + (i - hi)] = i;
  for (int i = p.k + tid; i < p.max_selected; i += kSelectThreads) outp[i] = -1;
  if (tid == 0) p.counts[row] = p.k;
  if (want == 0) return;

  uint32_t floor_key = 0;
  const int groups = (n + kGpuLanes - 1) / kGpuLanes;
  if (p.group_max != nullptr && groups >= want && groups <= kCandidateCap) {
    const uint32_t* gm = p.group_max + row * p.num_groups;
    for (int i = tid; i < groups; i += kSelectThreads) s_keys[i] = gm[i];
    __syncthreads();
    int unused;
    RadixSelect([&](int i) { return s_keys[i]; }, groups, want, &floor_key, &unused);
  }

  // Candidates in index order: warp w scans its segment of the middle pages twice (count,
  // then write at its offset).
  const int mid = hi - lo;
  const int seg = ((mid + kSelectWarps - 1) / kSelectWarps + kGpuLanes - 1) / kGpuLanes * kGpuLanes;
  const int s0 = lo + min(warp * seg, mid), s1 = lo + min(warp * seg + seg, mid);
  // kUnroll independent loads per lane in flight before their ballots.
  constexpr int kUnroll = 8;
  int count = 0;
  for (int base = s0; base < s1; base += kUnroll * kGpuLanes) {
    uint32_t keys[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kGpuLanes + lane;
      keys[u] = i < s1 ? ScoreKey(sc[i]) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      count += __popc(GpuBallot32(base + u * kGpuLanes + lane < s1 && keys[u] >= floor_key));
    }
  }
  int m;
  const int warp_off = GpuShfl32(BlockExclusiveScan(lane == 0 ? count : 0, s_scan, &m), 0);
  uint32_t threshold;
  int take;
  if (m <= kCandidateCap) {
    int pos = warp_off;
    for (int base = s0; base < s1; base += kUnroll * kGpuLanes) {
      uint32_t keys[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kGpuLanes + lane;
        keys[u] = i < s1 ? ScoreKey(sc[i]) : 0;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kGpuLanes + lane;
        const bool cand = i < s1 && keys[u] >= floor_key;
        const uint32_t ballot = GpuBallot32(cand);
        if (cand) {
          const int at = pos + __popc(ballot & ((1u << lane) - 1u));
          s_keys[at] = keys[u];
          s_idx[at] = i;
        }
        pos += __popc(ballot);
      }
    }
    __syncthreads();
    RadixSelect([&](int i) { return s_keys[i]; }, m, want, &threshold, &take);
    OrderedCompaction(
        0, m, [&](int i) { return s_keys[i]; }, [&](int i) { return s_idx[i]; }, threshold, take,
        outp + lo, s_scan);
  } else {
    auto key_at = [&](int i) { return ScoreKey(sc[i]); };
    RadixSelect([&](int i) { return ScoreKey(sc[lo + i]); }, mid, want, &threshold, &take);
    OrderedCompaction(
        lo, hi, key_at, [](int i) { return i; }, threshold, take, outp + lo, s_scan);
  }
}

template <typename T, int kHeadDim, int kGroups>
absl::Status LaunchScore(const ScoreParams& p, int num_seqs, hipStream_t s) {
  const dim3 grid(p.num_kv_heads,
                  (p.max_blocks_per_seq + kPagesPerScoreBlock - 1) / kPagesPerScoreBlock, num_seqs);
  ScorePagesKernel<T, kHeadDim, kGroups><<<grid, kScoreThreads, 0, s>>>(p);
  return GpuLastError("ScorePagesKernel launch");
}

absl::Status CheckTable(const BlockTableView& table) {
  if (table.block_table == nullptr || table.seq_lens == nullptr || table.num_seqs <= 0 ||
      table.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("block table needs non-null pointers and positive sizes, got ", table.num_seqs,
                     " x ", table.max_blocks_per_seq));
  }
  if (table.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("num_seqs ", table.num_seqs, " exceeds 65535"));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

int NumGroups(int max_blocks_per_seq) { return (max_blocks_per_seq + kGpuLanes - 1) / kGpuLanes; }

size_t ScoreBytes(const BlockTableView& table, int num_kv_heads) {
  return static_cast<size_t>(std::max(table.num_seqs, 0)) * std::max(num_kv_heads, 0) *
         std::max(table.max_blocks_per_seq, 0) * sizeof(float);
}

// Step 2; with `group_max` also the per-32-page maxima of the middle pages for step 3.
absl::Status LaunchRelevancy(const QueryView& query, const KvCacheView& cache,
                             const DigestView& digests, const BlockTableView& table,
                             GroupAggregation agg, float* scores, uint32_t* group_max, int sinks,
                             int locals, GpuStream stream, DevicePredicate predicate = {}) {
  MEMPIPE_RETURN_IF_ERROR(ValidateGroupAggregation(agg));
  KvCacheView shapes = cache;
  if (shapes.data == nullptr) shapes.data = digests.data;  // only shapes are checked
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(shapes));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(CheckTable(table));
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
  ScoreParams p{};
  p.query = query.data;
  p.digests = digests.data;
  p.block_table = table.block_table;
  p.seq_lens = table.seq_lens;
  p.scores = scores;
  p.group_max = group_max;
  p.num_heads = query.num_heads;
  p.num_kv_heads = cache.num_kv_heads;
  p.num_blocks = cache.num_blocks;
  p.block_size = cache.block_size;
  p.max_blocks_per_seq = table.max_blocks_per_seq;
  p.num_groups = NumGroups(table.max_blocks_per_seq);
  p.sinks = sinks;
  p.locals = locals;
  p.aggregation = static_cast<int>(agg);
  p.run_flag = predicate.flag;
  p.run_when_zero = predicate.run_when_zero;
  return gpu::DispatchShape(cache.dtype, query.head_dim, query.num_heads / cache.num_kv_heads,
                            [&]<typename T, int kHeadDim, int kGroups>() {
                              return LaunchScore<T, kHeadDim, kGroups>(
                                  p, query.num_seqs, static_cast<hipStream_t>(stream));
                            });
}

absl::Status LaunchSelect(const float* scores, const uint32_t* group_max,
                          const BlockTableView& table, int block_size, int num_kv_heads,
                          const SelectionConfig& config, const SelectionView& out, GpuStream stream,
                          DevicePredicate predicate = {}) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(config, "the GPU top-k kernel"));
  MEMPIPE_RETURN_IF_ERROR(CheckTable(table));
  if (scores == nullptr || out.pages == nullptr || out.counts == nullptr) {
    return absl::InvalidArgumentError("scores and selection pointers must not be null");
  }
  const int k = config.PagesPerHead(block_size);
  if (out.num_seqs != table.num_seqs || out.num_kv_heads != num_kv_heads || out.max_selected < k ||
      num_kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("selection is [", out.num_seqs, ", ", out.num_kv_heads, ", ", out.max_selected,
                     "]; need [", table.num_seqs, ", ", num_kv_heads, ", >= ", k, "]"));
  }
  SelectParams p{};
  p.scores = scores;
  p.group_max = group_max;
  p.seq_lens = table.seq_lens;
  p.pages = out.pages;
  p.counts = out.counts;
  p.num_kv_heads = num_kv_heads;
  p.max_blocks_per_seq = table.max_blocks_per_seq;
  p.block_size = block_size;
  p.max_selected = out.max_selected;
  p.num_groups = NumGroups(table.max_blocks_per_seq);
  p.k = k;
  p.sinks = config.num_sink_pages;
  p.locals = config.num_local_pages;
  p.run_flag = predicate.flag;
  p.run_when_zero = predicate.run_when_zero;
  SelectPagesKernel<<<dim3(num_kv_heads, table.num_seqs), kSelectThreads, 0,
                      static_cast<hipStream_t>(stream)>>>(p);
  return GpuLastError("SelectPagesKernel launch");
}

}  // namespace

size_t SelectWorkspaceBytes(const BlockTableView& table, int num_kv_heads) {
  const size_t groups = static_cast<size_t>(std::max(table.num_seqs, 0)) *
                        std::max(num_kv_heads, 0) *
                        NumGroups(std::max(table.max_blocks_per_seq, 0));
  return ScoreBytes(table, num_kv_heads) + groups * sizeof(uint32_t);
}

absl::Status ComputeRelevancyGpu(const QueryView& query, const KvCacheView& cache,
                                 const DigestView& digests, const BlockTableView& table,
                                 GroupAggregation agg, float* scores, GpuStream stream) {
  if (digests.format == DigestFormat::kInt8) {  // select_int8_gpu.hip
    return ComputeRelevancyInt8Gpu(query, cache, digests, table, agg, scores, nullptr, 0, 0,
                                   stream);
  }
  return LaunchRelevancy(query, cache, digests, table, agg, scores, nullptr, 0, 0, stream);
}

absl::Status SelectPagesGpu(const float* scores, const BlockTableView& table, int block_size,
                            int num_kv_heads, const SelectionConfig& config,
                            const SelectionView& out, GpuStream stream) {
  return LaunchSelect(scores, nullptr, table, block_size, num_kv_heads, config, out, stream);
}

absl::Status ScoreAndSelectGpu(const QueryView& query, const KvCacheView& cache,
                               const DigestView& digests, const BlockTableView& table,
                               const SelectionConfig& config, const SelectionView& out,
                               void* workspace, size_t workspace_bytes, GpuStream stream,
                               DevicePredicate predicate) {
  MEMPIPE_RETURN_IF_ERROR(ValidateSelectionConfig(config, cache.block_size));
  MEMPIPE_RETURN_IF_ERROR(RequireFlatSelection(config, "the GPU score + top-k kernels"));
  const size_t need = SelectWorkspaceBytes(table, cache.num_kv_heads);
  if (workspace == nullptr || workspace_bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("workspace of ", workspace_bytes, " bytes is too small; need ", need));
  }
  float* scores = static_cast<float*>(workspace);
  auto* group_max = reinterpret_cast<uint32_t*>(static_cast<char*>(workspace) +
                                                ScoreBytes(table, cache.num_kv_heads));
  if (digests.format == DigestFormat::kInt8) {  // select_int8_gpu.hip
    MEMPIPE_RETURN_IF_ERROR(
        ComputeRelevancyInt8Gpu(query, cache, digests, table, config.aggregation, scores, group_max,
                                config.num_sink_pages, config.num_local_pages, stream, predicate));
  } else {
    MEMPIPE_RETURN_IF_ERROR(LaunchRelevancy(query, cache, digests, table, config.aggregation,
                                            scores, group_max, config.num_sink_pages,
                                            config.num_local_pages, stream, predicate));
  }
  return LaunchSelect(scores, group_max, table, cache.block_size, cache.num_kv_heads, config, out,
                      stream, predicate);
}

absl::Status SelectPagesWithGroupMaxGpu(const float* scores, const uint32_t* group_max,
                                        const BlockTableView& table, int block_size,
                                        int num_kv_heads, const SelectionConfig& config,
                                        const SelectionView& out, GpuStream stream) {
  return LaunchSelect(scores, group_max, table, block_size, num_kv_heads, config, out, stream);
}

}  // namespace mempipe
