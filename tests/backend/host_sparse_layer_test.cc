#include "backend/host_sparse_layer.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "attention/decode.h"
#include "core/cpu_kernel.h"
#include "core/dtype.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/select.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::PagedFixture;
using testing::RandomTensor;
using testing::TestSeed;

constexpr int kKvHeads = 3, kGroup = 3, kHeadDim = 64;

struct Layer {
  Layer(std::mt19937_64& rng, DType dtype, int block_size, const std::vector<int>& lens)
      : f(rng, {.dtype = dtype,
                .block_size = block_size,
                .num_kv_heads = kKvHeads,
                .head_dim = kHeadDim,
                .seq_lens = lens}),
        q(rng, dtype, lens.size() * kKvHeads * kGroup * kHeadDim),
        seqs(static_cast<int>(lens.size())) {
    EXPECT_TRUE(BuildDigests(f.cache_view(), f.table_view(), f.digest_view()).ok());
  }
  // NaN-poisoned output, so a row left unwritten shows.
  std::vector<uint8_t> PoisonedOut() {
    const size_t n = static_cast<size_t>(seqs) * kKvHeads * kGroup * kHeadDim;
    std::vector<uint8_t> out(n * DTypeSize(f.cache_view().dtype));
    for (size_t i = 0; i < n; ++i) StoreFromFloat(out.data(), f.cache_view().dtype, i, NAN);
    return out;
  }
  DecodeIo Io(std::vector<uint8_t>& out, int threads) {
    return {q.data(), out.data(), f.cache_view().dtype, seqs, kKvHeads * kGroup, kHeadDim, threads};
  }
  PagedFixture f;
  RandomTensor q;
  int seqs;
};

struct LayerRun {
  std::vector<int32_t> pages, counts;
  std::vector<uint8_t> out;
};

// ScoreAndSelect, then SparseDecode: the two calls the one-call layer replaces.
LayerRun Apart(Layer& l, const SelectionConfig& cfg, int k, int threads) {
  LayerRun r{std::vector<int32_t>(l.seqs * kKvHeads * k, 77),
             std::vector<int32_t>(l.seqs * kKvHeads, 77), l.PoisonedOut()};
  const SelectionView sel{r.pages.data(), r.counts.data(), l.seqs, kKvHeads, k};
  const DecodeIo io = l.Io(r.out, threads);
  EXPECT_TRUE(ScoreAndSelect({io.query, io.dtype, io.num_seqs, io.num_heads, io.head_dim},
                             l.f.cache_view(), l.f.digest_view(), l.f.table_view(), cfg, sel,
                             threads)
                  .ok());
  EXPECT_TRUE(SparseDecode(io, l.f.cache_view(), l.f.table_view(),
                           {r.pages.data(), r.counts.data(), kKvHeads, k}, 0.125f)
                  .ok());
  return r;
}

LayerRun Together(Layer& l, const SelectionConfig& cfg, int k, int threads) {
  LayerRun r{std::vector<int32_t>(l.seqs * kKvHeads * k, 77),
             std::vector<int32_t>(l.seqs * kKvHeads, 77), l.PoisonedOut()};
  const SelectionView sel{r.pages.data(), r.counts.data(), l.seqs, kKvHeads, k};
  const absl::Status st = HostSparseLayer(l.Io(r.out, threads), l.f.cache_view(), l.f.digest_view(),
                                          l.f.table_view(), cfg, sel, 0.125f);
  EXPECT_TRUE(st.ok()) << st;
  return r;
}

bool HasNaN(const std::vector<uint8_t>& out, DType dtype) {
  for (size_t i = 0; i < out.size() / DTypeSize(dtype); ++i) {
    if (std::isnan(LoadAsFloat(out.data(), dtype, i))) return true;
  }
  return false;
}

// The one-call layer gives ScoreAndSelect's selection and SparseDecode's output, bit for bit,
// for every dtype and host kernel, one thread to more threads than rows (where each row's scan
// is split and its last chunk selects and attends it), sequences shorter than the budget
// (every page) and longer, and a budget over one decode chunk (the two-call fallback). The
// comparison is shown to reject an output with one row's last selected page dropped.
TEST(HostSparseLayer, EqualsScoreAndSelectThenSparseDecodeBitForBit) {
  std::mt19937_64 rng(TestSeed());
  int dropped_rejected = 0, fused_cases = 0;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (int block_size : {16, 32}) {
      const std::vector<int> lens = {70 * block_size + 5, 3 * block_size, 41 * block_size,
                                     9 * block_size - 1};
      Layer l(rng, dtype, block_size, lens);
      for (int budget_pages : {8, 1024 / block_size}) {  // one chunk (fused); over one chunk
        SelectionConfig cfg;
        cfg.budget_tokens = budget_pages * block_size;
        const int k = budget_pages;
        const bool fused = HostSparseLayerFused(cfg, block_size);
        EXPECT_EQ(fused, budget_pages * block_size <= kDecodeChunkTokens);
        for (CpuKernel kernel :
             {CpuKernel::kPortable, CpuKernel::kAvx2, CpuKernel::kAvx512, CpuKernel::kAvx512Bf16}) {
          if (!CpuKernelAvailable(kernel)) continue;
          ASSERT_TRUE(SetCpuKernel(kernel).ok());
          const LayerRun want = Apart(l, cfg, k, 1);
          ASSERT_FALSE(HasNaN(want.out, dtype));
          for (int threads : {1, 2, 3, 7, 64}) {
            const LayerRun got = Together(l, cfg, k, threads);
            const std::string where =
                absl::StrCat(DTypeName(dtype), " page ", block_size, " k ", k, " ",
                             CpuKernelName(kernel), " threads ", threads);
            ASSERT_EQ(got.pages, want.pages) << where;
            ASSERT_EQ(got.counts, want.counts) << where;
            ASSERT_EQ(got.out, want.out) << where;
            fused_cases += fused;
          }
          // A known-wrong output: sequence 0's head 1 without its last selected page.
          LayerRun wrong{want.pages, want.counts, l.PoisonedOut()};
          wrong.counts[1] -= 1;
          ASSERT_TRUE(SparseDecode(l.Io(wrong.out, 1), l.f.cache_view(), l.f.table_view(),
                                   {wrong.pages.data(), wrong.counts.data(), kKvHeads, k}, 0.125f)
                          .ok());
          dropped_rejected += wrong.out != want.out;
        }
      }
    }
  }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
  EXPECT_GT(fused_cases, 0);
  EXPECT_GT(dropped_rejected, 0) << "the comparison never saw a dropped page";
}

// SparseDecodeRows checks the rows it reads and names what is wrong with them; an empty range is
// a no-op.
TEST(SparseDecodeRows, RejectsABadRowNamingIt) {
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16;
  Layer l(rng, DType::kFloat32, block_size, {50 * block_size});
  auto out = l.PoisonedOut();
  const DecodeIo io = l.Io(out, 1);
  const int chunk = kDecodeChunkTokens / block_size, k = chunk + 1;
  std::vector<int32_t> pages(kKvHeads * k), counts(kKvHeads, 2);
  for (int h = 0; h < kKvHeads; ++h) {
    for (int i = 0; i < k; ++i) pages[h * k + i] = i;
  }
  const PageList list{pages.data(), counts.data(), kKvHeads, k};
  auto call = [&](int64_t first, int64_t last) {
    return SparseDecodeRows(io, l.f.cache_view(), l.f.table_view(), list, 0.125f, first, last);
  };
  EXPECT_TRUE(call(0, kKvHeads).ok());
  EXPECT_TRUE(call(1, 1).ok());
  EXPECT_EQ(call(0, kKvHeads + 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(call(2, 1).code(), absl::StatusCode::kInvalidArgument);
  counts[1] = chunk + 1;
  absl::Status st = call(0, 2);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find(absl::StrCat(chunk + 1, " pages")), absl::string_view::npos) << st;
  EXPECT_TRUE(call(2, 3).ok());  // the bad row is outside this range
  counts[2] = 3;
  pages[2 * k + 2] = 1;  // 0, 1, 1: not ascending
  st = call(2, 3);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("ascend"), absl::string_view::npos) << st;
  counts[2] = 0;
  EXPECT_EQ(call(2, 3).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mempipe
