#include "integration/bench/decode_bench.h"

#include <random>

#include "backend/policy.h"
#include "gtest/gtest.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

SyntheticContextConfig SmallConfig(uint64_t seed) {
  SyntheticContextConfig cfg;
  cfg.shape = ModelShape{3, 8, 2, 64};
  cfg.dtype = DType::kBFloat16;
  cfg.block_size = 16;
  cfg.batch = 3;
  cfg.context = 700;
  cfg.ragged = true;
  cfg.max_new_tokens = 4;
  cfg.seed = seed;
  return cfg;
}

TEST(DecodeBench, SparseLayersKeepHeavyHittersAndReadFewerBytes) {
  SyntheticContext ctx(SmallConfig(testing::TestSeed()));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  BenchOptions opt;
  opt.steps = 2;
  opt.warmup = 1;
  opt.policy.dense_layers = 1;
  opt.policy.selection.budget_tokens = 352;  // 22 pages: only the longest sequence loses pages
  auto r = RunPlacement(ctx, opt, "cpu", nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sparse_layers, 2);
  ASSERT_TRUE(r->rel_l2_error.has_value());
  EXPECT_GT(*r->rel_l2_error, 0.0);  // the longest sequence lost pages
  EXPECT_LT(*r->rel_l2_error, 0.5);  // but kept its heavy hitters
  EXPECT_LT(r->kv_bytes_per_step, 0.999 * 3 * 2 * 2 * 64 * 2 * 701.0 * 3);
  EXPECT_GT(r->digest_bytes_per_step, 0.0);
  EXPECT_GT(r->tokens_per_s, 0.0);
  EXPECT_EQ(r->step_ms.size(), 2u);
}

TEST(DecodeBench, DensePlacementAndErrors) {
  SyntheticContext ctx(SmallConfig(testing::TestSeed()));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  BenchOptions opt;
  opt.steps = 2;
  opt.policy.selection.budget_tokens = 64;
  auto dense = RunPlacement(ctx, opt, "dense", nullptr);
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(dense->sparse_layers, 0);
  EXPECT_FALSE(dense->rel_l2_error.has_value());

  auto bad = RunPlacement(ctx, opt, "tpu", nullptr);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("tpu"), absl::string_view::npos);
  opt.steps = 10;  // more than the 4 tokens of room
  bad = RunPlacement(ctx, opt, "dense", nullptr);
  EXPECT_NE(bad.status().message().find("11"), absl::string_view::npos) << bad.status();
}

}  // namespace
}  // namespace mempipe
