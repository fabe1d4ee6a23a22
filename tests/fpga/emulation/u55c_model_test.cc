// The U55C timing and energy model (all figures modeled) reproduces the published reference
// points its parameters were taken from (docs/FPGA-NOTES.md, fpga/emulation/u55c_params.h), and
// is checked against published points it was NOT calibrated on (HeldOut* tests below).
//
// Calibration points (each sets or bounds a parameter of u55c_params.h):
//   * large DMA: 9.3-11.6 GB/s to the card, 10.9-12.2 GB/s back (XRT PRs 5448, 937)
//     -> dma_to_card_bps, dma_from_card_bps (middle of each range);
//   * 4 KB DMA: 0.67-0.86 GB/s and 40,960-byte DMA: 2,975 / 3,025 MB/s (XRT issue 6787, the
//     4 KB and 40 KB listings) -> dma_transfer_overhead_s, dma_small_{to,from}_card_bps (the
//     40 KB listing was held out until it showed the affine model 1.55x too fast; see below);
//   * HBM reached by kernels: 421 (hbm_bandwidth example), 425 (Shuhai), 410 GB/s (XRT issue
//     8687) -> hbm_efficiency;
//   * launch: 16-56 us (XRT issue 6601), 50-100 us (XRT issue 8687) -> launch_latency_s;
//   * "350 GB/s with launch" (issue 8687) has no transfer size, so it only bounds the direction.
// Held out (used by no parameter): the 256 MB per-bank DMA figures of XRT PRs 2540 and 2065.
#include "fpga/emulation/u55c_model.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

constexpr double kGB = 1e9;

TEST(U55cModel, LargeDmaStreamsAtTheMeasuredRates) {
  const U55cModel m{U55cParams{}};
  const double bytes = 256.0 * 1024 * 1024;
  const double to_card = bytes / m.DmaSeconds(bytes, DmaDirection::kToCard) / kGB;
  const double from_card = bytes / m.DmaSeconds(bytes, DmaDirection::kFromCard) / kGB;
  EXPECT_GE(to_card, 9.3);  // XRT PRs 5448, 937: 9.3-11.6 GB/s to the card
  EXPECT_LE(to_card, 11.6);
  EXPECT_GE(from_card, 10.9);  // 10.9-12.2 GB/s back
  EXPECT_LE(from_card, 12.2);
}

TEST(U55cModel, SmallDmaIsBelowOneGBps) {
  const U55cModel m{U55cParams{}};
  for (DmaDirection dir : {DmaDirection::kToCard, DmaDirection::kFromCard}) {
    const double rate = 4096 / m.DmaSeconds(4096, dir) / kGB;
    EXPECT_GE(rate, 0.67);  // XRT issue 6787: 0.67-0.86 GB/s for 4 KB
    EXPECT_LE(rate, 0.86);
  }
  // Rates grow with size: a per-transfer cost, then the link rate.
  double last = 0;
  for (double bytes = 512; bytes <= 1 << 30; bytes *= 4) {
    const double rate = bytes / m.DmaSeconds(bytes, DmaDirection::kToCard);
    EXPECT_GT(rate, last) << bytes;
    last = rate;
  }
}

TEST(U55cModel, ChunksTransfersAtTheLargestDma) {
  const U55cModel m{U55cParams{}};
  const double max = m.params().dma_max_transfer_bytes;
  EXPECT_NEAR(m.DmaSeconds(2 * max, DmaDirection::kToCard),
              2 * m.DmaSeconds(max, DmaDirection::kToCard), 1e-12);
}

// 32 CUs, each streaming 256 MB from its own pseudo-channel, together reach the 410-425 GB/s
// measured on U280/U55C kernels; one CU gets one channel's share. The memory-side calibration,
// so at the Vitis targets (300 MHz, 32 CUs: the what-if variant), where the port is not the limit.
TEST(U55cModel, HbmAggregateMatchesMeasuredKernels) {
  const U55cParams p = U55cParams::VitisTarget();
  const U55cModel m{p};
  const double bytes = 256.0 * 1024 * 1024;
  std::vector<CuLaunch> launches;
  for (int cu = 0; cu < p.hbm_channels; ++cu) {
    launches.push_back(CuLaunch{cu, bytes, bytes / p.axi_word_bytes, 0, 0});
  }
  const CallEstimate all = m.Call({}, launches, {});
  const double aggregate = p.hbm_channels * bytes / all.kernel_s / kGB;
  EXPECT_GE(aggregate, 410.0);
  EXPECT_LE(aggregate, 425.0);
  // Below the 460 GB/s datasheet peak, and one CU alone reads one channel's 13 GB/s.
  const CallEstimate one = m.Call({}, {launches[0]}, {});
  EXPECT_NEAR(bytes / one.kernel_s / kGB, aggregate / p.hbm_channels, 1e-9);
  // Launch overhead lowers the end-to-end figure (the U55C user: 410 kernel, 350 with launch).
  const double with_launch = p.hbm_channels * bytes / (all.kernel_s + all.launch_s) / kGB;
  EXPECT_LT(with_launch, aggregate);
  // Two launches on one CU run back to back.
  const CallEstimate twice = m.Call({}, {launches[0], launches[0]}, {});
  EXPECT_NEAR(twice.kernel_s, 2 * one.kernel_s, 1e-12);
}

TEST(U55cModel, LaunchLatencyInTheReportedRange) {
  const U55cModel m{U55cParams{}};
  const CallEstimate e = m.Call({}, {CuLaunch{}}, {});
  EXPECT_GE(e.launch_s, 16e-6);  // XRT issues 6601 and 8687: 16-100 us
  EXPECT_LE(e.launch_s, 100e-6);
}

TEST(U55cModel, KernelClockBoundsComputeStages) {
  const U55cParams p = U55cParams::VitisTarget();
  const U55cModel m{p};
  // One select clock per page at 300 MHz: 3e8 clocks take one second.
  EXPECT_NEAR(m.CuSeconds(CuLaunch{0, 0, 0, 3e8, 0}), 1.0, 1e-9);
  // The port moves one 512-bit word per clock: 19.2 GB/s, above a channel's 13 GB/s.
  EXPECT_GT(p.axi_word_bytes * p.kernel_clock_hz, m.ChannelReadBps());
}

// By default the model prices what the RTL reaches (fpga/rtl/synth.md), never the Vitis targets:
// min(kernel_clock_hz, rtl_clock_estimate_hz) and min(num_cus, rtl_cus_that_fit).
TEST(U55cModel, DefaultPricesTheRtlNotTheVitisTarget) {
  const U55cParams p;
  EXPECT_FALSE(p.vitis_target_what_if);
  EXPECT_EQ(p.PricedClockHz(), std::min(p.kernel_clock_hz, p.rtl_clock_estimate_hz));
  EXPECT_EQ(p.PricedCus(), std::min(p.num_cus, p.rtl_cus_that_fit));
  EXPECT_LT(p.PricedClockHz(), 300e6);  // the RTL's estimate is below the Vitis target
  EXPECT_LT(p.PricedCus(), 32);         // and fewer CUs fit than channels exist
  const U55cModel m{p};
  // Clocks are priced at the RTL's clock.
  EXPECT_NEAR(m.CuSeconds(CuLaunch{0, 0, 0, p.rtl_clock_estimate_hz, 0}), 1.0, 1e-9);
  // A port at that clock: min(channel, 64 B x clock).
  EXPECT_NEAR(m.ChannelReadBps(),
              std::min(p.hbm_channel_peak_bps * p.hbm_efficiency,
                       p.axi_word_bytes * p.rtl_clock_estimate_hz),
              1.0);
  // 32 slices of 256 MB, one per channel, run on the CUs that fit (slice c on CU c mod fit), one
  // after another on each: the busiest CU scans ceil(32 / fit) of them.
  const double bytes = 256.0 * 1024 * 1024;
  std::vector<CuLaunch> launches;
  for (int cu = 0; cu < p.hbm_channels; ++cu) launches.push_back(CuLaunch{cu, bytes, 0, 0, 0});
  const double aggregate = p.hbm_channels * bytes / m.Call({}, launches, {}).kernel_s;
  const int rounds = (p.hbm_channels + p.PricedCus() - 1) / p.PricedCus();
  EXPECT_NEAR(aggregate, p.hbm_channels * m.ChannelReadBps() / rounds, 1e-6 * aggregate);
  // The what-if variant is faster, and the default never beats it (the check rejects a model
  // that prices the targets: the Vitis figure is not the default's).
  const U55cModel vitis{U55cParams::VitisTarget()};
  const double vitis_aggregate = p.hbm_channels * bytes / vitis.Call({}, launches, {}).kernel_s;
  EXPECT_GT(vitis_aggregate, 2 * aggregate);
  // A kernel clock below the estimate (a slower card) is priced at that clock.
  U55cParams slow = p;
  slow.kernel_clock_hz = p.rtl_clock_estimate_hz / 2;
  EXPECT_EQ(slow.PricedClockHz(), slow.kernel_clock_hz);
  // Fewer CUs than fit: those.
  U55cParams few = p;
  few.num_cus = 2;
  EXPECT_EQ(few.PricedCus(), 2);
}

TEST(U55cModel, EnergyIsBoardPowerTimesTime) {
  const U55cParams p;
  const U55cModel m{p};
  const CallEstimate e = m.Call({1 << 20}, {CuLaunch{0, 64.0 * (1 << 20), 1 << 20, 0, 1}}, {4096});
  EXPECT_NEAR(e.total_s, e.to_card_s + e.launch_s + e.kernel_s + e.from_card_s, 1e-15);
  EXPECT_NEAR(e.energy_j,
              p.board_power_active_w * e.kernel_s + p.board_power_idle_w * (e.total_s - e.kernel_s),
              1e-12);
  EXPECT_GT(e.energy_j, p.board_power_idle_w * e.total_s);
  EXPECT_LT(e.energy_j, p.board_power_active_w * e.total_s);
}

// Held-out large DMAs (not used for calibration): `xbutil dmatest` with 256 MB buffers on
// Gen3 x16 XDMA shells, the U55C's link and DMA engine.
//   XRT PR 2540: four DDR banks, 10,253-10,395 MB/s to the card, 10,815-10,927 MB/s back;
//   XRT PR 2065: 9,584 MB/s to the card, 11,958 MB/s back.
// xbutil reports MB/s as bytes per microsecond (1e6 bytes per second). Returns the largest
// |modeled / measured - 1| over those points.
double WorstHeldOutLargeDmaError(const U55cParams& params) {
  const U55cModel m{params};
  const double bytes = 256.0 * 1024 * 1024;
  struct Point {
    DmaDirection dir;
    double measured_mbps;
  };
  const Point points[] = {
      {DmaDirection::kToCard, 10297.8},   {DmaDirection::kToCard, 10395.0},    // PR 2540
      {DmaDirection::kToCard, 10367.4},   {DmaDirection::kToCard, 10253.1},    // PR 2540
      {DmaDirection::kFromCard, 10927.5}, {DmaDirection::kFromCard, 10836.8},  // PR 2540
      {DmaDirection::kFromCard, 10815.2}, {DmaDirection::kFromCard, 10860.0},  // PR 2540
      {DmaDirection::kToCard, 9584.11},   {DmaDirection::kFromCard, 11957.8},  // PR 2065
  };
  double worst = 0;
  for (const Point& p : points) {
    const double model_mbps = bytes / m.DmaSeconds(bytes, p.dir) / 1e6;
    worst = std::max(worst, std::abs(model_mbps / p.measured_mbps - 1.0));
  }
  return worst;
}

// Tolerance 12%: the half-width of the calibration sources' own card-to-card spread (9.3-11.6
// GB/s is 10.45 GB/s +- 11%), since the model has one rate per direction for every card.
// Observed: 9.5% (PR 2065's 9,584 MB/s to the card). The check rejects a model of a Gen3 x8 link
// (half the rates) and one 25% fast.
TEST(U55cModel, HeldOutLargeDmaPoints) {
  constexpr double kTolerance = 0.12;
  const U55cParams p;
  EXPECT_LE(WorstHeldOutLargeDmaError(p), kTolerance);
  U55cParams x8 = p;
  x8.dma_to_card_bps /= 2;
  x8.dma_from_card_bps /= 2;
  EXPECT_GT(WorstHeldOutLargeDmaError(x8), kTolerance);
  U55cParams fast = p;
  fast.dma_to_card_bps *= 1.25;
  fast.dma_from_card_bps *= 1.25;
  EXPECT_GT(WorstHeldOutLargeDmaError(fast), kTolerance);
}

// Mid-size DMA: XRT issue 6787 lists, beside the 4 KB figures, ten `xbutil validate` DMA runs
// with 40,960-byte buffers on a U50 (Gen3 x16 XDMA, the U55C's shell family): 2,963-2,990 MB/s
// to the card (median 2,975) and 2,344-3,227 MB/s back (median 3,025). Held out, it showed the
// former affine model (5 us + bytes / the large-buffer rate) 1.55x / 1.58x too fast: mid-size
// transfers cost more than a fixed overhead plus the large-buffer rate. The model now has a
// small-transfer rate for a transfer's first dma_small_knee_bytes, fitted to this listing and
// the 4 KB one, so this is a calibration check: within 5% of the medians, and never more than 5%
// faster than measured (the emulation must not flatter the card).
TEST(U55cModel, MidSizeDmaMatchesTheMeasuredRates) {
  const U55cModel m{U55cParams{}};
  const double bytes = 40960;
  const double to_card = bytes / m.DmaSeconds(bytes, DmaDirection::kToCard) / 1e6;
  const double from_card = bytes / m.DmaSeconds(bytes, DmaDirection::kFromCard) / 1e6;
  EXPECT_NEAR(to_card / 2975.0, 1.0, 0.05) << to_card;
  EXPECT_NEAR(from_card / 3025.0, 1.0, 0.05) << from_card;
  // The check rejects the former affine model (what this test found).
  U55cParams affine;
  affine.dma_transfer_overhead_s = 5e-6;
  affine.dma_small_to_card_bps = affine.dma_to_card_bps;
  affine.dma_small_from_card_bps = affine.dma_from_card_bps;
  const U55cModel old{affine};
  EXPECT_GT(bytes / old.DmaSeconds(bytes, DmaDirection::kToCard) / 1e6 / 2975.0, 1.05);
  // The small-transfer rate applies once per chunk, and only to its first knee bytes: a 256 MB
  // transfer stays within 1% of the large-buffer rate.
  const double big = 256.0 * 1024 * 1024;
  EXPECT_NEAR(big / m.DmaSeconds(big, DmaDirection::kToCard) / U55cParams{}.dma_to_card_bps, 1.0,
              0.01);
}

}  // namespace
}  // namespace mempipe
