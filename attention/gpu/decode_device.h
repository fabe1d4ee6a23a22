// Device functions that the paged decode kernels share (attention/gpu/paged_decode_gpu.hip):
// the launch parameters, page resolution (a split's items, a chunk of them staged as block ids
// in shared memory), the tile loop over a split's pages (double-buffered or not), and the
// log-sum-exp merge of partial softmax states that both the in-block stream merge and the
// split-combine kernel use. Include from .hip files only.
//
//   const SplitItems items = ResolveSplit(p, seq, heads.kvh, split);
//   ForEachTile<kWarps, true, Tile>(p, items, seq, tiles_per_page, tile_tokens, load, compute);
//   MergeStates(n, m_of, l_of, acc_of, &value, &lse);
//   StoreMerged<T, kHeadDim>(p, row, split, c, value, lse);
#ifndef MEMPIPE_ATTENTION_GPU_DECODE_DEVICE_H_
#define MEMPIPE_ATTENTION_GPU_DECODE_DEVICE_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "core/gpu/gpu_compat.h"

namespace mempipe::decode_gpu {

inline constexpr int kMaxSplits = 128;
inline constexpr int kChunkPages = 256;
// Query heads of one thread block at most: a larger GQA group (12, 16) is cut into
// group / heads-per-block blocks per KV head, adjacent in the grid so that they share the
// KV head's pages in L2. More heads would not fit the registers (q and accumulators).
inline constexpr int kMaxHeadsPerBlock = 8;

// Thread blocks per KV head for a GQA group: the fewest whose heads per block fit.
__host__ __device__ constexpr int SubBlocks(int group) {
  int s = 1;
  while (group / s > kMaxHeadsPerBlock || group % s != 0) ++s;
  return s;
}
static_assert(SubBlocks(8) == 1 && SubBlocks(12) == 2 && SubBlocks(16) == 2 && SubBlocks(7) == 1);

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
  int group;       // num_heads / num_kv_heads
  int sub_blocks;  // thread blocks per KV head (SubBlocks(group)); grid.x = num_kv_heads * this
  int num_splits, items_per_split;
  float scale_log2;         // softmax scale * log2(e): exp2 replaces exp
  const int32_t* run_flag;  // DevicePredicate: [1] or null
  int run_when_zero;
};

// The KV head of this thread block and its first query row (heads per block: kHeads).
struct BlockHeads {
  int kvh;
  size_t q_row0;
};
template <int kHeads>
__device__ __forceinline__ BlockHeads ResolveHeads(const DecodeParams& p, int seq) {
  const int kvh = blockIdx.x / p.sub_blocks, sub = blockIdx.x % p.sub_blocks;
  return {kvh, static_cast<size_t>(seq) * p.num_heads + kvh * p.group + sub * kHeads};
}

// The items (pages) of one (sequence, KV head, split): dense items are the logical pages
// 0 .. num_pages-1, sparse ones the selection list (count clamped to [0, max_selected]).
struct SplitItems {
  const int32_t* list;  // null: dense
  int seq_len, num_pages, begin, end;
};
__device__ __forceinline__ SplitItems ResolveSplit(const DecodeParams& p, int seq, int kvh,
                                                   int split) {
  SplitItems it;
  const int bs = p.block_size;
  it.seq_len = p.seq_lens[seq];
  it.num_pages = it.seq_len > 0 ? min((it.seq_len + bs - 1) / bs, p.max_blocks_per_seq) : 0;
  it.list = nullptr;
  int num_items = it.num_pages;
  if (p.pages != nullptr) {
    const size_t row = static_cast<size_t>(seq) * p.num_kv_heads + kvh;
    it.list = p.pages + row * p.max_selected;
    num_items = min(max(p.counts[row], 0), p.max_selected);
  }
  it.begin = split * p.items_per_split;
  it.end = min(num_items, it.begin + p.items_per_split);
  return it;
}

// Runs the split's tiles: chunks of kChunkPages items are resolved to block ids in shared
// memory (no tile waits on a dependent table lookup; an invalid page or block gets 0 valid
// tokens and is never read), then warp w takes tiles w, w + kWarps, ... of the chunk.
//   load(block, sub, valid, tile): issue the loads of tile `sub` of `block` (valid tokens from
//                                  the tile's first; <= 0: nothing valid)
//   compute(tile):                 fold the tile into the warp's softmax state
// kDoubleBuffer keeps two tiles in flight per warp (the next one loads while this one
// computes); without it each tile loads and computes in turn (for tiles too big for two).
template <int kWarps, bool kDoubleBuffer, typename Tile, typename Load, typename Compute>
__device__ __forceinline__ void ForEachTile(const DecodeParams& p, const SplitItems& it, int seq,
                                            int tiles_per_page, int tile_tokens, Load load,
                                            Compute compute) {
  __shared__ int s_block[kChunkPages];
  __shared__ int s_valid[kChunkPages];  // valid tokens of the page; 0 skips it
  const int warp = threadIdx.x / kGpuLanes;
  const int bs = p.block_size;
  const int32_t* table = p.block_table + static_cast<size_t>(seq) * p.max_blocks_per_seq;
  auto load_unit = [&](int unit, Tile& t) {
    const int i = unit / tiles_per_page, sub = unit % tiles_per_page;
    load(s_block[i], sub, s_valid[i] - sub * tile_tokens, t);
  };
  for (int chunk = it.begin; chunk < it.end; chunk += kChunkPages) {
    const int n = min(kChunkPages, it.end - chunk);
    __syncthreads();  // the previous chunk's tiles have all read s_block
    for (int i = threadIdx.x; i < n; i += kWarps * kGpuLanes) {
      const int page = it.list != nullptr ? it.list[chunk + i] : chunk + i;
      const int block = page >= 0 && page < it.num_pages ? table[page] : -1;
      const bool ok = block >= 0 && block < p.num_blocks;
      s_block[i] = ok ? block : 0;
      s_valid[i] = ok ? min(bs, it.seq_len - page * bs) : 0;
    }
    __syncthreads();
    const int units = n * tiles_per_page;
    if constexpr (kDoubleBuffer) {
      Tile a, b;
      int u = warp;
      if (u < units) load_unit(u, a);
      for (; u < units; u += 2 * kWarps) {
        if (u + kWarps < units) load_unit(u + kWarps, b);
        compute(a);
        if (u + 2 * kWarps < units) load_unit(u + 2 * kWarps, a);
        if (u + kWarps < units) compute(b);
      }
    } else {
      Tile a;
      for (int u = warp; u < units; u += kWarps) {
        load_unit(u, a);
        compute(a);
      }
    }
  }
}

// Merges n partial softmax states i (log2-domain max m_of(i), denominator l_of(i), numerator
// acc_of(i) of one channel) into the normalized value and the log2-domain log-sum-exp; states
// with m = -inf are empty. No state: value 0, lse -inf.
template <typename MOf, typename LOf, typename AccOf>
__device__ __forceinline__ void MergeStates(int n, MOf m_of, LOf l_of, AccOf acc_of, float* value,
                                            float* lse) {
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, m_of(i));
  float sum_l = 0.0f, sum_a = 0.0f;
  if (mx != -INFINITY) {
    for (int i = 0; i < n; ++i) {
      const float m = m_of(i);
      if (m == -INFINITY) continue;
      const float w = exp2f(m - mx);
      sum_l += w * l_of(i);
      sum_a += w * acc_of(i);
    }
  }
  *value = sum_l > 0.0f ? sum_a / sum_l : 0.0f;
  *lse = sum_l > 0.0f ? mx + log2f(sum_l) : -INFINITY;
}

// Writes channel c of query row `row`: the output itself (one split) or the split's partial.
template <typename T, int kHeadDim>
__device__ __forceinline__ void StoreMerged(const DecodeParams& p, size_t row, int split, int c,
                                            float value, float lse) {
  if (p.num_splits == 1) {
    static_cast<T*>(p.out)[row * kHeadDim + c] = gpu::FromF32<T>(value);
  } else {
    const size_t prow = row * p.num_splits + split;
    p.partial_out[prow * kHeadDim + c] = value;
    if (c == 0) p.partial_lse[prow] = lse;
  }
}

}  // namespace mempipe::decode_gpu

#endif  // MEMPIPE_ATTENTION_GPU_DECODE_DEVICE_H_
