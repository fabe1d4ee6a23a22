// The AVX-512 relevancy scan against the portable one (retriever/relevancy.cc): bit for bit,
// every dtype, head_dim, GQA group, aggregation and digest format, on ragged batches whose
// page counts cross the scan's 16-page batches, through shuffled block tables. The portable
// scan is itself checked against float64 in select_test.cc, and the canonical order against
// the GPU and HLS kernels elsewhere, so equality here carries those checks to the AVX-512 path.
#include "retriever/relevancy.h"

#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "core/cpu_kernel.h"
#include "gtest/gtest.h"
#include "tests/testing/int8_digests.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::Int8Digests;
using testing::PagedFixture;
using testing::RandomTensor;
using testing::TestSeed;

// The same scores summed in plain channel order (one accumulator): a plausible but
// non-canonical kernel. The bitwise comparison must tell it apart from the canonical one.
std::vector<float> SequentialOrderScores(const PagedFixture& f, const DigestView& dv,
                                         const RandomTensor& q, int heads, GroupAggregation agg) {
  const int kv_heads = f.spec().num_kv_heads, d = f.spec().head_dim, group = heads / kv_heads;
  std::vector<float> out(static_cast<size_t>(f.num_seqs()) * kv_heads * f.max_blocks(), -INFINITY);
  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int h = 0; h < kv_heads; ++h) {
      for (int p = 0; p < NumPages(f.table_view().seq_lens[s], f.spec().block_size); ++p) {
        const int block = f.Block(s, p);
        float agg_score = 0;
        for (int g = 0; g < group; ++g) {
          const float* qg = &q.values[(static_cast<size_t>(s) * heads + h * group + g) * d];
          float sum = 0;
          for (int c = 0; c < d; ++c) {
            const float mx = LoadAsFloat(dv.data, dv.dtype, dv.Offset(block, 0, h) + c);
            const float mn = LoadAsFloat(dv.data, dv.dtype, dv.Offset(block, 1, h) + c);
            sum += std::max(qg[c] * mx, qg[c] * mn);
          }
          agg_score = g == 0                          ? sum
                      : agg == GroupAggregation::kMax ? std::max(sum, agg_score)
                                                      : agg_score + sum;
        }
        out[(static_cast<size_t>(s) * kv_heads + h) * f.max_blocks() + p] = agg_score;
      }
    }
  }
  return out;
}

// Parameters: dtype, head_dim, GQA group (6 and 9 cross the AVX-512 scan's chunks of 4 query
// heads), int8 digests, vector kernel (avx512 or avx2).
class RelevancyKernelTest
    : public ::testing::TestWithParam<std::tuple<DType, int, int, bool, CpuKernel>> {
 protected:
  void TearDown() override { ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok()); }
};

TEST_P(RelevancyKernelTest, VectorScanEqualsPortableBitForBit) {
  const auto [dtype, head_dim, group, int8, kernel] = GetParam();
  if (!CpuKernelAvailable(kernel)) GTEST_SKIP() << "this CPU lacks the kernel's instructions";
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16, kv_heads = 3;
  std::uniform_int_distribution<int> len_dist(1, 70 * block_size);
  // 1 page, exactly 16 and 17 pages (the scans' batch edges: 16 pages for avx512, 8 for avx2),
  // 9 pages, and two random lengths.
  const std::vector<int> lens = {
      len_dist(rng), 1, 16 * block_size, 16 * block_size + 1, 9 * block_size - 3, len_dist(rng)};
  PagedFixture f(rng, {.dtype = dtype,
                       .block_size = block_size,
                       .num_kv_heads = kv_heads,
                       .head_dim = head_dim,
                       .seq_lens = lens});
  const DigestView native = f.digest_view();
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), native).ok());
  Int8Digests i8(native);
  if (int8) {
    ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), i8.view()).ok());
  }
  const DigestView dv = int8 ? i8.view() : native;
  const int heads = kv_heads * group;
  RandomTensor q(rng, dtype, lens.size() * heads * head_dim);
  const QueryView qv{q.data(), dtype, static_cast<int>(lens.size()), heads, head_dim};
  const size_t n = lens.size() * kv_heads * f.max_blocks();
  for (GroupAggregation agg : {GroupAggregation::kMax, GroupAggregation::kSum}) {
    std::vector<float> portable(n, NAN), vec(n, NAN), vec_mt(n, NAN), vec_split(n, NAN);
    ASSERT_TRUE(SetCpuKernel(CpuKernel::kPortable).ok());
    ASSERT_TRUE(
        ComputeRelevancy(qv, f.cache_view(), dv, f.table_view(), agg, portable.data()).ok());
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), dv, f.table_view(), agg, vec.data()).ok());
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), dv, f.table_view(), agg, vec_mt.data(),
                                 /*num_threads=*/2)
                    .ok());
    // More threads than rows: each row's pages are split into ranges (relevancy.cc).
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), dv, f.table_view(), agg, vec_split.data(),
                                 /*num_threads=*/4 * static_cast<int>(n))
                    .ok());
    for (size_t i = 0; i < n; ++i) {
      ASSERT_FALSE(std::isnan(vec[i])) << "score " << i << " left unwritten";
      uint32_t a, b;
      std::memcpy(&a, &vec[i], 4);
      std::memcpy(&b, &portable[i], 4);
      ASSERT_EQ(a, b) << "score " << i << " (" << GroupAggregationName(agg)
                      << "): " << CpuKernelName(kernel) << " " << vec[i] << " portable "
                      << portable[i];
    }
    ASSERT_EQ(0, std::memcmp(vec.data(), vec_mt.data(), n * sizeof(float)));
    ASSERT_EQ(0, std::memcmp(vec.data(), vec_split.data(), n * sizeof(float)));
    if (!int8) {
      // The known-wrong answer: the same bound summed in channel order differs somewhere.
      const std::vector<float> wrong = SequentialOrderScores(f, native, q, heads, agg);
      EXPECT_NE(0, std::memcmp(wrong.data(), vec.data(), n * sizeof(float)))
          << "the bitwise check cannot tell a channel-order sum from the canonical one";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RelevancyKernelTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(64, 128, 256), ::testing::Values(1, 3, 4, 6, 9),
                       ::testing::Bool(), ::testing::Values(CpuKernel::kAvx512, CpuKernel::kAvx2)));

// A query element that is not finite is refused, named by its sequence, head and channel, in
// every dtype; the same query with that element finite again is scored.
TEST(RelevancyQueryTest, NamesTheFirstNonFiniteElement) {
  std::mt19937_64 rng(TestSeed());
  for (const DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const int kv_heads = 2, heads = 6, d = 64;
    const std::vector<int> lens = {40, 17, 33};
    PagedFixture f(rng, {.dtype = dtype,
                         .block_size = 16,
                         .num_kv_heads = kv_heads,
                         .head_dim = d,
                         .seq_lens = lens});
    const DigestView dv = f.digest_view();
    ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), dv).ok());
    RandomTensor q(rng, dtype, lens.size() * heads * d);
    std::vector<float> scores(lens.size() * kv_heads * f.max_blocks());
    const QueryView qv{q.data(), dtype, static_cast<int>(lens.size()), heads, d};
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), dv, f.table_view(), GroupAggregation::kMax,
                                 scores.data())
                    .ok());
    // Sequence 2, head 4, channel 37; and a later bad element that must not be the one named.
    const size_t at = (2 * heads + 4) * d + 37;
    for (const float bad : {INFINITY, -INFINITY, NAN}) {
      RandomTensor b = q;
      StoreFromFloat(b.bytes.data(), dtype, at, bad);
      StoreFromFloat(b.bytes.data(), dtype, at + 5, bad);
      const QueryView bv{b.data(), dtype, static_cast<int>(lens.size()), heads, d};
      const absl::Status st = ComputeRelevancy(bv, f.cache_view(), dv, f.table_view(),
                                               GroupAggregation::kMax, scores.data());
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << DTypeName(dtype) << " " << bad;
      EXPECT_NE(st.message().find("query[2][4][37] is"), absl::string_view::npos) << st;
    }
  }
}

}  // namespace
}  // namespace mempipe
