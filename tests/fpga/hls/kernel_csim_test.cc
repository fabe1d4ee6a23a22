// C simulation of the HLS kernels against the CPU reference of retriever/: digests, scores and
// selections must be identical bit for bit, over dtypes, page sizes, head dims, GQA ratios and
// ragged batches, on data drawn fresh per run.
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fpga/device_layout.h"
#include "fpga/hls/kernel_common.h"
#include "fpga/hls/kernels.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/select.h"
#include "tests/fpga/test_data.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using hls_compat::Word512;
using testing::Batch;
using testing::FreshSeed;
using testing::MakeBatch;

// Rearranges reference digests [blocks, 2, heads, dim] into head h's slice [blocks, 2, dim].
std::vector<Word512> HeadSlice(const std::vector<uint8_t>& dg, const DigestView& v, int h) {
  const size_t row = static_cast<size_t>(v.head_dim) * DTypeSize(v.dtype);
  std::vector<Word512> slice(static_cast<size_t>(v.num_blocks) * 2 * row / sizeof(Word512));
  for (int b = 0; b < v.num_blocks; ++b) {
    for (int which = 0; which < 2; ++which) {
      std::memcpy(
          reinterpret_cast<uint8_t*>(slice.data()) + (static_cast<size_t>(b) * 2 + which) * row,
          dg.data() + v.Offset(b, which, h) * DTypeSize(v.dtype), row);
    }
  }
  return slice;
}

std::vector<int> RaggedLens(std::mt19937_64& rng, int num_seqs, int max_len) {
  std::uniform_int_distribution<int> len(1, max_len);
  std::vector<int> lens(num_seqs);
  for (int& l : lens) l = len(rng);
  return lens;
}

struct Case {
  DType dtype;
  int block_size;
  int head_dim;
};

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int bs : kSupportedBlockSizes) {
      for (int d : kSupportedHeadDims) cases.push_back({dt, bs, d});
    }
  }
  return cases;
}

// Scores and selections of mempipe_score_topk (per KV head) against ComputeRelevancy and
// SelectPages.
void CheckScoreTopk(std::mt19937_64& rng, Batch& b, const SelectionConfig& config) {
  SCOPED_TRACE(::testing::Message()
               << DTypeName(b.dtype) << " page " << b.block_size << " d " << b.head_dim << " group "
               << b.group << " kv_heads " << b.num_kv_heads << " budget " << config.budget_tokens);
  KvCacheView cache = b.Cache();
  const BlockTableView table = b.Table();
  DigestView dv{nullptr, b.dtype, b.num_blocks, b.num_kv_heads, b.head_dim};
  std::vector<uint8_t> dg(dv.NumBytes());
  // Blocks no page uses keep NaN digests: the kernel must never read them.
  for (size_t i = 0; i < dv.NumElems(); ++i) {
    StoreFromFloat(dg.data(), b.dtype, i, std::numeric_limits<float>::quiet_NaN());
  }
  dv.data = dg.data();
  ASSERT_TRUE(BuildDigests(cache, table, dv).ok());

  const int num_seqs = table.num_seqs;
  std::vector<float> ref_scores(static_cast<size_t>(num_seqs) * b.num_kv_heads * b.max_blocks);
  ASSERT_TRUE(
      ComputeRelevancy(b.Query(), cache, dv, table, config.aggregation, ref_scores.data()).ok());
  const int k = config.PagesPerHead(b.block_size);
  const int max_sel = k + static_cast<int>(rng() % 3);  // padding past k must be -1
  std::vector<int32_t> ref_pages(static_cast<size_t>(num_seqs) * b.num_kv_heads * max_sel);
  std::vector<int32_t> ref_counts(static_cast<size_t>(num_seqs) * b.num_kv_heads);
  const SelectionView ref_sel{ref_pages.data(), ref_counts.data(), num_seqs, b.num_kv_heads,
                              max_sel};
  ASSERT_TRUE(
      SelectPages(ref_scores.data(), table, b.block_size, b.num_kv_heads, config, ref_sel).ok());

  SelectRequest req{0, b.Query(), table, config, ref_sel};
  const ScoreIo io = PlanScoreIo(num_seqs, b.group, b.head_dim, b.max_blocks, max_sel);
  for (int h = 0; h < b.num_kv_heads; ++h) {
    const std::vector<Word512> slice = HeadSlice(dg, dv, h);
    std::vector<Word512> in(io.in_bytes / sizeof(Word512));
    PackScoreInputs(req, h, b.group, io, reinterpret_cast<uint8_t*>(in.data()));
    const uint8_t* inb = reinterpret_cast<const uint8_t*>(in.data());
    std::vector<int32_t> pages(static_cast<size_t>(num_seqs) * max_sel, 0x7eadbeef);
    std::vector<int32_t> counts(num_seqs, 0x7eadbeef);
    std::vector<float> scores(static_cast<size_t>(num_seqs) * b.max_blocks,
                              std::numeric_limits<float>::quiet_NaN());
    fpga_hls::ScoreTopkCsim(slice.data(), reinterpret_cast<const Word512*>(inb + io.queries_offset),
                            reinterpret_cast<const int32_t*>(inb + io.table_offset),
                            reinterpret_cast<const int32_t*>(inb + io.lens_offset), pages.data(),
                            counts.data(), num_seqs, b.group, b.head_dim, static_cast<int>(b.dtype),
                            b.block_size, b.max_blocks, max_sel, k, config.num_sink_pages,
                            config.num_local_pages, static_cast<int>(config.aggregation),
                            scores.data());
    for (int s = 0; s < num_seqs; ++s) {
      const float* want =
          ref_scores.data() + (static_cast<size_t>(s) * b.num_kv_heads + h) * b.max_blocks;
      ASSERT_EQ(0, std::memcmp(want, scores.data() + static_cast<size_t>(s) * b.max_blocks,
                               b.max_blocks * sizeof(float)))
          << "scores differ: seq " << s << " head " << h;
      ASSERT_EQ(counts[s], ref_sel.Count(s, h)) << "seq " << s << " head " << h;
      for (int i = 0; i < max_sel; ++i) {
        ASSERT_EQ(pages[static_cast<size_t>(s) * max_sel + i], ref_sel.Row(s, h)[i])
            << "seq " << s << " head " << h << " slot " << i;
      }
    }
  }
}

TEST(ScoreTopkKernel, MatchesReferenceAcrossShapes) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkKernel.MatchesReferenceAcrossShapes"));
  const int groups[] = {1, 2, 4, 8, 16};
  for (const Case& c : AllCases()) {
    const int group = groups[rng() % 5];
    const int kv_heads = 1 + static_cast<int>(rng() % 3);
    Batch b = MakeBatch(rng, c.dtype, c.block_size, kv_heads, c.head_dim, group,
                        RaggedLens(rng, 1 + static_cast<int>(rng() % 4), 40 * c.block_size),
                        /*levels=*/0, /*share_blocks=*/false);
    SelectionConfig config;
    config.budget_tokens = c.block_size * (3 + static_cast<int>(rng() % 10));
    config.num_sink_pages = static_cast<int>(rng() % 2);
    config.num_local_pages = 1 + static_cast<int>(rng() % 2);
    config.aggregation = rng() % 2 ? GroupAggregation::kSum : GroupAggregation::kMax;
    CheckScoreTopk(rng, b, config);
  }
}

// Few distinct key values and shared physical blocks make many equal scores: the tie-breaking
// (lower page index first) must match SelectPages exactly.
TEST(ScoreTopkKernel, TiesBreakLikeReference) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkKernel.TiesBreakLikeReference"));
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int group : {1, 4}) {
      Batch b = MakeBatch(rng, dt, 16, 2, 64, group, RaggedLens(rng, 3, 1200), /*levels=*/3,
                          /*share_blocks=*/true);
      SelectionConfig config;
      config.budget_tokens = 16 * 12;
      config.num_sink_pages = 2;
      config.num_local_pages = 2;
      config.aggregation = group > 1 ? GroupAggregation::kSum : GroupAggregation::kMax;
      CheckScoreTopk(rng, b, config);
    }
  }
}

// Long rows with a large budget exercise the insertion array near its size.
TEST(ScoreTopkKernel, LargeBudget) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkKernel.LargeBudget"));
  Batch b = MakeBatch(rng, DType::kFloat16, 16, 1, 128, 4, {16 * 3000 - 5, 16 * 1100}, 0, false);
  SelectionConfig config;
  config.budget_tokens = 16 * (fpga_hls::kMaxTopK + 3);  // exactly kMaxTopK middle pages
  config.num_sink_pages = 1;
  config.num_local_pages = 2;
  CheckScoreTopk(rng, b, config);
}

// mempipe_digest_update (through the host's launch split) equals UpdateDigestsFromKeys byte for
// byte, from prefill-like runs, decode-like single tokens, padding and revisited blocks.
TEST(DigestUpdateKernel, MatchesReferenceAcrossShapes) {
  std::mt19937_64 rng(FreshSeed("DigestUpdateKernel.MatchesReferenceAcrossShapes"));
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(::testing::Message()
                 << DTypeName(c.dtype) << " page " << c.block_size << " d " << c.head_dim);
    const int kv_heads = 1 + static_cast<int>(rng() % 4);
    const int num_blocks = 12;
    DigestView ref{nullptr, c.dtype, num_blocks, kv_heads, c.head_dim};
    std::vector<uint8_t> ref_bytes(ref.NumBytes());
    for (size_t i = 0; i < ref.NumElems(); ++i) {
      StoreFromFloat(ref_bytes.data(), c.dtype, i, std::numeric_limits<float>::quiet_NaN());
    }
    ref.data = ref_bytes.data();
    std::vector<std::vector<Word512>> slices;
    for (int h = 0; h < kv_heads; ++h) slices.push_back(HeadSlice(ref_bytes, ref, h));

    // Three sequences filling their blocks in interleaved order, plus padding slots.
    std::vector<int> fill(num_blocks, 0);
    std::uniform_real_distribution<float> uni(-4.0f, 4.0f);
    for (int round = 0; round < 6; ++round) {
      std::vector<int64_t> slots;
      const int n = round == 0 ? 3 * c.block_size + 5 : 1 + static_cast<int>(rng() % 9);
      for (int t = 0; t < n; ++t) {
        if (rng() % 11 == 0) {
          slots.push_back(-1);
          continue;
        }
        int blk = static_cast<int>(rng() % num_blocks);
        if (round == 0) blk = t / c.block_size;        // a prefill: pages filled in order
        if (fill[blk] == c.block_size) fill[blk] = 0;  // the page is reused from its start
        slots.push_back(static_cast<int64_t>(blk) * c.block_size + fill[blk]++);
      }
      const int num_tokens = static_cast<int>(slots.size());
      std::vector<uint8_t> keys(static_cast<size_t>(num_tokens) * kv_heads * c.head_dim *
                                DTypeSize(c.dtype));
      for (size_t i = 0; i < keys.size() / DTypeSize(c.dtype); ++i) {
        StoreFromFloat(keys.data(), c.dtype, i, uni(rng));
      }
      ASSERT_TRUE(
          UpdateDigestsFromKeys(ref, c.block_size, slots.data(), num_tokens, keys.data()).ok());
      for (const auto& [begin, end] : SplitUpdateLaunches(slots.data(), num_tokens, c.block_size)) {
        const size_t key_row_words = fpga_hls::RowWords(c.head_dim, static_cast<int>(c.dtype));
        for (int h = 0; h < kv_heads; ++h) {
          // Full-width keys [n, kv_heads, head_dim]: the kernel picks row `h` itself.
          const Word512* k = reinterpret_cast<const Word512*>(keys.data()) +
                             static_cast<size_t>(begin) * kv_heads * key_row_words;
          mempipe_digest_update(slices[h].data(), slices[h].data(), k, slots.data() + begin,
                                end - begin, kv_heads, h, c.head_dim, static_cast<int>(c.dtype),
                                c.block_size);
        }
      }
      for (int h = 0; h < kv_heads; ++h) {
        const std::vector<Word512> want = HeadSlice(ref_bytes, ref, h);
        ASSERT_EQ(0, std::memcmp(want.data(), slices[h].data(), want.size() * sizeof(Word512)))
            << "round " << round << " head " << h;
      }
    }
  }
}

TEST(SplitUpdateLaunches, SplitsOnlyWhereABlockReturns) {
  // Block ids at page size 16: 0,0,1,1,0 -> the revisit of block 0 opens a second launch.
  const int64_t slots[] = {0, 1, 16, 17, -1, 2, 3, 32};
  const auto launches = SplitUpdateLaunches(slots, 8, 16);
  ASSERT_EQ(launches.size(), 2u);
  EXPECT_EQ(launches[0], (std::pair<int, int>{0, 5}));
  EXPECT_EQ(launches[1], (std::pair<int, int>{5, 8}));
  const int64_t in_order[] = {0, 1, 16, 17, 32};
  EXPECT_EQ(SplitUpdateLaunches(in_order, 5, 16).size(), 1u);
}

// The bulk build's key rows [n, kv_heads, head_dim] are the same from a head-, page-major or
// transposed-K cache as from a token-major one with the same contents (same seed), and differ
// from any of them read as token-major.
TEST(GatherKeysForBuild, GivesTheSameRowsFromEitherLayout) {
  const uint64_t seed = FreshSeed("GatherKeysForBuild");
  std::vector<std::vector<uint8_t>> keys;
  std::vector<int64_t> slots0;
  for (KvLayout layout : {KvLayout::kTokenMajor, KvLayout::kHeadMajor, KvLayout::kPageMajor,
                          KvLayout::kHeadMajorKT, KvLayout::kPageMajorKT}) {
    SCOPED_TRACE(KvLayoutName(layout));
    std::mt19937_64 rng(seed);
    testing::PagedFixture f(rng, {.dtype = DType::kBFloat16,
                                  .block_size = 16,
                                  .num_kv_heads = 3,
                                  .head_dim = 64,
                                  .seq_lens = {40, 17},
                                  .layout = layout});
    std::vector<int64_t> slots;
    std::vector<uint8_t> k;
    ASSERT_TRUE(GatherKeysForBuild(f.cache_view(), f.table_view(), slots, k).ok());
    ASSERT_EQ(k.size(), slots.size() * 3 * 64 * 2);
    if (layout == KvLayout::kTokenMajor) slots0 = slots;
    EXPECT_EQ(slots, slots0);
    keys.push_back(k);
    if (layout != KvLayout::kTokenMajor) {
      KvCacheView wrong = f.cache_view();
      wrong.layout = KvLayout::kTokenMajor;
      std::vector<int64_t> s2;
      std::vector<uint8_t> k2;
      ASSERT_TRUE(GatherKeysForBuild(wrong, f.table_view(), s2, k2).ok());
      EXPECT_NE(k2, keys[0]);
    }
  }
  for (size_t i = 1; i < keys.size(); ++i) EXPECT_EQ(keys[0], keys[i]) << "layout " << i;
}

}  // namespace
}  // namespace mempipe
