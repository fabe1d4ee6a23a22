// Size computations of the paged cache (issue 14, item 1): a sequence length near 2^31 made
// NumPages overflow to a negative page count, so ValidateBlockTable ran no block-id check and
// accepted a table of garbage (decode then returned NaN, selection wrote out of bounds). These
// tests failed before NumPages computed in 64 bits.
#include "core/paged_kv.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
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
  // and untouched past the first chunk of 1,024 entries that the check reads at once; the first
  // entry is out of range).
  const int block_size = 64;
  const int width = (1 << 25);
  std::unique_ptr<int32_t[]> table(new int32_t[width]);
  std::fill(table.get(), table.get() + 1024, 0);
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

// The block-id check reads each row in chunks of 1,024 entries (a vectorized max of the entries
// as unsigned) and names the first bad entry of the row: a negative one (which a signed max
// would pass), one equal to num_blocks, in the first chunk, the last, or between, in the first
// sequence or a later one.
TEST(PagedKv, BlockTableCheckNamesTheFirstBadEntryInEveryChunk) {
  const int block_size = 16, num_blocks = 50, width = 3000;
  // Sequence 1 has 2,990 pages: its last 10 entries are not block ids.
  const std::vector<int32_t> lens = {width * block_size, (width - 10) * block_size - 5};
  for (int s : {0, 1}) {
    const int pages = NumPages(lens[s], block_size);
    for (int at : {0, 1023, 1024, 2047, 2500, pages - 1}) {
      for (int32_t bad : {-1, std::numeric_limits<int32_t>::min(), num_blocks, num_blocks + 7}) {
        std::vector<int32_t> table(2 * width);
        for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i % num_blocks);
        table[s * width + at] = bad;
        if (at + 100 < pages) table[s * width + at + 100] = -3;  // a later bad entry
        const BlockTableView view{table.data(), lens.data(), 2, width};
        const absl::Status st = ValidateBlockTable(view, block_size, num_blocks);
        ASSERT_FALSE(st.ok()) << "seq " << s << " entry " << at << " = " << bad << " accepted";
        const std::string want = "block_table[" + std::to_string(s) + "][" + std::to_string(at) +
                                 "] = " + std::to_string(bad) + " is outside [0, 50)";
        EXPECT_NE(st.message().find(want), absl::string_view::npos) << st << "; want " << want;
      }
    }
  }
  std::vector<int32_t> table(2 * width);
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i % num_blocks);
  const BlockTableView view{table.data(), lens.data(), 2, width};
  EXPECT_TRUE(ValidateBlockTable(view, block_size, num_blocks).ok());
  // Entries past a sequence's pages are not block ids and are not checked.
  table[2 * width - 1] = -9;
  EXPECT_TRUE(ValidateBlockTable(view, block_size, num_blocks).ok());
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
  for (KvLayout layout : {KvLayout::kTokenMajor, KvLayout::kHeadMajor, KvLayout::kPageMajor,
                          KvLayout::kHeadMajorKT, KvLayout::kPageMajorKT}) {
    SCOPED_TRACE(KvLayoutName(layout));
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
          ASSERT_EQ(store[cache.ElementOffset(0, block, off, h, c)],
                    key[(t * kv_heads + h) * d + c]);
          ASSERT_EQ(store[cache.ElementOffset(1, block, off, h, c)],
                    value[(t * kv_heads + h) * d + c]);
          written += 2;
        }
      }
    }
    int finite = 0;
    for (float x : store) finite += std::isfinite(x);
    EXPECT_EQ(finite, written) << "only the written slots hold values";
    stores.push_back(store);
  }
  for (auto [a, b] : {std::pair{0, 1}, std::pair{0, 2}, std::pair{1, 2}, std::pair{1, 3},
                      std::pair{2, 4}, std::pair{3, 4}}) {
    int differ = 0;
    for (size_t i = 0; i < stores[a].size(); ++i) {
      differ += !(stores[a][i] == stores[b][i]) && std::isfinite(stores[a][i]);
    }
    EXPECT_GT(differ, 0) << "layouts " << a << " and " << b << " must place the rows differently";
  }
}

// Rows read in place from a wider tensor (vLLM's key and value: column slices of one fused qkv
// row) store exactly what the packed rows store, in every layout; each of key and value has its
// own stride. Rejected: a stride shorter than a row, named. Reading the fused rows as packed
// (stride 0) stores something else, so the stride is what is followed.
TEST(PagedKv, WriteKvReadsStridedRowsInPlace) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const int blocks = 4, bs = 16, kv_heads = 2, d = 64, tokens = 37;
  const int64_t row = kv_heads * d, q_cols = 3 * row, fused = q_cols + 2 * row;
  std::vector<int64_t> slots(tokens);
  for (int t = 0; t < tokens; ++t) slots[t] = (t * 5 + 3) % (blocks * bs);
  slots[6] = -1;
  std::vector<float> qkv(tokens * fused), key(tokens * row), value(tokens * row);
  for (float& x : qkv) x = normal(rng);
  for (int t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < row; ++c) {
      key[t * row + c] = qkv[t * fused + q_cols + c];
      value[t * row + c] = qkv[t * fused + q_cols + row + c];
    }
  }
  for (KvLayout layout : {KvLayout::kTokenMajor, KvLayout::kHeadMajor, KvLayout::kPageMajor}) {
    SCOPED_TRACE(KvLayoutName(layout));
    KvCacheView cache{nullptr, DType::kFloat32, blocks, bs, kv_heads, d, layout};
    std::vector<float> packed(cache.NumElems(), NAN), strided(cache.NumElems(), NAN),
        misread(cache.NumElems(), NAN);
    cache.data = packed.data();
    ASSERT_TRUE(WriteKv(cache, slots.data(), tokens, key.data(), value.data()).ok());
    cache.data = strided.data();
    ASSERT_TRUE(WriteKv(cache, slots.data(), tokens, qkv.data() + q_cols, qkv.data() + q_cols + row,
                        fused, fused)
                    .ok());
    EXPECT_EQ(0, std::memcmp(packed.data(), strided.data(), packed.size() * sizeof(float)));
    cache.data = misread.data();
    ASSERT_TRUE(
        WriteKv(cache, slots.data(), tokens, qkv.data() + q_cols, qkv.data() + q_cols + row).ok());
    EXPECT_NE(0, std::memcmp(packed.data(), misread.data(), packed.size() * sizeof(float)));
    // Only one of the two strided: the other is read packed.
    std::vector<float> mixed(cache.NumElems(), NAN);
    cache.data = mixed.data();
    ASSERT_TRUE(
        WriteKv(cache, slots.data(), tokens, qkv.data() + q_cols, value.data(), fused, 0).ok());
    EXPECT_EQ(0, std::memcmp(packed.data(), mixed.data(), packed.size() * sizeof(float)));
  }
  KvCacheView cache{nullptr, DType::kFloat32, blocks, bs, kv_heads, d, KvLayout::kTokenMajor};
  std::vector<float> store(cache.NumElems());
  cache.data = store.data();
  const absl::Status bad =
      WriteKv(cache, slots.data(), tokens, key.data(), value.data(), 0, row - 1);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(bad.message());
  EXPECT_NE(msg.find("value_row_stride"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 127"), std::string::npos) << msg;
}

// Page-major: block b's K and V rows of every KV head lie in the block's own slice [b, b + 1) of
// 2 * num_kv_heads * block_size * head_dim elements, each KV head's K page followed by its V
// page. Head-major's V rows lie in the second half of the cache instead.
TEST(PagedKv, PageMajorKeepsEachBlockWholeAndEachHeadsPagesAdjacent) {
  const int blocks = 6, bs = 16, kv_heads = 3, d = 64;
  KvCacheView page{nullptr, DType::kBFloat16, blocks, bs, kv_heads, d, KvLayout::kPageMajor};
  ASSERT_EQ(ParseKvLayout("page").value(), KvLayout::kPageMajor);
  const size_t block = 2 * static_cast<size_t>(kv_heads) * bs * d;
  EXPECT_EQ(page.NumElems(), blocks * block);
  for (int b = 0; b < blocks; ++b) {
    for (int h = 0; h < kv_heads; ++h) {
      for (int t = 0; t < bs; ++t) {
        for (int kv = 0; kv < 2; ++kv) {
          const size_t o = page.Offset(kv, b, t, h);
          ASSERT_EQ(o, b * block + (2 * h + kv) * static_cast<size_t>(bs) * d + t * d)
              << "kv " << kv << " block " << b << " token " << t << " head " << h;
        }
      }
    }
  }
  KvCacheView head = page;
  head.layout = KvLayout::kHeadMajor;
  EXPECT_GE(head.Offset(1, 0, 0, 0), head.PlaneElems()) << "head-major V is a plane apart";
  EXPECT_TRUE(page.HeadMajor()) << "rows of a page contiguous: the host steps read it whole";
  EXPECT_EQ(page.HeadsPerRun(), 1);
}

// head_kt: each K page is [head_dim / x, block_size, x] with x = 4 bytes of channels (fp32 1,
// bf16 and fp16 2), in head-major's place; V pages are head-major's. Every (token, channel) of a
// page maps to its own element inside the page, and a token's channels 2j and 2j + 1 of a
// 16-bit cache share one 32-bit word, the next token's word following it.
TEST(PagedKv, HeadMajorKTTransposesEachKPageInGroupsOfFourBytes) {
  const int blocks = 3, bs = 32, kv_heads = 2, d = 64;
  ASSERT_EQ(ParseKvLayout("head_kt").value(), KvLayout::kHeadMajorKT);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(DTypeName(dtype));
    KvCacheView kt{nullptr, dtype, blocks, bs, kv_heads, d, KvLayout::kHeadMajorKT};
    KvCacheView head = kt;
    head.layout = KvLayout::kHeadMajor;
    const int x = dtype == DType::kFloat32 ? 1 : 2;
    EXPECT_EQ(kt.KeyGroup(), x);
    EXPECT_EQ(kt.NumElems(), head.NumElems());
    EXPECT_TRUE(kt.KeysTransposed());
    EXPECT_FALSE(head.KeysTransposed());
    for (int b = 0; b < blocks; ++b) {
      for (int h = 0; h < kv_heads; ++h) {
        std::vector<int> seen(static_cast<size_t>(bs) * d, 0);
        const size_t page = head.Offset(0, b, 0, h);
        for (int t = 0; t < bs; ++t) {
          for (int c = 0; c < d; ++c) {
            const size_t o = kt.ElementOffset(0, b, t, h, c);
            ASSERT_EQ(o, page + (static_cast<size_t>(c / x) * bs + t) * x + c % x)
                << "block " << b << " head " << h << " token " << t << " channel " << c;
            ASSERT_LT(o - page, seen.size());
            ++seen[o - page];
            ASSERT_EQ(kt.ElementOffset(1, b, t, h, c), head.ElementOffset(1, b, t, h, c));
          }
        }
        for (int n : seen) ASSERT_EQ(n, 1) << "each element of the page once";
      }
    }
    // Not head-major's rows: token 1, channel 0 is x elements in, not d.
    EXPECT_EQ(kt.KeyInPage(1, 0), static_cast<size_t>(x));
    EXPECT_EQ(head.KeyInPage(1, 0), static_cast<size_t>(d));
    // page_kt: the same transposed K pages at page-major's places.
    KvCacheView pkt = kt, page = kt;
    pkt.layout = KvLayout::kPageMajorKT;
    page.layout = KvLayout::kPageMajor;
    EXPECT_TRUE(pkt.KeysTransposed());
    EXPECT_TRUE(pkt.PageMajor());
    for (int t = 0; t < bs; t += 7) {
      for (int c = 0; c < d; c += 5) {
        EXPECT_EQ(
            pkt.ElementOffset(0, 2, t, 1, c),
            page.Offset(0, 2, 0, 1) + kt.ElementOffset(0, 2, t, 1, c) - kt.Offset(0, 2, 0, 1));
        EXPECT_EQ(pkt.ElementOffset(1, 2, t, 1, c), page.ElementOffset(1, 2, t, 1, c));
      }
    }
  }
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
  cache.layout = KvLayout::kPageMajor;
  const absl::Status sp = RequireTokenMajor(cache, "GPU decode");
  EXPECT_EQ(sp.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(sp.message().find("page-major"), absl::string_view::npos) << sp;
  cache.layout = KvLayout::kHeadMajorKT;
  const absl::Status skt = RequireTokenMajor(cache, "GPU decode");
  EXPECT_EQ(skt.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(skt.message().find("head_kt"), absl::string_view::npos) << skt;
}

TEST(PagedKv, ParseKvLayoutNamesTheBadValue) {
  for (KvLayout l : {KvLayout::kTokenMajor, KvLayout::kHeadMajor, KvLayout::kPageMajor,
                     KvLayout::kHeadMajorKT, KvLayout::kPageMajorKT}) {
    EXPECT_EQ(ParseKvLayout(KvLayoutName(l)).value(), l);
  }
  const auto bad = ParseKvLayout("pages");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(),
            "kv_layout must be token, head, page, head_kt or page_kt, got 'pages'");
}

}  // namespace
}  // namespace mempipe
