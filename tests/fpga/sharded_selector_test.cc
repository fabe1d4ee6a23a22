// The sharded FPGA selector (fpga/sharded_selector.h) and the emulated card with super-page
// digests (fpga/emulation/hierarchical_u55c.h).
#include "fpga/sharded_selector.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "absl/time/clock.h"
#include "core/status_macros.h"
#include "fpga/emulation/hierarchical_u55c.h"
#include "fpga/fpga_selector.h"
#include "gtest/gtest.h"
#include "retriever/hierarchical.h"
#include "retriever/select.h"
#include "tests/testing/paged_fixture.h"
#include "tests/testing/super_page_fixture.h"

namespace mempipe {
namespace {

using testing::HierFixture;
using testing::TestSeed;

constexpr int kKvHeads = 8, kGroup = 4, kHeadDim = 64, kBlock = 16;

struct Selection {
  std::vector<int32_t> pages, counts;
  SelectorCosts costs;
};

// Builds the digests from `fx`, appends `steps` new tokens per sequence (the same keys for every
// selector), and selects once per step; returns every step's selections concatenated.
absl::StatusOr<Selection> RunSteps(PageSelector& sel, HierFixture& fx, const SelectionConfig& cfg,
                                   uint64_t seed, int steps) {
  const int seqs = static_cast<int>(fx.lens.size());
  const int k = cfg.PagesPerHead(kBlock);
  MEMPIPE_RETURN_IF_ERROR(
      sel.AddLayer(3, CacheShape{fx.cache.dtype, fx.cache.num_blocks, kBlock, kKvHeads, kHeadDim}));
  // Prefill all but the last `steps` tokens of each sequence, then append one per step.
  std::vector<int32_t> lens = fx.lens;
  for (int32_t& l : lens) l -= steps;
  BlockTableView table = fx.table_view();
  table.seq_lens = lens.data();
  MEMPIPE_RETURN_IF_ERROR(sel.BuildDigests(3, fx.cache, table));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Selection all;
  const size_t row = static_cast<size_t>(kKvHeads) * kHeadDim * DTypeSize(fx.cache.dtype);
  for (int step = 0; step < steps; ++step) {
    std::vector<int64_t> slots;
    std::vector<uint8_t> keys;
    for (int s = 0; s < seqs; ++s) {
      const int t = lens[s]++;
      const int b = fx.table[s * fx.max_blocks + t / kBlock];
      slots.push_back(static_cast<int64_t>(b) * kBlock + t % kBlock);
      const uint8_t* src =
          fx.storage.data() + fx.cache.Offset(0, b, t % kBlock, 0) * DTypeSize(fx.cache.dtype);
      keys.insert(keys.end(), src, src + row);
    }
    MEMPIPE_RETURN_IF_ERROR(sel.AppendKeys(3, slots.data(), seqs, keys.data()));
    std::vector<float> q(static_cast<size_t>(seqs) * kKvHeads * kGroup * kHeadDim);
    for (float& v : q) v = u(rng);
    std::vector<int32_t> pages(static_cast<size_t>(seqs) * kKvHeads * k, 4242);  // poisoned
    std::vector<int32_t> counts(static_cast<size_t>(seqs) * kKvHeads, -3);
    SelectRequest r{3, QueryView{q.data(), DType::kFloat32, seqs, kKvHeads * kGroup, kHeadDim},
                    table, cfg, SelectionView{pages.data(), counts.data(), seqs, kKvHeads, k}};
    MEMPIPE_ASSIGN_OR_RETURN(SelectTicket t, sel.Submit(r));
    MEMPIPE_RETURN_IF_ERROR(sel.Wait(t, absl::InfiniteFuture()));
    MEMPIPE_RETURN_IF_ERROR(ValidateSelection(r.out, table, kBlock, cfg));
    all.pages.insert(all.pages.end(), pages.begin(), pages.end());
    all.counts.insert(all.counts.end(), counts.begin(), counts.end());
    all.costs = sel.Costs();
  }
  return all;
}

std::unique_ptr<PageSelector> Make(int cards, int f, bool paced = false) {
  FpgaOptions o;
  o.cards = cards;
  o.pages_per_super_page = f;
  o.paced = paced;
  auto s = MakeFpgaSelector(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : nullptr;
}

SelectionConfig Config(int f) {
  SelectionConfig cfg;
  cfg.budget_tokens = 24 * kBlock;
  cfg.hierarchy = PageHierarchy{f, 2};
  return cfg;
}

// Flat (HLS kernels) and hierarchical (reference) cards, sharded 2, 3 (uneven), 4 and 8 ways:
// the same selections as one card, bit for bit, and as the CPU reference.
TEST(ShardedFpgaSelectorTest, SelectionsEqualOneCardAndTheReference) {
  const uint64_t seed = TestSeed();
  for (int f : {1, 4}) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> len(40 * kBlock, 120 * kBlock);
    HierFixture fx(rng, DType::kBFloat16, kBlock, 4, kKvHeads, kHeadDim,
                   {len(rng), len(rng), 3 * kBlock + 2});
    CpuPageSelector cpu;
    auto ref = RunSteps(cpu, fx, Config(f), seed, 3);
    ASSERT_TRUE(ref.ok()) << ref.status();
    auto one = Make(1, f);
    auto single = RunSteps(*one, fx, Config(f), seed, 3);
    ASSERT_TRUE(single.ok()) << single.status();
    EXPECT_EQ(ref->pages, single->pages) << "f " << f;
    for (int cards : {2, 3, 4, 8}) {
      auto sharded_sel = Make(cards, f);
      auto sharded = RunSteps(*sharded_sel, fx, Config(f), seed, 3);
      ASSERT_TRUE(sharded.ok()) << sharded.status();
      EXPECT_EQ(single->pages, sharded->pages) << cards << " cards, f " << f;
      EXPECT_EQ(single->counts, sharded->counts);
    }
    // The comparison is not vacuous: another query selects differently.
    auto other_sel = Make(2, f);
    auto other = RunSteps(*other_sel, fx, Config(f), seed + 1, 3);
    ASSERT_TRUE(other.ok());
    EXPECT_NE(single->pages, other->pages);
  }
}

// Modeled time: the slowest card's plus the host's fan-out and fan-in; energy: the sum. A
// selector priced as one card (all heads' DMAs on one link, all launches on one card) fails.
TEST(ShardedFpgaSelectorTest, ModeledTimeIsTheSlowestCardsPlusFanOutAndIn) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  HierFixture fx(rng, DType::kBFloat16, kBlock, 4, kKvHeads, kHeadDim,
                 {200 * kBlock, 90 * kBlock + 7});
  auto one = Make(1, 1);
  auto single = RunSteps(*one, fx, Config(1), seed, 1);
  ASSERT_TRUE(single.ok());
  const ShardingParams sp;
  for (int cards : {2, 3, 4}) {
    FpgaOptions o;
    o.cards = cards;
    auto made = MakeFpgaSelector(o);
    ASSERT_TRUE(made.ok());
    auto* sharded = static_cast<ShardedFpgaSelector*>(made->get());
    auto r = RunSteps(*sharded, fx, Config(1), seed, 1);
    ASSERT_TRUE(r.ok()) << r.status();
    const std::vector<SelectorCosts> per_card = sharded->LastCardCosts();
    ASSERT_EQ(static_cast<int>(per_card.size()), cards);
    double slowest = 0, sum = 0, energy = 0;
    for (const SelectorCosts& c : per_card) {
      ASSERT_TRUE(c.modeled_device_ms.has_value());
      slowest = std::max(slowest, *c.modeled_device_ms);
      sum += *c.modeled_device_ms;
      energy += *c.modeled_energy_mj;
    }
    const double host_ms = cards * (sp.fan_out_per_card_s + sp.fan_in_per_card_s) * 1e3;
    ASSERT_TRUE(r->costs.modeled_device_ms.has_value());
    EXPECT_NEAR(*r->costs.modeled_device_ms, slowest + host_ms, 1e-9);
    EXPECT_NEAR(*r->costs.modeled_energy_mj, energy, 1e-9);
    // Known-wrong pricings are rejected: cards in series, or all heads on one card.
    EXPECT_GT(sum + host_ms - *r->costs.modeled_device_ms, 1e-6);
    EXPECT_LT(*r->costs.modeled_device_ms, *single->costs.modeled_device_ms) << cards;
    if (cards == 3) {  // 2/3/3 heads: the two-head card is faster, the total is not its
      EXPECT_LT(*per_card[0].modeled_device_ms, *per_card[2].modeled_device_ms);
      EXPECT_GT(*r->costs.modeled_device_ms - host_ms, *per_card[0].modeled_device_ms);
    }
  }
}

TEST(ShardedFpgaSelectorTest, ErrorsNameTheBadValue) {
  FpgaOptions o;
  o.cards = 0;
  EXPECT_NE(MakeFpgaSelector(o).status().message().find("got 0"), absl::string_view::npos);
  o.cards = 9;
  auto sel = MakeFpgaSelector(o);
  ASSERT_TRUE(sel.ok());
  const absl::Status s = (*sel)->AddLayer(0, CacheShape{DType::kFloat32, 64, 16, 8, 64});
  EXPECT_NE(s.message().find("9 cards need at least 9 KV heads"), absl::string_view::npos) << s;
  o.cards = 1;
  o.pages_per_super_page = 3;
  EXPECT_NE(MakeFpgaSelector(o).status().message().find("got 3"), absl::string_view::npos);
  o.pages_per_super_page = 4;
  o.backend = FpgaBackend::kXrt;
  EXPECT_FALSE(MakeFpgaSelector(o).ok());
  // The flat HLS card refuses a hierarchical request instead of selecting flat.
  std::mt19937_64 rng(TestSeed());
  HierFixture fx(rng, DType::kFloat32, kBlock, 4, kKvHeads, kHeadDim, {60 * kBlock});
  auto flat_card = Make(1, 1);
  auto r = RunSteps(*flat_card, fx, Config(4), 1, 1);
  EXPECT_NE(r.status().message().find("flat only"), absl::string_view::npos) << r.status();
  // A card with super-pages of 4 refuses a request for 2, and a misaligned table.
  auto hier_card = Make(1, 4);
  r = RunSteps(*hier_card, fx, Config(2), 1, 1);
  EXPECT_NE(r.status().message().find("super-page digests of 4"), absl::string_view::npos)
      << r.status();
  std::swap(fx.table[4], fx.table[5]);
  auto hier_card2 = Make(1, 4);
  r = RunSteps(*hier_card2, fx, Config(4), 1, 1);
  EXPECT_NE(r.status().message().find("aligned group"), absl::string_view::npos) << r.status();
}

// The emulated card's super digests equal the CPU reference's; a hierarchical selection is
// priced below the flat one at long context (fewer bytes), and paced completion is no earlier
// than the modeled time.
TEST(HierarchicalU55cTest, DigestsMatchAndFewerBytesCostLess) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  HierFixture fx(rng, DType::kBFloat16, kBlock, 4, kKvHeads, kHeadDim,
                 {1500 * kBlock + 3, 800 * kBlock});
  HierarchicalU55cSelector card(U55cParams{}, /*paced=*/true, 4);
  auto hier = RunSteps(card, fx, Config(4), seed, 2);
  ASSERT_TRUE(hier.ok()) << hier.status();
  ASSERT_GE(hier->costs.host_ms + 1e-3, *hier->costs.modeled_device_ms) << "paced";
  const HierarchyStats st = card.LastStats();
  EXPECT_GT(st.super_rows_scored, 0);
  EXPECT_LT(st.super_rows_scored + st.page_rows_scored, st.flat_page_rows / 2);
  // Digests: CPU reference from scratch.
  ASSERT_TRUE(BuildDigests(fx.cache, fx.table_view(), fx.page_view()).ok());
  ASSERT_TRUE(BuildSuperDigests(fx.page_view(), fx.table_view(), kBlock, 4, fx.super_view()).ok());
  auto pv = card.PageDigests(3);
  auto sv = card.SuperDigests(3);
  ASSERT_TRUE(pv.ok() && sv.ok());
  for (size_t s = 0; s < fx.lens.size(); ++s) {
    for (int p = 0; p < NumPages(fx.lens[s], kBlock); p += 4) {
      const int sb = fx.table[s * fx.max_blocks + p] / 4;
      const size_t bytes = fx.super_view().BlockStride() * 2;
      ASSERT_EQ(0, std::memcmp(static_cast<uint8_t*>(sv->data) + sb * bytes,
                               fx.super.data() + sb * bytes, bytes))
          << "seq " << s << " super-page " << p / 4;
    }
  }
  // The same requests flat on the same kind of card: more modeled time.
  HierarchicalU55cSelector flat_card(U55cParams{}, /*paced=*/false, 4);
  auto flat = RunSteps(flat_card, fx, Config(1), seed, 2);
  ASSERT_TRUE(flat.ok());
  EXPECT_LT(*hier->costs.modeled_device_ms, *flat->costs.modeled_device_ms);
}

// A paced result due after the deadline is late even when the waiter only looks once it is done
// (EmulatedU55c's test of the same): before, Wait clamped a passed deadline to "now" and counted
// the late card as on time.
TEST(HierarchicalU55cTest, PacedResultDueAfterTheDeadlineIsLateWhenLookedAtLate) {
  const uint64_t seed = TestSeed();
  std::mt19937_64 rng(seed);
  HierFixture fx(rng, DType::kBFloat16, kBlock, 4, kKvHeads, kHeadDim, {300 * kBlock + 3});
  U55cParams p;
  p.launch_latency_s = 0.02;  // modeled completion about 20 ms after the submit
  HierarchicalU55cSelector card(p, /*paced=*/true, 4);
  ASSERT_TRUE(RunSteps(card, fx, Config(4), seed, 1).ok());
  const int k = Config(4).PagesPerHead(kBlock);
  std::vector<float> q(static_cast<size_t>(kKvHeads) * kGroup * kHeadDim, 0.5f);
  std::vector<int32_t> pages(static_cast<size_t>(kKvHeads) * k, 4242), counts(kKvHeads, -3);
  const SelectRequest r{3, QueryView{q.data(), DType::kFloat32, 1, kKvHeads * kGroup, kHeadDim},
                        fx.table_view(), Config(4),
                        SelectionView{pages.data(), counts.data(), 1, kKvHeads, k}};
  for (const bool late : {true, false}) {
    const absl::Time submitted = absl::Now();
    auto t = card.Submit(r);
    ASSERT_TRUE(t.ok()) << t.status();
    absl::SleepFor(absl::Milliseconds(late ? 80 : 300));  // done by now
    const absl::Status st =
        card.Wait(*t, submitted + absl::Milliseconds(late ? 1 : 250));  // both passed
    if (late) {
      EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
      EXPECT_EQ(counts, std::vector<int32_t>(kKvHeads, -3));
    } else {
      EXPECT_TRUE(st.ok()) << st;
      EXPECT_NE(counts, std::vector<int32_t>(kKvHeads, -3));
    }
  }
}

}  // namespace
}  // namespace mempipe
