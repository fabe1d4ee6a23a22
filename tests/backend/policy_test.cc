// The sparsity policy (backend/policy.h): the dense-layers and short-batch rules.
#include "backend/policy.h"

#include "gtest/gtest.h"

namespace mempipe {
namespace {

TEST(Policy, FirstLayersAndShortBatchesAreDense) {
  SparsityPolicy p;
  p.dense_layers = 2;
  p.selection.budget_tokens = 64;
  const int32_t short_lens[] = {10, 64};
  const int32_t long_lens[] = {10, 65};
  EXPECT_FALSE(DecodesSparse(p, 1, long_lens, 2));
  EXPECT_TRUE(DecodesSparse(p, 2, long_lens, 2));
  EXPECT_FALSE(DecodesSparse(p, 5, short_lens, 2));
  p.dense_layers = -1;
  EXPECT_NE(ValidateSparsityPolicy(p, 16).message().find("-1"), absl::string_view::npos);
}

TEST(Policy, DenseLayersBoundTheFirstSparseLayer) {
  SparsityPolicy p;
  p.dense_layers = 2;
  EXPECT_TRUE(IsDenseLayer(p, 1));
  EXPECT_FALSE(IsDenseLayer(p, 2));
  EXPECT_EQ(FirstSparseLayer(p, 8), 2);
  EXPECT_EQ(FirstSparseLayer(p, 1), 1);  // every layer dense
  p.dense_layers = 0;
  EXPECT_FALSE(IsDenseLayer(p, 0));
  EXPECT_EQ(FirstSparseLayer(p, 8), 0);
  EXPECT_TRUE(ValidateDenseLayers(0).ok());
  const absl::Status bad = ValidateDenseLayers(-3);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("-3"), absl::string_view::npos) << bad;
}

}  // namespace
}  // namespace mempipe
