// Test support: a paged cache whose block table keeps super-pages in aligned physical groups
// (retriever/hierarchical.h), with page and super-page digest buffers and a from-scratch super
// digest reference.
//
//   HierFixture fx(rng, DType::kBFloat16, /*block_size=*/16, /*f=*/4, /*kv_heads=*/2,
//                  /*head_dim=*/64, {300, 1000});
#ifndef MEMPIPE_TESTS_TESTING_SUPER_PAGE_FIXTURE_H_
#define MEMPIPE_TESTS_TESTING_SUPER_PAGE_FIXTURE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/hierarchical.h"

namespace mempipe::testing {

// A paged cache whose block table maps each group of f logical pages onto one aligned group of
// f physical blocks (the groups shuffled over the cache), random keys with signed zeros mixed
// in (max/min tie-breaking between +0 and -0 must agree), unused slots NaN-poisoned.
struct HierFixture {
  HierFixture(std::mt19937_64& rng, DType dtype, int block_size, int f, int kv_heads, int head_dim,
              std::vector<int> lens_in)
      : lens(std::move(lens_in)), f(f) {
    max_blocks = 1;
    int groups = 2;  // spare super-blocks, poisoned
    for (int len : lens) {
      const int n = NumPages(len, block_size);
      max_blocks = std::max(max_blocks, NumSuperBlocks(n, f) * f);
      groups += NumSuperBlocks(n, f);
    }
    cache = KvCacheView{nullptr, dtype, groups * f, block_size, kv_heads, head_dim};
    storage.resize(cache.NumBytes());
    for (size_t i = 0; i < cache.NumElems(); ++i) StoreFromFloat(storage.data(), dtype, i, NAN);
    cache.data = storage.data();
    std::vector<int> perm(groups);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    table.assign(lens.size() * max_blocks, -7);
    int next = 0;
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    std::uniform_int_distribution<int> pick(0, 9);
    for (size_t s = 0; s < lens.size(); ++s) {
      const int n = NumPages(lens[s], block_size);
      for (int p = 0; p < n; p += f) {
        const int g = perm[next++];
        for (int i = 0; i < f && p + i < n; ++i) table[s * max_blocks + p + i] = g * f + i;
      }
      for (int t = 0; t < lens[s]; ++t) {
        const int b = table[s * max_blocks + t / block_size];
        for (int h = 0; h < kv_heads; ++h) {
          for (int c = 0; c < head_dim; ++c) {
            const int r = pick(rng);
            const float v = r == 0 ? 0.0f : r == 1 ? -0.0f : u(rng);
            StoreFromFloat(storage.data(), dtype, cache.Offset(0, b, t % block_size, h) + c, v);
          }
        }
      }
    }
    digests.assign(DigestView{nullptr, dtype, cache.num_blocks, kv_heads, head_dim}.NumBytes(), 0);
    super.assign(SuperDigestView(nullptr, page_view(), f).NumBytes(), 0);
  }
  BlockTableView table_view() const {
    return BlockTableView{table.data(), lens.data(), static_cast<int>(lens.size()), max_blocks};
  }
  DigestView page_view() {
    return DigestView{digests.data(), cache.dtype, cache.num_blocks, cache.num_kv_heads,
                      cache.head_dim};
  }
  DigestView super_view() { return SuperDigestView(super.data(), page_view(), f); }
  float Key(int s, int t, int h, int c) const {
    const int b = table[s * max_blocks + t / cache.block_size];
    return LoadAsFloat(storage.data(), cache.dtype,
                       cache.Offset(0, b, t % cache.block_size, h) + c);
  }
  // The super digest of (s, super-page j, h) from the keys, as stored bits in `dtype`: max/min
  // over tokens in order, the first of equal values kept. `drop_last_page` is a known-wrong
  // variant (the super-page without its last page).
  std::vector<uint8_t> ScratchSuper(int s, int j, int h, bool drop_last_page = false) const {
    const int bs = cache.block_size, d = cache.head_dim;
    const int t0 = j * f * bs;
    int t1 = std::min(lens[s], t0 + f * bs);
    if (drop_last_page && t1 - t0 > bs) t1 = (NumPages(t1, bs) - 1) * bs;
    std::vector<uint8_t> row(2 * d * DTypeSize(cache.dtype));
    for (int c = 0; c < d; ++c) {
      int imx = t0, imn = t0;
      for (int t = t0 + 1; t < t1; ++t) {
        if (Key(s, t, h, c) > Key(s, imx, h, c)) imx = t;
        if (Key(s, t, h, c) < Key(s, imn, h, c)) imn = t;
      }
      StoreFromFloat(row.data(), cache.dtype, c, Key(s, imx, h, c));
      StoreFromFloat(row.data(), cache.dtype, d + c, Key(s, imn, h, c));
    }
    return row;
  }
  std::vector<uint8_t> StoredSuper(int s, int j, int h) {
    const DigestView v = super_view();
    const size_t esize = DTypeSize(cache.dtype);
    const int sb = table[s * max_blocks + j * f] / f;
    std::vector<uint8_t> row(2 * cache.head_dim * esize);
    const uint8_t* base = static_cast<const uint8_t*>(v.data);
    std::memcpy(row.data(), base + v.Offset(sb, 0, h) * esize, cache.head_dim * esize);
    std::memcpy(row.data() + cache.head_dim * esize, base + v.Offset(sb, 1, h) * esize,
                cache.head_dim * esize);
    return row;
  }

  std::vector<int> lens;
  int f;
  int max_blocks;
  KvCacheView cache;
  std::vector<uint8_t> storage, digests, super;
  std::vector<int32_t> table;
};

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_TESTING_SUPER_PAGE_FIXTURE_H_
