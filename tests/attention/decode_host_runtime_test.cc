// Dense and sparse decode with their (sequence, KV head) split on an installed host OpenMP
// runtime (core/host_parallel_runtime.h; issue 16) give the one-thread bits, on fresh random data
// with NaN-poisoned outputs. The runtime is the std::thread stand-in of
// tests/testing/fake_openmp.h, so ThreadSanitizer sees the kernels' writes from the team threads.
// (tests/python/test_host_threads.py runs the same comparison on torch's real libgomp.)
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "attention/decode.h"
#include "core/host_parallel_runtime.h"
#include "core/thread_pool.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_openmp.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

class DecodeOnHostRuntimeTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    dtype_ = GetParam();
    const uint64_t seed = testing::TestSeed();
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> len_dist(1, 20 * kBlock);
    lens_ = {len_dist(rng), len_dist(rng), 1, len_dist(rng), kBlock};
    f_ = std::make_unique<testing::PagedFixture>(rng, testing::FixtureSpec{.dtype = dtype_,
                                                                           .block_size = kBlock,
                                                                           .num_kv_heads = kKvHeads,
                                                                           .head_dim = kHeadDim,
                                                                           .seq_lens = lens_});
    q_ = std::make_unique<testing::RandomTensor>(rng, dtype_, lens_.size() * kHeads * kHeadDim);
    // A random ascending selection of up to kPages pages per (sequence, KV head).
    pages_.assign(lens_.size() * kKvHeads * kPages, -1);
    counts_.assign(lens_.size() * kKvHeads, 0);
    for (size_t s = 0; s < lens_.size(); ++s) {
      const int num_pages = NumPages(lens_[s], kBlock);
      for (int h = 0; h < kKvHeads; ++h) {
        int n = 0;
        for (int p = 0; p < num_pages && n < kPages; ++p) {
          if (p == 0 || std::bernoulli_distribution(0.5)(rng)) {
            pages_[(s * kKvHeads + h) * kPages + n++] = p;
          }
        }
        counts_[s * kKvHeads + h] = n;
      }
    }
  }
  void TearDown() override { ResetHostParallelRuntime(); }

  std::vector<uint8_t> Run(bool sparse, int threads) const {
    std::vector<uint8_t> out(lens_.size() * kHeads * kHeadDim * DTypeSize(dtype_));
    for (size_t i = 0; i < lens_.size() * kHeads * kHeadDim; ++i) {
      StoreFromFloat(out.data(), dtype_, i, NAN);
    }
    const DecodeIo io{q_->data(), out.data(), dtype_, static_cast<int>(lens_.size()),
                      kHeads,     kHeadDim,   threads};
    const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    const absl::Status st =
        sparse ? SparseDecode(io, f_->cache_view(), f_->table_view(),
                              {pages_.data(), counts_.data(), kKvHeads, kPages}, scale)
               : DenseDecode(io, f_->cache_view(), f_->table_view(), scale);
    EXPECT_TRUE(st.ok()) << st;
    for (size_t i = 0; i < lens_.size() * kHeads * kHeadDim; ++i) {
      EXPECT_TRUE(std::isfinite(LoadAsFloat(out.data(), dtype_, i))) << "element " << i;
    }
    return out;
  }

  static constexpr int kBlock = 16, kKvHeads = 3, kHeads = 9, kHeadDim = 64, kPages = 5;
  DType dtype_;
  std::vector<int> lens_;
  std::vector<int32_t> pages_, counts_;
  std::unique_ptr<testing::PagedFixture> f_;
  std::unique_ptr<testing::RandomTensor> q_;
};

TEST_P(DecodeOnHostRuntimeTest, TeamGivesTheOneThreadBits) {
  for (bool sparse : {false, true}) {
    const std::vector<uint8_t> want = Run(sparse, 1);
    ASSERT_TRUE(InstallHostParallelRuntime(testing::FakeOpenMpEntry(), "fake").ok());
    for (int threads : {2, 3, 7}) {
      const int64_t calls = GetHostParallelRuntimeInfo().team_calls;
      EXPECT_EQ(Run(sparse, threads), want) << (sparse ? "sparse" : "dense") << ", " << threads;
      const HostParallelRuntimeInfo info = GetHostParallelRuntimeInfo();
      EXPECT_EQ(info.team_calls, calls + 1);
      // ForEachSeqHeads caps the split at the pool's size (core/parallel.h).
      EXPECT_EQ(info.last_call_team, std::min(threads, ThreadPool::DefaultMaxWorkers() + 1));
    }
    ResetHostParallelRuntime();
  }
}

TEST_P(DecodeOnHostRuntimeTest, TheComparisonRejectsAOneBitChange) {
  std::vector<uint8_t> want = Run(/*sparse=*/true, 1);
  ASSERT_TRUE(InstallHostParallelRuntime(testing::FakeOpenMpEntry(), "fake").ok());
  std::vector<uint8_t> got = Run(/*sparse=*/true, 3);
  ASSERT_EQ(got, want);
  got[got.size() / 2] ^= 1;  // the lowest mantissa bit of one element
  EXPECT_NE(got, want);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, DecodeOnHostRuntimeTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace mempipe
