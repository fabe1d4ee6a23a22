#include "attention/decode.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "retriever/select.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::AttentionTolerance;
using testing::PagedFixture;
using testing::RandomTensor;
using testing::ReferenceAttention;
using testing::TestSeed;

// Parameters: dtype, block size, head_dim, GQA group size, host kernel (decode.h), cache layout.
class DecodeTest
    : public ::testing::TestWithParam<std::tuple<DType, int, int, int, CpuKernel, KvLayout>> {
 protected:
  void SetUp() override {
    CpuKernel kernel;
    std::tie(dtype_, block_size_, head_dim_, group_, kernel, layout_) = GetParam();
    if (!CpuKernelAvailable(kernel)) GTEST_SKIP() << "this CPU lacks the kernel's instructions";
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    rng_.seed(TestSeed());
    std::uniform_int_distribution<int> len_dist(1, 12 * block_size_);
    lens_ = {len_dist(rng_), 1, block_size_, len_dist(rng_) + block_size_};
    f_ = std::make_unique<PagedFixture>(rng_, testing::FixtureSpec{.dtype = dtype_,
                                                                   .block_size = block_size_,
                                                                   .num_kv_heads = kKvHeads,
                                                                   .head_dim = head_dim_,
                                                                   .seq_lens = lens_,
                                                                   .layout = layout_});
    heads_ = kKvHeads * group_;
    q_ = std::make_unique<RandomTensor>(rng_, dtype_, lens_.size() * heads_ * head_dim_);
    scale_ = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  }
  void TearDown() override {
    SetDecodeReadAhead(DecodeReadAhead::kStream);
    ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
  }

  // The outputs of decode(io) under both read-ahead schemes at 1, 2 and 3 threads, in that order
  // (a failed call fails the test and ends the list).
  template <typename Decode>
  std::vector<std::vector<uint8_t>> EachSchemeAndThreadCount(Decode decode) {
    std::vector<std::vector<uint8_t>> outs;
    for (DecodeReadAhead mode : {DecodeReadAhead::kStream, DecodeReadAhead::kNextPage}) {
      SetDecodeReadAhead(mode);
      for (int threads : {1, 2, 3}) {
        outs.push_back(PoisonedOut());
        DecodeIo io = Io(outs.back());
        io.num_threads = threads;
        const absl::Status st = decode(io);
        EXPECT_TRUE(st.ok()) << st;
        if (!st.ok()) return outs;
      }
    }
    return outs;
  }

  // Output buffer poisoned with NaN so an unwritten element shows.
  std::vector<uint8_t> PoisonedOut() const {
    std::vector<uint8_t> out(lens_.size() * heads_ * head_dim_ * DTypeSize(dtype_));
    for (size_t i = 0; i < lens_.size() * heads_ * head_dim_; ++i) {
      StoreFromFloat(out.data(), dtype_, i, NAN);
    }
    return out;
  }

  DecodeIo Io(std::vector<uint8_t>& out) const {
    return DecodeIo{q_->data(), out.data(), dtype_, static_cast<int>(lens_.size()),
                    heads_,     head_dim_};
  }

  // Every output row against float64 attention over `tokens_of(s, kv_head)`.
  template <typename TokensOf>
  void ExpectMatchesReference(const std::vector<uint8_t>& out, TokensOf tokens_of) const {
    for (int s = 0; s < static_cast<int>(lens_.size()); ++s) {
      for (int h = 0; h < heads_; ++h) {
        const int kvh = h / group_;
        const std::vector<int> tokens = tokens_of(s, kvh);
        const auto ref = ReferenceAttention(*f_, &q_->values[(s * heads_ + h) * head_dim_], s, kvh,
                                            tokens, scale_);
        for (int c = 0; c < head_dim_; ++c) {
          const float got = LoadAsFloat(out.data(), dtype_, (s * heads_ + h) * head_dim_ + c);
          ASSERT_TRUE(std::isfinite(got)) << "seq " << s << " head " << h << " c " << c;
          ASSERT_NEAR(
              got, ref[c],
              AttentionTolerance(dtype_, ref[c], static_cast<int>(tokens.size()), head_dim_))
              << "seq " << s << " head " << h << " c " << c;
        }
      }
    }
  }

  static constexpr int kKvHeads = 2;
  DType dtype_;
  KvLayout layout_;
  int block_size_, head_dim_, group_, heads_;
  float scale_;
  std::mt19937_64 rng_;
  std::vector<int> lens_;
  std::unique_ptr<PagedFixture> f_;
  std::unique_ptr<RandomTensor> q_;
};

std::vector<int> Range(int n) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

// Under both of the AVX-512 kernel's prefetch schemes (DecodeReadAhead; the other kernels ignore
// it).
TEST_P(DecodeTest, DenseMatchesFloat64Reference) {
  for (DecodeReadAhead mode : {DecodeReadAhead::kStream, DecodeReadAhead::kNextPage}) {
    SCOPED_TRACE(DecodeReadAheadName(mode));
    SetDecodeReadAhead(mode);
    auto out = PoisonedOut();
    ASSERT_TRUE(DenseDecode(Io(out), f_->cache_view(), f_->table_view(), scale_).ok());
    ExpectMatchesReference(out, [&](int s, int) { return Range(lens_[s]); });
  }
}

// 1, 2 and 3 threads (ranges of one KV head, or several, per thread) under both prefetch schemes:
// a prefetch reads nothing into the result, so the outputs are equal bit for bit.
TEST_P(DecodeTest, ThreadsSplitWorkWithoutChangingResults) {
  const auto outs = EachSchemeAndThreadCount([&](const DecodeIo& io) {
    return DenseDecode(io, f_->cache_view(), f_->table_view(), scale_);
  });
  for (size_t i = 1; i < outs.size(); ++i) EXPECT_EQ(outs[0], outs[i]) << "run " << i;
}

TEST_P(DecodeTest, SparseOverEveryPageEqualsDense) {
  const int max_pages = f_->max_blocks();
  std::vector<int32_t> pages(lens_.size() * kKvHeads * max_pages, -1),
      counts(lens_.size() * kKvHeads);
  for (size_t s = 0; s < lens_.size(); ++s) {
    for (int h = 0; h < kKvHeads; ++h) {
      counts[s * kKvHeads + h] = NumPages(lens_[s], block_size_);
      for (int p = 0; p < counts[s * kKvHeads + h]; ++p)
        pages[(s * kKvHeads + h) * max_pages + p] = p;
    }
  }
  auto dense = PoisonedOut(), sparse = PoisonedOut();
  ASSERT_TRUE(DenseDecode(Io(dense), f_->cache_view(), f_->table_view(), scale_).ok());
  ASSERT_TRUE(SparseDecode(Io(sparse), f_->cache_view(), f_->table_view(),
                           {pages.data(), counts.data(), kKvHeads, max_pages}, scale_)
                  .ok());
  EXPECT_EQ(dense, sparse);  // same pages, same order: bit-identical
}

// Random selections with a different count for every (sequence, KV head): the output is the
// same on 1, 2 and 3 threads (each thread's range of items, and its prefetch across them,
// differs) and matches the reference over the selected tokens.
TEST_P(DecodeTest, SparseUnevenSelectionsAnyThreadCountMatchReference) {
  const int max_pages = f_->max_blocks();
  std::vector<int32_t> pages(lens_.size() * kKvHeads * max_pages, -1),
      counts(lens_.size() * kKvHeads);
  for (size_t s = 0; s < lens_.size(); ++s) {
    const int n = NumPages(lens_[s], block_size_);
    for (int h = 0; h < kKvHeads; ++h) {
      std::vector<int32_t> all(n);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng_);
      const int c = std::uniform_int_distribution<int>(1, n)(rng_);
      std::sort(all.begin(), all.begin() + c);
      counts[s * kKvHeads + h] = c;
      std::copy(all.begin(), all.begin() + c, &pages[(s * kKvHeads + h) * max_pages]);
    }
  }
  const PageList list{pages.data(), counts.data(), kKvHeads, max_pages};
  // Both of the AVX-512 kernel's prefetch schemes (DecodeReadAhead; the others ignore it): a
  // prefetch reads nothing into the result, so the outputs are equal bit for bit.
  const auto outs = EachSchemeAndThreadCount([&](const DecodeIo& io) {
    return SparseDecode(io, f_->cache_view(), f_->table_view(), list, scale_);
  });
  for (size_t i = 1; i < outs.size(); ++i) EXPECT_EQ(outs[0], outs[i]) << "run " << i;
  ExpectMatchesReference(outs[0], [&](int s, int kvh) {
    std::vector<int> tokens;
    const size_t row = static_cast<size_t>(s) * kKvHeads + kvh;
    for (int i = 0; i < counts[row]; ++i) {
      const int p = pages[row * max_pages + i];
      for (int t = p * block_size_; t < std::min(lens_[s], (p + 1) * block_size_); ++t) {
        tokens.push_back(t);
      }
    }
    return tokens;
  });
}

// The benchmarks' read-only twin of the kernels: runs where the AVX-512 or AVX2 kernel is active
// (dense and sparse, several threads) and writes no output; refused, naming the kernel, elsewhere.
TEST_P(DecodeTest, ReadDecodeRowsRunsOnlyWithAVectorKernelAndWritesNothing) {
  std::vector<int32_t> pages(lens_.size() * kKvHeads), counts(lens_.size() * kKvHeads, 1);
  for (size_t s = 0; s < lens_.size(); ++s) {
    for (int h = 0; h < kKvHeads; ++h)
      pages[s * kKvHeads + h] = NumPages(lens_[s], block_size_) - 1;
  }
  const PageList list{pages.data(), counts.data(), kKvHeads, 1};
  auto out = PoisonedOut();
  const auto poisoned = out;
  DecodeIo io = Io(out);
  io.num_threads = 3;
  for (DecodeReadAhead mode : {DecodeReadAhead::kStream, DecodeReadAhead::kNextPage}) {
    SetDecodeReadAhead(mode);
    for (const PageList* p : {static_cast<const PageList*>(nullptr), &list}) {
      const absl::Status st = ReadDecodeRows(io, f_->cache_view(), f_->table_view(), p);
      if (UseAvx512Kernel() || UseAvx2Kernel()) {
        EXPECT_TRUE(st.ok()) << st;
      } else {
        EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
        EXPECT_NE(st.message().find("portable"), absl::string_view::npos) << st;
      }
    }
  }
  EXPECT_EQ(out, poisoned);
}

TEST_P(DecodeTest, SparseOverSelectionMatchesReferenceOnThoseTokens) {
  ASSERT_TRUE(BuildDigests(f_->cache_view(), f_->table_view(), f_->digest_view()).ok());
  SelectionConfig cfg;
  cfg.budget_tokens = 4 * block_size_;
  const int k = 4;
  std::vector<int32_t> pages(lens_.size() * kKvHeads * k), counts(lens_.size() * kKvHeads);
  const SelectionView sel{pages.data(), counts.data(), static_cast<int>(lens_.size()), kKvHeads, k};
  ASSERT_TRUE(
      ScoreAndSelect({q_->data(), dtype_, static_cast<int>(lens_.size()), heads_, head_dim_},
                     f_->cache_view(), f_->digest_view(), f_->table_view(), cfg, sel)
          .ok());
  auto out = PoisonedOut();
  ASSERT_TRUE(SparseDecode(Io(out), f_->cache_view(), f_->table_view(),
                           {pages.data(), counts.data(), kKvHeads, k}, scale_)
                  .ok());
  ExpectMatchesReference(out, [&](int s, int kvh) {
    std::vector<int> tokens;
    for (int i = 0; i < sel.Count(s, kvh); ++i) {
      const int p = sel.Row(s, kvh)[i];
      for (int t = p * block_size_; t < std::min(lens_[s], (p + 1) * block_size_); ++t) {
        tokens.push_back(t);
      }
    }
    return tokens;
  });
}

TEST_P(DecodeTest, PrefillIsCausal) {
  // The last q_len tokens of each sequence attend causally.
  std::vector<int32_t> qsl = {0};
  std::vector<int> q_lens;
  for (int len : lens_) {
    q_lens.push_back(std::min(len, 3));
    qsl.push_back(qsl.back() + q_lens.back());
  }
  const int tokens = qsl.back();
  RandomTensor q(rng_, dtype_, static_cast<size_t>(tokens) * heads_ * head_dim_);
  std::vector<uint8_t> out(static_cast<size_t>(tokens) * heads_ * head_dim_ * DTypeSize(dtype_));
  for (size_t i = 0; i < static_cast<size_t>(tokens) * heads_ * head_dim_; ++i) {
    StoreFromFloat(out.data(), dtype_, i, NAN);
  }
  ASSERT_TRUE(PrefillAttention({q.data(), out.data(), dtype_, tokens, heads_, head_dim_},
                               qsl.data(), f_->cache_view(), f_->table_view(), scale_)
                  .ok());
  // Threads split (token, KV head) pairs without changing a bit.
  std::vector<uint8_t> threaded(out.size());
  ASSERT_TRUE(PrefillAttention({q.data(), threaded.data(), dtype_, tokens, heads_, head_dim_, 3},
                               qsl.data(), f_->cache_view(), f_->table_view(), scale_)
                  .ok());
  EXPECT_EQ(out, threaded);
  for (size_t s = 0; s < lens_.size(); ++s) {
    for (int i = 0; i < q_lens[s]; ++i) {
      const int row = qsl[s] + i;
      const int pos = lens_[s] - q_lens[s] + i;
      for (int h = 0; h < heads_; ++h) {
        const auto ref = ReferenceAttention(*f_, &q.values[(row * heads_ + h) * head_dim_], s,
                                            h / group_, Range(pos + 1), scale_);
        for (int c = 0; c < head_dim_; ++c) {
          ASSERT_NEAR(LoadAsFloat(out.data(), dtype_, (row * heads_ + h) * head_dim_ + c), ref[c],
                      AttentionTolerance(dtype_, ref[c], pos + 1, head_dim_));
        }
      }
    }
  }
}

// Test names say the shape, e.g. Shapes/DecodeTest.DenseMatchesFloat64Reference/
// bf16_page16_d128_g3_avx512_bf16: .ci/test selects the TSan run's shapes by them.
std::string ShapeName(const ::testing::TestParamInfo<DecodeTest::ParamType>& info) {
  const auto& [dtype, block_size, head_dim, group, kernel, layout] = info.param;
  std::string kernel_name(CpuKernelName(kernel));
  std::replace(kernel_name.begin(), kernel_name.end(), '-', '_');
  return absl::StrCat(DTypeName(dtype), "_page", block_size, "_d", head_dim, "_g", group, "_",
                      kernel_name);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DecodeTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 32, 64), ::testing::Values(64, 128, 256),
                       ::testing::Values(1, 3, 6),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512,
                                         CpuKernel::kAvx512Bf16, CpuKernel::kAvx2),
                       ::testing::Values(KvLayout::kTokenMajor)),
    ShapeName);

// The head-major layout (each KV head's page contiguous) through the same checks: every kernel,
// dtype and page size; the head dims and groups that exercise the kernels' distinct paths.
INSTANTIATE_TEST_SUITE_P(
    HeadMajor, DecodeTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 32, 64), ::testing::Values(64, 128),
                       ::testing::Values(1, 6),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512,
                                         CpuKernel::kAvx512Bf16, CpuKernel::kAvx2),
                       ::testing::Values(KvLayout::kHeadMajor)),
    ShapeName);

// Head-major with transposed K pages (head_kt): the AVX-512 kernel's own scores over the
// transposed pages (fp32, fp16 and widened bf16, and vdpbf16ps for avx512-bf16), the portable
// kernel's element reads, the AVX2 kernel's un-transposed rows; every page size (one or two
// vectors of tokens per pass, and two passes at 64), and groups of 1, 3 and 6 (the scores' H of
// 1, 3, 4 and 2).
INSTANTIATE_TEST_SUITE_P(
    HeadMajorKT, DecodeTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 32, 64), ::testing::Values(64, 128),
                       ::testing::Values(1, 3, 6),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512,
                                         CpuKernel::kAvx512Bf16, CpuKernel::kAvx2),
                       ::testing::Values(KvLayout::kHeadMajorKT)),
    ShapeName);

// Page-major with transposed K pages (page_kt): head_kt's pages at page-major's places.
INSTANTIATE_TEST_SUITE_P(
    PageMajorKT, DecodeTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 64), ::testing::Values(64), ::testing::Values(1, 6),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512,
                                         CpuKernel::kAvx512Bf16, CpuKernel::kAvx2),
                       ::testing::Values(KvLayout::kPageMajorKT)),
    ShapeName);

// The page-major layout (a KV head's K page and V page one piece): the offsets differ from
// head-major's only in the block, KV head and K-to-V strides, so fewer shapes.
INSTANTIATE_TEST_SUITE_P(
    PageMajor, DecodeTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 64), ::testing::Values(64), ::testing::Values(1, 6),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512,
                                         CpuKernel::kAvx512Bf16, CpuKernel::kAvx2),
                       ::testing::Values(KvLayout::kPageMajor)),
    ShapeName);

// The derived tolerance rejects known-wrong answers (issue 14): the dense output of a
// 5,120-token bf16 sequence against the reference with one 64-token page dropped, and an
// all-zero output, each fail the element check that the correct output passes.
TEST(DecodeTolerance, RejectsADroppedPageAndAZeroedOutput) {
  std::mt19937_64 rng(TestSeed());
  const int len = 5120, bs = 64, d = 128, kv = 2, heads = 2;
  PagedFixture f(rng, {.dtype = DType::kBFloat16,
                       .block_size = bs,
                       .num_kv_heads = kv,
                       .head_dim = d,
                       .seq_lens = {len}});
  RandomTensor q(rng, DType::kBFloat16, heads * d);
  std::vector<uint8_t> out(heads * d * 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_TRUE(DenseDecode({q.data(), out.data(), DType::kBFloat16, 1, heads, d}, f.cache_view(),
                          f.table_view(), scale)
                  .ok());
  std::vector<int> all = Range(len), dropped;
  for (int t : all) {
    if (t / bs != 40) dropped.push_back(t);  // page 40 of 80
  }
  // How many elements fail the check of `got` against attention over `tokens`.
  auto failures = [&](const std::vector<int>& tokens, bool zeroed) {
    int n = 0;
    for (int h = 0; h < heads; ++h) {
      const auto ref = ReferenceAttention(f, &q.values[h * d], 0, h, tokens, scale);
      for (int c = 0; c < d; ++c) {
        const double got = zeroed ? 0.0 : LoadAsFloat(out.data(), DType::kBFloat16, h * d + c);
        n += std::abs(got - ref[c]) >
             AttentionTolerance(DType::kBFloat16, ref[c], static_cast<int>(tokens.size()), d);
      }
    }
    return n;
  };
  EXPECT_EQ(failures(all, false), 0) << "the correct output must pass";
  EXPECT_GT(failures(dropped, false), 0) << "a dropped page must fail the check";
  EXPECT_GT(failures(all, true), 0) << "a zeroed output must fail the check";
  // For the record: how many elements the former fixed bf16 bound (3e-2) would have caught.
  int old_failures = 0;
  for (int h = 0; h < heads; ++h) {
    const auto ref = ReferenceAttention(f, &q.values[h * d], 0, h, dropped, scale);
    for (int c = 0; c < d; ++c) {
      old_failures += std::abs(LoadAsFloat(out.data(), DType::kBFloat16, h * d + c) - ref[c]) >
                      3e-2;  // the former fixed bf16 bound
    }
  }
  std::cout << "dropped page: " << failures(dropped, false) << " of " << heads * d
            << " elements fail the derived check, " << old_failures << " the former 3e-2 bound\n";
}

// Sequences longer than one chunk (decode.h: kDecodeChunkTokens = 512 tokens of pages) are split
// into chunks, attended separately and combined. Dense and sparse, with KV heads of uneven
// selections (one head's later chunks are empty), against the float64 reference, for 1 and 3
// threads (bit-identical); and the check rejects the same output measured against a reference that
// drops one chunk's tokens.
TEST(DecodeChunks, LongSequencesCombineChunksExactlyOnce) {
  for (CpuKernel kernel :
       {CpuKernel::kPortable, CpuKernel::kAvx512, CpuKernel::kAvx512Bf16, CpuKernel::kAvx2}) {
    if (!CpuKernelAvailable(kernel)) continue;
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    for (auto [dtype, layout] : {std::pair{DType::kFloat32, KvLayout::kTokenMajor},
                                 std::pair{DType::kBFloat16, KvLayout::kTokenMajor},
                                 std::pair{DType::kBFloat16, KvLayout::kHeadMajor},
                                 std::pair{DType::kFloat32, KvLayout::kPageMajor}}) {
      SCOPED_TRACE(::testing::Message() << "kernel " << ActiveCpuKernelName() << " dtype "
                                        << DTypeName(dtype) << " layout " << KvLayoutName(layout));
      std::mt19937_64 rng(TestSeed());
      const int bs = 16, kv = 2, group = 3, heads = kv * group, d = 64;
      const std::vector<int> lens = {2100, 700, 40};  // 5, 2 and 1 chunks of 32 pages
      PagedFixture f(rng, {.dtype = dtype,
                           .block_size = bs,
                           .num_kv_heads = kv,
                           .head_dim = d,
                           .seq_lens = lens,
                           .layout = layout});
      RandomTensor q(rng, dtype, lens.size() * heads * d);
      const float scale = 0.125f;
      // KV head 0 attends to every page but the fifth; KV head 1 to the first two pages only.
      const int max_pages = f.max_blocks();
      std::vector<int32_t> pages(lens.size() * kv * max_pages, -1), counts(lens.size() * kv);
      auto tokens_of = [&](int s, int h, int skip_from, int skip_to) {
        std::vector<int> tokens;
        for (int i = 0; i < counts[s * kv + h]; ++i) {
          const int p = pages[(s * kv + h) * max_pages + i];
          for (int t = p * bs; t < std::min(lens[s], (p + 1) * bs); ++t) {
            if (t < skip_from || t >= skip_to) tokens.push_back(t);
          }
        }
        return tokens;
      };
      for (size_t s = 0; s < lens.size(); ++s) {
        const int n = NumPages(lens[s], bs);
        int c = 0;
        for (int p = 0; p < n; ++p) {
          if (p != 4 || n == 1) pages[(s * kv) * max_pages + c++] = p;
        }
        counts[s * kv] = c;
        counts[s * kv + 1] = std::min(n, 2);
        for (int i = 0; i < counts[s * kv + 1]; ++i) pages[(s * kv + 1) * max_pages + i] = i;
      }
      const PageList list{pages.data(), counts.data(), kv, max_pages};
      std::vector<uint8_t> out(q.bytes.size()), out3(q.bytes.size());
      for (int sparse = 0; sparse < 2; ++sparse) {
        for (auto* o : {&out, &out3}) {
          for (size_t i = 0; i < q.values.size(); ++i) StoreFromFloat(o->data(), dtype, i, NAN);
          DecodeIo io{q.data(), o->data(),        dtype, static_cast<int>(lens.size()), heads,
                      d,        o == &out ? 1 : 3};
          ASSERT_TRUE((sparse ? SparseDecode(io, f.cache_view(), f.table_view(), list, scale)
                              : DenseDecode(io, f.cache_view(), f.table_view(), scale))
                          .ok());
        }
        EXPECT_EQ(out, out3) << "sparse " << sparse;
        int wrong_checked = 0;  // outputs whose tokens include the dropped chunk
        for (int s = 0; s < static_cast<int>(lens.size()); ++s) {
          for (int h = 0; h < heads; ++h) {
            const int kvh = h / group;
            const auto tokens = sparse ? tokens_of(s, kvh, 0, 0) : Range(lens[s]);
            const auto ref =
                ReferenceAttention(f, &q.values[(s * heads + h) * d], s, kvh, tokens, scale);
            // The same output against a reference without the second chunk (tokens 512-1023).
            std::vector<int> dropped;
            for (int t : tokens) {
              if (t < 512 || t >= 1024) dropped.push_back(t);
            }
            const auto bad =
                ReferenceAttention(f, &q.values[(s * heads + h) * d], s, kvh, dropped, scale);
            bool rejected = false;
            for (int c = 0; c < d; ++c) {
              const float got = LoadAsFloat(out.data(), dtype, (s * heads + h) * d + c);
              const int n = static_cast<int>(tokens.size());
              ASSERT_NEAR(got, ref[c], AttentionTolerance(dtype, ref[c], n, d))
                  << "sparse " << sparse << " seq " << s << " head " << h << " c " << c;
              rejected |= std::abs(got - bad[c]) > AttentionTolerance(dtype, bad[c], n, d);
            }
            if (dropped.size() < tokens.size()) {
              ++wrong_checked;
              EXPECT_TRUE(rejected) << "sparse " << sparse << " seq " << s << " head " << h;
            }
          }
        }
        EXPECT_GT(wrong_checked, 0);
      }
    }
  }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
}

// The layout is read, not assumed: a head-major cache decoded as if it were token-major, and a
// head_kt cache as if it were head-major (the same bytes, K pages not transposed), fail the
// reference check that the right view passes, for every kernel, dense and sparse.
TEST(DecodeLayout, ACacheReadInAnotherLayoutFailsTheCheck) {
  for (auto [layout, wrong_layout] : {std::pair{KvLayout::kHeadMajor, KvLayout::kTokenMajor},
                                      std::pair{KvLayout::kHeadMajorKT, KvLayout::kHeadMajor}})
    for (CpuKernel kernel :
         {CpuKernel::kPortable, CpuKernel::kAvx512, CpuKernel::kAvx512Bf16, CpuKernel::kAvx2}) {
      if (!CpuKernelAvailable(kernel)) continue;
      ASSERT_TRUE(SetCpuKernel(kernel).ok());
      SCOPED_TRACE(absl::StrCat(ActiveCpuKernelName(), " ", KvLayoutName(layout)));
      std::mt19937_64 rng(TestSeed());
      const int bs = 16, kv = 4, d = 64, len = 300;
      PagedFixture f(rng, {.dtype = DType::kFloat32,
                           .block_size = bs,
                           .num_kv_heads = kv,
                           .head_dim = d,
                           .seq_lens = {len},
                           .layout = layout});
      RandomTensor q(rng, DType::kFloat32, kv * d);
      const float scale = 0.125f;
      std::vector<int32_t> pages(kv * 3), counts(kv, 3);
      for (int h = 0; h < kv; ++h) {
        for (int i = 0; i < 3; ++i) pages[h * 3 + i] = 2 * i + h % 2;
      }
      for (int sparse = 0; sparse < 2; ++sparse) {
        auto failures = [&](const KvCacheView& cache) {
          std::vector<float> out(kv * d, NAN);
          DecodeIo io{q.data(), out.data(), DType::kFloat32, 1, kv, d};
          const absl::Status st = sparse ? SparseDecode(io, cache, f.table_view(),
                                                        {pages.data(), counts.data(), kv, 3}, scale)
                                         : DenseDecode(io, cache, f.table_view(), scale);
          EXPECT_TRUE(st.ok()) << st;
          int n = 0;
          for (int h = 0; h < kv; ++h) {
            std::vector<int> tokens;
            for (int t = 0; t < len; ++t) {
              const int p = t / bs;
              if (!sparse || (p % 2 == h % 2 && p / 2 < 3)) tokens.push_back(t);
            }
            const auto ref = ReferenceAttention(f, &q.values[h * d], 0, h, tokens, scale);
            for (int c = 0; c < d; ++c) {
              n += !(
                  std::abs(out[h * d + c] - ref[c]) <=
                  AttentionTolerance(DType::kFloat32, ref[c], static_cast<int>(tokens.size()), d));
            }
          }
          return n;
        };
        KvCacheView wrong = f.cache_view();
        wrong.layout = wrong_layout;
        EXPECT_EQ(failures(f.cache_view()), 0) << "sparse " << sparse;
        EXPECT_GT(failures(wrong), kv * d / 2) << "sparse " << sparse;
      }
    }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
}

TEST(DecodeErrors, NameTheBadValue) {
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.seq_lens = {40, 20}});
  std::vector<float> q(2 * 4 * 64, 0.1f), out(2 * 4 * 64);
  DecodeIo io{q.data(), out.data(), DType::kFloat32, 2, 4, 64};
  auto expect_bad = [](absl::Status s, const std::string& needle) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << s;
  };
  KvCacheView cache = f.cache_view();
  cache.head_dim = 96;
  expect_bad(DenseDecode(io, cache, f.table_view(), 1.0f), "got 96");
  cache = f.cache_view();
  cache.block_size = 48;
  expect_bad(DenseDecode(io, cache, f.table_view(), 1.0f), "got 48");
  DecodeIo three = io;
  three.num_seqs = 3;
  expect_bad(DenseDecode(three, f.cache_view(), f.table_view(), 1.0f), "3 sequences");
  f.mutable_seq_lens()[1] = 1000;
  expect_bad(DenseDecode(io, f.cache_view(), f.table_view(), 1.0f), "seq_lens[1] = 1000");
  f.mutable_seq_lens()[1] = 20;
  f.mutable_block_table()[0] = -3;
  expect_bad(DenseDecode(io, f.cache_view(), f.table_view(), 1.0f), "= -3");
  f.mutable_block_table()[0] = 0;
  int32_t pages[4] = {0, 5, -1, -1}, counts[4] = {2, 1, 1, 1};
  expect_bad(SparseDecode(io, f.cache_view(), f.table_view(), {pages, counts, 2, 2}, 1.0f), "= 5");
  const PageList bad{pages, counts, 2, 2};
  expect_bad(ReadDecodeRows(io, f.cache_view(), f.table_view(), &bad), "= 5");
  expect_bad(ReadDecodeRows(three, f.cache_view(), f.table_view(), nullptr), "3 sequences");
  int32_t zero_counts[4] = {0, 1, 1, 1};
  expect_bad(SparseDecode(io, f.cache_view(), f.table_view(), {pages, zero_counts, 2, 2}, 1.0f),
             "= 0");
  EXPECT_EQ(ParseCpuKernel("sse2").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ParseCpuKernel("sse2").status().message().find("'sse2'"), absl::string_view::npos);
  for (CpuKernel k :
       {CpuKernel::kAuto, CpuKernel::kPortable, CpuKernel::kAvx512, CpuKernel::kAvx512Bf16}) {
    EXPECT_EQ(*ParseCpuKernel(CpuKernelName(k)), k);
    if (!CpuKernelAvailable(k)) {
      const absl::Status st = SetCpuKernel(k);
      EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
      EXPECT_NE(st.message().find(CpuKernelName(k)), absl::string_view::npos) << st;
    }
  }
  // avx512-bf16 needs avx512; auto names the kernel it picks.
  EXPECT_TRUE(!CpuKernelAvailable(CpuKernel::kAvx512Bf16) ||
              CpuKernelAvailable(CpuKernel::kAvx512));
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
  EXPECT_NE(ActiveCpuKernelName(), "auto");
  // The read-ahead: its names round-trip, a bad one is named.
  const absl::StatusOr<DecodeReadAhead> bad_mode = ParseDecodeReadAhead("far");
  EXPECT_EQ(bad_mode.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_mode.status().message().find("\"far\""), absl::string_view::npos);
  for (DecodeReadAhead mode : {DecodeReadAhead::kStream, DecodeReadAhead::kNextPage}) {
    SetDecodeReadAhead(mode);
    EXPECT_EQ(ActiveDecodeReadAhead(), mode);
    EXPECT_EQ(*ParseDecodeReadAhead(DecodeReadAheadName(mode)), mode);
  }
  SetDecodeReadAhead(DecodeReadAhead::kStream);
}

}  // namespace
}  // namespace mempipe
