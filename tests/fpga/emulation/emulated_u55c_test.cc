// The emulated U55C end to end against the CPU reference selector: digests and selections equal
// bit for bit through bulk build, decode-step appends and scoring, on fresh random data; costs
// carry both measured host time and modeled device time/energy; paced completion, deadlines and
// errors.
#include "fpga/emulation/emulated_u55c.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <random>
#include <vector>

#include "absl/time/clock.h"
#include "fpga/fpga_selector.h"
#include "gtest/gtest.h"
#include "tests/fpga/test_data.h"

namespace mempipe {
namespace {

using testing::Batch;

struct Case {
  DType dtype;
  int block_size, kv_heads, head_dim, group;
  GroupAggregation agg;
};

std::vector<uint8_t> DigestBytes(PageSelector& sel, int layer, const CacheShape& sh) {
  DigestView v{nullptr, sh.dtype, sh.num_blocks, sh.num_kv_heads, sh.head_dim};
  std::vector<uint8_t> bytes(v.NumBytes());
  v.data = bytes.data();
  if (auto* emu = dynamic_cast<EmulatedU55cSelector*>(&sel)) {
    EXPECT_TRUE(emu->ReadDigests(layer, v).ok());
  } else {
    auto ref = dynamic_cast<CpuPageSelector&>(sel).Digests(layer);
    EXPECT_TRUE(ref.ok());
    std::memcpy(bytes.data(), ref->data, bytes.size());
  }
  return bytes;
}

TEST(EmulatedU55c, MatchesCpuSelectorThroughDecodeSteps) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.MatchesCpuSelectorThroughDecodeSteps"));
  const Case cases[] = {
      {DType::kFloat16, 16, 2, 128, 4, GroupAggregation::kMax},
      {DType::kBFloat16, 32, 1, 64, 8, GroupAggregation::kSum},
      {DType::kFloat32, 64, 3, 256, 1, GroupAggregation::kMax},
      {DType::kFloat16, 16, 8, 64, 2, GroupAggregation::kSum},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << DTypeName(c.dtype) << " page " << c.block_size << " d " << c.head_dim << " kv "
                 << c.kv_heads << " group " << c.group);
    std::uniform_int_distribution<int> len(1, 30 * c.block_size);
    Batch b = testing::MakeBatch(rng, c.dtype, c.block_size, c.kv_heads, c.head_dim, c.group,
                                 {len(rng), len(rng), len(rng)}, 0, false);
    const CacheShape shape{c.dtype, b.num_blocks, c.block_size, c.kv_heads, c.head_dim};
    EmulatedU55cSelector emu(U55cParams{}, /*paced=*/false);
    CpuPageSelector cpu;
    for (int layer : {0, 1}) {
      ASSERT_TRUE(emu.AddLayer(layer, shape).ok());
      ASSERT_TRUE(cpu.AddLayer(layer, shape).ok());
      ASSERT_TRUE(emu.BuildDigests(layer, b.Cache(), b.Table()).ok());
      ASSERT_TRUE(cpu.BuildDigests(layer, b.Cache(), b.Table()).ok());
    }
    // Spare blocks: those no sequence uses yet.
    std::vector<bool> used(b.num_blocks, false);
    for (int s = 0; s < 3; ++s) {
      for (int p = 0; p < NumPages(b.lens[s], c.block_size); ++p)
        used[b.table[s * b.max_blocks + p]] = true;
    }
    std::vector<int32_t> spare;
    for (int blk = 0; blk < b.num_blocks; ++blk) {
      if (!used[blk]) spare.push_back(blk);
    }
    std::uniform_real_distribution<float> uni(-3.0f, 3.0f);
    SelectionConfig config;
    config.budget_tokens = c.block_size * 6;
    config.num_sink_pages = 1;
    config.num_local_pages = 2;
    config.aggregation = c.agg;
    for (int step = 0; step < 2 * c.block_size + 3; ++step) {
      // One token per sequence; a sequence that needs a page when none is spare sends padding.
      std::vector<int64_t> slots(3);
      for (int s = 0; s < 3; ++s) {
        const int pos = b.lens[s];
        const int page = pos / c.block_size;
        if (pos % c.block_size == 0) {
          if (spare.empty() || page >= b.max_blocks) {
            slots[s] = -1;
            continue;
          }
          b.table[s * b.max_blocks + page] = spare.back();
          spare.pop_back();
        }
        slots[s] = static_cast<int64_t>(b.table[s * b.max_blocks + page]) * c.block_size +
                   pos % c.block_size;
        ++b.lens[s];
      }
      std::vector<uint8_t> keys(3 * static_cast<size_t>(c.kv_heads) * c.head_dim *
                                DTypeSize(c.dtype));
      for (size_t i = 0; i < keys.size() / DTypeSize(c.dtype); ++i) {
        StoreFromFloat(keys.data(), c.dtype, i, uni(rng));
      }
      for (size_t i = 0; i < b.queries.size() / DTypeSize(c.dtype); ++i) {
        StoreFromFloat(b.queries.data(), c.dtype, i, uni(rng));
      }
      const int max_sel = config.PagesPerHead(c.block_size) + 1;
      const size_t n = 3 * static_cast<size_t>(c.kv_heads) * max_sel;
      // Poisoned outputs: every entry must be written.
      std::vector<int32_t> emu_pages(n, 0x7eadbeef), cpu_pages(n, 0x7eadbeef);
      std::vector<int32_t> emu_counts(3 * c.kv_heads, -99), cpu_counts(3 * c.kv_heads, -99);
      // Both layers in flight before either is waited for, as the pipeline does.
      std::vector<SelectTicket> tickets;
      for (int layer : {0, 1}) {
        ASSERT_TRUE(emu.AppendKeys(layer, slots.data(), 3, keys.data()).ok());
        ASSERT_TRUE(cpu.AppendKeys(layer, slots.data(), 3, keys.data()).ok());
      }
      for (int layer : {0, 1}) {
        const SelectionView out{layer == 0 ? emu_pages.data() : cpu_pages.data(),
                                layer == 0 ? emu_counts.data() : cpu_counts.data(), 3, c.kv_heads,
                                max_sel};
        auto t = emu.Submit({layer, b.Query(), b.Table(), config, out});
        ASSERT_TRUE(t.ok()) << t.status();
        tickets.push_back(*t);
      }
      for (SelectTicket t : tickets) ASSERT_TRUE(emu.Wait(t, absl::InfiniteFuture()).ok());
      const SelectorCosts costs = emu.Costs();
      EXPECT_GT(costs.host_ms, 0.0);
      ASSERT_TRUE(costs.modeled_device_ms.has_value());
      ASSERT_TRUE(costs.modeled_energy_mj.has_value());
      EXPECT_GT(*costs.modeled_device_ms, costs.transfer_ms);
      EXPECT_GT(*costs.modeled_energy_mj, 0.0);
      // Layer 0's selection (into emu_*) and layer 1's (into cpu_*) both against the reference.
      for (int layer : {0, 1}) {
        std::vector<int32_t> ref_pages(n, 0x7eadbeef), ref_counts(3 * c.kv_heads, -99);
        const SelectionView ref{ref_pages.data(), ref_counts.data(), 3, c.kv_heads, max_sel};
        auto t = cpu.Submit({layer, b.Query(), b.Table(), config, ref});
        ASSERT_TRUE(t.ok());
        ASSERT_TRUE(cpu.Wait(*t, absl::InfiniteFuture()).ok());
        EXPECT_EQ(ref_pages, layer == 0 ? emu_pages : cpu_pages) << "step " << step;
        EXPECT_EQ(ref_counts, layer == 0 ? emu_counts : cpu_counts) << "step " << step;
        EXPECT_EQ(DigestBytes(emu, layer, shape), DigestBytes(cpu, layer, shape))
            << "step " << step << " layer " << layer;
      }
    }
  }
}

struct Small {
  Batch b;
  CacheShape shape;
  SelectionConfig config;
  std::vector<int32_t> pages, counts;
  SelectRequest Request() {
    return {0, b.Query(), b.Table(), config,
            SelectionView{pages.data(), counts.data(), static_cast<int>(b.lens.size()),
                          b.num_kv_heads, config.PagesPerHead(b.block_size)}};
  }
};

Small MakeSmall(std::mt19937_64& rng) {
  Small s;
  s.b = testing::MakeBatch(rng, DType::kFloat16, 16, 2, 64, 2, {900, 333}, 0, false);
  s.shape = {DType::kFloat16, s.b.num_blocks, 16, 2, 64};
  s.config.budget_tokens = 16 * 8;
  s.pages.assign(2 * 2 * 8, 0);
  s.counts.assign(2 * 2, 0);
  return s;
}

// functional=reference (the CPU reference computing the emulated card's result) gives the HLS
// kernels' bits, digests included, and the same modeled cost: only the host time differs.
TEST(EmulatedU55c, ReferenceFunctionalMatchesTheHlsKernels) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.ReferenceFunctionalMatchesTheHlsKernels"));
  Batch b = testing::MakeBatch(rng, DType::kBFloat16, 16, 2, 128, 4, {900, 333, 17}, 0, false);
  const CacheShape shape{DType::kBFloat16, b.num_blocks, 16, 2, 128};
  EmulatedU55cSelector hls(U55cParams{}, /*paced=*/false);
  EmulatedU55cSelector ref(U55cParams{}, /*paced=*/false, EmulatedFunctional::kReference, 2);
  SelectionConfig config;
  config.budget_tokens = 16 * 8;
  std::vector<int64_t> slots = {static_cast<int64_t>(b.table[0]) * 16 + 3};
  std::vector<uint8_t> keys(2 * 128 * 2);
  std::uniform_real_distribution<float> uni(-9.0f, 9.0f);
  for (size_t i = 0; i < keys.size() / 2; ++i)
    StoreFromFloat(keys.data(), DType::kBFloat16, i, uni(rng));
  std::vector<std::vector<int32_t>> pages, counts;
  std::vector<double> modeled;
  for (EmulatedU55cSelector* sel : {&hls, &ref}) {
    ASSERT_TRUE(sel->AddLayer(2, shape).ok());
    ASSERT_TRUE(sel->BuildDigests(2, b.Cache(), b.Table()).ok());
    ASSERT_TRUE(sel->AppendKeys(2, slots.data(), 1, keys.data()).ok());
    pages.emplace_back(3 * 2 * 9, 0x7eadbeef);
    counts.emplace_back(3 * 2, -99);
    auto t = sel->Submit(
        {2, b.Query(), b.Table(), config, {pages.back().data(), counts.back().data(), 3, 2, 9}});
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE(sel->Wait(*t, absl::InfiniteFuture()).ok());
    modeled.push_back(sel->Costs().modeled_device_ms.value_or(-1));
  }
  EXPECT_EQ(pages[0], pages[1]);
  EXPECT_EQ(counts[0], counts[1]);
  EXPECT_NE(pages[0], std::vector<int32_t>(pages[0].size(), 0x7eadbeef));  // the check can fail
  EXPECT_EQ(DigestBytes(hls, 2, shape), DigestBytes(ref, 2, shape));
  EXPECT_EQ(modeled[0], modeled[1]);
  EXPECT_GT(modeled[0], 0);
  EXPECT_EQ(ParseEmulatedFunctional("rtl").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EmulatedU55c, PacedCompletionWaitsForTheModeledTime) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.PacedCompletionWaitsForTheModeledTime"));
  Small s = MakeSmall(rng);
  U55cParams p;
  p.launch_latency_s = 0.08;  // a slow card, so the pacing dominates host noise
  EmulatedU55cSelector emu(p, /*paced=*/true);
  ASSERT_TRUE(emu.AddLayer(0, s.shape).ok());
  const auto tb = std::chrono::steady_clock::now();
  ASSERT_TRUE(emu.BuildDigests(0, s.b.Cache(), s.b.Table()).ok());
  const double build_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tb).count();
  ASSERT_TRUE(emu.Costs().modeled_device_ms.has_value());
  EXPECT_GE(build_ms, *emu.Costs().modeled_device_ms * 0.99) << "a paced update is paced too";
  const auto t0 = std::chrono::steady_clock::now();
  auto t = emu.Submit(s.Request());
  ASSERT_TRUE(t.ok());
  const double submit_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(submit_ms, 80.0) << "Submit returns before the modeled completion";
  ASSERT_TRUE(emu.Wait(*t, absl::InfiniteFuture()).ok());
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const SelectorCosts c = emu.Costs();
  ASSERT_TRUE(c.modeled_device_ms.has_value());
  EXPECT_GE(*c.modeled_device_ms, 80.0);
  EXPECT_GE(wall_ms, *c.modeled_device_ms * 0.99);
  EXPECT_GE(c.host_ms, *c.modeled_device_ms * 0.99);

  // Two requests queue in order: the second completes a modeled call after the first.
  const auto t1 = std::chrono::steady_clock::now();
  auto a = emu.Submit(s.Request());
  auto b2 = emu.Submit(s.Request());
  ASSERT_TRUE(a.ok() && b2.ok());
  ASSERT_TRUE(emu.Wait(*a, absl::InfiniteFuture()).ok());
  ASSERT_TRUE(emu.Wait(*b2, absl::InfiniteFuture()).ok());
  const double both_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();
  EXPECT_GE(both_ms, 2 * *c.modeled_device_ms * 0.99);
}

TEST(EmulatedU55c, DeadlineDropsTheRequest) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.DeadlineDropsTheRequest"));
  Small s = MakeSmall(rng);
  U55cParams p;
  p.launch_latency_s = 0.2;
  EmulatedU55cSelector emu(p, /*paced=*/true);
  ASSERT_TRUE(emu.AddLayer(0, s.shape).ok());
  ASSERT_TRUE(emu.BuildDigests(0, s.b.Cache(), s.b.Table()).ok());
  std::fill(s.pages.begin(), s.pages.end(), 0x7eadbeef);
  const std::vector<int32_t> poisoned = s.pages;
  auto t = emu.Submit(s.Request());
  ASSERT_TRUE(t.ok());
  const absl::Status late = emu.Wait(*t, absl::Now() + absl::Milliseconds(10));
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded) << late;
  EXPECT_EQ(emu.Wait(*t, absl::InfiniteFuture()).code(), absl::StatusCode::kNotFound);
  // The dropped request never writes the caller's buffers, even after it completes.
  auto next = emu.Submit(s.Request());
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(s.pages, poisoned);
  ASSERT_TRUE(emu.Wait(*next, absl::InfiniteFuture()).ok());
  EXPECT_NE(s.pages, poisoned);
}

// A paced result due after the deadline is late even when the waiter only looks once it is done
// (a waiter descheduled past both, as on a loaded 2-core machine): Wait reports the deadline
// missed and leaves the caller's buffers alone; the same wait with the deadline after the
// modeled completion succeeds. Before the check, the first wait returned OK.
TEST(EmulatedU55c, PacedResultDueAfterTheDeadlineIsLateWhenLookedAtLate) {
  std::mt19937_64 rng(
      testing::FreshSeed("EmulatedU55c.PacedResultDueAfterTheDeadlineIsLateWhenLookedAtLate"));
  Small s = MakeSmall(rng);
  U55cParams p;
  p.launch_latency_s = 0.02;  // modeled completion about 20 ms after the submit
  EmulatedU55cSelector emu(p, /*paced=*/true);
  ASSERT_TRUE(emu.AddLayer(0, s.shape).ok());
  ASSERT_TRUE(emu.BuildDigests(0, s.b.Cache(), s.b.Table()).ok());
  std::fill(s.pages.begin(), s.pages.end(), 0x7eadbeef);
  const std::vector<int32_t> poisoned = s.pages;
  const absl::Time submitted = absl::Now();
  auto t = emu.Submit(s.Request());
  ASSERT_TRUE(t.ok());
  absl::SleepFor(absl::Milliseconds(80));  // the request is done by now
  const absl::Status late = emu.Wait(*t, submitted + absl::Milliseconds(1));
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded) << late;
  EXPECT_EQ(s.pages, poisoned);
  EXPECT_EQ(emu.Wait(*t, absl::InfiniteFuture()).code(), absl::StatusCode::kNotFound);
  // Control: the deadline after the modeled completion, looked at as late.
  const absl::Time again = absl::Now();
  auto u = emu.Submit(s.Request());
  ASSERT_TRUE(u.ok());
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(emu.Wait(*u, again + absl::Milliseconds(250)).ok());  // margin for sanitizers
  EXPECT_NE(s.pages, poisoned);
}

TEST(EmulatedU55c, BadInputsAreStatuses) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.BadInputsAreStatuses"));
  Small s = MakeSmall(rng);
  EmulatedU55cSelector emu(U55cParams{}, false);
  EXPECT_EQ(emu.Submit(s.Request()).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(emu.AddLayer(0, s.shape).ok());
  EXPECT_EQ(emu.AddLayer(0, s.shape).code(), absl::StatusCode::kAlreadyExists);
  CacheShape bad = s.shape;
  bad.block_size = 48;
  const absl::Status bs = emu.AddLayer(1, bad);
  EXPECT_NE(bs.message().find("48"), std::string::npos) << bs;
  // A layer whose digests cannot fit one 512 MB pseudo-channel per KV head.
  const absl::Status big = emu.AddLayer(2, {DType::kFloat32, 300000, 16, 1, 256});
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;

  Batch wide = testing::MakeBatch(rng, DType::kFloat16, 16, 1, 64, 32, {100}, 0, false);
  ASSERT_TRUE(emu.AddLayer(3, {DType::kFloat16, wide.num_blocks, 16, 1, 64}).ok());
  std::vector<int32_t> pages(8), counts(1);
  SelectionConfig config;
  config.budget_tokens = 16 * 8;
  const absl::Status gqa =
      emu.Submit({3, wide.Query(), wide.Table(), config, {pages.data(), counts.data(), 1, 1, 8}})
          .status();
  EXPECT_EQ(gqa.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(gqa.message().find("32"), std::string::npos) << gqa;

  const int64_t slot[] = {static_cast<int64_t>(s.b.num_blocks) * 16};
  std::vector<uint8_t> key(2 * 64 * 2);
  EXPECT_EQ(emu.AppendKeys(0, slot, 1, key.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(emu.Wait(77, absl::InfiniteFuture()).code(), absl::StatusCode::kNotFound);
}

TEST(EmulatedU55c, HeadsSpreadOverPseudoChannels) {
  EmulatedU55cSelector emu(U55cParams{}, false);
  const CacheShape shape{DType::kBFloat16, 128, 16, 8, 128};
  for (int layer = 0; layer < 4; ++layer) ASSERT_TRUE(emu.AddLayer(layer, shape).ok());
  const std::vector<double> bytes = emu.ChannelBytes();
  ASSERT_EQ(bytes.size(), 32u);
  // 4 layers x 8 KV heads fill the 32 channels once each.
  for (double b : bytes) EXPECT_EQ(b, 128.0 * 2 * 128 * 2);
  EXPECT_NE(emu.ChannelOf(0, 0), emu.ChannelOf(1, 0));
}

// A Llama-3-8B-shaped layer (8 KV heads, GQA 4, head_dim 128, fp16, page 16), 4 sequences of
// 8K tokens: the modeled U55C time follows from the parameters by hand (each KV head's CU
// streams its 1 MB of digests at one channel's rate), and both figures are printed, labeled.
TEST(EmulatedU55c, ReferenceShapeCostsFollowTheModel) {
  std::mt19937_64 rng(testing::FreshSeed("EmulatedU55c.ReferenceShapeCostsFollowTheModel"));
  const int seq_len = 8192, num_seqs = 4;
  Batch b = testing::MakeBatch(rng, DType::kFloat16, 16, 8, 128, 4,
                               std::vector<int>(num_seqs, seq_len), 0, false);
  const CacheShape shape{DType::kFloat16, b.num_blocks, 16, 8, 128};
  const U55cParams p;
  EmulatedU55cSelector emu(p, false);
  ASSERT_TRUE(emu.AddLayer(0, shape).ok());
  ASSERT_TRUE(emu.BuildDigests(0, b.Cache(), b.Table()).ok());
  const SelectorCosts build = emu.Costs();
  SelectionConfig config;
  config.budget_tokens = 4096;
  const int k = config.PagesPerHead(16);
  std::vector<int32_t> pages(static_cast<size_t>(num_seqs) * 8 * k), counts(num_seqs * 8);
  auto t = emu.Submit({0, b.Query(), b.Table(), config,
                       SelectionView{pages.data(), counts.data(), num_seqs, 8, k}});
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(emu.Wait(*t, absl::InfiniteFuture()).ok());
  const SelectorCosts c = emu.Costs();

  // The CPU reference on the same request, for the measured side by side (and equality).
  CpuPageSelector cpu;
  ASSERT_TRUE(cpu.AddLayer(0, shape).ok());
  ASSERT_TRUE(cpu.BuildDigests(0, b.Cache(), b.Table()).ok());
  const double cpu_build_ms = cpu.Costs().host_ms;
  std::vector<int32_t> ref_pages(pages.size()), ref_counts(counts.size());
  auto rt = cpu.Submit({0, b.Query(), b.Table(), config,
                        SelectionView{ref_pages.data(), ref_counts.data(), num_seqs, 8, k}});
  ASSERT_TRUE(rt.ok());
  ASSERT_TRUE(cpu.Wait(*rt, absl::InfiniteFuture()).ok());
  EXPECT_EQ(pages, ref_pages);
  EXPECT_EQ(counts, ref_counts);

  // By hand: one CU per KV head, all in parallel.
  const double pages_per_seq = seq_len / 16.0;
  const double digest_bytes = num_seqs * pages_per_seq * 2 * 128 * 2;  // max+min rows, fp16
  // Priced at the RTL's clock estimate (below the Vitis target), whose port may be slower than
  // the channel: min(channel x efficiency, 64 B x clock).
  const double hz = std::min(p.kernel_clock_hz, p.rtl_clock_estimate_hz);
  const double channel_bps =
      std::min(p.hbm_channel_peak_bps * p.hbm_efficiency, p.axi_word_bytes * hz);
  // The RTL kernel's timing (fpga/rtl): the score core takes row_words x max(group, 4 adder
  // stages) clocks per page (4 x 4 here) against the HBM stream; the select's emit pass (a clock
  // per page, plus the row) and the query load do not overlap; fills once per launch and per
  // further sequence. The 8 KV heads (CUs 0-7) run on the CUs that fit (CU c mod PricedCus),
  // so the busiest runs ceil(8 / PricedCus) of them one after another.
  const double score_s = num_seqs * pages_per_seq * 4 * 4 / hz;
  const double serial_s =
      num_seqs * (pages_per_seq * p.select_clocks_per_page + k + 4 * 128 / 16.0) / hz;
  const double fill_s = (p.pipeline_fill_clocks + (num_seqs - 1) * p.row_fill_clocks) / hz;
  const int rounds = (8 + p.PricedCus() - 1) / p.PricedCus();
  const double kernel_s =
      rounds * (std::max(digest_bytes / channel_bps, score_s) + serial_s + fill_s);
  // (io bytes add about 1% to the HBM side)
  const double launch_s = p.launch_latency_s + 7 * p.per_cu_start_s;
  EXPECT_NEAR(*c.modeled_device_ms - c.transfer_ms, (kernel_s + launch_s) * 1e3,
              0.02 * (kernel_s + launch_s) * 1e3);
  // 16 DMAs (one in, one out per CU), each at most a few microseconds past its fixed cost.
  EXPECT_GT(c.transfer_ms, 16 * p.dma_transfer_overhead_s * 1e3);
  EXPECT_LT(c.transfer_ms, 16 * 3 * p.dma_transfer_overhead_s * 1e3);
  std::cout << "[reference shape] 4 seqs x 8K tokens, 8 KV heads, GQA 4, d 128, fp16, page 16\n"
            << "  bulk build  : measured host " << build.host_ms << " ms (this machine, C-sim)"
            << "; modeled U55C " << *build.modeled_device_ms << " ms, " << *build.modeled_energy_mj
            << " mJ\n"
            << "  score+top-k : measured host " << c.host_ms << " ms (this machine, C-sim)"
            << "; modeled U55C " << *c.modeled_device_ms << " ms (of which DMA " << c.transfer_ms
            << " ms), " << *c.modeled_energy_mj << " mJ\n"
            << "  cpu selector: measured host " << cpu_build_ms << " ms build, "
            << cpu.Costs().host_ms << " ms score+top-k (this machine)\n";
}

TEST(FpgaFactory, BuildsTheEmulatorAndRejectsBadOptions) {
  auto sel = MakeFpgaSelector(FpgaOptions{});
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ((*sel)->Name(), "fpga-u55c-emulated");
  FpgaOptions bad;
  bad.params.num_cus = 0;
  EXPECT_EQ(MakeFpgaSelector(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = FpgaOptions{};
  bad.params.hbm_efficiency = 1.5;
  EXPECT_EQ(MakeFpgaSelector(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = FpgaOptions{};
  bad.params.rtl_cus_that_fit = 0;  // no cap would price 32 CUs silently
  EXPECT_EQ(MakeFpgaSelector(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = FpgaOptions{};
  bad.params.rtl_clock_estimate_hz = 0;
  EXPECT_EQ(MakeFpgaSelector(bad).status().code(), absl::StatusCode::kInvalidArgument);
  FpgaOptions vitis;  // the labelled what-if is accepted
  vitis.params = U55cParams::VitisTarget();
  EXPECT_TRUE(MakeFpgaSelector(vitis).ok());
  EXPECT_EQ(*ParseFpgaBackend("xrt"), FpgaBackend::kXrt);
  EXPECT_FALSE(ParseFpgaBackend("vitis").ok());
}

}  // namespace
}  // namespace mempipe
