#include "retriever/hierarchical.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"
#include "tests/testing/paged_fixture.h"
#include "tests/testing/super_page_fixture.h"

namespace mempipe {
namespace {

using testing::HierFixture;
using testing::TestSeed;

class SuperDigestTest : public ::testing::TestWithParam<std::tuple<DType, int, int>> {};

// Bulk (from page digests) and incremental (token by token, in random chunks, sequences
// interleaved) super digests both equal the super digest built from the keys, bit for bit.
TEST_P(SuperDigestTest, BulkAndIncrementalEqualScratch) {
  const auto [dtype, block_size, f] = GetParam();
  std::mt19937_64 rng(TestSeed());
  std::uniform_int_distribution<int> len(1, 11 * block_size);
  HierFixture fx(rng, dtype, block_size, f, 2, 64,
                 {len(rng), len(rng), f * block_size, f * block_size + 1, 1});
  ASSERT_TRUE(BuildDigests(fx.cache, fx.table_view(), fx.page_view()).ok());
  ASSERT_TRUE(
      BuildSuperDigests(fx.page_view(), fx.table_view(), block_size, f, fx.super_view()).ok());
  int checked = 0, wrong_rejected = 0;
  for (size_t s = 0; s < fx.lens.size(); ++s) {
    for (int j = 0; j < NumSuperBlocks(NumPages(fx.lens[s], block_size), f); ++j) {
      for (int h = 0; h < 2; ++h) {
        ASSERT_EQ(fx.ScratchSuper(s, j, h), fx.StoredSuper(s, j, h)) << "seq " << s << " sp " << j;
        ++checked;
        if (fx.ScratchSuper(s, j, h, /*drop_last_page=*/true) != fx.StoredSuper(s, j, h)) {
          ++wrong_rejected;
        }
      }
    }
  }
  EXPECT_GT(checked, 10);
  EXPECT_GT(wrong_rejected, 0) << "the comparison must reject a super digest missing a page";

  // Incremental: every token appended in order, sequences interleaved, random chunk sizes.
  const std::vector<uint8_t> bulk_pages = fx.digests, bulk_super = fx.super;
  std::fill(fx.digests.begin(), fx.digests.end(), 0xAB);  // poison
  std::fill(fx.super.begin(), fx.super.end(), 0xAB);
  std::vector<int> pos(fx.lens.size(), 0);
  const size_t row = static_cast<size_t>(2) * 64 * DTypeSize(dtype);
  std::uniform_int_distribution<int> chunk(1, 2 * block_size);
  for (bool left = true; left;) {
    left = false;
    std::vector<int64_t> slots;
    std::vector<uint8_t> keys;
    for (size_t s = 0; s < fx.lens.size(); ++s) {
      const int end = std::min(fx.lens[s], pos[s] + chunk(rng));
      for (int t = pos[s]; t < end; ++t) {
        const int b = fx.table[s * fx.max_blocks + t / block_size];
        slots.push_back(static_cast<int64_t>(b) * block_size + t % block_size);
        const uint8_t* src =
            fx.storage.data() + fx.cache.Offset(0, b, t % block_size, 0) * DTypeSize(dtype);
        keys.insert(keys.end(), src, src + row);
      }
      pos[s] = end;
      left = left || end < fx.lens[s];
    }
    slots.push_back(-1);  // skipped
    keys.resize(keys.size() + row);
    ASSERT_TRUE(UpdateHierarchicalDigests(fx.page_view(), fx.super_view(), block_size, f,
                                          slots.data(), static_cast<int>(slots.size()), keys.data())
                    .ok());
  }
  for (size_t s = 0; s < fx.lens.size(); ++s) {
    for (int j = 0; j < NumSuperBlocks(NumPages(fx.lens[s], block_size), f); ++j) {
      for (int h = 0; h < 2; ++h) {
        ASSERT_EQ(fx.ScratchSuper(s, j, h), fx.StoredSuper(s, j, h)) << "incremental, seq " << s;
      }
    }
  }
  // One call that writes sequence 0 twice over (slots repeat: the token-by-token path) ends
  // where writing it once does.
  {
    std::vector<int64_t> slots;
    std::vector<uint8_t> keys;
    for (int rep = 0; rep < 2; ++rep) {
      for (int t = 0; t < fx.lens[0]; ++t) {
        const int b = fx.table[t / block_size];
        slots.push_back(static_cast<int64_t>(b) * block_size + t % block_size);
        const uint8_t* src =
            fx.storage.data() + fx.cache.Offset(0, b, t % block_size, 0) * DTypeSize(dtype);
        keys.insert(keys.end(), src, src + row);
      }
    }
    ASSERT_TRUE(UpdateHierarchicalDigests(fx.page_view(), fx.super_view(), block_size, f,
                                          slots.data(), static_cast<int>(slots.size()), keys.data())
                    .ok());
    for (int j = 0; j < NumSuperBlocks(NumPages(fx.lens[0], block_size), f); ++j) {
      ASSERT_EQ(fx.ScratchSuper(0, j, 1), fx.StoredSuper(0, j, 1)) << "repeated slots";
    }
  }
  // Page digests too (the incremental path updates both).
  fx.super = bulk_super;
  for (size_t s = 0; s < fx.lens.size(); ++s) {
    for (int p = 0; p < NumPages(fx.lens[s], block_size); ++p) {
      const int b = fx.table[s * fx.max_blocks + p];
      const size_t off = fx.page_view().Offset(b, 0, 0) * DTypeSize(dtype);
      const size_t n = fx.page_view().BlockStride() * DTypeSize(dtype);
      ASSERT_EQ(0, std::memcmp(fx.digests.data() + off, bulk_pages.data() + off, n));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, SuperDigestTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16,
                                                              DType::kFloat16),
                                            ::testing::Values(16, 32), ::testing::Values(2, 4, 8)));

// The brute-force two-level selection of hierarchical.h, from scratch: super digests from the
// keys, a full sort of every candidate list.
struct BruteSelection {
  std::vector<int32_t> pages;  // [seqs, heads, k], -1 padded
  std::vector<int32_t> counts;
  std::vector<int64_t> super_scored, page_scored;
};

BruteSelection Brute(const HierFixture& fx, const float* q, int heads, const SelectionConfig& cfg,
                     const std::vector<float>& flat_scores) {
  const int bs = fx.cache.block_size, d = fx.cache.head_dim, kvh = fx.cache.num_kv_heads;
  const int f = cfg.hierarchy.pages_per_super_page, group = heads / kvh;
  const int k = cfg.PagesPerHead(bs);
  BruteSelection r;
  r.pages.assign(fx.lens.size() * kvh * k, -1);
  r.counts.assign(fx.lens.size() * kvh, 0);
  r.super_scored.assign(fx.lens.size() * kvh, 0);
  r.page_scored.assign(fx.lens.size() * kvh, 0);
  for (size_t s = 0; s < fx.lens.size(); ++s) {
    const int n = NumPages(fx.lens[s], bs);
    for (int h = 0; h < kvh; ++h) {
      const size_t rh = s * kvh + h;
      int32_t* row = &r.pages[rh * k];
      std::vector<int32_t> sel;
      if (n <= k) {
        for (int p = 0; p < n; ++p) sel.push_back(p);
      } else {
        const int lo = cfg.num_sink_pages, hi = n - cfg.num_local_pages;
        const int want = k - lo - cfg.num_local_pages;
        for (int p = 0; p < lo; ++p) sel.push_back(p);
        std::vector<std::pair<float, int>> sp;  // (score, super-page)
        for (int j = 0; j * f < n; ++j) {
          if (std::min(j * f + f, hi) <= std::max(j * f, lo)) continue;  // no middle page
          const std::vector<uint8_t> dg = fx.ScratchSuper(s, j, h);
          std::vector<float> mx(d), mn(d);
          for (int c = 0; c < d; ++c) {
            mx[c] = LoadAsFloat(dg.data(), fx.cache.dtype, c);
            mn[c] = LoadAsFloat(dg.data(), fx.cache.dtype, d + c);
          }
          float a = 0;
          for (int g = 0; g < group; ++g) {
            const float v =
                PageBound(q + ((s * heads) + h * group + g) * d, mx.data(), mn.data(), d);
            a = g == 0 ? v : cfg.aggregation == GroupAggregation::kMax ? std::max(a, v) : a + v;
          }
          sp.push_back({a, j});
        }
        r.super_scored[rh] = static_cast<int64_t>(sp.size());
        std::sort(sp.begin(), sp.end(), [](auto x, auto y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        });
        const size_t m = static_cast<size_t>(cfg.hierarchy.expansion) * ((want + f - 1) / f);
        std::vector<std::pair<float, int>> cand;
        for (size_t i = 0; i < sp.size() && (i < m || static_cast<int>(cand.size()) < want); ++i) {
          for (int p = std::max(sp[i].second * f, lo); p < std::min(sp[i].second * f + f, hi);
               ++p) {
            cand.push_back({flat_scores[rh * fx.max_blocks + p], p});
          }
        }
        r.page_scored[rh] = static_cast<int64_t>(cand.size());
        std::sort(cand.begin(), cand.end(), [](auto x, auto y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        });
        std::vector<int32_t> mid;
        for (int i = 0; i < want; ++i) mid.push_back(cand[i].second);
        std::sort(mid.begin(), mid.end());
        sel.insert(sel.end(), mid.begin(), mid.end());
        for (int p = hi; p < n; ++p) sel.push_back(p);
      }
      std::copy(sel.begin(), sel.end(), row);
      r.counts[rh] = static_cast<int32_t>(sel.size());
    }
  }
  return r;
}

class HierarchicalSelectTest
    : public ::testing::TestWithParam<std::tuple<DType, int, int, GroupAggregation>> {};

TEST_P(HierarchicalSelectTest, MatchesBruteForceAndFlatWhenNothingIsPruned) {
  const auto [dtype, f, group, agg] = GetParam();
  std::mt19937_64 rng(TestSeed());
  const int bs = 16, kvh = 2, d = 64, heads = kvh * group;
  std::uniform_int_distribution<int> len(1, 90 * bs);
  HierFixture fx(rng, dtype, bs, f, kvh, d, {len(rng), len(rng), 70 * bs + 3, 9 * bs, 5});
  ASSERT_TRUE(BuildDigests(fx.cache, fx.table_view(), fx.page_view()).ok());
  ASSERT_TRUE(BuildSuperDigests(fx.page_view(), fx.table_view(), bs, f, fx.super_view()).ok());
  const int seqs = static_cast<int>(fx.lens.size());
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(seqs) * heads * d);
  for (float& v : q) v = u(rng);
  const QueryView qv{q.data(), DType::kFloat32, seqs, heads, d};
  std::vector<float> flat_scores(static_cast<size_t>(seqs) * kvh * fx.max_blocks);
  ASSERT_TRUE(
      ComputeRelevancy(qv, fx.cache, fx.page_view(), fx.table_view(), agg, flat_scores.data())
          .ok());
  int differs_from_flat = 0;
  for (int expansion : {1, 2, 3}) {
    for (int budget_pages : {8, 13, 24}) {
      SelectionConfig cfg;
      cfg.budget_tokens = budget_pages * bs;
      cfg.num_sink_pages = budget_pages == 13 ? 0 : 1;
      cfg.num_local_pages = budget_pages == 24 ? 3 : 1;
      cfg.aggregation = agg;
      cfg.hierarchy = PageHierarchy{f, expansion};
      const int k = budget_pages;
      std::vector<int32_t> pages(static_cast<size_t>(seqs) * kvh * k, 12345),
          counts(seqs * kvh, -9);
      const SelectionView out{pages.data(), counts.data(), seqs, kvh, k};
      HierarchyStats stats;
      std::vector<HierarchyStats> rows;
      ASSERT_TRUE(SelectHierarchical(qv, fx.cache, fx.page_view(), fx.super_view(), fx.table_view(),
                                     cfg, out, &stats, /*num_threads=*/3, &rows)
                      .ok());
      const BruteSelection b = Brute(fx, q.data(), heads, cfg, flat_scores);
      ASSERT_EQ(b.pages, pages) << "expansion " << expansion << " budget " << budget_pages;
      ASSERT_EQ(b.counts, counts);
      ASSERT_TRUE(ValidateSelection(out, fx.table_view(), bs, cfg).ok());
      int64_t super_sum = 0, page_sum = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        ASSERT_EQ(rows[i].super_rows_scored, b.super_scored[i]);
        ASSERT_EQ(rows[i].page_rows_scored, b.page_scored[i]);
        super_sum += b.super_scored[i];
        page_sum += b.page_scored[i];
      }
      EXPECT_EQ(stats.super_rows_scored, super_sum);
      EXPECT_EQ(stats.page_rows_scored, page_sum);
      // ScoreAndSelect with the same config runs the same reference (super digests built on the
      // spot).
      std::vector<int32_t> pages2(pages.size(), 777), counts2(counts.size(), -9);
      ASSERT_TRUE(ScoreAndSelect(qv, fx.cache, fx.page_view(), fx.table_view(), cfg,
                                 SelectionView{pages2.data(), counts2.data(), seqs, kvh, k})
                      .ok());
      ASSERT_EQ(pages, pages2);
      // Flat selection: equal when pass 1 keeps every candidate, usually not otherwise.
      SelectionConfig flat = cfg;
      flat.hierarchy = PageHierarchy{};
      std::vector<int32_t> fpages(pages.size(), 0), fcounts(counts.size(), 0);
      ASSERT_TRUE(SelectPages(flat_scores.data(), fx.table_view(), bs, kvh, flat,
                              SelectionView{fpages.data(), fcounts.data(), seqs, kvh, k})
                      .ok());
      if (fpages != pages) ++differs_from_flat;
      cfg.hierarchy.expansion = 1 << 20;
      std::fill(pages.begin(), pages.end(), 12345);
      ASSERT_TRUE(SelectHierarchical(qv, fx.cache, fx.page_view(), fx.super_view(), fx.table_view(),
                                     cfg, out)
                      .ok());
      ASSERT_EQ(fpages, pages) << "keeping every super-page must give the flat selection";
    }
  }
  // The comparisons above can fail: pruning changes the answer somewhere in these runs.
  EXPECT_GT(differs_from_flat, 0);
}

INSTANTIATE_TEST_SUITE_P(All, HierarchicalSelectTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16),
                                            ::testing::Values(2, 4, 8), ::testing::Values(1, 4),
                                            ::testing::Values(GroupAggregation::kMax,
                                                              GroupAggregation::kSum)));

// A super-page's bound is at least each of its pages' bounds (why pass 1 may prune).
TEST(HierarchicalTest, SuperBoundBoundsItsPages) {
  std::mt19937_64 rng(TestSeed());
  const int bs = 16, f = 4, d = 64;
  HierFixture fx(rng, DType::kFloat32, bs, f, 1, d, {37 * bs + 5});
  ASSERT_TRUE(BuildDigests(fx.cache, fx.table_view(), fx.page_view()).ok());
  ASSERT_TRUE(BuildSuperDigests(fx.page_view(), fx.table_view(), bs, f, fx.super_view()).ok());
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(d);
  for (float& v : q) v = u(rng);
  const float* pg = static_cast<const float*>(fx.page_view().data);
  const float* sp = static_cast<const float*>(fx.super_view().data);
  for (int p = 0; p < NumPages(fx.lens[0], bs); ++p) {
    const int b = fx.table[p], sb = fx.table[p - p % f] / f;
    const float page = PageBound(q.data(), pg + fx.page_view().Offset(b, 0, 0),
                                 pg + fx.page_view().Offset(b, 1, 0), d);
    const float super = PageBound(q.data(), sp + fx.super_view().Offset(sb, 0, 0),
                                  sp + fx.super_view().Offset(sb, 1, 0), d);
    ASSERT_GE(super * (1 + 1e-5f) + 1e-5f, page) << "page " << p;
  }
}

TEST(HierarchicalTest, ErrorsNameTheBadValue) {
  std::mt19937_64 rng(TestSeed());
  HierFixture fx(rng, DType::kFloat32, 16, 4, 1, 64, {40 * 16});
  // A misaligned table: swap two pages of a group.
  std::swap(fx.table[1], fx.table[2]);
  absl::Status s = ValidateSuperPageTable(fx.table_view(), 16, 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("page 1"), absl::string_view::npos) << s;
  std::swap(fx.table[1], fx.table[2]);
  EXPECT_TRUE(ValidateSuperPageTable(fx.table_view(), 16, 4).ok());

  auto h = ParsePageHierarchy("16in64", 16);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->pages_per_super_page, 4);
  EXPECT_EQ(PageHierarchyName(*h, 16), "16in64");
  EXPECT_TRUE(ParsePageHierarchy("none", 32)->Flat());
  EXPECT_NE(ParsePageHierarchy("16in64", 32).status().message().find("page size is 32"),
            absl::string_view::npos);
  EXPECT_NE(ParsePageHierarchy("16in48", 16).status().message().find("16in48"),
            absl::string_view::npos);
  EXPECT_FALSE(ParsePageHierarchy("sixteen", 16).ok());

  SelectionConfig cfg;
  cfg.budget_tokens = 256;
  cfg.hierarchy = PageHierarchy{3, 2};
  EXPECT_NE(ValidateSelectionConfig(cfg, 16).message().find("got 3"), absl::string_view::npos);
  cfg.hierarchy = PageHierarchy{4, 0};
  EXPECT_NE(ValidateSelectionConfig(cfg, 16).message().find("expansion"), absl::string_view::npos);
  cfg.hierarchy = PageHierarchy{4, 2};
  EXPECT_TRUE(ValidateSelectionConfig(cfg, 16).ok());
  // Flat-only paths refuse instead of selecting flat.
  std::vector<float> scores(40, 0.0f);
  std::vector<int32_t> pages(16), counts(1);
  const absl::Status flat_only = SelectPages(scores.data(), fx.table_view(), 16, 1, cfg,
                                             SelectionView{pages.data(), counts.data(), 1, 1, 16});
  EXPECT_NE(flat_only.message().find("flat only"), absl::string_view::npos) << flat_only;
  EXPECT_TRUE(RequireFlatSelection(SelectionConfig{}, "x").ok());
  // The super view must match the page digests.
  ASSERT_TRUE(BuildDigests(fx.cache, fx.table_view(), fx.page_view()).ok());
  DigestView bad = fx.super_view();
  bad.num_blocks += 1;
  EXPECT_NE(BuildSuperDigests(fx.page_view(), fx.table_view(), 16, 4, bad)
                .message()
                .find("super-page digests"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace mempipe
