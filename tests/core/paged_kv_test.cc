// Size computations of the paged cache (issue 14, item 1): a sequence length near 2^31 made
// NumPages overflow to a negative page count, so ValidateBlockTable ran no block-id check and
// accepted a table of garbage (decode then returned NaN, selection wrote out of bounds). These
// tests failed before NumPages computed in 64 bits.
#include "core/paged_kv.h"

#include <cstdint>
#include <limits>
#include <memory>

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

}  // namespace
}  // namespace mempipe
