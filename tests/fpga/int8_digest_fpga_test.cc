// Int8 digests on the FPGA path, in C simulation against the CPU reference of retriever/:
//  * mempipe_score_topk on int8 records (packed here from the CPU's int8 digest, independently
//    of the device code) gives ComputeRelevancy's scores and SelectPages' selection bit for bit;
//    a record with one scale doubled must change the scores (the check can fail);
//  * the emulated U55C with an int8 layer (its update kernel builds and appends, its score
//    kernel selects) equals the CPU selector with an int8 layer: codes, scales, exact rows and
//    selections, through several decode steps;
//  * the modeled score launch reads the record (320 B per page and head at bf16 d = 128 against
//    512 B) and is no slower than the native one.
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fpga/device_layout.h"
#include "fpga/emulation/emulated_u55c.h"
#include "fpga/hls/kernel_common.h"
#include "fpga/hls/kernels.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/page_selector.h"
#include "retriever/select.h"
#include "tests/fpga/test_data.h"
#include "tests/testing/int8_digests.h"

namespace mempipe {
namespace {

using hls_compat::Word512;
using testing::Batch;
using testing::FreshSeed;
using testing::Int8Digests;
using testing::MakeBatch;

// Head h's int8 slice as the card holds it: per block [max codes][min codes][scale word]
// [exact max row][exact min row], each part a whole number of 64-byte words.
std::vector<Word512> Int8HeadSlice(const DigestView& v, int h) {
  const size_t d = static_cast<size_t>(v.head_dim), eb = DTypeSize(v.dtype);
  const size_t block_bytes = 2 * d + 64 + 2 * d * eb;
  std::vector<Word512> slice(v.num_blocks * block_bytes / sizeof(Word512), Word512{});
  auto* out = reinterpret_cast<uint8_t*>(slice.data());
  for (int b = 0; b < v.num_blocks; ++b) {
    uint8_t* blk = out + b * block_bytes;
    for (int which = 0; which < 2; ++which) {
      std::memcpy(blk + which * d, static_cast<const int8_t*>(v.data) + v.Offset(b, which, h), d);
      std::memcpy(blk + 2 * d + 64 + which * d * eb,
                  static_cast<const uint8_t*>(v.exact) + v.Offset(b, which, h) * eb, d * eb);
    }
    std::memcpy(blk + 2 * d, &v.scales[v.ScaleIndex(b, h)], sizeof(float));
  }
  return slice;
}

std::vector<int> RaggedLens(std::mt19937_64& rng, int num_seqs, int max_len) {
  std::uniform_int_distribution<int> len(1, max_len);
  std::vector<int> lens(num_seqs);
  for (int& l : lens) l = len(rng);
  return lens;
}

TEST(Int8ScoreTopkKernel, MatchesReferenceAcrossShapes) {
  std::mt19937_64 rng(FreshSeed("Int8ScoreTopkKernel.MatchesReferenceAcrossShapes"));
  const int groups[] = {1, 2, 4, 8, 16};
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int bs : {16, 32}) {
      for (int d : kSupportedHeadDims) {
        const int group = groups[rng() % 5];
        const int kv_heads = 1 + static_cast<int>(rng() % 2);
        Batch b = MakeBatch(rng, dt, bs, kv_heads, d, group,
                            RaggedLens(rng, 1 + static_cast<int>(rng() % 3), 40 * bs), 0, false);
        SelectionConfig config;
        config.budget_tokens = bs * (3 + static_cast<int>(rng() % 10));
        config.num_sink_pages = static_cast<int>(rng() % 2);
        config.num_local_pages = 1 + static_cast<int>(rng() % 2);
        config.aggregation = rng() % 2 ? GroupAggregation::kSum : GroupAggregation::kMax;
        SCOPED_TRACE(::testing::Message() << DTypeName(dt) << " page " << bs << " d " << d
                                          << " group " << group << " kv " << kv_heads);
        KvCacheView cache = b.Cache();
        const BlockTableView table = b.Table();
        Int8Digests q8(DigestView{nullptr, dt, b.num_blocks, kv_heads, d});
        ASSERT_TRUE(BuildDigests(cache, table, q8.view()).ok());
        const int num_seqs = table.num_seqs;
        std::vector<float> ref(static_cast<size_t>(num_seqs) * kv_heads * b.max_blocks);
        ASSERT_TRUE(
            ComputeRelevancy(b.Query(), cache, q8.view(), table, config.aggregation, ref.data())
                .ok());
        const int k = config.PagesPerHead(bs);
        const int max_sel = k + 1;
        std::vector<int32_t> ref_pages(static_cast<size_t>(num_seqs) * kv_heads * max_sel);
        std::vector<int32_t> ref_counts(static_cast<size_t>(num_seqs) * kv_heads);
        const SelectionView ref_sel{ref_pages.data(), ref_counts.data(), num_seqs, kv_heads,
                                    max_sel};
        ASSERT_TRUE(SelectPages(ref.data(), table, bs, kv_heads, config, ref_sel).ok());
        SelectRequest req{0, b.Query(), table, config, ref_sel};
        const ScoreIo io = PlanScoreIo(num_seqs, group, d, b.max_blocks, max_sel);
        const int code = static_cast<int>(dt) | fpga_hls::kInt8DigestFlag;
        for (int h = 0; h < kv_heads; ++h) {
          std::vector<Word512> slice = Int8HeadSlice(q8.view(), h);
          std::vector<Word512> in(io.in_bytes / sizeof(Word512));
          PackScoreInputs(req, h, group, io, reinterpret_cast<uint8_t*>(in.data()));
          const uint8_t* inb = reinterpret_cast<const uint8_t*>(in.data());
          auto run = [&](std::vector<float>& scores, std::vector<int32_t>& pages,
                         std::vector<int32_t>& counts) {
            scores.assign(static_cast<size_t>(num_seqs) * b.max_blocks,
                          std::numeric_limits<float>::quiet_NaN());
            pages.assign(static_cast<size_t>(num_seqs) * max_sel, 0x7eadbeef);
            counts.assign(num_seqs, 0x7eadbeef);
            fpga_hls::ScoreTopkCsim(
                slice.data(), reinterpret_cast<const Word512*>(inb + io.queries_offset),
                reinterpret_cast<const int32_t*>(inb + io.table_offset),
                reinterpret_cast<const int32_t*>(inb + io.lens_offset), pages.data(), counts.data(),
                num_seqs, group, d, code, bs, b.max_blocks, max_sel, k, config.num_sink_pages,
                config.num_local_pages, static_cast<int>(config.aggregation), scores.data());
          };
          std::vector<float> scores;
          std::vector<int32_t> pages, counts;
          run(scores, pages, counts);
          for (int s = 0; s < num_seqs; ++s) {
            const float* want = ref.data() + (static_cast<size_t>(s) * kv_heads + h) * b.max_blocks;
            ASSERT_EQ(0, std::memcmp(want, scores.data() + static_cast<size_t>(s) * b.max_blocks,
                                     b.max_blocks * sizeof(float)))
                << "scores differ: seq " << s << " head " << h;
            ASSERT_EQ(counts[s], ref_sel.Count(s, h));
            for (int i = 0; i < max_sel; ++i) {
              ASSERT_EQ(pages[static_cast<size_t>(s) * max_sel + i], ref_sel.Row(s, h)[i])
                  << "seq " << s << " head " << h << " slot " << i;
            }
          }
          // One scale doubled (sequence 0's first page) must show in the scores.
          if (h == 0) {
            const size_t block_bytes = slice.size() * sizeof(Word512) / b.num_blocks;
            uint8_t* scale_at = reinterpret_cast<uint8_t*>(slice.data()) +
                                static_cast<size_t>(b.table[0]) * block_bytes + 2 * d;
            uint32_t bits;
            std::memcpy(&bits, scale_at, 4);
            if (bits != 0) {
              bits += 1u << 23;  // exponent + 1
              std::memcpy(scale_at, &bits, 4);
              run(scores, pages, counts);
              EXPECT_NE(0, std::memcmp(ref.data(), scores.data(), b.max_blocks * sizeof(float)))
                  << "a changed scale went unnoticed";
            }
          }
        }
      }
    }
  }
}

// The emulated card with an int8 layer against the CPU selector with one, step by step.
TEST(Int8EmulatedU55c, MatchesCpuSelectorThroughDecodeSteps) {
  std::mt19937_64 rng(FreshSeed("Int8EmulatedU55c.MatchesCpuSelectorThroughDecodeSteps"));
  const int bs = 16, kv = 2, d = 128, group = 4;
  const std::vector<int> lens = {700, 333, 1200};
  Batch b = MakeBatch(rng, DType::kBFloat16, bs, kv, d, group, lens, 0, false);
  // Room for the decode steps: every sequence grows by `steps` tokens into its own pages.
  KvCacheView cache = b.Cache();
  CacheShape shape{DType::kBFloat16, b.num_blocks, bs, kv, d};
  shape.digest_format = DigestFormat::kInt8;
  EmulatedU55cSelector fpga(U55cParams{}, /*paced=*/false);  // HLS kernels in C simulation
  // The functional-reference card (CPU reference inside) must agree as well.
  EmulatedU55cSelector ref_card(U55cParams{}, /*paced=*/false, EmulatedFunctional::kReference);
  CpuPageSelector cpu;
  for (PageSelector* s : {static_cast<PageSelector*>(&fpga), static_cast<PageSelector*>(&ref_card),
                          static_cast<PageSelector*>(&cpu)}) {
    ASSERT_TRUE(s->AddLayer(0, shape).ok());
    ASSERT_TRUE(s->BuildDigests(0, cache, b.Table()).ok());
  }

  auto same_digests = [&](const char* when) {
    for (EmulatedU55cSelector* card : {&fpga, &ref_card}) {
      Int8Digests got(DigestView{nullptr, DType::kBFloat16, b.num_blocks, kv, d});
      ASSERT_TRUE(card->ReadDigests(0, got.view()).ok());
      absl::StatusOr<DigestView> want = cpu.Digests(0);
      ASSERT_TRUE(want.ok());
      const BlockTableView t = b.Table();
      for (int s = 0; s < t.num_seqs; ++s) {
        for (int p = 0; p < NumPages(t.seq_lens[s], bs); ++p) {
          const int blk = t.Block(s, p);
          const DigestView g = got.view();
          ASSERT_EQ(0, std::memcmp(static_cast<int8_t*>(g.data) + g.Offset(blk, 0, 0),
                                   static_cast<int8_t*>(want->data) + g.Offset(blk, 0, 0),
                                   g.BlockStride()))
              << when << ": codes of seq " << s << " page " << p;
          ASSERT_EQ(0, std::memcmp(g.scales + g.ScaleIndex(blk, 0),
                                   want->scales + g.ScaleIndex(blk, 0), kv * sizeof(float)))
              << when << ": scales of seq " << s << " page " << p;
          ASSERT_EQ(0, std::memcmp(static_cast<uint8_t*>(g.exact) + g.Offset(blk, 0, 0) * 2,
                                   static_cast<uint8_t*>(want->exact) + g.Offset(blk, 0, 0) * 2,
                                   g.BlockStride() * 2))
              << when << ": exact rows of seq " << s << " page " << p;
        }
      }
    }
  };
  same_digests("build");

  const SelectionConfig config{.budget_tokens = 12 * bs, .num_sink_pages = 1, .num_local_pages = 2};
  const int k = config.PagesPerHead(bs);
  const int num_seqs = static_cast<int>(lens.size());
  for (int step = 0; step < 3; ++step) {
    // Rewrite one token per sequence (its last, or a page start) with fresh keys: a decode step.
    std::vector<int64_t> slots;
    const BlockTableView t = b.Table();
    for (int s = 0; s < num_seqs; ++s) {
      const int tok = step == 1 ? (t.seq_lens[s] - 1) / bs * bs : t.seq_lens[s] - 1;
      slots.push_back(static_cast<int64_t>(t.Block(s, tok / bs)) * bs + tok % bs);
    }
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<uint8_t> keys(slots.size() * kv * d * 2);
    for (size_t i = 0; i < slots.size() * kv * d; ++i) {
      StoreFromFloat(keys.data(), DType::kBFloat16, i, normal(rng));
    }
    ASSERT_TRUE(fpga.AppendKeys(0, slots.data(), num_seqs, keys.data()).ok());
    ASSERT_TRUE(ref_card.AppendKeys(0, slots.data(), num_seqs, keys.data()).ok());
    ASSERT_TRUE(cpu.AppendKeys(0, slots.data(), num_seqs, keys.data()).ok());
    same_digests("append");
    std::vector<uint8_t> q(static_cast<size_t>(num_seqs) * kv * group * d * 2);
    for (size_t i = 0; i < q.size() / 2; ++i)
      StoreFromFloat(q.data(), DType::kBFloat16, i, normal(rng));
    const QueryView qv{q.data(), DType::kBFloat16, num_seqs, kv * group, d};
    std::vector<int32_t> fp(num_seqs * kv * k, -5), fc(num_seqs * kv, -5), cp(fp.size(), -6),
        cc(fc.size(), -6);
    absl::StatusOr<SelectTicket> tf =
        fpga.Submit({0, qv, t, config, SelectionView{fp.data(), fc.data(), num_seqs, kv, k}});
    absl::StatusOr<SelectTicket> tc =
        cpu.Submit({0, qv, t, config, SelectionView{cp.data(), cc.data(), num_seqs, kv, k}});
    std::vector<int32_t> rp(fp.size(), -7), rc(fc.size(), -7);
    absl::StatusOr<SelectTicket> tr =
        ref_card.Submit({0, qv, t, config, SelectionView{rp.data(), rc.data(), num_seqs, kv, k}});
    ASSERT_TRUE(tf.ok() && tc.ok() && tr.ok());
    ASSERT_TRUE(fpga.Wait(*tf, absl::InfiniteFuture()).ok());
    ASSERT_TRUE(cpu.Wait(*tc, absl::InfiniteFuture()).ok());
    ASSERT_TRUE(ref_card.Wait(*tr, absl::InfiniteFuture()).ok());
    EXPECT_EQ(fp, cp) << "step " << step;
    EXPECT_EQ(fc, cc) << "step " << step;
    EXPECT_EQ(rp, cp) << "step " << step << " (functional-reference card)";
    EXPECT_EQ(rc, cc) << "step " << step << " (functional-reference card)";
    ASSERT_TRUE(fpga.Costs().modeled_device_ms.has_value());
  }
}

// Modeled: the int8 score launch reads 5 of 8 words per page and head (bf16, d = 128) and takes
// no longer than the native one; the slice holds the record and the exact rows.
TEST(Int8DeviceLayout, ModeledBytesShrink) {
  const int bs = 16, kv = 8, d = 128, group = 4, pages = 2048;
  CacheShape native{DType::kBFloat16, pages + 1, bs, kv, d};
  CacheShape int8 = native;
  int8.digest_format = DigestFormat::kInt8;
  EXPECT_EQ(ScanWordsOf(native), 8u);
  EXPECT_EQ(ScanWordsOf(int8), 5u);
  EXPECT_EQ(HeadSliceWords(native), static_cast<size_t>(pages + 1) * 8);
  EXPECT_EQ(HeadSliceWords(int8), static_cast<size_t>(pages + 1) * 13);
  std::vector<int32_t> table(pages), lens = {pages * bs};
  for (int i = 0; i < pages; ++i) table[i] = i;
  std::vector<uint8_t> q(kv * group * d * 2);
  std::vector<int32_t> sel(64), cnt(1);
  SelectRequest r{0, QueryView{q.data(), DType::kBFloat16, 1, kv * group, d},
                  BlockTableView{table.data(), lens.data(), 1, pages},
                  SelectionConfig{.budget_tokens = 64 * bs},
                  SelectionView{sel.data(), cnt.data(), 1, kv, 64}};
  const ScoreIo io = PlanScoreIo(1, group, d, pages, 64);
  const CuLaunch a = ScoreLaunchWork(r, native, 0, io), c = ScoreLaunchWork(r, int8, 0, io);
  const double other =
      io.queries_bytes + io.table_bytes + io.lens_bytes + io.pages_bytes + io.counts_bytes;
  EXPECT_DOUBLE_EQ(a.hbm_bytes - other, 512.0 * pages);
  EXPECT_DOUBLE_EQ(c.hbm_bytes - other, 320.0 * pages);
  EXPECT_LE(c.stream_words, a.stream_words);
  const U55cModel model{U55cParams{}};
  EXPECT_LT(model.CuSeconds(c), model.CuSeconds(a));
}

}  // namespace
}  // namespace mempipe
