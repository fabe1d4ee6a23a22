// The RTL kernel (fpga/rtl/mempipe_score_topk.sv, simulated by Verilator behind an AXI memory
// model with HBM-like latency and random back-pressure) against the C++ reference of
// retriever/: every page score and every selection bit for bit, on the shapes the C-simulation
// test uses (tests/fpga/kernel_csim_test.cc): all dtypes x page sizes x head dims, GQA 1-16,
// ragged batches, ties, the largest top-k. Data are drawn fresh per run (seed printed).
//
// MEMPIPE_RTL_CASES=N runs only the first N shape cases of the sweep (CI keeps it small).
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fpga/device_layout.h"
#include "fpga/hls/kernel_common.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/select.h"
#include "tests/fpga/rtl/rtl_harness.h"
#include "tests/fpga/test_data.h"

namespace mempipe {
namespace {

using rtl_testing::MemModel;
using rtl_testing::RtlRun;
using rtl_testing::RtlScoreTopk;
using rtl_testing::ScoreTopkArgs;
using testing::Batch;
using testing::FreshSeed;
using testing::MakeBatch;

// Head h's digest slice [blocks, 2, dim] from reference digests [blocks, 2, heads, dim].
std::vector<uint8_t> HeadSlice(const std::vector<uint8_t>& dg, const DigestView& v, int h) {
  const size_t row = static_cast<size_t>(v.head_dim) * DTypeSize(v.dtype);
  std::vector<uint8_t> slice(static_cast<size_t>(v.num_blocks) * 2 * row);
  for (int b = 0; b < v.num_blocks; ++b) {
    for (int which = 0; which < 2; ++which) {
      std::memcpy(slice.data() + (static_cast<size_t>(b) * 2 + which) * row,
                  dg.data() + v.Offset(b, which, h) * DTypeSize(v.dtype), row);
    }
  }
  return slice;
}

std::vector<int> RaggedLens(std::mt19937_64& rng, int num_seqs, int max_len) {
  std::uniform_int_distribution<int> len(1, max_len);
  std::vector<int> lens(num_seqs);
  for (int& l : lens) l = len(rng);
  return lens;
}

// What one kernel call on one KV head must produce.
struct Expected {
  std::vector<uint32_t> scores;  // every page of every sequence, in order
  std::vector<int32_t> pages;    // [num_seqs, max_selected]
  std::vector<int32_t> counts;   // [num_seqs]
};

struct Got {
  std::vector<uint32_t> scores;
  std::vector<int32_t> pages, counts;
};

// "" if equal bit for bit, else the first difference.
std::string Compare(const Expected& want, const Got& got, int max_sel) {
  std::ostringstream os;
  if (want.scores.size() != got.scores.size()) {
    os << "score count " << got.scores.size() << " != " << want.scores.size();
    return os.str();
  }
  for (size_t i = 0; i < want.scores.size(); ++i) {
    if (want.scores[i] != got.scores[i]) {
      os << "score " << i << ": 0x" << std::hex << got.scores[i] << " != 0x" << want.scores[i];
      return os.str();
    }
  }
  for (size_t s = 0; s < want.counts.size(); ++s) {
    if (want.counts[s] != got.counts[s]) {
      os << "seq " << s << " count " << got.counts[s] << " != " << want.counts[s];
      return os.str();
    }
    for (int i = 0; i < max_sel; ++i) {
      const size_t j = s * max_sel + i;
      if (want.pages[j] != got.pages[j]) {
        os << "seq " << s << " slot " << i << ": page " << got.pages[j] << " != " << want.pages[j];
        return os.str();
      }
    }
  }
  return "";
}

struct CallResult {
  Expected want;
  Got got;
  int max_sel = 0;
  uint64_t cycles = 0;
};

// Builds digests and the reference for `b`, runs the RTL kernel on KV head `h`.
CallResult RunHead(std::mt19937_64& rng, Batch& b, const SelectionConfig& config, int h) {
  CallResult r;
  KvCacheView cache = b.Cache();
  const BlockTableView table = b.Table();
  DigestView dv{nullptr, b.dtype, b.num_blocks, b.num_kv_heads, b.head_dim};
  std::vector<uint8_t> dg(dv.NumBytes());
  for (size_t i = 0; i < dv.NumElems(); ++i) {  // blocks no page uses: NaN, never read
    StoreFromFloat(dg.data(), b.dtype, i, std::numeric_limits<float>::quiet_NaN());
  }
  dv.data = dg.data();
  EXPECT_TRUE(BuildDigests(cache, table, dv).ok());
  const int num_seqs = table.num_seqs;
  std::vector<float> ref_scores(static_cast<size_t>(num_seqs) * b.num_kv_heads * b.max_blocks);
  EXPECT_TRUE(
      ComputeRelevancy(b.Query(), cache, dv, table, config.aggregation, ref_scores.data()).ok());
  const int k = config.PagesPerHead(b.block_size);
  r.max_sel = k + static_cast<int>(rng() % 3);  // padding past k must be -1
  std::vector<int32_t> ref_pages(static_cast<size_t>(num_seqs) * b.num_kv_heads * r.max_sel);
  std::vector<int32_t> ref_counts(static_cast<size_t>(num_seqs) * b.num_kv_heads);
  const SelectionView ref_sel{ref_pages.data(), ref_counts.data(), num_seqs, b.num_kv_heads,
                              r.max_sel};
  EXPECT_TRUE(
      SelectPages(ref_scores.data(), table, b.block_size, b.num_kv_heads, config, ref_sel).ok());
  for (int s = 0; s < num_seqs; ++s) {
    const float* row =
        ref_scores.data() + (static_cast<size_t>(s) * b.num_kv_heads + h) * b.max_blocks;
    for (int p = 0; p < NumPages(b.lens[s], b.block_size); ++p) {
      uint32_t u;
      std::memcpy(&u, &row[p], 4);
      r.want.scores.push_back(u);
    }
    r.want.counts.push_back(ref_sel.Count(s, h));
    for (int i = 0; i < r.max_sel; ++i) r.want.pages.push_back(ref_sel.Row(s, h)[i]);
  }

  // Device buffers laid out as the host runtime lays them out (fpga/device_layout.h).
  MemModel mm;
  mm.seed = rng();
  RtlScoreTopk kernel(mm);
  const std::vector<uint8_t> slice = HeadSlice(dg, dv, h);
  const ScoreIo io = PlanScoreIo(num_seqs, b.group, b.head_dim, b.max_blocks, r.max_sel);
  SelectRequest req{0, b.Query(), table, config, ref_sel};
  const uint64_t dg_addr = kernel.Alloc(slice.size());
  std::memcpy(kernel.Mem(dg_addr), slice.data(), slice.size());
  const uint64_t in_addr = kernel.Alloc(io.in_bytes);
  PackScoreInputs(req, h, b.group, io, kernel.Mem(in_addr));
  const uint64_t out_addr = kernel.Alloc(io.out_bytes);
  for (size_t i = 0; i < io.out_bytes / 4; ++i) {  // poison: every slot must be written
    const int32_t poison = 0x7eadbeef;
    std::memcpy(kernel.Mem(out_addr) + 4 * i, &poison, 4);
  }
  ScoreTopkArgs a;
  a.digests = dg_addr;
  a.queries = in_addr + io.queries_offset;
  a.block_table = in_addr + io.table_offset;
  a.seq_lens = in_addr + io.lens_offset;
  a.pages = out_addr + io.pages_offset;
  a.counts = out_addr + io.counts_offset;
  a.num_seqs = num_seqs;
  a.group = b.group;
  a.head_dim = b.head_dim;
  a.dtype = static_cast<int>(b.dtype);
  a.block_size = b.block_size;
  a.max_blocks_per_seq = b.max_blocks;
  a.max_selected = r.max_sel;
  a.k = k;
  a.sinks = config.num_sink_pages;
  a.locals = config.num_local_pages;
  a.aggregation = static_cast<int>(config.aggregation);
  // A hung kernel shows as a failure after 200 clocks per page-head-word plus 1M.
  int64_t pages_total = 0;
  for (int len : b.lens) pages_total += NumPages(len, b.block_size);
  const RtlRun run = kernel.Run(a, 1'000'000 + 200 * pages_total * b.group * b.head_dim / 16);
  r.cycles = run.cycles;
  r.got.scores = run.scores;
  r.got.pages.resize(static_cast<size_t>(num_seqs) * r.max_sel);
  r.got.counts.resize(num_seqs);
  std::memcpy(r.got.pages.data(), kernel.Mem(a.pages), r.got.pages.size() * 4);
  std::memcpy(r.got.counts.data(), kernel.Mem(a.counts), r.got.counts.size() * 4);
  return r;
}

void CheckHead(std::mt19937_64& rng, Batch& b, const SelectionConfig& config) {
  const int h = static_cast<int>(rng() % b.num_kv_heads);
  SCOPED_TRACE(::testing::Message()
               << DTypeName(b.dtype) << " page " << b.block_size << " d " << b.head_dim << " group "
               << b.group << " head " << h << " seqs " << b.lens.size() << " budget "
               << config.budget_tokens << " sinks " << config.num_sink_pages << " locals "
               << config.num_local_pages << " agg " << static_cast<int>(config.aggregation));
  std::cerr << "[rtl] " << DTypeName(b.dtype) << " page " << b.block_size << " d " << b.head_dim
            << " group " << b.group << " seqs " << b.lens.size() << " k "
            << config.PagesPerHead(b.block_size) << "\n";
  try {
    const CallResult r = RunHead(rng, b, config, h);
    EXPECT_EQ("", Compare(r.want, r.got, r.max_sel));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "RTL simulation: " << e.what();
  }
}

int CaseLimit() {
  const char* e = std::getenv("MEMPIPE_RTL_CASES");
  return e != nullptr ? std::atoi(e) : 1 << 30;
}

TEST(ScoreTopkRtl, MatchesReferenceAcrossShapes) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkRtl.MatchesReferenceAcrossShapes"));
  const int groups[] = {1, 2, 4, 8, 16};
  int n = 0;
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int bs : kSupportedBlockSizes) {
      for (int d : kSupportedHeadDims) {
        if (n++ >= CaseLimit()) return;
        const int group = groups[rng() % 5];
        const int kv_heads = 1 + static_cast<int>(rng() % 3);
        Batch b = MakeBatch(rng, dt, bs, kv_heads, d, group,
                            RaggedLens(rng, 1 + static_cast<int>(rng() % 4), 40 * bs),
                            /*levels=*/0, /*share_blocks=*/false);
        SelectionConfig config;
        config.budget_tokens = bs * (3 + static_cast<int>(rng() % 10));
        config.num_sink_pages = static_cast<int>(rng() % 2);
        config.num_local_pages = 1 + static_cast<int>(rng() % 2);
        config.aggregation = rng() % 2 ? GroupAggregation::kSum : GroupAggregation::kMax;
        CheckHead(rng, b, config);
      }
    }
  }
}

// Every GQA ratio 1..16 (not just powers of two) on one shape.
TEST(ScoreTopkRtl, EveryGroupSize) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkRtl.EveryGroupSize"));
  for (int group = 1; group <= 16; group += (CaseLimit() < 100 ? 5 : 1)) {
    Batch b =
        MakeBatch(rng, DType::kBFloat16, 32, 1, 64, group, RaggedLens(rng, 2, 32 * 20), 0, false);
    SelectionConfig config;
    config.budget_tokens = 32 * 6;
    config.aggregation = group % 2 ? GroupAggregation::kSum : GroupAggregation::kMax;
    CheckHead(rng, b, config);
  }
}

// Few distinct key values and shared physical blocks: many equal scores, lower page first.
TEST(ScoreTopkRtl, TiesBreakLikeReference) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkRtl.TiesBreakLikeReference"));
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int group : {1, 4}) {
      Batch b = MakeBatch(rng, dt, 16, 2, 64, group, RaggedLens(rng, 3, 1200), /*levels=*/3,
                          /*share_blocks=*/true);
      SelectionConfig config;
      config.budget_tokens = 16 * 12;
      config.num_sink_pages = 2;
      config.num_local_pages = 2;
      config.aggregation = group > 1 ? GroupAggregation::kSum : GroupAggregation::kMax;
      CheckHead(rng, b, config);
    }
  }
}

// Long rows with exactly MAX_TOPK = 1024 middle pages kept.
TEST(ScoreTopkRtl, LargeBudget) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkRtl.LargeBudget"));
  Batch b = MakeBatch(rng, DType::kFloat16, 16, 1, 128, 4, {16 * 3000 - 5, 16 * 1100}, 0, false);
  SelectionConfig config;
  config.budget_tokens = 16 * (fpga_hls::kMaxTopK + 3);
  config.num_sink_pages = 1;
  config.num_local_pages = 2;
  CheckHead(rng, b, config);
}

// The comparison must reject known-wrong answers: one score off by an ulp, two selected pages
// swapped for others, a wrong count.
TEST(ScoreTopkRtl, ComparisonRejectsWrongAnswers) {
  std::mt19937_64 rng(FreshSeed("ScoreTopkRtl.ComparisonRejectsWrongAnswers"));
  Batch b = MakeBatch(rng, DType::kFloat16, 16, 1, 64, 2, {16 * 30, 16 * 9 + 3}, 0, false);
  SelectionConfig config;
  config.budget_tokens = 16 * 6;
  const CallResult r = RunHead(rng, b, config, 0);
  ASSERT_EQ("", Compare(r.want, r.got, r.max_sel));
  Got bad = r.got;
  bad.scores[rng() % bad.scores.size()] ^= 1;
  EXPECT_NE("", Compare(r.want, bad, r.max_sel));
  bad = r.got;
  bad.pages[2] = bad.pages[2] + 1;  // a page that was not selected (rows are ascending)
  EXPECT_NE("", Compare(r.want, bad, r.max_sel));
  bad = r.got;
  bad.counts[1] -= 1;
  EXPECT_NE("", Compare(r.want, bad, r.max_sel));
}

}  // namespace
}  // namespace mempipe
