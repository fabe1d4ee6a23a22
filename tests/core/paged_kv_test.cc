// Size computations of the paged cache (issue 14, item 1): a sequence length near 2^31 made
// NumPages overflow to a negative page count, so ValidateBlockTable ran no block-id check and
// accepted a table of garbage (decode then returned NaN, selection wrote out of bounds). These
// tests failed before NumPages computed in 64 bits.
#include "core/paged_kv.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

TEST(PagedKv, NumPagesDoesNotOverflowNearInt32Max) {
  const int max = std::numeric_limits<int32_t>::max();
  EXPECT_EQ(NumPages(max, 16), 134217728);
  EXPECT_EQ(NumPages(max, 64), 33554432);
  EXPECT_EQ(NumPages(max - 62, 64), 33554432);
  EXPECT_EQ(NumPages(1, 16), 1);
  EXPECT_EQ(NumPages(16, 16), 1);
  EXPECT_EQ(NumPages(17, 16), 2);
  EXPECT_EQ(NumPages(0, 16), 0);
}

TEST(PagedKv, HugeSeqLenStillChecksEveryBlockId) {
  // A table wide enough for INT32_MAX tokens of 64: 2^25 entries (128 MiB, left uninitialized
  // and untouched except for the first entry, which is out of range).
  const int block_size = 64;
  const int width = (1 << 25);
  std::unique_ptr<int32_t[]> table(new int32_t[width]);
  table[0] = -5;
  const int32_t len = std::numeric_limits<int32_t>::max();
  const BlockTableView view{table.get(), &len, 1, width};
  const absl::Status st = ValidateBlockTable(view, block_size, /*num_blocks=*/4);
  ASSERT_FALSE(st.ok()) << "a garbage block id was accepted for seq_len " << len;
  EXPECT_NE(st.message().find("block_table[0][0] = -5"), absl::string_view::npos) << st;
}

TEST(PagedKv, SeqLenPastTheTableIsRejectedWithTheValue) {
  int32_t table[2] = {0, 1};
  const int32_t len = std::numeric_limits<int32_t>::max();
  const BlockTableView view{table, &len, 1, 2};
  const absl::Status st = ValidateBlockTable(view, 16, 4);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("2147483647"), absl::string_view::npos) << st;
}

// The two layouts hold the same logical cache: Offset() places (K/V, block, token, head) where
// the layout says, and WriteKv stores a token's rows through it. Every element is written to a
// NaN-poisoned cache of each layout and read back through Offset; the head-major bytes differ
// from the token-major ones (the layout is not ignored), and padding slots write nothing.
TEST(PagedKv, WriteKvStoresTheSameLogicalCacheInEitherLayout) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int blocks = 5, bs = 16, kv_heads = 3, d = 64, tokens = 40;
  std::vector<int64_t> slots(tokens);
  for (int t = 0; t < tokens; ++t) slots[t] = (t * 7) % (blocks * bs);
  slots[3] = -1;  // padding
  std::vector<float> key(tokens * kv_heads * d), value(key.size());
  for (float& x : key) x = normal(rng);
  for (float& x : value) x = normal(rng);
  std::vector<std::vector<float>> stores;
  for (KvLayout layout : {KvLayout::kTokenMajor, KvLayout::kHeadMajor}) {
    KvCacheView cache{nullptr, DType::kFloat32, blocks, bs, kv_heads, d, layout};
    std::vector<float> store(cache.NumElems(), NAN);
    cache.data = store.data();
    ASSERT_TRUE(WriteKv(cache, slots.data(), tokens, key.data(), value.data()).ok());
    int written = 0;
    for (int t = 0; t < tokens; ++t) {
      if (slots[t] < 0) continue;
      const int block = static_cast<int>(slots[t] / bs), off = static_cast<int>(slots[t] % bs);
      for (int h = 0; h < kv_heads; ++h) {
        for (int c = 0; c < d; ++c) {
          ASSERT_EQ(store[cache.Offset(0, block, off, h) + c], key[(t * kv_heads + h) * d + c]);
          ASSERT_EQ(store[cache.Offset(1, block, off, h) + c], value[(t * kv_heads + h) * d + c]);
          written += 2;
        }
      }
    }
    int finite = 0;
    for (float x : store) finite += std::isfinite(x);
    EXPECT_EQ(finite, written) << "only the written slots hold values";
    stores.push_back(store);
  }
  int differ = 0;
  for (size_t i = 0; i < stores[0].size(); ++i) {
    differ += !(stores[0][i] == stores[1][i]) && std::isfinite(stores[0][i]);
  }
  EXPECT_GT(differ, 0) << "the two layouts must place the rows differently";
}

// The GPU kernels and the device copies take token-major caches only and say so.
TEST(PagedKv, RequireTokenMajorRefusesAHeadMajorCacheNamingTheCaller) {
  KvCacheView cache{nullptr, DType::kBFloat16, 4, 16, 8, 128};
  EXPECT_TRUE(RequireTokenMajor(cache, "GPU decode").ok());
  cache.layout = KvLayout::kHeadMajor;
  const absl::Status st = RequireTokenMajor(cache, "GPU decode");
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("GPU decode"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("head-major"), absl::string_view::npos) << st;
}

}  // namespace
}  // namespace mempipe
