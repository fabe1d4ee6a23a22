// mempipe-bench's last-step audit (integration/bench/selection_audit.h) and its hierarchical runs.
#include "integration/bench/selection_audit.h"

#include <vector>

#include "gtest/gtest.h"
#include "integration/bench/decode_bench.h"
#include "retriever/hierarchical.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

SyntheticContextConfig Config(uint64_t seed, int block_group) {
  SyntheticContextConfig cfg;
  cfg.shape = ModelShape{2, 8, 2, 64};
  cfg.dtype = DType::kBFloat16;
  cfg.block_size = 16;
  cfg.batch = 3;
  cfg.context = 1500;
  cfg.ragged = true;
  cfg.max_new_tokens = 3;
  cfg.block_group = block_group;
  cfg.seed = seed;
  return cfg;
}

BenchOptions Options(int f) {
  BenchOptions opt;
  opt.steps = 1;
  opt.warmup = 1;
  opt.policy.dense_layers = 0;
  opt.policy.selection.budget_tokens = 320;  // 20 of up to 94 pages
  opt.policy.selection.hierarchy = PageHierarchy{f, 1};
  return opt;
}

// Flat: recall exactly 1 and every page scanned. 16-in-64: fewer rows, recall in (0, 1]; the
// aligned block groups pass the super-page layout check.
TEST(SelectionAudit, FlatIsExactAndHierarchicalScansFewerRows) {
  const uint64_t seed = testing::TestSeed();
  SyntheticContext flat_ctx(Config(seed, 1));
  ASSERT_TRUE(flat_ctx.Prefill(nullptr).ok());
  auto flat = RunPlacement(flat_ctx, Options(1), "cpu", nullptr);
  ASSERT_TRUE(flat.ok()) << flat.status();
  ASSERT_TRUE(flat->recall_vs_flat.has_value());
  EXPECT_EQ(*flat->recall_vs_flat, 1.0);
  EXPECT_EQ(flat->digest_rows_per_step, flat->flat_digest_rows_per_step);

  SyntheticContext ctx(Config(seed, 4));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  ASSERT_TRUE(ValidateSuperPageTable(ctx.table(), 16, 4).ok());
  auto hier = RunPlacement(ctx, Options(4), "cpu", nullptr);
  ASSERT_TRUE(hier.ok()) << hier.status();
  ASSERT_TRUE(hier->recall_vs_flat.has_value());
  EXPECT_GT(*hier->recall_vs_flat, 0.0);
  EXPECT_LE(*hier->recall_vs_flat, 1.0);
  EXPECT_LT(hier->digest_rows_per_step, hier->flat_digest_rows_per_step);
  EXPECT_EQ(hier->flat_digest_rows_per_step, flat->flat_digest_rows_per_step);
  // The interleaved one-block layout breaks the super-page layout: refused, naming the page.
  auto refused = RunPlacement(flat_ctx, Options(4), "cpu", nullptr);
  EXPECT_NE(refused.status().message().find("aligned group"), absl::string_view::npos)
      << refused.status();
}

// The audit's recall rejects a selection that is not the flat one.
TEST(SelectionAudit, RecallRejectsAWrongSelection) {
  SyntheticContext ctx(Config(testing::TestSeed(), 1));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  const KvCacheView cache = ctx.cache(1);
  const BlockTableView table = ctx.table();
  std::vector<uint8_t> q, k, v;
  std::vector<int64_t> slots;
  ctx.NextToken(0, 1, q, k, v, slots);
  const QueryView query{q.data(), DType::kBFloat16, 3, 8, 64};
  const SelectionConfig cfg = Options(1).policy.selection;
  const int kp = cfg.PagesPerHead(16);
  std::vector<int32_t> pages(3 * 2 * kp), counts(3 * 2);
  const SelectionView sel{pages.data(), counts.data(), 3, 2, kp};
  std::vector<uint8_t> digests(
      DigestView{nullptr, cache.dtype, cache.num_blocks, 2, 64}.NumBytes());
  const DigestView dv{digests.data(), cache.dtype, cache.num_blocks, 2, 64};
  ASSERT_TRUE(BuildDigests(cache, table, dv).ok());
  ASSERT_TRUE(ScoreAndSelect(query, cache, dv, table, cfg, sel).ok());
  std::vector<uint8_t> scratch;
  SelectionAudit exact;
  ASSERT_TRUE(
      AuditSelection(query, cache, table, cfg, sel, DigestFormat::kNative, scratch, exact).ok());
  EXPECT_EQ(exact.Recall(), 1.0);
  EXPECT_GT(exact.flat_middle, 0.0);
  // Known-wrong: the middle pages replaced by the lowest ones (still a valid-looking row).
  for (int r = 0; r < 6; ++r) {
    const int n = NumPages(table.seq_lens[r / 2], 16);
    if (n <= kp) continue;
    for (int i = 1; i + 1 < kp; ++i) pages[r * kp + i] = i;
  }
  SelectionAudit wrong;
  ASSERT_TRUE(
      AuditSelection(query, cache, table, cfg, sel, DigestFormat::kNative, scratch, wrong).ok());
  EXPECT_LT(wrong.Recall(), 1.0);
}

}  // namespace
}  // namespace mempipe
