#include "retriever/select.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "core/cpu_kernel.h"
#include "gtest/gtest.h"
#include "retriever/relevancy.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::PagedFixture;
using testing::RandomTensor;
using testing::TestSeed;

// A paged batch of `lens` with its digests built, and a random query of `group` heads per KV
// head for each sequence.
struct DigestedBatch {
  DigestedBatch(std::mt19937_64& rng, DType dtype, int block_size, int kv_heads, int head_dim,
                int group, const std::vector<int>& lens)
      : f(rng, {.dtype = dtype,
                .block_size = block_size,
                .num_kv_heads = kv_heads,
                .head_dim = head_dim,
                .seq_lens = lens}),
        q(rng, dtype, lens.size() * kv_heads * group * head_dim),
        qv{q.data(), dtype, static_cast<int>(lens.size()), kv_heads * group, head_dim} {
    EXPECT_TRUE(BuildDigests(f.cache_view(), f.table_view(), f.digest_view()).ok());
  }
  PagedFixture f;
  RandomTensor q;
  QueryView qv;
};

class RelevancyTest : public ::testing::TestWithParam<std::tuple<DType, int, int, int>> {};

// Scores equal a float64 evaluation of the Quest bound (within fp32 rounding), and bound
// q.k for every key of the page (random data with negative values).
TEST_P(RelevancyTest, MatchesFloat64AndBoundsEveryKey) {
  const auto [dtype, block_size, head_dim, group] = GetParam();
  std::mt19937_64 rng(TestSeed());
  const int kv_heads = 2;
  std::uniform_int_distribution<int> len_dist(1, 9 * block_size);
  std::vector<int> lens = {len_dist(rng), len_dist(rng), block_size * 3, 1};
  DigestedBatch b(rng, dtype, block_size, kv_heads, head_dim, group, lens);
  PagedFixture& f = b.f;
  const RandomTensor& q = b.q;
  const QueryView& qv = b.qv;
  const int heads = kv_heads * group;
  for (GroupAggregation agg : {GroupAggregation::kMax, GroupAggregation::kSum}) {
    std::vector<float> scores(lens.size() * kv_heads * f.max_blocks(), NAN);
    ASSERT_TRUE(
        ComputeRelevancy(qv, f.cache_view(), f.digest_view(), f.table_view(), agg, scores.data())
            .ok());
    std::vector<float> threaded(scores.size(), NAN);
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), f.digest_view(), f.table_view(), agg,
                                 threaded.data(), /*num_threads=*/3)
                    .ok());
    ASSERT_EQ(0, std::memcmp(scores.data(), threaded.data(), scores.size() * sizeof(float)));
    // More threads than (sequence, KV head) pairs: the pages of each pair are split as well.
    std::vector<float> split(scores.size(), NAN);
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), f.digest_view(), f.table_view(), agg,
                                 split.data(), /*num_threads=*/64)
                    .ok());
    ASSERT_EQ(0, std::memcmp(scores.data(), split.data(), scores.size() * sizeof(float)));
    for (int s = 0; s < f.num_seqs(); ++s) {
      for (int h = 0; h < kv_heads; ++h) {
        const float* row = &scores[(s * kv_heads + h) * f.max_blocks()];
        const int pages = NumPages(lens[s], block_size);
        for (int p = 0; p < f.max_blocks(); ++p) {
          if (p >= pages) {
            ASSERT_EQ(row[p], -INFINITY);
            continue;
          }
          double ref = agg == GroupAggregation::kMax ? -1e300 : 0.0, abs_sum = 0;
          double max_dot = -1e300;
          for (int g = 0; g < group; ++g) {
            const float* qh = &q.values[((s * heads) + h * group + g) * head_dim];
            double bound = 0;
            for (int c = 0; c < head_dim; ++c) {
              double mx = -1e300, mn = 1e300;
              for (int t = p * block_size; t < std::min(lens[s], (p + 1) * block_size); ++t) {
                mx = std::max(mx, f.Kv(0, s, t, h, c));
                mn = std::min(mn, f.Kv(0, s, t, h, c));
              }
              bound += std::max(qh[c] * mx, qh[c] * mn);
              abs_sum += std::abs(qh[c]) * std::max(std::abs(mx), std::abs(mn));
            }
            ref = agg == GroupAggregation::kMax ? std::max(ref, bound) : ref + bound;
            for (int t = p * block_size; t < std::min(lens[s], (p + 1) * block_size); ++t) {
              double dot = 0;
              for (int c = 0; c < head_dim; ++c) dot += qh[c] * f.Kv(0, s, t, h, c);
              max_dot = std::max(max_dot, dot);
            }
          }
          const double tol = 1e-6 * abs_sum + 1e-6;
          ASSERT_NEAR(row[p], ref, tol) << "seq " << s << " head " << h << " page " << p;
          if (agg == GroupAggregation::kMax) {
            ASSERT_GE(row[p] + tol, max_dot) << "bound violated: seq " << s << " page " << p;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RelevancyTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 64), ::testing::Values(64, 128, 256),
                       ::testing::Values(1, 4, 8)));

// Sort-based reference: sinks, locals, then the best middle pages by (score desc, index asc).
std::vector<int> ReferenceSelect(const float* sc, int n, const SelectionConfig& cfg, int k) {
  std::vector<int> all(n);
  std::iota(all.begin(), all.end(), 0);
  if (n <= k) return all;
  std::vector<int> middle(all.begin() + cfg.num_sink_pages, all.end() - cfg.num_local_pages);
  std::stable_sort(middle.begin(), middle.end(), [&](int a, int b) { return sc[a] > sc[b]; });
  std::vector<int> out(all.begin(), all.begin() + cfg.num_sink_pages);
  out.insert(out.end(), middle.begin(),
             middle.begin() + (k - cfg.num_sink_pages - cfg.num_local_pages));
  out.insert(out.end(), all.end() - cfg.num_local_pages, all.end());
  std::sort(out.begin(), out.end());
  return out;
}

// The host kernels SelectPages' threshold search can run with: an AVX-512 copy of the whole
// search under the avx512 and avx512-bf16 kernels, an AVX2 copy of its counting pass under avx2,
// and the portable one otherwise.
std::vector<CpuKernel> AvailableKernels() {
  std::vector<CpuKernel> kernels;
  for (CpuKernel k : {CpuKernel::kPortable, CpuKernel::kAvx2, CpuKernel::kAvx512}) {
    if (CpuKernelAvailable(k)) kernels.push_back(k);
  }
  return kernels;
}

// Few distinct scores (ties everywhere) and edge lengths (at, just above and far below the
// budget), each kernel in turn, against a sort; one to 32 threads.
TEST(SelectPages, MatchesSortReferenceWithTiesAndEdgeLengths) {
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16, kv_heads = 3;
  for (int trial = 0; trial < 50 * static_cast<int>(AvailableKernels().size()); ++trial) {
    const CpuKernel kernel = AvailableKernels()[trial % AvailableKernels().size()];
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    SCOPED_TRACE(CpuKernelName(kernel));
    std::uniform_int_distribution<int> k_dist(2, 12), sink_dist(0, 2), local_dist(1, 2);
    SelectionConfig cfg;
    cfg.num_sink_pages = sink_dist(rng);
    cfg.num_local_pages = local_dist(rng);
    const int k = std::max(k_dist(rng), cfg.num_sink_pages + cfg.num_local_pages);
    cfg.budget_tokens = k * block_size;
    std::uniform_int_distribution<int> len_dist(1, 40 * block_size);
    std::vector<int32_t> lens = {len_dist(rng), k * block_size, k * block_size + 1, 1,
                                 len_dist(rng)};
    int max_blocks = 0;
    for (int len : lens) max_blocks = std::max(max_blocks, NumPages(len, block_size));
    std::vector<int32_t> table(lens.size() * max_blocks, 0);
    // Few distinct values so ties are common.
    std::uniform_int_distribution<int> val(0, 5);
    std::vector<float> scores(lens.size() * kv_heads * max_blocks);
    for (float& x : scores) x = static_cast<float>(val(rng));
    const BlockTableView tv{table.data(), lens.data(), static_cast<int>(lens.size()), max_blocks};
    // One thread, a few, and more threads than the 15 (sequence, KV head) rows: every row is
    // written (the buffers start poisoned) and equals the reference whatever the split.
    for (int threads : {1, 2, 4, 32}) {
      std::vector<int32_t> pages(lens.size() * kv_heads * k, 77);
      std::vector<int32_t> counts(lens.size() * kv_heads, 77);
      const SelectionView out{pages.data(), counts.data(), static_cast<int>(lens.size()), kv_heads,
                              k};
      ASSERT_TRUE(SelectPages(scores.data(), tv, block_size, kv_heads, cfg, out, threads).ok());
      for (size_t s = 0; s < lens.size(); ++s) {
        for (int h = 0; h < kv_heads; ++h) {
          const auto ref = ReferenceSelect(&scores[(s * kv_heads + h) * max_blocks],
                                           NumPages(lens[s], block_size), cfg, k);
          ASSERT_EQ(out.Count(s, h), static_cast<int>(ref.size()))
              << "trial " << trial << " threads " << threads << " seq " << s << " head " << h;
          for (int i = 0; i < k; ++i) {
            ASSERT_EQ(out.Row(s, h)[i], i < static_cast<int>(ref.size()) ? ref[i] : -1)
                << "trial " << trial << " threads " << threads << " seq " << s << " head " << h
                << " slot " << i;
          }
        }
      }
    }
  }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
}

// Continuous scores of every shape a threshold search can get wrong, on long rows (up to 3,000
// pages, up to 400 chosen) and with every kernel's counting pass: normal scores of mixed sign,
// all-positive and all-negative rows (the keys' sign bit shared), scores rising or falling
// with the page (the position and its reverse), a constant row (all ties: the lowest pages),
// two values only, and huge magnitudes next to denormals. Each row equals the sort
// reference. The same rows are shown to separate the right answer from three known-wrong
// ones: the pages by position only (the first middle pages), a selection that drops its
// last-chosen page for the next-best one, and one that breaks ties toward the higher page.
TEST(SelectPages, MatchesSortReferenceOnLongContinuousRowsWithEveryKernel) {
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16, kv_heads = 1;
  int by_position_differs = 0, dropped_differs = 0, high_ties_differs = 0;
  for (CpuKernel kernel : AvailableKernels()) {
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    for (int trial = 0; trial < 80; ++trial) {
      std::uniform_int_distribution<int> n_dist(3, 3000);
      const int n = n_dist(rng);
      std::uniform_int_distribution<int> k_dist(2, std::max(2, std::min(n - 1, 400)));
      SelectionConfig cfg;
      cfg.num_sink_pages = trial % 3 == 0 ? 0 : 1;
      cfg.num_local_pages = 1;
      const int k = std::max(k_dist(rng), cfg.num_sink_pages + cfg.num_local_pages);
      cfg.budget_tokens = k * block_size;
      std::vector<float> sc(n);
      std::normal_distribution<float> normal(0.0f, 3.0f);
      const int shape = trial % 8;
      for (int p = 0; p < n; ++p) {
        const float z = normal(rng);
        switch (shape) {
          case 0:
            sc[p] = z;
            break;
          case 1:
            sc[p] = std::fabs(z) + 1.0f;
            break;
          case 2:
            sc[p] = -std::fabs(z) - 1e-3f;
            break;
          case 3:
            sc[p] = static_cast<float>(p) * 0.25f + 0.01f * z;
            break;
          case 4:
            sc[p] = static_cast<float>(n - p) + 0.01f * z;
            break;
          case 5:
            sc[p] = 2.5f;
            break;
          case 6:
            sc[p] = z > 0 ? 1.0f : -1.0f;
            break;
          default:
            sc[p] = z > 0 ? z * 1e30f : z * 1e-40f;
            break;
        }
      }
      std::vector<int32_t> lens = {n * block_size}, table(n, 0);
      std::vector<int32_t> pages(k, 77), counts(1, 77);
      const BlockTableView tv{table.data(), lens.data(), 1, n};
      const SelectionView out{pages.data(), counts.data(), 1, kv_heads, k};
      ASSERT_TRUE(SelectPages(sc.data(), tv, block_size, kv_heads, cfg, out).ok());
      const auto ref = ReferenceSelect(sc.data(), n, cfg, k);
      ASSERT_EQ(counts[0], static_cast<int>(ref.size()));
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_EQ(pages[i], ref[i]) << CpuKernelName(kernel) << " trial " << trial << " shape "
                                    << shape << " n " << n << " k " << k << " slot " << i;
      }
      if (n <= k) continue;
      // The known-wrong answers, each built from the reference's own rule with one fault.
      const int lo = cfg.num_sink_pages, hi = n - cfg.num_local_pages;
      const int want = k - lo - cfg.num_local_pages;
      std::vector<int> middle(hi - lo);
      std::iota(middle.begin(), middle.end(), lo);
      auto pick = [&](std::vector<int> chosen) {
        std::vector<int> r(chosen);
        for (int p = 0; p < lo; ++p) r.push_back(p);
        for (int p = hi; p < n; ++p) r.push_back(p);
        std::sort(r.begin(), r.end());
        return r;
      };
      by_position_differs += pick(std::vector<int>(middle.begin(), middle.begin() + want)) != ref;
      std::vector<int> ranked(middle);
      std::stable_sort(ranked.begin(), ranked.end(), [&](int a, int b) { return sc[a] > sc[b]; });
      if (want >= 1 && want < static_cast<int>(ranked.size())) {  // a page to drop, one to add
        std::vector<int> dropped(ranked.begin(), ranked.begin() + want);
        dropped.back() = ranked[want];
        dropped_differs += pick(dropped) != ref;
      }
      std::vector<int> high(middle);
      std::stable_sort(high.begin(), high.end(),
                       [&](int a, int b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a > b); });
      high_ties_differs += pick(std::vector<int>(high.begin(), high.begin() + want)) != ref;
    }
  }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
  EXPECT_GT(by_position_differs, 0) << "the rows never separate a position-only selection";
  EXPECT_GT(dropped_differs, 0) << "the rows never separate a dropped page";
  EXPECT_GT(high_ties_differs, 0) << "the rows never separate ties broken toward the higher page";
}

// ComputeRelevancyThen reports every (sequence, KV head) row in exactly one range, once the whole
// range is written: the scores seen inside the callback equal the finished scores, on one thread,
// on fewer threads than rows (a range per thread) and on more (each row's pages split into
// chunks, the last chunk to finish reporting the row). A callback run after the first chunk
// instead would see the poison.
TEST(ComputeRelevancyThen, ReportsEveryFinishedRowOnce) {
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16, kv_heads = 3, head_dim = 64, group = 3;
  const std::vector<int> lens = {90 * block_size + 7, 5 * block_size, 64 * block_size};
  DigestedBatch b(rng, DType::kBFloat16, block_size, kv_heads, head_dim, group, lens);
  const BlockTableView tv = b.f.table_view();
  const size_t width = tv.max_blocks_per_seq, rows = lens.size() * kv_heads;
  std::vector<float> want(rows * width);
  ASSERT_TRUE(ComputeRelevancy(b.qv, b.f.cache_view(), b.f.digest_view(), tv,
                               GroupAggregation::kMax, want.data(), 1)
                  .ok());
  // Past the rows, 16 and 64 threads run 10 times each: a row reported before its last chunk is
  // scanned shows up only when another thread is still scanning that chunk.
  for (int threads :
       {1, 2, 7, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64}) {
    std::vector<float> scores(rows * width, std::numeric_limits<float>::quiet_NaN());
    std::vector<std::vector<float>> seen(rows);
    std::vector<std::atomic<int>> calls(rows);
    std::atomic<int> ranges{0};
    ASSERT_TRUE(ComputeRelevancyThen(b.qv, b.f.cache_view(), b.f.digest_view(), tv,
                                     GroupAggregation::kMax, scores.data(), threads,
                                     [&](int64_t first, int64_t last) {
                                       ranges.fetch_add(1);
                                       for (int64_t r = first; r < last; ++r) {
                                         calls[r].fetch_add(1);
                                         seen[r].assign(scores.begin() + r * width,
                                                        scores.begin() + (r + 1) * width);
                                       }
                                     })
                    .ok());
    for (size_t r = 0; r < rows; ++r) {
      ASSERT_EQ(calls[r].load(), 1) << threads << " threads, row " << r;
      ASSERT_EQ(0, std::memcmp(seen[r].data(), &want[r * width], width * sizeof(float)))
          << threads << " threads: row " << r << " was not finished when it was reported";
    }
    // At most a range per thread where there are no more threads than rows; one per row past
    // them.
    if (threads > static_cast<int>(rows)) {
      EXPECT_EQ(ranges.load(), static_cast<int>(rows)) << threads << " threads";
    } else {
      EXPECT_LE(ranges.load(), threads);
    }
    ASSERT_EQ(0, std::memcmp(scores.data(), want.data(), want.size() * sizeof(float)));
  }
}

// ScoreAndSelect (relevancy then selection, both on the host threads) gives the one-thread
// selection for any thread count, and that selection is not trivial: the middle pages it
// chose differ between heads (a split that computed one row and copied it, or left rows to
// another thread that never ran, would not give the one-thread answer).
TEST(ScoreAndSelect, SameSelectionForAnyThreadCount) {
  std::mt19937_64 rng(TestSeed());
  const int block_size = 16, kv_heads = 4, head_dim = 64, group = 2;
  const std::vector<int> lens = {70 * block_size + 5, 3 * block_size, 41 * block_size};
  DigestedBatch b(rng, DType::kFloat32, block_size, kv_heads, head_dim, group, lens);
  PagedFixture& f = b.f;
  const QueryView& qv = b.qv;
  SelectionConfig cfg;
  cfg.budget_tokens = 8 * block_size;
  const int k = cfg.PagesPerHead(block_size);
  auto run = [&](int threads) {
    std::vector<int32_t> pages(lens.size() * kv_heads * k, 77);
    std::vector<int32_t> counts(lens.size() * kv_heads, 77);
    const SelectionView out{pages.data(), counts.data(), static_cast<int>(lens.size()), kv_heads,
                            k};
    EXPECT_TRUE(
        ScoreAndSelect(qv, f.cache_view(), f.digest_view(), f.table_view(), cfg, out, threads)
            .ok());
    EXPECT_TRUE(ValidateSelection(out, f.table_view(), block_size, cfg).ok());
    pages.insert(pages.end(), counts.begin(), counts.end());
    return pages;
  };
  const std::vector<int32_t> one = run(1);
  {  // the two steps apart (scores, then SelectPages) give the same selection
    std::vector<float> scores(lens.size() * kv_heads * f.table_view().max_blocks_per_seq);
    ASSERT_TRUE(ComputeRelevancy(qv, f.cache_view(), f.digest_view(), f.table_view(),
                                 cfg.aggregation, scores.data())
                    .ok());
    std::vector<int32_t> pages(lens.size() * kv_heads * k, 77);
    std::vector<int32_t> counts(lens.size() * kv_heads, 77);
    const SelectionView out{pages.data(), counts.data(), static_cast<int>(lens.size()), kv_heads,
                            k};
    ASSERT_TRUE(SelectPages(scores.data(), f.table_view(), block_size, kv_heads, cfg, out).ok());
    pages.insert(pages.end(), counts.begin(), counts.end());
    EXPECT_EQ(pages, one) << "ScoreAndSelect differs from ComputeRelevancy + SelectPages";
  }
  std::vector<int32_t> middle_h0(one.begin() + 1, one.begin() + k - 1);
  std::vector<int32_t> middle_h1(one.begin() + k + 1, one.begin() + 2 * k - 1);
  EXPECT_NE(middle_h0, middle_h1) << "heads 0 and 1 of sequence 0 chose the same middle pages";
  for (int threads : {2, 3, 64}) EXPECT_EQ(run(threads), one) << threads << " threads";
}

// Scores full of the values an ordering can get wrong: NaN (ranks as -inf), -inf, -0 and +0
// (equal: ties go to the lower page), denormals, +inf. SelectPages (a threshold search on keys
// made from the scores' bits) against a sort by the float comparison. The same data is shown to
// separate a known-wrong ordering (raw float bits as signed integers, which ranks -0 below +0 and
// orders NaN by its bits) from the right one. Every available kernel runs it (the AVX-512 search
// has its own key function).
TEST(SelectPages, SpecialValuesMatchTheFloatOrder) {
  std::mt19937_64 rng(TestSeed());
  const float kSpecial[] = {NAN,   -NAN,  -INFINITY, INFINITY,
                            -0.0f, 0.0f,  1e-45f,    -1e-45f,
                            1.0f,  -1.0f, 3.5f,      std::numeric_limits<float>::max()};
  const int block_size = 16, kv_heads = 2;
  auto key = [](float f) { return std::isnan(f) ? -INFINITY : f; };
  int wrong_differs = 0;
  for (int trial = 0; trial < 40 * static_cast<int>(AvailableKernels().size()); ++trial) {
    const CpuKernel kernel = AvailableKernels()[trial % AvailableKernels().size()];
    ASSERT_TRUE(SetCpuKernel(kernel).ok());
    SCOPED_TRACE(CpuKernelName(kernel));
    SelectionConfig cfg;
    std::uniform_int_distribution<int> k_dist(3, 40), n_dist(1, 300), v_dist(0, 11);
    const int k = k_dist(rng);
    cfg.budget_tokens = k * block_size;
    std::vector<int32_t> lens = {n_dist(rng) * block_size, (k + 1) * block_size - 3};
    int max_blocks = 0;
    for (int len : lens) max_blocks = std::max(max_blocks, NumPages(len, block_size));
    std::vector<int32_t> table(lens.size() * max_blocks, 0);
    std::vector<float> scores(lens.size() * kv_heads * max_blocks);
    for (float& x : scores) x = kSpecial[v_dist(rng)];
    std::vector<int32_t> pages(lens.size() * kv_heads * k, 77), counts(lens.size() * kv_heads);
    const BlockTableView tv{table.data(), lens.data(), 2, max_blocks};
    const SelectionView out{pages.data(), counts.data(), 2, kv_heads, k};
    ASSERT_TRUE(SelectPages(scores.data(), tv, block_size, kv_heads, cfg, out).ok());
    for (int s = 0; s < 2; ++s) {
      for (int h = 0; h < kv_heads; ++h) {
        const float* sc = &scores[(s * kv_heads + h) * max_blocks];
        const int n = NumPages(lens[s], block_size);
        auto select_by = [&](auto better) {
          std::vector<int> all(n);
          std::iota(all.begin(), all.end(), 0);
          if (n <= k) return all;
          std::vector<int> middle(all.begin() + 1, all.end() - 1);
          std::stable_sort(middle.begin(), middle.end(), better);
          std::vector<int> r = {0};
          r.insert(r.end(), middle.begin(), middle.begin() + (k - 2));
          r.push_back(n - 1);
          std::sort(r.begin(), r.end());
          return r;
        };
        const auto ref = select_by([&](int a, int b) { return key(sc[a]) > key(sc[b]); });
        const auto wrong = select_by([&](int a, int b) {
          int32_t ia, ib;
          std::memcpy(&ia, &sc[a], 4);
          std::memcpy(&ib, &sc[b], 4);
          return ia > ib;
        });
        wrong_differs += wrong != ref;
        ASSERT_EQ(out.Count(s, h), static_cast<int>(ref.size()));
        for (size_t i = 0; i < ref.size(); ++i) {
          ASSERT_EQ(out.Row(s, h)[i], ref[i]) << "trial " << trial << " seq " << s << " slot " << i;
        }
      }
    }
  }
  ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok());
  EXPECT_GT(wrong_differs, 0) << "the data never separates a raw-bits ordering from the right one";
}

TEST(SelectPages, BadConfigNamesTheValue) {
  const int32_t len = 100, table = 0;
  int32_t pages[8], counts[1];
  const BlockTableView tv{&table, &len, 1, 7};
  const SelectionView out{pages, counts, 1, 1, 8};
  float scores[7] = {};
  auto expect_bad = [&](SelectionConfig cfg, int block_size, const char* needle) {
    absl::Status s = SelectPages(scores, tv, block_size, 1, cfg, out);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << s;
  };
  expect_bad({.budget_tokens = 0}, 16, "got 0");
  expect_bad({.budget_tokens = 40}, 16, "got 40");
  expect_bad({.budget_tokens = 32, .num_sink_pages = 2, .num_local_pages = 1}, 16, "2 sink");
  expect_bad({.budget_tokens = 64, .num_local_pages = 0}, 16, "got 0");
  expect_bad({.budget_tokens = 64}, 48, "got 48");
  // Found by tests/fuzz/config_fuzz (issue 14): sinks + locals overflowed int, wrapped negative
  // and passed the room check (UBSan: signed overflow), so selection indexed far out of range.
  expect_bad({.budget_tokens = 64, .num_sink_pages = 1086374080, .num_local_pages = 1086374080}, 16,
             "1086374080 sink");
  SelectionConfig ok;
  ok.budget_tokens = 64;
  const int32_t long_len = 500;
  const BlockTableView past{&table, &long_len, 1, 7};
  absl::Status s = SelectPages(scores, past, 16, 1, ok, out);
  EXPECT_NE(s.message().find("500"), absl::string_view::npos) << s;
}

TEST(ComputeRelevancy, RejectsNonFiniteQueryNamingIt) {
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.seq_lens = {40, 3}});
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), f.digest_view()).ok());
  std::vector<float> q(2 * 4 * 64, 0.5f);
  q[(1 * 4 + 3) * 64 + 17] = NAN;
  std::vector<float> scores(2 * 2 * f.max_blocks());
  absl::Status s =
      ComputeRelevancy({q.data(), DType::kFloat32, 2, 4, 64}, f.cache_view(), f.digest_view(),
                       f.table_view(), GroupAggregation::kMax, scores.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("query[1][3][17]"), absl::string_view::npos) << s;
  s = ComputeRelevancy({q.data(), DType::kFloat32, 2, 3, 64}, f.cache_view(), f.digest_view(),
                       f.table_view(), GroupAggregation::kMax, scores.data());
  EXPECT_NE(s.message().find("num_heads 3"), absl::string_view::npos) << s;
  f.mutable_seq_lens()[1] = 0;
  s = ComputeRelevancy({q.data(), DType::kFloat32, 2, 4, 64}, f.cache_view(), f.digest_view(),
                       f.table_view(), GroupAggregation::kMax, scores.data());
  EXPECT_NE(s.message().find("seq_lens[1] = 0"), absl::string_view::npos) << s;
}

// An aggregation code that is neither max nor sum is refused (it used to mean "sum"), by the
// relevancy step and by the selection config alike; the valid codes pass.
TEST(ComputeRelevancy, RejectsUnknownAggregationNamingIt) {
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.seq_lens = {40, 3}});
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), f.digest_view()).ok());
  std::vector<float> q(2 * 4 * 64, 0.5f);
  std::vector<float> scores(2 * 2 * f.max_blocks());
  const auto bad = static_cast<GroupAggregation>(7);
  absl::Status s = ComputeRelevancy({q.data(), DType::kFloat32, 2, 4, 64}, f.cache_view(),
                                    f.digest_view(), f.table_view(), bad, scores.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("aggregation code 7"), absl::string_view::npos) << s;
  const SelectionConfig config{.budget_tokens = 64, .aggregation = bad};
  s = ValidateSelectionConfig(config, 16);
  EXPECT_NE(s.message().find("aggregation code 7"), absl::string_view::npos) << s;
  EXPECT_TRUE(ValidateGroupAggregation(GroupAggregation::kMax).ok());
  EXPECT_TRUE(ValidateGroupAggregation(GroupAggregation::kSum).ok());
}

}  // namespace
}  // namespace mempipe

namespace mempipe {
namespace {

// ValidateSelection (issue 14, item 5): what SelectPages returns passes; each known-wrong
// variant of it (a dropped page, a missing sink, a missing local, pages out of order or past
// the sequence, a garbage count) is rejected naming the entry.
TEST(ValidateSelection, AcceptsSelectPagesOutputAndRejectsEachKnownWrongVariant) {
  const int block_size = 16, kv = 2, width = 10;
  const int32_t lens[2] = {150, 40};  // 10 pages (a real choice of 5), 3 pages (all)
  std::vector<int32_t> table(2 * width);
  std::iota(table.begin(), table.end(), 0);
  const BlockTableView tv{table.data(), lens, 2, width};
  SelectionConfig cfg;
  cfg.budget_tokens = 5 * block_size;
  cfg.num_sink_pages = 1;
  cfg.num_local_pages = 2;
  std::mt19937 rng(testing::TestSeed());
  std::vector<float> scores(2 * kv * width);
  for (float& x : scores) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  const int max_selected = 6;
  std::vector<int32_t> pages(2 * kv * max_selected), counts(2 * kv);
  const SelectionView sel{pages.data(), counts.data(), 2, kv, max_selected};
  ASSERT_TRUE(SelectPages(scores.data(), tv, block_size, kv, cfg, sel).ok());
  ASSERT_TRUE(ValidateSelection(sel, tv, block_size, cfg).ok());
  const std::vector<int32_t> good_pages = pages, good_counts = counts;
  auto expect_rejected = [&](const char* what, auto spoil, const char* needle) {
    pages = good_pages;
    counts = good_counts;
    spoil(sel.Row(0, 1), sel.Count(0, 1));
    const absl::Status st = ValidateSelection(sel, tv, block_size, cfg);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what << " was accepted";
    EXPECT_NE(st.message().find(needle), absl::string_view::npos) << what << ": " << st;
  };
  expect_rejected(
      "a dropped page", [](int32_t*, int32_t& c) { --c; }, "count of sequence 0");
  expect_rejected(
      "a garbage count", [](int32_t*, int32_t& c) { c = 1057046488; }, "1057046488");
  expect_rejected(
      "a missing sink",
      [](int32_t* r, int32_t&) {
        r[0] = 1;
        if (r[1] == 1) r[0] = -1;
      },
      "entry 0");
  expect_rejected(
      "position-only (newest pages)",
      [](int32_t* r, int32_t& c) {
        for (int i = 0; i < c; ++i) r[i] = 10 - c + i;
      },
      "sink page");
  expect_rejected(
      "a missing local", [](int32_t* r, int32_t& c) { r[c - 1] = r[c - 2] + 0; }, "entry 4");
  expect_rejected(
      "pages out of order", [](int32_t* r, int32_t&) { std::swap(r[1], r[2]); }, "not above");
  expect_rejected(
      "a page past the sequence", [](int32_t* r, int32_t& c) { r[c - 1] = 12; }, "outside");
  // The short sequence must select exactly its pages.
  pages = good_pages;
  counts = good_counts;
  sel.Row(1, 0)[1] = 2;
  sel.Row(1, 0)[2] = 3;
  EXPECT_FALSE(ValidateSelection(sel, tv, block_size, cfg).ok());
}

}  // namespace
}  // namespace mempipe
