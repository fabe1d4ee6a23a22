// Random paged-KV test data shared by the FPGA tests: a cache with random keys, a ragged batch
// whose block tables are random permutations, queries, and the seed that produced them.
#ifndef MEMPIPE_TESTS_FPGA_TEST_DATA_H_
#define MEMPIPE_TESTS_FPGA_TEST_DATA_H_

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/paged_kv.h"
#include "retriever/relevancy.h"

namespace mempipe::testing {

// A fresh seed per run, printed so a failure can be replayed.
inline uint64_t FreshSeed(const char* what) {
  const uint64_t seed =
      (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  std::cout << "[seed] " << what << " = " << seed << "\n";
  return seed;
}

struct Batch {
  DType dtype = DType::kFloat32;
  int block_size = 16, num_kv_heads = 2, head_dim = 64, group = 1, num_blocks = 0;
  std::vector<uint8_t> cache;    // [2, num_blocks, block_size, kv_heads, head_dim]
  std::vector<int32_t> table;    // [num_seqs, max_blocks]
  std::vector<int32_t> lens;     // [num_seqs]
  std::vector<uint8_t> queries;  // [num_seqs, kv_heads * group, head_dim] in dtype
  int max_blocks = 0;

  KvCacheView Cache() {
    return KvCacheView{cache.data(), dtype, num_blocks, block_size, num_kv_heads, head_dim};
  }
  BlockTableView Table() const {
    return BlockTableView{table.data(), lens.data(), static_cast<int>(lens.size()), max_blocks};
  }
  QueryView Query() const {
    return QueryView{queries.data(), dtype, static_cast<int>(lens.size()), num_kv_heads * group,
                     head_dim};
  }
};

// `levels` > 0 draws keys from that many integer values (many ties); else uniform [-3, 3).
// With `share_blocks`, some pages of a sequence reuse one physical block (identical digests).
inline Batch MakeBatch(std::mt19937_64& rng, DType dtype, int block_size, int kv_heads,
                       int head_dim, int group, const std::vector<int>& seq_lens, int levels,
                       bool share_blocks) {
  Batch b;
  b.dtype = dtype;
  b.block_size = block_size;
  b.num_kv_heads = kv_heads;
  b.head_dim = head_dim;
  b.group = group;
  b.lens = std::vector<int32_t>(seq_lens.begin(), seq_lens.end());
  int total_pages = 0;
  for (int len : seq_lens) {
    b.max_blocks = std::max(b.max_blocks, NumPages(len, block_size) + 1);
    total_pages += NumPages(len, block_size);
  }
  b.num_blocks = total_pages + 3;  // a few blocks no sequence uses
  std::vector<int32_t> perm(b.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  b.table.assign(static_cast<size_t>(seq_lens.size()) * b.max_blocks, -7);  // unused: poison ids
  int next = 0;
  for (size_t s = 0; s < seq_lens.size(); ++s) {
    const int pages = NumPages(seq_lens[s], block_size);
    for (int p = 0; p < pages; ++p) {
      const bool reuse = share_blocks && p >= 2 && rng() % 5 == 0;
      b.table[s * b.max_blocks + p] = reuse ? b.table[s * b.max_blocks + p - 2] : perm[next++];
    }
  }
  const KvCacheView view = b.Cache();
  b.cache.assign(view.NumBytes(), 0);
  std::uniform_real_distribution<float> uni(-3.0f, 3.0f);
  std::uniform_int_distribution<int> lvl(-(levels / 2), levels - 1 - levels / 2);
  for (size_t i = 0; i < view.NumElems(); ++i) {
    StoreFromFloat(b.cache.data(), dtype, i, levels > 0 ? static_cast<float>(lvl(rng)) : uni(rng));
  }
  // Slots no sequence uses hold NaN keys: a digest that reads one shows it.
  std::vector<bool> used(static_cast<size_t>(b.num_blocks) * block_size, false);
  for (size_t s = 0; s < seq_lens.size(); ++s) {
    for (int t = 0; t < seq_lens[s]; ++t) {
      used[static_cast<size_t>(b.table[s * b.max_blocks + t / block_size]) * block_size +
           t % block_size] = true;
    }
  }
  for (int blk = 0; blk < b.num_blocks; ++blk) {
    for (int t = 0; t < block_size; ++t) {
      if (used[static_cast<size_t>(blk) * block_size + t]) continue;
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < kv_heads; ++h) {
          const size_t o = view.Offset(kv, blk, t, h);
          for (int c = 0; c < head_dim; ++c) {
            StoreFromFloat(b.cache.data(), dtype, o + c, std::numeric_limits<float>::quiet_NaN());
          }
        }
      }
    }
  }
  const size_t qn = seq_lens.size() * static_cast<size_t>(kv_heads) * group * head_dim;
  b.queries.assign(qn * DTypeSize(dtype), 0);
  for (size_t i = 0; i < qn; ++i) StoreFromFloat(b.queries.data(), dtype, i, uni(rng));
  return b;
}

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_FPGA_TEST_DATA_H_
