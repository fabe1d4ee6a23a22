// The selection offload over the XRT selector on XRT's noop shim (no card): the same plumbing
// as with a card, end to end. The shim's kernels compute nothing, so every selection it returns
// is malformed: the engine must count it as a fallback (reason invalid) and, after
// dead_after_failures of them, declare the selector dead -- never hand it to the decode.
#include <vector>

#include "backend/selection_offload.h"
#include "fpga/fpga_selector.h"
#include "gtest/gtest.h"
#include "tests/fpga/noop_xrt.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

const auto* const kEnv =
    ::testing::AddGlobalTestEnvironment(new testing::NoopXrtEnvironment(/*completion_delay_us=*/0));

TEST(SelectionOffloadXrt, NoopShimSelectionsAreInvalidFallbacksThenDead) {
  std::mt19937_64 rng(testing::TestSeed());
  testing::PagedFixture f(rng, {.dtype = DType::kFloat16,
                                .block_size = 16,
                                .num_kv_heads = 2,
                                .head_dim = 64,
                                .seq_lens = {300, 129}});
  FpgaOptions fo;
  fo.backend = FpgaBackend::kXrt;
  fo.params.num_cus = 4;
  auto sel = MakeFpgaSelector(fo);
  ASSERT_TRUE(sel.ok()) << sel.status();
  auto off = SelectionOffload::Create(*std::move(sel),
                                      {.slots = 2, .deadline_ms = 5000, .dead_after_failures = 2});
  ASSERT_TRUE(off.ok()) << off.status();
  const KvCacheView cache = f.cache_view();
  ASSERT_TRUE((*off)
                  ->AddLayer(3, {cache.dtype, cache.num_blocks, cache.block_size,
                                 cache.num_kv_heads, cache.head_dim})
                  .ok());
  ASSERT_TRUE((*off)->BuildDigests(3, cache, f.table_view()).ok());
  std::vector<int64_t> slots = {f.Slot(0, 299), f.Slot(1, 128)};
  std::vector<uint8_t> keys(2 * 2 * 64 * 2, 0x3c);
  ASSERT_TRUE((*off)->Append(3, slots.data(), 2, keys.data()).ok());
  std::vector<uint8_t> q(2 * 4 * 64 * 2, 0x3c);  // fp16 1.0 bytes pattern (finite)
  SelectionConfig config;
  config.budget_tokens = 64;
  const OffloadReason want[] = {OffloadReason::kInvalid, OffloadReason::kInvalid,
                                OffloadReason::kDead};
  for (OffloadReason w : want) {
    ASSERT_TRUE(
        (*off)->Submit(1, 3, {q.data(), DType::kFloat16, 2, 4, 64}, f.table_view(), config).ok());
    std::vector<int32_t> pages(2 * 2 * 4, -7), counts(2 * 2, -7);
    auto r = (*off)->Wait(1, {pages.data(), counts.data(), 2, 2, 4});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*r, w) << OffloadReasonName(*r);
    for (int32_t v : pages) EXPECT_EQ(v, -7);  // the caller's buffers are left alone
  }
  const OffloadMetrics m = (*off)->Metrics();
  EXPECT_EQ(m.selector, "fpga-xrt");
  EXPECT_EQ(m.appends, 1);
  EXPECT_TRUE(m.dead);
  EXPECT_EQ(m.waited[static_cast<int>(OffloadReason::kInvalid)], 2);
}

}  // namespace
}  // namespace mempipe
