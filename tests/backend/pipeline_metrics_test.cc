// Metrics: the busy-overlap computation on hand-built timelines (random ones checked against a
// brute-force sweep), and the latency histogram's bookkeeping.
#include "backend/pipeline_metrics.h"

#include <cstdio>
#include <random>

#include "gtest/gtest.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using std::chrono::microseconds;
using TimePoint = std::chrono::steady_clock::time_point;

std::vector<BusyInterval> RandomTimeline(std::mt19937_64& rng, TimePoint t0, int n) {
  std::vector<BusyInterval> v;
  int64_t t = 0;
  for (int i = 0; i < n; ++i) {
    t += rng() % 50;                      // idle gap (may be 0)
    const int64_t len = 1 + rng() % 100;  // busy
    v.emplace_back(t0 + microseconds(t), t0 + microseconds(t + len));
    t += len;
  }
  return v;
}

// Microseconds covered by both, by testing every microsecond.
double BruteForceOverlapMs(const std::vector<BusyInterval>& a, const std::vector<BusyInterval>& b,
                           TimePoint t0) {
  auto covers = [&](const std::vector<BusyInterval>& v, TimePoint t) {
    for (const auto& [lo, hi] : v) {
      if (lo <= t && t < hi) return true;
    }
    return false;
  };
  int64_t both = 0;
  for (int64_t us = 0; us < 20000; ++us) {
    const TimePoint t = t0 + microseconds(us);
    both += covers(a, t) && covers(b, t);
  }
  return both * 1e-3;
}

TEST(BusyOverlap, HandBuilt) {
  const TimePoint t0{};
  auto iv = [&](int lo, int hi) {
    return BusyInterval(t0 + microseconds(lo), t0 + microseconds(hi));
  };
  EXPECT_DOUBLE_EQ(BusyOverlapMs({}, {iv(0, 10)}), 0.0);
  EXPECT_DOUBLE_EQ(BusyOverlapMs({iv(0, 2100), iv(2100, 4200)}, {iv(2100, 2150)}), 0.05);
  EXPECT_DOUBLE_EQ(BusyOverlapMs({iv(0, 1000)}, {iv(100, 200), iv(300, 400), iv(900, 1500)}), 0.3);
  EXPECT_DOUBLE_EQ(BusyOverlapMs({iv(0, 10)}, {iv(10, 20)}), 0.0);  // touching is not overlap
}

TEST(BusyOverlap, MatchesBruteForceOnRandomTimelines) {
  const uint64_t seed = testing::TestSeed();
  std::mt19937_64 rng(seed);
  const TimePoint t0{};
  for (int trial = 0; trial < 20; ++trial) {
    const auto a = RandomTimeline(rng, t0, 1 + rng() % 40);
    const auto b = RandomTimeline(rng, t0, 1 + rng() % 40);
    EXPECT_NEAR(BusyOverlapMs(a, b), BruteForceOverlapMs(a, b, t0), 1e-9) << "trial " << trial;
    EXPECT_NEAR(BusyOverlapMs(a, b), BusyOverlapMs(b, a), 1e-9);
  }
}

TEST(LatencyHistogram, CountsExtremesAndPercentiles) {
  LatencyHistogram h;
  EXPECT_EQ(h.PercentileMs(0.5), 0.0);
  for (double ms : {0.0005, 0.003, 0.003, 0.010, 2.5}) h.Record(ms);
  EXPECT_EQ(h.count(), 5u);
  EXPECT_DOUBLE_EQ(h.min_ms(), 0.0005);
  EXPECT_DOUBLE_EQ(h.max_ms(), 2.5);
  EXPECT_NEAR(h.mean_ms(), (0.0005 + 0.003 + 0.003 + 0.010 + 2.5) / 5, 1e-12);
  EXPECT_EQ(h.buckets()[0], 1u);                 // [0, 1) us
  EXPECT_EQ(h.buckets()[2], 2u);                 // [2, 4) us
  EXPECT_EQ(h.buckets()[4], 1u);                 // [8, 16) us
  EXPECT_EQ(h.buckets()[12], 1u);                // [2048, 4096) us
  EXPECT_DOUBLE_EQ(h.PercentileMs(0.5), 0.004);  // upper edge of the median's bucket
  EXPECT_DOUBLE_EQ(h.PercentileMs(1.0), 2.5);    // clamped to the exact max
  LatencyHistogram g;
  g.Record(7.0);
  g.Merge(h);
  EXPECT_EQ(g.count(), 6u);
  EXPECT_DOUBLE_EQ(g.max_ms(), 7.0);
  EXPECT_DOUBLE_EQ(g.min_ms(), 0.0005);
  EXPECT_NE(g.ToJson().find("\"count\":6"), std::string::npos);
}

}  // namespace
}  // namespace mempipe
