// The bench driven through the pipeline agrees with the direct bench (RunPlacement) on the same
// synthetic context: same selections, hence the same error against dense and the same bytes.
#include "integration/bench/pipeline_bench.h"

#include "backend/selector_registry.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fault_injecting_selector.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

SyntheticContextConfig SmallConfig(uint64_t seed) {
  SyntheticContextConfig cfg;
  cfg.shape = ModelShape{3, 8, 2, 64};
  cfg.dtype = DType::kBFloat16;
  cfg.block_size = 16;
  cfg.batch = 4;
  cfg.context = 700;
  cfg.max_new_tokens = 4;
  cfg.seed = seed;
  return cfg;
}

BenchOptions SmallOptions() {
  BenchOptions opt;
  opt.steps = 2;
  opt.warmup = 1;
  opt.policy.dense_layers = 1;
  opt.policy.selection.budget_tokens = 256;
  return opt;
}

TEST(PipelineBench, MatchesTheDirectBenchInEveryMode) {
  SyntheticContext ctx(SmallConfig(testing::TestSeed()));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  const BenchOptions opt = SmallOptions();
  absl::StatusOr<PlacementResult> direct = RunPlacement(ctx, opt, "cpu", nullptr);
  ASSERT_TRUE(direct.ok()) << direct.status();
  ASSERT_TRUE(direct->rel_l2_error.has_value());

  // A paced stand-in for the FPGA, so `fpga` resolves without the FPGA library.
  RegisterPageSelectorFactory(Device::kFpga, "test", [] {
    FaultInjectionOptions f;
    f.delay_ms = 0.2;
    f.report_delay_as_modeled = true;
    return absl::StatusOr<std::unique_ptr<PageSelector>>(
        std::make_unique<FaultInjectingSelector>(f));
  });
  for (const auto& [spec, mode, mbs] :
       {std::tuple{"cpu", PipelineMode::kSync, 1}, std::tuple{"fpga", PipelineMode::kPipelined, 2},
        std::tuple{"prepare=fpga,relevancy=fpga,retrieval=fpga,apply=cpu", PipelineMode::kPipelined,
                   4}}) {
    PipelineBenchOptions p;
    p.placement = spec;
    p.mode = mode;
    p.micro_batches = mbs;
    absl::StatusOr<PipelinePlacementResult> r = RunPipelinePlacement(ctx, opt, p, nullptr);
    ASSERT_TRUE(r.ok()) << spec << ": " << r.status();
    EXPECT_EQ(r->result.sparse_layers, direct->sparse_layers) << spec;
    ASSERT_TRUE(r->result.rel_l2_error.has_value());
    EXPECT_DOUBLE_EQ(*r->result.rel_l2_error, *direct->rel_l2_error) << spec;
    EXPECT_DOUBLE_EQ(r->result.kv_bytes_per_step, direct->kv_bytes_per_step) << spec;
    EXPECT_DOUBLE_EQ(r->result.digest_bytes_per_step, direct->digest_bytes_per_step) << spec;
    EXPECT_EQ(r->result.step_ms.size(), 2u);
    const PipelineMetrics& m = r->metrics;
    EXPECT_EQ(m.steps, 2u);  // timed steps only
    EXPECT_EQ(m.requests, 2u * 3 * mbs);
    EXPECT_EQ(m.selections_fresh, 2u * 2 * mbs);  // layer 0 is dense
    EXPECT_EQ(m.fallbacks, 0u);
    // The metrics JSON is valid JSON and carries the overlap.
    const nlohmann::json j = nlohmann::json::parse(m.ToJson());
    EXPECT_TRUE(j["overlap_measured"].contains("hidden_fraction"));
    EXPECT_EQ(j["requests"].get<uint64_t>(), m.requests);
  }
  UnregisterPageSelectorFactory(Device::kFpga);
}

TEST(PipelineBench, ReuseAndErrors) {
  SyntheticContext ctx(SmallConfig(testing::TestSeed()));
  ASSERT_TRUE(ctx.Prefill(nullptr).ok());
  const BenchOptions opt = SmallOptions();
  PipelineBenchOptions p;
  p.reuse = 2;
  absl::StatusOr<PipelinePlacementResult> r = RunPipelinePlacement(ctx, opt, p, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->metrics.selections_reused, 0u);
  EXPECT_NE(r->result.placement.find("reuse2"), std::string::npos);

  p = PipelineBenchOptions{};
  p.placement = "prepare=cpu,relevancy=fpga,retrieval=fpga,apply=cpu";
  EXPECT_EQ(RunPipelinePlacement(ctx, opt, p, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.placement = "gpu";  // no GPU selector in this program
  const absl::Status none = RunPipelinePlacement(ctx, opt, p, nullptr).status();
  EXPECT_EQ(none.code(), absl::StatusCode::kUnimplemented) << none;
  EXPECT_NE(none.message().find("'gpu'"), absl::string_view::npos);
}

TEST(PipelineBench, ParsePipelineRun) {
  PipelineBenchOptions d;
  d.micro_batches = 3;
  d.reuse = 2;
  absl::StatusOr<PipelineBenchOptions> r = ParsePipelineRun("fpga", d);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->placement, "fpga");
  EXPECT_EQ(r->mode, PipelineMode::kSync);
  EXPECT_EQ(r->micro_batches, 3);  // the defaults where the run says nothing
  EXPECT_EQ(r->reuse, 2);

  r = ParsePipelineRun(
      " prepare=fpga,relevancy=fpga,retrieval=fpga,apply=gpu :pipelined:"
      "micro_batches=4:reuse=1",
      d);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->placement, "prepare=fpga,relevancy=fpga,retrieval=fpga,apply=gpu");
  EXPECT_EQ(r->mode, PipelineMode::kPipelined);
  EXPECT_EQ(r->micro_batches, 4);
  EXPECT_EQ(r->reuse, 1);

  for (const char* bad : {"", ":sync", "fpga:fast", "fpga:reuse=x", "fpga:reuse", "fpga:mb=2"}) {
    const absl::Status s = ParsePipelineRun(bad, d).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  const absl::Status s = ParsePipelineRun("fpga:micro_batchez=2", d).status();
  EXPECT_NE(s.message().find("micro_batchez=2"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace mempipe
