// The XRT host runtime against a slow card: XRT's noop shim with a completion delay, so Wait()
// must honor deadlines (DeadlineExceeded, the request dropped) and otherwise block until the
// runs complete.
#include <chrono>
#include <vector>

#include "fpga/host/xrt_selector.h"
#include "gtest/gtest.h"
#include "tests/fpga/noop_xrt.h"
#include "tests/fpga/test_data.h"

namespace mempipe {
namespace {

constexpr int kDelayUs = 300000;

const auto* const kEnv =
    ::testing::AddGlobalTestEnvironment(new testing::NoopXrtEnvironment(kDelayUs));

TEST(XrtSelectorDelay, DeadlineExceededThenCompletionAfterTheDelay) {
  std::mt19937_64 rng(testing::FreshSeed("XrtSelectorDelay"));
  FpgaOptions o;
  o.backend = FpgaBackend::kXrt;
  auto sel = XrtPageSelector::Open(o);
  ASSERT_TRUE(sel.ok()) << sel.status();
  testing::Batch b = testing::MakeBatch(rng, DType::kFloat16, 32, 1, 64, 2, {500, 90}, 0, false);
  ASSERT_TRUE((*sel)->AddLayer(0, {b.dtype, b.num_blocks, 32, 1, 64}).ok());
  SelectionConfig config;
  config.budget_tokens = 32 * 4;
  std::vector<int32_t> pages(2 * 4), counts(2);
  const SelectRequest req{0, b.Query(), b.Table(), config,
                          SelectionView{pages.data(), counts.data(), 2, 1, 4}};

  auto t0 = std::chrono::steady_clock::now();
  auto ticket = (*sel)->Submit(req);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  std::cerr << "submit took "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << "\n";
  const absl::Status late = (*sel)->Wait(*ticket, absl::Now() + absl::Milliseconds(20));
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded) << late;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::microseconds(kDelayUs));
  EXPECT_EQ((*sel)->Wait(*ticket, absl::InfiniteFuture()).code(), absl::StatusCode::kNotFound)
      << "a ticket past its deadline is dropped";

  t0 = std::chrono::steady_clock::now();
  ticket = (*sel)->Submit(req);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE((*sel)->Wait(*ticket, absl::InfiniteFuture()).ok());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::microseconds(kDelayUs * 9 / 10));
}

}  // namespace
}  // namespace mempipe
