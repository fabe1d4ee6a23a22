// Differential tests of the GPU kernels against the CPU reference on fresh random data:
// digests and the fused append bit for bit, relevancy scores and selections bit for bit, and
// dense/sparse decode within the per-dtype tolerance of a float64 reference. Unused cache
// slots, table entries and every output buffer are poisoned. Without a GPU every test skips.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention/decode.h"
#include "attention/gpu/paged_decode_gpu.h"
#include "core/gpu/gpu_runtime.h"
#include "core/status_macros.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/gpu/digest_gpu.h"
#include "retriever/gpu/gpu_page_selector.h"
#include "retriever/gpu/select_gpu.h"
#include "retriever/page_selector.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"
#include "tests/testing/gpu_test_util.h"
#include "tests/testing/int8_digests.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::GpuAttentionTolerance;
using testing::PagedFixture;
using testing::RandomTensor;
using testing::ReferenceAttention;
using testing::TestSeed;

constexpr int kKvHeads = 2;

#define SKIP_WITHOUT_GPU() MEMPIPE_SKIP_WITHOUT_GPU("GPU kernel test")
using testing::Download;
using testing::Upload;

std::vector<uint8_t> NanBytes(DType dtype, size_t n) {
  std::vector<uint8_t> v(n * DTypeSize(dtype));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(v.data(), dtype, i, NAN);
  return v;
}

class GpuKernelTest : public ::testing::TestWithParam<std::tuple<DType, int, int, int>> {
 protected:
  void SetUp() override {
    std::tie(dtype_, block_size_, head_dim_, group_) = GetParam();
    // Without a device every test skips (or fails) at its first line: build nothing.
    if (GpuDeviceCount() == 0) return;
    rng_.seed(TestSeed());
    // Ragged: a long sequence (several splits), a one-token one, an exact page, a partial.
    std::uniform_int_distribution<int> len_dist(1, 40 * block_size_);
    lens_ = {len_dist(rng_) + 60 * block_size_, 1, block_size_, len_dist(rng_)};
    f_ = std::make_unique<PagedFixture>(rng_, testing::FixtureSpec{.dtype = dtype_,
                                                                   .block_size = block_size_,
                                                                   .num_kv_heads = kKvHeads,
                                                                   .head_dim = head_dim_,
                                                                   .seq_lens = lens_});
    heads_ = kKvHeads * group_;
    q_ = std::make_unique<RandomTensor>(rng_, dtype_, lens_.size() * heads_ * head_dim_);
    scale_ = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    cache_ = f_->cache_view();
    table_ = f_->table_view();
    d_cache_ = Upload(cache_.data, cache_.NumBytes());
    d_table_ =
        Upload(table_.block_table, sizeof(int32_t) * table_.num_seqs * table_.max_blocks_per_seq);
    d_lens_ = Upload(table_.seq_lens, sizeof(int32_t) * table_.num_seqs);
    d_q_ = Upload(q_->bytes);
  }

  int num_seqs() const { return static_cast<int>(lens_.size()); }
  KvCacheView DeviceCache() const {
    KvCacheView c = cache_;
    c.data = d_cache_.data();
    return c;
  }
  BlockTableView DeviceTable() const {
    return BlockTableView{static_cast<const int32_t*>(d_table_.data()),
                          static_cast<const int32_t*>(d_lens_.data()), table_.num_seqs,
                          table_.max_blocks_per_seq};
  }
  DigestView Digests(void* data) const {
    return DigestView{data, dtype_, cache_.num_blocks, kKvHeads, head_dim_};
  }

  // Runs a GPU decode into a NaN-poisoned buffer and checks every row against float64.
  template <typename Run, typename TokensOf>
  void CheckDecode(Run run, TokensOf tokens_of) {
    const size_t n = lens_.size() * heads_ * head_dim_;
    DeviceBuffer d_out = Upload(NanBytes(dtype_, n));
    DecodeIo io{d_q_.data(), d_out.data(), dtype_, num_seqs(), heads_, head_dim_};
    ASSERT_TRUE(run(io).ok());
    ASSERT_TRUE(GpuSynchronize().ok());
    const std::vector<uint8_t> out = Download<uint8_t>(d_out, n * DTypeSize(dtype_));
    for (int s = 0; s < num_seqs(); ++s) {
      for (int h = 0; h < heads_; ++h) {
        const int kvh = h / group_;
        const auto attended = tokens_of(s, kvh);
        const auto ref = ReferenceAttention(*f_, &q_->values[(s * heads_ + h) * head_dim_], s, kvh,
                                            attended, scale_);
        for (int c = 0; c < head_dim_; ++c) {
          const float got = LoadAsFloat(out.data(), dtype_, (s * heads_ + h) * head_dim_ + c);
          // Derived from the dtype's rounding and the reduction length (as the CPU tests).
          const double tol =
              GpuAttentionTolerance(dtype_, ref[c], static_cast<int>(attended.size()), head_dim_);
          ASSERT_NEAR(got, ref[c], tol) << "seq " << s << " head " << h << " c " << c;
        }
      }
    }
  }

  std::mt19937_64 rng_;
  DType dtype_;
  int block_size_, head_dim_, group_, heads_;
  float scale_;
  std::vector<int> lens_;
  std::unique_ptr<PagedFixture> f_;
  std::unique_ptr<RandomTensor> q_;
  KvCacheView cache_;
  BlockTableView table_;
  DeviceBuffer d_cache_, d_table_, d_lens_, d_q_;
};

TEST_P(GpuKernelTest, BuildDigestsBitExact) {
  SKIP_WITHOUT_GPU();
  DigestView cpu = f_->digest_view();
  const std::vector<uint8_t> poison = NanBytes(dtype_, cpu.NumElems());
  std::memcpy(cpu.data, poison.data(), poison.size());
  ASSERT_TRUE(BuildDigests(cache_, table_, cpu).ok());
  DeviceBuffer d_dg = Upload(poison);
  ASSERT_TRUE(BuildDigestsGpu(DeviceCache(), DeviceTable(), Digests(d_dg.data()), nullptr).ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  const auto got = Download<uint8_t>(d_dg, cpu.NumBytes());
  ASSERT_EQ(0, std::memcmp(got.data(), cpu.data, cpu.NumBytes()));
}

TEST_P(GpuKernelTest, AppendKvAndDigestsBitExact) {
  SKIP_WITHOUT_GPU();
  DigestView cpu = f_->digest_view();
  ASSERT_TRUE(BuildDigests(cache_, table_, cpu).ok());
  DeviceBuffer d_dg = Upload(cpu.data, cpu.NumBytes());
  // A decode-like batch (one token per sequence at its next position, some starting a page)
  // plus a prefill-like run of consecutive tokens into fresh blocks, and padding slots.
  // Slots are distinct, as vLLM's are within one batch.
  std::vector<int64_t> slots;
  for (int rep = 0; rep < 3; ++rep) {
    for (int s = 0; s < num_seqs(); ++s) {
      const int64_t slot = f_->Slot(s, std::uniform_int_distribution<int>(0, lens_[s] - 1)(rng_));
      if (std::find(slots.begin(), slots.end(), slot) == slots.end()) slots.push_back(slot);
    }
    slots.push_back(-1 - rep);
  }
  const int shuffled = static_cast<int>(slots.size());
  // The prefill-like run fills the fixture's three unused blocks.
  std::vector<bool> used(cache_.num_blocks, false);
  for (int s = 0; s < num_seqs(); ++s) {
    for (int p = 0; p < NumPages(lens_[s], block_size_); ++p) used[f_->Block(s, p)] = true;
  }
  std::vector<int64_t> spare;
  for (int b = 0; b < cache_.num_blocks; ++b) {
    if (!used[b]) spare.push_back(b);
  }
  ASSERT_EQ(spare.size(), 3u);
  for (int t = 0; t < 2 * block_size_ + 5; ++t) {
    slots.push_back(spare[t / block_size_] * block_size_ + t % block_size_);
  }
  std::shuffle(slots.begin(), slots.begin() + shuffled, rng_);
  const int n = static_cast<int>(slots.size());
  RandomTensor k(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  RandomTensor v(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  DeviceBuffer d_slots = Upload(slots), d_k = Upload(k.bytes), d_v = Upload(v.bytes);
  ASSERT_TRUE(AppendKvAndDigestsGpu(DeviceCache(), static_cast<const int64_t*>(d_slots.data()), n,
                                    d_k.data(), d_v.data(), Digests(d_dg.data()), nullptr)
                  .ok());
  ASSERT_TRUE(AppendKvAndDigests(cache_, slots.data(), n, k.data(), v.data(), cpu).ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  const auto got_cache = Download<uint8_t>(d_cache_, cache_.NumBytes());
  const auto got_dg = Download<uint8_t>(d_dg, cpu.NumBytes());
  EXPECT_EQ(0, std::memcmp(got_cache.data(), cache_.data, cache_.NumBytes()));
  EXPECT_EQ(0, std::memcmp(got_dg.data(), cpu.data, cpu.NumBytes()));

  // Again through the caller-workspace overload (workspace full of garbage), the same slots in
  // a fully shuffled order (resets after other tokens of their block) with new K/V.
  std::shuffle(slots.begin(), slots.end(), rng_);
  RandomTensor k2(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  RandomTensor v2(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  DeviceBuffer d_slots2 = Upload(slots), d_k2 = Upload(k2.bytes), d_v2 = Upload(v2.bytes);
  DeviceBuffer d_ws = Upload(std::vector<uint8_t>(AppendWorkspaceBytes(cache_), 0xa5));
  ASSERT_TRUE(AppendKvAndDigestsGpu(DeviceCache(), static_cast<const int64_t*>(d_slots2.data()), n,
                                    d_k2.data(), d_v2.data(), Digests(d_dg.data()), d_ws.data(),
                                    d_ws.size(), nullptr)
                  .ok());
  ASSERT_TRUE(AppendKvAndDigests(cache_, slots.data(), n, k2.data(), v2.data(), cpu).ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  EXPECT_EQ(0, std::memcmp(Download<uint8_t>(d_cache_, cache_.NumBytes()).data(), cache_.data,
                           cache_.NumBytes()));
  EXPECT_EQ(0,
            std::memcmp(Download<uint8_t>(d_dg, cpu.NumBytes()).data(), cpu.data, cpu.NumBytes()));
  // A workspace one byte short is refused, naming both sizes.
  const absl::Status small = AppendKvAndDigestsGpu(
      DeviceCache(), static_cast<const int64_t*>(d_slots2.data()), n, d_k2.data(), d_v2.data(),
      Digests(d_dg.data()), d_ws.data(), d_ws.size() - 1, nullptr);
  EXPECT_EQ(small.code(), absl::StatusCode::kInvalidArgument) << small;
  EXPECT_NE(small.message().find(std::to_string(d_ws.size())), std::string::npos) << small;
}

TEST_P(GpuKernelTest, RelevancyAndSelectionBitExact) {
  SKIP_WITHOUT_GPU();
  DigestView cpu_dg = f_->digest_view();
  ASSERT_TRUE(BuildDigests(cache_, table_, cpu_dg).ok());
  DeviceBuffer d_dg = Upload(cpu_dg.data, cpu_dg.NumBytes());
  for (GroupAggregation agg : {GroupAggregation::kMax, GroupAggregation::kSum}) {
    const QueryView q{q_->data(), dtype_, num_seqs(), heads_, head_dim_};
    const size_t n_scores = static_cast<size_t>(num_seqs()) * kKvHeads * table_.max_blocks_per_seq;
    std::vector<float> cpu_scores(n_scores);
    ASSERT_TRUE(ComputeRelevancy(q, cache_, cpu_dg, table_, agg, cpu_scores.data()).ok());
    const std::vector<float> poison(n_scores, NAN);
    DeviceBuffer d_scores = Upload(poison);
    QueryView dq = q;
    dq.data = d_q_.data();
    ASSERT_TRUE(ComputeRelevancyGpu(dq, DeviceCache(), Digests(d_dg.data()), DeviceTable(), agg,
                                    static_cast<float*>(d_scores.data()), nullptr)
                    .ok());
    ASSERT_TRUE(GpuSynchronize().ok());
    const auto got = Download<float>(d_scores, n_scores);
    ASSERT_EQ(0, std::memcmp(got.data(), cpu_scores.data(), n_scores * sizeof(float)))
        << "scores differ (" << GroupAggregationName(agg) << ")";

    // Budgets that leave some sequences fully selected and cut others.
    for (int pages : {2, 5, 17}) {
      SelectionConfig config{.budget_tokens = pages * block_size_,
                             .num_sink_pages = 1,
                             .num_local_pages = pages > 2 ? 2 : 1,
                             .aggregation = agg};
      const int max_sel = pages + 3;
      const size_t n_sel = static_cast<size_t>(num_seqs()) * kKvHeads * max_sel;
      std::vector<int32_t> sel(n_sel, 12345), cnt(num_seqs() * kKvHeads, 12345);
      SelectionView view{sel.data(), cnt.data(), num_seqs(), kKvHeads, max_sel};
      ASSERT_TRUE(SelectPages(cpu_scores.data(), table_, block_size_, kKvHeads, config, view).ok());
      std::vector<int32_t> poison_sel(n_sel, 777), poison_cnt(cnt.size(), 777);
      DeviceBuffer d_sel = Upload(poison_sel), d_cnt = Upload(poison_cnt);
      SelectionView dview{static_cast<int32_t*>(d_sel.data()), static_cast<int32_t*>(d_cnt.data()),
                          num_seqs(), kKvHeads, max_sel};
      DeviceBuffer d_ws =
          Upload(std::vector<uint8_t>(SelectWorkspaceBytes(table_, kKvHeads), 0xff));
      ASSERT_TRUE(ScoreAndSelectGpu(dq, DeviceCache(), Digests(d_dg.data()), DeviceTable(), config,
                                    dview, d_ws.data(), d_ws.size(), nullptr)
                      .ok());
      ASSERT_TRUE(GpuSynchronize().ok());
      EXPECT_EQ(Download<int32_t>(d_sel, n_sel), sel) << "budget " << pages << " pages";
      EXPECT_EQ(Download<int32_t>(d_cnt, cnt.size()), cnt) << "budget " << pages << " pages";
    }
  }
}

// Int8 digests (retriever/int8_quant.h) on the GPU against the CPU reference, bit for bit:
// the bulk build (codes, scales and exact rows, over NaN/-128-poisoned buffers), a decode-like
// append plus a prefill-like run, then scores and selections. A single changed code on the
// device must make the score comparison fail (the check can fail).
TEST_P(GpuKernelTest, Int8DigestsScoresAndSelectionBitExact) {
  SKIP_WITHOUT_GPU();
  testing::Int8Digests cpu(Digests(nullptr));
  DeviceBuffer d_codes = Upload(cpu.codes), d_scales = Upload(cpu.scales),
               d_exact = Upload(cpu.exact);
  DigestView gpu = cpu.view();
  gpu.data = d_codes.data();
  gpu.scales = static_cast<float*>(d_scales.data());
  gpu.exact = d_exact.data();
  auto same = [&](const char* what) {
    ASSERT_TRUE(GpuSynchronize().ok());
    EXPECT_EQ(Download<uint8_t>(d_codes, cpu.codes.size()), cpu.codes) << what << ": codes";
    EXPECT_EQ(0, std::memcmp(Download<float>(d_scales, cpu.scales.size()).data(), cpu.scales.data(),
                             cpu.scales.size() * sizeof(float)))
        << what << ": scales";
    EXPECT_EQ(Download<uint8_t>(d_exact, cpu.exact.size()), cpu.exact) << what << ": exact";
  };
  ASSERT_TRUE(BuildDigests(cache_, table_, cpu.view()).ok());
  ASSERT_TRUE(BuildDigestsGpu(DeviceCache(), DeviceTable(), gpu, nullptr).ok());
  same("build");

  // Append: one token per sequence at a random position (distinct slots) and a prefill-like run
  // into the unused blocks, shuffled together, with padding.
  std::vector<int64_t> slots;
  for (int s = 0; s < num_seqs(); ++s) {
    slots.push_back(f_->Slot(s, std::uniform_int_distribution<int>(0, lens_[s] - 1)(rng_)));
  }
  std::vector<bool> used(cache_.num_blocks, false);
  for (int s = 0; s < num_seqs(); ++s) {
    for (int p = 0; p < NumPages(lens_[s], block_size_); ++p) used[f_->Block(s, p)] = true;
  }
  for (int b = 0, t = 0; b < cache_.num_blocks; ++b) {
    if (used[b]) continue;
    for (int o = 0; o < block_size_ && t < 2 * block_size_ + 5; ++o, ++t) {
      slots.push_back(static_cast<int64_t>(b) * block_size_ + o);
    }
  }
  slots.push_back(-1);
  const int n = static_cast<int>(slots.size());
  RandomTensor k(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  RandomTensor v(rng_, dtype_, static_cast<size_t>(n) * kKvHeads * head_dim_);
  DeviceBuffer d_slots = Upload(slots), d_k = Upload(k.bytes), d_v = Upload(v.bytes);
  ASSERT_TRUE(AppendKvAndDigestsGpu(DeviceCache(), static_cast<const int64_t*>(d_slots.data()), n,
                                    d_k.data(), d_v.data(), gpu, nullptr)
                  .ok());
  ASSERT_TRUE(AppendKvAndDigests(cache_, slots.data(), n, k.data(), v.data(), cpu.view()).ok());
  same("append");

  const QueryView q{q_->data(), dtype_, num_seqs(), heads_, head_dim_};
  QueryView dq = q;
  dq.data = d_q_.data();
  const size_t n_scores = static_cast<size_t>(num_seqs()) * kKvHeads * table_.max_blocks_per_seq;
  for (GroupAggregation agg : {GroupAggregation::kMax, GroupAggregation::kSum}) {
    std::vector<float> cpu_scores(n_scores);
    ASSERT_TRUE(ComputeRelevancy(q, cache_, cpu.view(), table_, agg, cpu_scores.data()).ok());
    DeviceBuffer d_scores = Upload(std::vector<float>(n_scores, NAN));
    ASSERT_TRUE(ComputeRelevancyGpu(dq, DeviceCache(), gpu, DeviceTable(), agg,
                                    static_cast<float*>(d_scores.data()), nullptr)
                    .ok());
    ASSERT_TRUE(GpuSynchronize().ok());
    ASSERT_EQ(0, std::memcmp(Download<float>(d_scores, n_scores).data(), cpu_scores.data(),
                             n_scores * sizeof(float)))
        << "int8 scores differ (" << GroupAggregationName(agg) << ")";
    for (int pages : {2, 5, 17}) {
      SelectionConfig config{.budget_tokens = pages * block_size_,
                             .num_sink_pages = 1,
                             .num_local_pages = pages > 2 ? 2 : 1,
                             .aggregation = agg};
      const int max_sel = pages + 3;
      const size_t n_sel = static_cast<size_t>(num_seqs()) * kKvHeads * max_sel;
      std::vector<int32_t> sel(n_sel, 12345), cnt(num_seqs() * kKvHeads, 12345);
      ASSERT_TRUE(
          ScoreAndSelect(q, cache_, cpu.view(), table_, config,
                         SelectionView{sel.data(), cnt.data(), num_seqs(), kKvHeads, max_sel})
              .ok());
      DeviceBuffer d_sel = Upload(std::vector<int32_t>(n_sel, 777)),
                   d_cnt = Upload(std::vector<int32_t>(cnt.size(), 777));
      DeviceBuffer d_ws =
          Upload(std::vector<uint8_t>(SelectWorkspaceBytes(table_, kKvHeads), 0xff));
      ASSERT_TRUE(ScoreAndSelectGpu(dq, DeviceCache(), gpu, DeviceTable(), config,
                                    SelectionView{static_cast<int32_t*>(d_sel.data()),
                                                  static_cast<int32_t*>(d_cnt.data()), num_seqs(),
                                                  kKvHeads, max_sel},
                                    d_ws.data(), d_ws.size(), nullptr)
                      .ok());
      ASSERT_TRUE(GpuSynchronize().ok());
      EXPECT_EQ(Download<int32_t>(d_sel, n_sel), sel) << "int8, budget " << pages << " pages";
      EXPECT_EQ(Download<int32_t>(d_cnt, cnt.size()), cnt) << "int8, budget " << pages;
    }
    // The comparison can fail: one max code of sequence 0's first page, head 0, lowered by one
    // on the device changes that page's summed score (a channel where query head 0 is positive
    // reads the max row).
    if (agg == GroupAggregation::kSum) {
      std::vector<uint8_t> codes = cpu.codes;
      const size_t at = cpu.view().Offset(f_->Block(0, 0), 0, 0);
      // The channel where query head 0 is largest (q > 0 reads the max row; a tiny q would let
      // the fp32 sum absorb the change, as the first H200 run showed for one shape).
      int c = 0;
      for (int i = 1; i < head_dim_; ++i) {
        if (LoadAsFloat(q_->data(), dtype_, i) > LoadAsFloat(q_->data(), dtype_, c)) c = i;
      }
      ASSERT_GT(LoadAsFloat(q_->data(), dtype_, c), 0.0f);
      codes[at + c] = static_cast<uint8_t>(static_cast<int8_t>(codes[at + c]) - 1);
      DeviceBuffer d_bad = Upload(codes);
      DigestView bad = gpu;
      bad.data = d_bad.data();
      ASSERT_TRUE(ComputeRelevancyGpu(dq, DeviceCache(), bad, DeviceTable(), agg,
                                      static_cast<float*>(d_scores.data()), nullptr)
                      .ok());
      ASSERT_TRUE(GpuSynchronize().ok());
      EXPECT_NE(0, std::memcmp(Download<float>(d_scores, n_scores).data(), cpu_scores.data(),
                               n_scores * sizeof(float)))
          << "a changed int8 code went unnoticed";
    }
  }
}

TEST_P(GpuKernelTest, DenseDecodeMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  const size_t ws_bytes =
      PagedDecodeWorkspaceBytes(num_seqs(), heads_, kKvHeads, table_.max_blocks_per_seq);
  DeviceBuffer ws = Upload(std::vector<float>(ws_bytes / 4 + 4, NAN));
  CheckDecode(
      [&](const DecodeIo& io) {
        return DenseDecodeGpu(io, DeviceCache(), DeviceTable(), scale_, ws.data(), ws.size(),
                              nullptr);
      },
      [&](int s, int) {
        std::vector<int> t(lens_[s]);
        for (int i = 0; i < lens_[s]; ++i) t[i] = i;
        return t;
      });
}

TEST_P(GpuKernelTest, SparseDecodeMatchesFloat64) {
  SKIP_WITHOUT_GPU();
  // A random ascending selection per (sequence, KV head), counts from 1 to every page.
  const int max_sel = 24;
  std::vector<int32_t> sel(static_cast<size_t>(num_seqs()) * kKvHeads * max_sel, -1);
  std::vector<int32_t> cnt(num_seqs() * kKvHeads);
  for (int s = 0; s < num_seqs(); ++s) {
    const int n = NumPages(lens_[s], block_size_);
    for (int h = 0; h < kKvHeads; ++h) {
      std::vector<int32_t> all(n);
      for (int i = 0; i < n; ++i) all[i] = i;
      std::shuffle(all.begin(), all.end(), rng_);
      const int c = std::uniform_int_distribution<int>(1, std::min(n, max_sel))(rng_);
      std::sort(all.begin(), all.begin() + c);
      std::copy(all.begin(), all.begin() + c, sel.begin() + (s * kKvHeads + h) * max_sel);
      cnt[s * kKvHeads + h] = c;
    }
  }
  DeviceBuffer d_sel = Upload(sel), d_cnt = Upload(cnt);
  const PageList pages{static_cast<const int32_t*>(d_sel.data()),
                       static_cast<const int32_t*>(d_cnt.data()), kKvHeads, max_sel};
  const size_t ws_bytes = PagedDecodeWorkspaceBytes(num_seqs(), heads_, kKvHeads, max_sel);
  DeviceBuffer ws = Upload(std::vector<float>(ws_bytes / 4 + 4, NAN));
  CheckDecode(
      [&](const DecodeIo& io) {
        return SparseDecodeGpu(io, DeviceCache(), DeviceTable(), pages, scale_, ws.data(),
                               ws.size(), nullptr);
      },
      [&](int s, int h) {
        std::vector<int> t;
        const int32_t* row = &sel[(s * kKvHeads + h) * max_sel];
        for (int i = 0; i < cnt[s * kKvHeads + h]; ++i) {
          for (int j = 0; j < block_size_; ++j) {
            const int tok = row[i] * block_size_ + j;
            if (tok < lens_[s]) t.push_back(tok);
          }
        }
        return t;
      });
}

std::string ShapeName(const ::testing::TestParamInfo<GpuKernelTest::ParamType>& info) {
  return std::string(DTypeName(std::get<0>(info.param))) + "_page" +
         std::to_string(std::get<1>(info.param)) + "_d" + std::to_string(std::get<2>(info.param)) +
         "_g" + std::to_string(std::get<3>(info.param));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuKernelTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 32, 64), ::testing::Values(64, 128, 256),
                       ::testing::Values(1, 4, 8)),
    ShapeName);

// The GQA groups of real models beyond 1, 4, 8 (2: Llama-2-70B-like pairs, 3: SmolLM2,
// 5: Qwen2.5-14B/32B, 6, 7: Qwen2.5-7B, 12, 16: two thread blocks per KV head), every dtype
// and head_dim, on one page size each (page sizes are covered above) so that the suite stays
// short. Block tables are shuffled and lengths are not page multiples (PagedFixture).
INSTANTIATE_TEST_SUITE_P(Groups, GpuKernelTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::Values(32), ::testing::Values(64, 128, 256),
                                            ::testing::Values(2, 3, 5, 6, 7, 12, 16)),
                         ShapeName);
INSTANTIATE_TEST_SUITE_P(GroupsPage16, GpuKernelTest,
                         ::testing::Combine(::testing::Values(DType::kBFloat16),
                                            ::testing::Values(16, 64), ::testing::Values(128),
                                            ::testing::Values(3, 5, 7, 12, 16)),
                         ShapeName);

// Many sequences: one split per (sequence, KV head), the path without the combine kernel; and
// many tied scores (integer-valued queries and keys), the path that breaks ties by index.
TEST(GpuKernelLargeBatch, SingleSplitDecodeAndTiedSelection) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  // 6 rows per SM fill whole waves at 2 or 3 resident decode blocks per SM, so the decode
  // planner keeps one split (the path that writes out rows directly).
  const absl::StatusOr<int> sms = GpuMultiprocessorCount();
  ASSERT_TRUE(sms.ok()) << sms.status();
  const int num_seqs = std::min(6 * *sms, 65535), bs = 16, d = 128, group = 4;
  std::vector<int> lens(num_seqs);
  for (int& l : lens) l = std::uniform_int_distribution<int>(1, 20 * bs)(rng);
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = 1,
                       .head_dim = d,
                       .seq_lens = lens});
  // Integer keys in [-2, 2] make many pages' bounds equal.
  for (int s = 0; s < num_seqs; ++s) {
    for (int t = 0; t < lens[s]; ++t) {
      for (int c = 0; c < d; ++c) {
        f.SetKv(0, s, t, 0, c, static_cast<float>(std::uniform_int_distribution<int>(-2, 2)(rng)));
      }
    }
  }
  std::vector<uint16_t> qbits(static_cast<size_t>(num_seqs) * group * d);
  for (size_t i = 0; i < qbits.size(); ++i) {
    qbits[i] =
        BFloat16::FromFloat(static_cast<float>(std::uniform_int_distribution<int>(-1, 1)(rng)))
            .bits;
  }
  KvCacheView cache = f.cache_view();
  BlockTableView table = f.table_view();
  DigestView dg = f.digest_view();
  ASSERT_TRUE(BuildDigests(cache, table, dg).ok());
  DeviceBuffer d_cache = Upload(cache.data, cache.NumBytes());
  DeviceBuffer d_table = Upload(table.block_table, 4ull * num_seqs * table.max_blocks_per_seq);
  DeviceBuffer d_lens = Upload(table.seq_lens, 4ull * num_seqs);
  DeviceBuffer d_dg = Upload(dg.data, dg.NumBytes());
  DeviceBuffer d_q = Upload(qbits);
  KvCacheView dcache = cache;
  dcache.data = d_cache.data();
  const BlockTableView dtable{static_cast<const int32_t*>(d_table.data()),
                              static_cast<const int32_t*>(d_lens.data()), num_seqs,
                              table.max_blocks_per_seq};
  DigestView ddg = dg;
  ddg.data = d_dg.data();

  const SelectionConfig config{.budget_tokens = 6 * bs, .num_sink_pages = 1, .num_local_pages = 1};
  const int max_sel = 6;
  std::vector<int32_t> sel(num_seqs * max_sel), cnt(num_seqs);
  const QueryView q{qbits.data(), DType::kBFloat16, num_seqs, group, d};
  ASSERT_TRUE(ScoreAndSelect(q, cache, dg, table, config,
                             SelectionView{sel.data(), cnt.data(), num_seqs, 1, max_sel})
                  .ok());
  DeviceBuffer d_sel = Upload(std::vector<int32_t>(sel.size(), 999));
  DeviceBuffer d_cnt = Upload(std::vector<int32_t>(cnt.size(), 999));
  DeviceBuffer ws = DeviceBuffer::Allocate(SelectWorkspaceBytes(table, 1)).value();
  QueryView dq = q;
  dq.data = d_q.data();
  const SelectionView dview{static_cast<int32_t*>(d_sel.data()),
                            static_cast<int32_t*>(d_cnt.data()), num_seqs, 1, max_sel};
  ASSERT_TRUE(
      ScoreAndSelectGpu(dq, dcache, ddg, dtable, config, dview, ws.data(), ws.size(), nullptr)
          .ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  EXPECT_EQ(Download<int32_t>(d_sel, sel.size()), sel);
  EXPECT_EQ(Download<int32_t>(d_cnt, cnt.size()), cnt);

  // Dense decode over 6 rows per SM: one split (see above).
  std::vector<uint16_t> qn(qbits.size());
  std::normal_distribution<float> normal;
  std::vector<float> qf(qbits.size());
  for (size_t i = 0; i < qn.size(); ++i) {
    qn[i] = BFloat16::FromFloat(normal(rng)).bits;
    qf[i] = BFloat16::FromBits(qn[i]).ToFloat();
  }
  DeviceBuffer d_qn = Upload(qn);
  DeviceBuffer d_out = Upload(NanBytes(DType::kBFloat16, qn.size()));
  const size_t ws_bytes = PagedDecodeWorkspaceBytes(num_seqs, group, 1, table.max_blocks_per_seq);
  DeviceBuffer dws = DeviceBuffer::Allocate(ws_bytes + 16).value();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_TRUE(
      DenseDecodeGpu(DecodeIo{d_qn.data(), d_out.data(), DType::kBFloat16, num_seqs, group, d},
                     dcache, dtable, scale, dws.data(), dws.size(), nullptr)
          .ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  const auto out = Download<uint16_t>(d_out, qn.size());
  for (int s = 0; s < num_seqs; ++s) {
    std::vector<int> toks(lens[s]);
    for (int i = 0; i < lens[s]; ++i) toks[i] = i;
    for (int h = 0; h < group; ++h) {
      const auto ref = ReferenceAttention(f, &qf[(s * group + h) * d], s, 0, toks, scale);
      for (int c = 0; c < d; ++c) {
        ASSERT_NEAR(BFloat16::FromBits(out[(s * group + h) * d + c]).ToFloat(), ref[c],
                    GpuAttentionTolerance(DType::kBFloat16, ref[c], lens[s], d))
            << "seq " << s << " head " << h << " c " << c;
      }
    }
  }
}

// Long sequences with a small budget take the group-maximum prefilter (few candidates in
// shared memory); a sequence whose pages all tie overflows it and takes the full-row path.
// Both must equal the CPU selection exactly. Also checks SelectPagesGpu (no prefilter).
TEST(GpuKernelLongRows, PrefilterAndFallbackSelectExactly) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  const int bs = 16, d = 64, group = 2;
  const std::vector<int> lens = {3000 * bs + 7, 5000 * bs, 700 * bs - 3};
  const int num_seqs = static_cast<int>(lens.size());
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = 1,
                       .head_dim = d,
                       .seq_lens = lens});
  for (int t = 0; t < lens[1]; ++t) {
    for (int c = 0; c < d; ++c) f.SetKv(0, 1, t, 0, c, 0.5f);  // every page of seq 1 ties
  }
  RandomTensor q(rng, DType::kBFloat16, static_cast<size_t>(num_seqs) * group * d);
  KvCacheView cache = f.cache_view();
  BlockTableView table = f.table_view();
  DigestView dg = f.digest_view();
  ASSERT_TRUE(BuildDigests(cache, table, dg).ok());
  DeviceBuffer d_table = Upload(table.block_table, 4ull * num_seqs * table.max_blocks_per_seq);
  DeviceBuffer d_lens = Upload(table.seq_lens, 4ull * num_seqs);
  DeviceBuffer d_dg = Upload(dg.data, dg.NumBytes());
  DeviceBuffer d_q = Upload(q.bytes);
  KvCacheView dcache = cache;
  dcache.data = nullptr;  // selection reads digests only
  const BlockTableView dtable{static_cast<const int32_t*>(d_table.data()),
                              static_cast<const int32_t*>(d_lens.data()), num_seqs,
                              table.max_blocks_per_seq};
  DigestView ddg = dg;
  ddg.data = d_dg.data();
  QueryView hq{q.data(), DType::kBFloat16, num_seqs, group, d};
  QueryView dq = hq;
  dq.data = d_q.data();
  for (int pages : {8, 64, 300}) {
    const SelectionConfig config{
        .budget_tokens = pages * bs, .num_sink_pages = 2, .num_local_pages = 3};
    const int max_sel = pages + 1;
    std::vector<int32_t> sel(num_seqs * max_sel), cnt(num_seqs);
    ASSERT_TRUE(ScoreAndSelect(hq, cache, dg, table, config,
                               SelectionView{sel.data(), cnt.data(), num_seqs, 1, max_sel})
                    .ok());
    DeviceBuffer d_sel = Upload(std::vector<int32_t>(sel.size(), 999));
    DeviceBuffer d_cnt = Upload(std::vector<int32_t>(cnt.size(), 999));
    DeviceBuffer ws = Upload(std::vector<uint8_t>(SelectWorkspaceBytes(table, 1), 0xff));
    const SelectionView dview{static_cast<int32_t*>(d_sel.data()),
                              static_cast<int32_t*>(d_cnt.data()), num_seqs, 1, max_sel};
    ASSERT_TRUE(
        ScoreAndSelectGpu(dq, dcache, ddg, dtable, config, dview, ws.data(), ws.size(), nullptr)
            .ok());
    ASSERT_TRUE(GpuSynchronize().ok());
    EXPECT_EQ(Download<int32_t>(d_sel, sel.size()), sel) << "budget " << pages;
    EXPECT_EQ(Download<int32_t>(d_cnt, cnt.size()), cnt) << "budget " << pages;

    // Step 3 alone from the scores ScoreAndSelectGpu left at the start of its workspace.
    DeviceBuffer d_sel2 = Upload(std::vector<int32_t>(sel.size(), 999));
    const SelectionView dview2{static_cast<int32_t*>(d_sel2.data()),
                               static_cast<int32_t*>(d_cnt.data()), num_seqs, 1, max_sel};
    ASSERT_TRUE(
        SelectPagesGpu(static_cast<const float*>(ws.data()), dtable, bs, 1, config, dview2, nullptr)
            .ok());
    ASSERT_TRUE(GpuSynchronize().ok());
    EXPECT_EQ(Download<int32_t>(d_sel2, sel.size()), sel) << "budget " << pages;
  }
}

// A long prompt appended in one batch, as chunked prefill lays it out: two sequences'
// chunks interleaved (1000 tokens of one, then of the other), each sequence's pages in a
// shuffled block order, lengths not page multiples. Cache and digests equal the CPU's bit
// for bit (the linear launcher folds each block from its first token or latest reset).
TEST(GpuKernelAppend, LongPromptInOneBatchBitExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  const DType dtype = DType::kBFloat16;
  const int bs = 16, kv_heads = 2, d = 128, chunk = 1000;
  const std::vector<int> lens = {9000 + 7, 6000 - 3};
  int pages = 0;
  for (int l : lens) pages += NumPages(l, bs);
  std::vector<int32_t> perm(pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> first_page = {0, NumPages(lens[0], bs)};
  std::vector<int64_t> slots;
  for (int start = 0; start < std::max(lens[0], lens[1]); start += chunk) {
    for (int s = 0; s < 2; ++s) {
      for (int t = start; t < std::min(start + chunk, lens[s]); ++t) {
        slots.push_back(static_cast<int64_t>(perm[first_page[s] + t / bs]) * bs + t % bs);
      }
    }
  }
  const int n = static_cast<int>(slots.size());
  const size_t row = static_cast<size_t>(kv_heads) * d;
  KvCacheView cache{nullptr, dtype, pages, bs, kv_heads, d};
  std::vector<uint8_t> host_cache = NanBytes(dtype, cache.NumElems());
  cache.data = host_cache.data();
  DigestView dg{nullptr, dtype, pages, kv_heads, d};
  std::vector<uint8_t> host_dg = NanBytes(dtype, dg.NumElems());
  dg.data = host_dg.data();
  RandomTensor k(rng, dtype, n * row), v(rng, dtype, n * row);
  DeviceBuffer d_cache = Upload(host_cache), d_dg = Upload(host_dg), d_slots = Upload(slots);
  DeviceBuffer d_k = Upload(k.bytes), d_v = Upload(v.bytes);
  ASSERT_TRUE(AppendKvAndDigests(cache, slots.data(), n, k.data(), v.data(), dg).ok());
  KvCacheView dcache = cache;
  dcache.data = d_cache.data();
  DigestView ddg = dg;
  ddg.data = d_dg.data();
  ASSERT_TRUE(AppendKvAndDigestsGpu(dcache, static_cast<const int64_t*>(d_slots.data()), n,
                                    d_k.data(), d_v.data(), ddg, nullptr)
                  .ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  EXPECT_EQ(0, std::memcmp(Download<uint8_t>(d_cache, cache.NumBytes()).data(), host_cache.data(),
                           cache.NumBytes()));
  EXPECT_EQ(
      0, std::memcmp(Download<uint8_t>(d_dg, dg.NumBytes()).data(), host_dg.data(), dg.NumBytes()));
}

// The sparse decode step (fused append, score + select, sparse decode) on fixed-address
// buffers is capturable in a CUDA graph: captured once, replayed with new queries, new tokens
// and new lengths, it equals the same calls run eagerly, bit for bit (two input sets, so a
// graph that kept its first inputs would fail the second comparison).
TEST(GpuKernelGraph, DecodeStepReplaysLikeEager) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  const DType dtype = DType::kBFloat16;
  const int bs = 16, kv_heads = 2, d = 128, group = 4, heads = kv_heads * group;
  const std::vector<int> lens = {700 + 5, 300, 1000 - 9};
  const int num_seqs = static_cast<int>(lens.size());
  PagedFixture f(rng, {.dtype = dtype,
                       .block_size = bs,
                       .num_kv_heads = kv_heads,
                       .head_dim = d,
                       .seq_lens = lens});
  const KvCacheView hcache = f.cache_view();
  const BlockTableView htable = f.table_view();
  ASSERT_TRUE(BuildDigests(hcache, htable, f.digest_view()).ok());
  const DigestView hdg = f.digest_view();
  const std::vector<uint8_t> cache0(static_cast<uint8_t*>(hcache.data),
                                    static_cast<uint8_t*>(hcache.data) + hcache.NumBytes());
  const std::vector<uint8_t> dg0(static_cast<uint8_t*>(hdg.data),
                                 static_cast<uint8_t*>(hdg.data) + hdg.NumBytes());
  const size_t row = static_cast<size_t>(kv_heads) * d;
  const SelectionConfig config{.budget_tokens = 12 * bs, .num_sink_pages = 1, .num_local_pages = 2};
  const int max_sel = 12;

  // Fixed-address buffers of the step.
  DeviceBuffer d_cache = Upload(cache0), d_dg = Upload(dg0);
  DeviceBuffer d_table =
      Upload(htable.block_table, sizeof(int32_t) * num_seqs * htable.max_blocks_per_seq);
  DeviceBuffer d_lens = Upload(std::vector<int32_t>(num_seqs, 1));
  DeviceBuffer d_q = Upload(std::vector<uint8_t>(num_seqs * heads * d * 2, 0));
  DeviceBuffer d_out = Upload(NanBytes(dtype, num_seqs * heads * d));
  DeviceBuffer d_slots = Upload(std::vector<int64_t>(num_seqs, -1));
  DeviceBuffer d_k = Upload(std::vector<uint8_t>(num_seqs * row * 2, 0));
  DeviceBuffer d_v = Upload(std::vector<uint8_t>(num_seqs * row * 2, 0));
  DeviceBuffer d_sel = Upload(std::vector<int32_t>(num_seqs * kv_heads * max_sel, 0));
  DeviceBuffer d_cnt = Upload(std::vector<int32_t>(num_seqs * kv_heads, 0));
  KvCacheView cache = hcache;
  cache.data = d_cache.data();
  DigestView dg = hdg;
  dg.data = d_dg.data();
  const BlockTableView table{static_cast<const int32_t*>(d_table.data()),
                             static_cast<const int32_t*>(d_lens.data()), num_seqs,
                             htable.max_blocks_per_seq};
  DeviceBuffer d_append_ws = DeviceBuffer::Allocate(AppendWorkspaceBytes(cache)).value();
  DeviceBuffer d_select_ws = DeviceBuffer::Allocate(SelectWorkspaceBytes(table, kv_heads)).value();
  DeviceBuffer d_decode_ws =
      DeviceBuffer::Allocate(PagedDecodeWorkspaceBytes(num_seqs, heads, kv_heads, max_sel) + 16)
          .value();
  const QueryView q{d_q.data(), dtype, num_seqs, heads, d};
  const SelectionView sel{static_cast<int32_t*>(d_sel.data()), static_cast<int32_t*>(d_cnt.data()),
                          num_seqs, kv_heads, max_sel};
  const PageList pages{static_cast<const int32_t*>(d_sel.data()),
                       static_cast<const int32_t*>(d_cnt.data()), kv_heads, max_sel};
  absl::StatusOr<GpuStreamOwner> stream = GpuStreamOwner::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  auto step = [&]() -> absl::Status {
    MEMPIPE_RETURN_IF_ERROR(AppendKvAndDigestsGpu(
        cache, static_cast<const int64_t*>(d_slots.data()), num_seqs, d_k.data(), d_v.data(), dg,
        d_append_ws.data(), d_append_ws.size(), stream->get()));
    MEMPIPE_RETURN_IF_ERROR(ScoreAndSelectGpu(q, cache, dg, table, config, sel, d_select_ws.data(),
                                              d_select_ws.size(), stream->get()));
    return SparseDecodeGpu(DecodeIo{d_q.data(), d_out.data(), dtype, num_seqs, heads, d}, cache,
                           table, pages, 1.0f / std::sqrt(static_cast<float>(d)),
                           d_decode_ws.data(), d_decode_ws.size(), stream->get());
  };
  absl::StatusOr<GpuGraph> graph = GpuGraph::Capture(stream->get(), step);
  ASSERT_TRUE(graph.ok()) << graph.status();

  std::vector<uint8_t> previous_out;
  for (int set = 0; set < 2; ++set) {
    // New inputs: each sequence appends one token (its next position, some starting a page).
    std::vector<int32_t> new_lens(num_seqs);
    std::vector<int64_t> slots(num_seqs);
    for (int s = 0; s < num_seqs; ++s) {
      const int pos = lens[s] - 40 + 17 * set + s;  // inside the table's pages
      new_lens[s] = pos + 1;
      slots[s] = f.Slot(s, pos);
    }
    RandomTensor qn(rng, dtype, num_seqs * heads * d), kn(rng, dtype, num_seqs * row),
        vn(rng, dtype, num_seqs * row);
    auto load_inputs = [&] {
      ASSERT_TRUE(d_cache.CopyFromHost(cache0.data(), cache0.size()).ok());
      ASSERT_TRUE(d_dg.CopyFromHost(dg0.data(), dg0.size()).ok());
      ASSERT_TRUE(d_lens.CopyFromHost(new_lens.data(), new_lens.size() * 4).ok());
      ASSERT_TRUE(d_slots.CopyFromHost(slots.data(), slots.size() * 8).ok());
      ASSERT_TRUE(d_q.CopyFromHost(qn.bytes.data(), qn.bytes.size()).ok());
      ASSERT_TRUE(d_k.CopyFromHost(kn.bytes.data(), kn.bytes.size()).ok());
      ASSERT_TRUE(d_v.CopyFromHost(vn.bytes.data(), vn.bytes.size()).ok());
    };
    auto results = [&] {
      std::vector<uint8_t> out = Download<uint8_t>(d_out, num_seqs * heads * d * 2);
      std::vector<uint8_t> cnt = Download<uint8_t>(d_cnt, num_seqs * kv_heads * 4);
      std::vector<uint8_t> sl = Download<uint8_t>(d_sel, num_seqs * kv_heads * max_sel * 4);
      std::vector<uint8_t> dgb = Download<uint8_t>(d_dg, dg0.size());
      out.insert(out.end(), cnt.begin(), cnt.end());
      out.insert(out.end(), sl.begin(), sl.end());
      out.insert(out.end(), dgb.begin(), dgb.end());
      return out;
    };
    load_inputs();
    ASSERT_TRUE(graph->Launch(stream->get()).ok());
    ASSERT_TRUE(stream->Synchronize().ok());
    const std::vector<uint8_t> replayed = results();
    load_inputs();
    ASSERT_TRUE(step().ok());
    ASSERT_TRUE(stream->Synchronize().ok());
    const std::vector<uint8_t> eager = results();
    EXPECT_EQ(replayed, eager) << "input set " << set;
    EXPECT_NE(replayed, previous_out) << "input set " << set << " gave the previous output";
    for (int i = 0; i < num_seqs * heads * d; ++i) {
      ASSERT_TRUE(std::isfinite(LoadAsFloat(replayed.data(), dtype, i))) << "out[" << i << "]";
    }
    previous_out = replayed;
  }
}

// GpuPageSelector against the CPU selector on the same layer: digests after a bulk build and
// an append, then two selections in flight at once, equal bit for bit; a bad request gets the
// CPU selector's error.
TEST(GpuPageSelectorTest, MatchesCpuSelector) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  const int bs = 16, kv_heads = 2, d = 128, group = 4;
  const std::vector<int> lens = {2000 + 3, 77, 900};
  const int num_seqs = static_cast<int>(lens.size());
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = kv_heads,
                       .head_dim = d,
                       .seq_lens = lens});
  const KvCacheView cache = f.cache_view();
  const CacheShape shape{cache.dtype, cache.num_blocks, bs, kv_heads, d};
  absl::StatusOr<std::unique_ptr<GpuPageSelector>> gpu = GpuPageSelector::Create();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  CpuPageSelector cpu;
  for (PageSelector* sel :
       {static_cast<PageSelector*>(gpu->get()), static_cast<PageSelector*>(&cpu)}) {
    ASSERT_TRUE(sel->AddLayer(3, shape).ok());
    ASSERT_TRUE(sel->BuildDigests(3, cache, f.table_view()).ok());
  }
  // Append: re-write 40 tokens of sequence 0 (a page start among them) with new keys.
  std::vector<int64_t> slots;
  for (int t = 1600; t < 1640; ++t) slots.push_back(f.Slot(0, t));
  RandomTensor keys(rng, DType::kBFloat16, slots.size() * kv_heads * d);
  ASSERT_TRUE(
      (*gpu)->AppendKeys(3, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
  ASSERT_TRUE(cpu.AppendKeys(3, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
  absl::StatusOr<DigestView> gdg = (*gpu)->DeviceDigests(3);
  absl::StatusOr<DigestView> cdg = cpu.Digests(3);
  ASSERT_TRUE(gdg.ok() && cdg.ok());
  ASSERT_TRUE(GpuSynchronize().ok());
  std::vector<uint8_t> got(cdg->NumBytes());
  ASSERT_TRUE(CopyToHostSync(got.data(), gdg->data, got.size(), (*gpu)->stream()).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), cdg->data, got.size()));

  RandomTensor q1(rng, DType::kBFloat16, num_seqs * kv_heads * group * d);
  RandomTensor q2(rng, DType::kBFloat16, num_seqs * kv_heads * group * d);
  const int max_sel = 10;
  const SelectionConfig config{.budget_tokens = 8 * bs, .num_sink_pages = 1, .num_local_pages = 2};
  auto request = [&](const RandomTensor& q, std::vector<int32_t>& sel, std::vector<int32_t>& cnt) {
    sel.assign(num_seqs * kv_heads * max_sel, 555);
    cnt.assign(num_seqs * kv_heads, 555);
    return SelectRequest{3, QueryView{q.data(), DType::kBFloat16, num_seqs, kv_heads * group, d},
                         f.table_view(), config,
                         SelectionView{sel.data(), cnt.data(), num_seqs, kv_heads, max_sel}};
  };
  std::vector<int32_t> gs1, gc1, gs2, gc2, cs1, cc1, cs2, cc2;
  absl::StatusOr<SelectTicket> t1 = (*gpu)->Submit(request(q1, gs1, gc1));
  absl::StatusOr<SelectTicket> t2 = (*gpu)->Submit(request(q2, gs2, gc2));
  ASSERT_TRUE(t1.ok() && t2.ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  ASSERT_TRUE((*gpu)->Wait(*t2, deadline).ok());
  ASSERT_TRUE((*gpu)->Wait(*t1, deadline).ok());
  for (auto [q, s, c] : {std::tuple(&q1, &cs1, &cc1), std::tuple(&q2, &cs2, &cc2)}) {
    absl::StatusOr<SelectTicket> t = cpu.Submit(request(*q, *s, *c));
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE(cpu.Wait(*t, deadline).ok());
  }
  EXPECT_EQ(gs1, cs1);
  EXPECT_EQ(gc1, cc1);
  EXPECT_EQ(gs2, cs2);
  EXPECT_EQ(gc2, cc2);
  EXPECT_NE(gs1, gs2);  // different queries choose differently (else the check proves little)

  SelectionConfig bad = config;
  bad.budget_tokens = 24;
  SelectRequest r = request(q1, gs1, gc1);
  r.config = bad;
  absl::StatusOr<SelectTicket> gbad = (*gpu)->Submit(r), cbad = cpu.Submit(r);
  ASSERT_TRUE(gbad.ok() && cbad.ok());
  const absl::Status gpu_error = (*gpu)->Wait(*gbad, deadline);
  EXPECT_FALSE(gpu_error.ok());
  EXPECT_EQ(gpu_error, cpu.Wait(*cbad, deadline));
  EXPECT_EQ((*gpu)->Wait(12345, deadline).code(), absl::StatusCode::kNotFound);
}

// The GPU selector with int8 digests (CacheShape::digest_format) equals the CPU selector's:
// digests after a build and an append, and selections.
TEST(GpuPageSelectorTest, Int8MatchesCpuSelector) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  const int bs = 16, kv_heads = 2, d = 128, group = 4;
  const std::vector<int> lens = {3000 + 5, 200, 1100};
  const int num_seqs = static_cast<int>(lens.size());
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = kv_heads,
                       .head_dim = d,
                       .seq_lens = lens});
  const KvCacheView cache = f.cache_view();
  CacheShape shape{cache.dtype, cache.num_blocks, bs, kv_heads, d};
  shape.digest_format = DigestFormat::kInt8;
  absl::StatusOr<std::unique_ptr<GpuPageSelector>> gpu = GpuPageSelector::Create();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  CpuPageSelector cpu;
  for (PageSelector* sel :
       {static_cast<PageSelector*>(gpu->get()), static_cast<PageSelector*>(&cpu)}) {
    ASSERT_TRUE(sel->AddLayer(1, shape).ok());
    ASSERT_TRUE(sel->BuildDigests(1, cache, f.table_view()).ok());
  }
  std::vector<int64_t> slots;
  for (int t = 2400; t < 2440; ++t) slots.push_back(f.Slot(0, t));
  RandomTensor keys(rng, DType::kBFloat16, slots.size() * kv_heads * d);
  ASSERT_TRUE(
      (*gpu)->AppendKeys(1, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
  ASSERT_TRUE(cpu.AppendKeys(1, slots.data(), static_cast<int>(slots.size()), keys.data()).ok());
  absl::StatusOr<DigestView> gdg = (*gpu)->DeviceDigests(1);
  absl::StatusOr<DigestView> cdg = cpu.Digests(1);
  ASSERT_TRUE(gdg.ok() && cdg.ok());
  ASSERT_EQ(gdg->format, DigestFormat::kInt8);
  ASSERT_TRUE(GpuSynchronize().ok());
  // Compare the pages in use (the selectors' unused blocks are uninitialized on the device).
  std::vector<int8_t> codes(cdg->NumElems());
  std::vector<float> scales(cdg->ScaleBytes() / sizeof(float));
  ASSERT_TRUE(CopyToHostSync(codes.data(), gdg->data, codes.size(), (*gpu)->stream()).ok());
  ASSERT_TRUE(CopyToHostSync(scales.data(), gdg->scales, scales.size() * 4, (*gpu)->stream()).ok());
  for (int s = 0; s < num_seqs; ++s) {
    for (int p = 0; p < NumPages(lens[s], bs); ++p) {
      const int b = f.Block(s, p);
      ASSERT_EQ(0, std::memcmp(codes.data() + cdg->Offset(b, 0, 0),
                               static_cast<int8_t*>(cdg->data) + cdg->Offset(b, 0, 0),
                               cdg->BlockStride()))
          << "seq " << s << " page " << p;
      ASSERT_EQ(0, std::memcmp(scales.data() + cdg->ScaleIndex(b, 0),
                               cdg->scales + cdg->ScaleIndex(b, 0), kv_heads * sizeof(float)));
    }
  }
  RandomTensor q(rng, DType::kBFloat16, num_seqs * kv_heads * group * d);
  const int max_sel = 12;
  const SelectionConfig config{.budget_tokens = 10 * bs, .num_sink_pages = 1, .num_local_pages = 2};
  std::vector<int32_t> gs(num_seqs * kv_heads * max_sel, 5), gc(num_seqs * kv_heads, 5),
      cs(gs.size(), 6), cc(gc.size(), 6);
  const QueryView qv{q.data(), DType::kBFloat16, num_seqs, kv_heads * group, d};
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  absl::StatusOr<SelectTicket> tg =
      (*gpu)->Submit({1, qv, f.table_view(), config,
                      SelectionView{gs.data(), gc.data(), num_seqs, kv_heads, max_sel}});
  absl::StatusOr<SelectTicket> tc =
      cpu.Submit({1, qv, f.table_view(), config,
                  SelectionView{cs.data(), cc.data(), num_seqs, kv_heads, max_sel}});
  ASSERT_TRUE(tg.ok() && tc.ok());
  ASSERT_TRUE((*gpu)->Wait(*tg, deadline).ok());
  ASSERT_TRUE(cpu.Wait(*tc, deadline).ok());
  EXPECT_EQ(gs, cs);
  EXPECT_EQ(gc, cc);
}

// One validation for every device (issue 14 item 7). The aggregation code is a host value:
// the GPU launchers refuse a bad one with the CPU's message, GPU or not.
TEST(GpuKernelErrors, AggregationCheckedLikeTheCpu) {
  alignas(16) static uint8_t buf[4096];
  int32_t table[1] = {0}, lens[1] = {1};
  const KvCacheView cache{buf, DType::kBFloat16, 1, 16, 1, 64};
  const BlockTableView tv{table, lens, 1, 1};
  const DigestView dg{buf, DType::kBFloat16, 1, 1, 64};
  const QueryView q{buf, DType::kBFloat16, 1, 1, 64};
  const auto bad = static_cast<GroupAggregation>(7);
  const absl::Status cpu = ValidateGroupAggregation(bad);
  ASSERT_FALSE(cpu.ok());
  absl::Status s =
      ComputeRelevancyGpu(q, cache, dg, tv, bad, reinterpret_cast<float*>(buf), nullptr);
  EXPECT_EQ(s, cpu);
  const SelectionConfig config{.budget_tokens = 64, .aggregation = bad};
  int32_t sel[4], cnt[1];
  s = ScoreAndSelectGpu(q, cache, dg, tv, config, SelectionView{sel, cnt, 1, 1, 4}, buf,
                        sizeof(buf), nullptr);
  EXPECT_EQ(s, cpu);
}

// Device-resident tables and selections: the checked mode gives exactly the CPU's verdict (a
// seq_len past the block table, a block id outside the cache, a selection out of order), and
// passes a valid request.
TEST(GpuKernelErrors, CheckedModeMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = 16,
                       .num_kv_heads = 2,
                       .head_dim = 64,
                       .seq_lens = {70, 33}});
  const KvCacheView cache = f.cache_view();
  DeviceBuffer d_q = Upload(std::vector<uint8_t>(2 * 4 * 64 * 2, 0));
  DeviceBuffer d_out = Upload(std::vector<uint8_t>(2 * 4 * 64 * 2, 0));
  const DecodeIo io{d_q.data(), d_out.data(), DType::kBFloat16, 2, 4, 64};
  const DecodeIo host_io{cache.data, cache.data, DType::kBFloat16, 2, 4, 64};
  auto verdicts = [&](const std::vector<int32_t>& table, const std::vector<int32_t>& lens,
                      const std::vector<int32_t>* sel, const std::vector<int32_t>* cnt) {
    const int max_blocks = static_cast<int>(table.size() / 2);
    DeviceBuffer d_table = Upload(table), d_lens = Upload(lens);
    const BlockTableView dtv{static_cast<const int32_t*>(d_table.data()),
                             static_cast<const int32_t*>(d_lens.data()), 2, max_blocks};
    const BlockTableView htv{table.data(), lens.data(), 2, max_blocks};
    absl::Status want = ValidateDecodeIo(host_io, cache, htv);
    absl::Status got;
    if (sel == nullptr) {
      got = ValidateDecodeInputsGpu(io, cache, dtv, nullptr, nullptr);
    } else {
      const int max_sel = static_cast<int>(sel->size() / 4);
      if (want.ok())
        want = ValidatePageList(PageList{sel->data(), cnt->data(), 2, max_sel}, htv, cache);
      DeviceBuffer d_sel = Upload(*sel), d_cnt = Upload(*cnt);
      const PageList dpl{static_cast<const int32_t*>(d_sel.data()),
                         static_cast<const int32_t*>(d_cnt.data()), 2, max_sel};
      got = ValidateDecodeInputsGpu(io, cache, dtv, &dpl, nullptr);
    }
    return std::make_pair(got, want);
  };
  const BlockTableView ftv = f.table_view();
  std::vector<int32_t> table(ftv.block_table, ftv.block_table + 2 * ftv.max_blocks_per_seq);
  std::vector<int32_t> lens = {70, 33};
  auto [ok_got, ok_want] = verdicts(table, lens, nullptr, nullptr);
  EXPECT_TRUE(ok_want.ok()) << ok_want;
  EXPECT_EQ(ok_got, ok_want);

  std::vector<int32_t> long_lens = {70, 16 * ftv.max_blocks_per_seq + 1};  // past the table
  auto [len_got, len_want] = verdicts(table, long_lens, nullptr, nullptr);
  EXPECT_FALSE(len_want.ok());
  EXPECT_EQ(len_got, len_want);

  std::vector<int32_t> bad_table = table;
  bad_table[1] = cache.num_blocks;  // sequence 0, page 1: outside the cache
  auto [blk_got, blk_want] = verdicts(bad_table, lens, nullptr, nullptr);
  EXPECT_FALSE(blk_want.ok());
  EXPECT_EQ(blk_got, blk_want);

  // Selection [seq][kv head][2]: ascending lists pass, a descending one fails.
  std::vector<int32_t> sel = {0, 4, 1, 2, 0, 2, 1, 2}, cnt = {2, 2, 2, 1};
  auto [sel_got, sel_want] = verdicts(table, lens, &sel, &cnt);
  EXPECT_TRUE(sel_want.ok()) << sel_want;
  EXPECT_EQ(sel_got, sel_want);
  sel[3] = 0;  // [0][1] = {1, 0}
  auto [bad_got, bad_want] = verdicts(table, lens, &sel, &cnt);
  EXPECT_FALSE(bad_want.ok());
  EXPECT_EQ(bad_got, bad_want);
}

TEST(GpuKernelErrors, NameTheBadValue) {
  // Host-side checks run before any device call, so they hold without a GPU too.
  alignas(16) static uint8_t buf[4096];
  int32_t table[1] = {0}, lens[1] = {1};
  KvCacheView cache{buf, DType::kBFloat16, 1, 16, 1, 128};
  const BlockTableView tv{table, lens, 1, 1};
  DecodeIo io{buf, buf, DType::kBFloat16, 1, 9, 128};  // group 9: no model has it
  absl::Status s = DenseDecodeGpu(io, cache, tv, 1.0f, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("got 9"), std::string::npos) << s;

  cache.head_dim = 96;
  io.head_dim = 96;
  s = DenseDecodeGpu(io, cache, tv, 1.0f, nullptr, 0, nullptr);
  EXPECT_NE(s.message().find("96"), std::string::npos) << s;

  cache.head_dim = 128;
  io.head_dim = 128;
  io.num_heads = 1;
  io.query = buf + 2;
  s = DenseDecodeGpu(io, cache, tv, 1.0f, nullptr, 0, nullptr);
  EXPECT_NE(s.message().find("aligned"), std::string::npos) << s;

  cache.block_size = 48;
  s = BuildDigestsGpu(cache, tv, DigestView{buf, DType::kBFloat16, 1, 1, 128}, nullptr);
  EXPECT_NE(s.message().find("48"), std::string::npos) << s;

  cache.block_size = 16;
  const SelectionConfig bad{.budget_tokens = 24};
  int32_t sel[4], cnt[1];
  s = SelectPagesGpu(reinterpret_cast<const float*>(buf), tv, 16, 1, bad,
                     SelectionView{sel, cnt, 1, 1, 4}, nullptr);
  EXPECT_NE(s.message().find("24"), std::string::npos) << s;
}

}  // namespace
}  // namespace mempipe
