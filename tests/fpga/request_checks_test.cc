// The FPGA front end's request checks (fpga/request_checks.h), shared by the emulated U55C and
// the XRT selector: each accepts a well-formed call and rejects a known-wrong one with a message
// naming the bad value.
#include "fpga/request_checks.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

constexpr CacheShape kShape{DType::kBFloat16, 8, 16, 2, 64};

TEST(RequestChecks, BuildRequestAcceptsAMatchingCacheAndRejectsAMismatch) {
  std::vector<uint16_t> kv(2 * 8 * 16 * 2 * 64);
  const int32_t table[] = {0, 1};
  const int32_t lens[] = {20};
  const BlockTableView bt{table, lens, 1, 2};
  KvCacheView cache{kv.data(), DType::kBFloat16, 8, 16, 2, 64};
  EXPECT_TRUE(ValidateBuildRequest(3, cache, bt, kShape).ok());

  cache.dtype = DType::kFloat16;
  const absl::Status wrong_dtype = ValidateBuildRequest(3, cache, bt, kShape);
  EXPECT_EQ(wrong_dtype.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_dtype.message().find("does not match layer 3"), absl::string_view::npos)
      << wrong_dtype;
  EXPECT_NE(wrong_dtype.message().find("fp16"), absl::string_view::npos) << wrong_dtype;

  cache.dtype = DType::kBFloat16;
  cache.num_blocks = 4;
  EXPECT_EQ(ValidateBuildRequest(3, cache, bt, kShape).code(), absl::StatusCode::kInvalidArgument);

  cache.num_blocks = 8;
  const int32_t bad_table[] = {0, 9};  // block 9 is past the 8-block cache
  const BlockTableView bad{bad_table, lens, 1, 2};
  const absl::Status past = ValidateBuildRequest(3, cache, bad, kShape);
  EXPECT_EQ(past.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(past.message().find("9"), absl::string_view::npos) << past;
}

TEST(RequestChecks, CacheShapeAndAppendRejectBadValues) {
  EXPECT_TRUE(ValidateCacheShape(kShape).ok());
  CacheShape odd = kShape;
  odd.head_dim = 96;
  const absl::Status s = ValidateCacheShape(odd);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("96"), absl::string_view::npos) << s;

  const int64_t slots[] = {0, 127, 128};  // the cache has 8 x 16 = 128 slots
  const std::vector<uint16_t> keys(3 * 2 * 64);
  EXPECT_TRUE(ValidateAppend(kShape, slots, 2, keys.data()).ok());
  const absl::Status past = ValidateAppend(kShape, slots, 3, keys.data());
  EXPECT_EQ(past.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(past.message().find("slot_mapping[2] = 128"), absl::string_view::npos) << past;
  EXPECT_EQ(ValidateAppend(kShape, slots, 1, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mempipe
