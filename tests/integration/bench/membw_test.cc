// The STREAM-like read (integration/bench/membw.h): its size rule and its errors; and the FMA
// rate beside it.
#include "integration/bench/membw.h"

#include <unistd.h>

#include <algorithm>
#include <string>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

TEST(MemoryReadBytes, PastTheLastLevelCacheAndWholeMiB) {
  const size_t llc = LastLevelCacheBytes();
  for (size_t at_least : {size_t{0}, size_t{1}, 300 * kMiB + 5, size_t{5} << 30}) {
    const size_t bytes = MemoryReadBytes(at_least);
    EXPECT_GE(bytes, 4 * llc) << at_least;
    EXPECT_GE(bytes, 256 * kMiB) << at_least;
    EXPECT_GE(bytes, at_least);
    EXPECT_EQ(bytes % kMiB, 0u) << bytes;
    // Not larger than it has to be: the largest of the three, rounded up to a MiB.
    EXPECT_LT(bytes - kMiB, std::max({at_least, 256 * kMiB, 4 * llc})) << at_least;
  }
}

TEST(LastLevelCacheBytes, AtLeastTheSecondLevel) {
  // Where the C library knows the L2, the last level is not smaller (an L1 would be).
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 <= 0) GTEST_SKIP() << "the C library does not report an L2 here";
  EXPECT_GE(LastLevelCacheBytes(), static_cast<size_t>(l2));
}

TEST(MeasureReadBandwidth, ReadsTheWholeBuffer) {
  auto bw = MeasureReadBandwidth(8 * kMiB, 2, 2);
  ASSERT_TRUE(bw.ok()) << bw.status();
  EXPECT_EQ(bw->bytes, 8 * kMiB);
  EXPECT_EQ(bw->threads, 2);
  EXPECT_GT(bw->gbytes_per_s, 0);
  EXPECT_GT(bw->gbytes_per_cpu_s, 0);
}

TEST(MeasureReadBandwidth, NamesTheBadValue) {
  auto small = MeasureReadBandwidth(1000, 1, 1);
  ASSERT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("bytes 1000"), std::string::npos) << small.status();
  auto threads = MeasureReadBandwidth(8 * kMiB, 0, 1);
  ASSERT_EQ(threads.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(threads.status().message().find("threads 0"), std::string::npos) << threads.status();
}

TEST(ReadProbe, RepeatsTheReadOfTheWholeBuffer) {
  auto probe = ReadProbe::Create(8 * kMiB + 100, 3);
  ASSERT_TRUE(probe.ok()) << probe.status();
  EXPECT_EQ(probe->bytes(), 8 * kMiB);  // whole 256-byte chunks
  EXPECT_EQ(probe->threads(), 3);
  const uint64_t words = probe->bytes() / 8;
  const uint64_t one_pass = words * (words - 1) / 2;  // word i holds i
  for (int pass = 0; pass < 3; ++pass) {
    const ReadProbe::Pass p = probe->Run();
    EXPECT_EQ(probe->sum(), (pass + 1) * one_pass) << "every word read once per pass";
    EXPECT_GT(p.wall_s, 0) << pass;
    EXPECT_GT(p.cpu_s, 0) << pass;
    // 8 MiB cannot be read faster than 100 TB/s: the pass did read the buffer.
    EXPECT_GT(p.wall_s, 8.0 * kMiB / 1e14) << pass;
    EXPECT_NEAR(probe->GBytesPerS(p), probe->bytes() / p.wall_s / 1e9, 1e-9);
  }
  EXPECT_EQ(probe->GBytesPerS(ReadProbe::Pass{}), 0);  // no time: no rate, not infinity
}

TEST(ReadProbe, ChunksCoverTheirPlacesOnce) {
  auto probe = ReadProbe::Create(4 * kMiB, 2);
  ASSERT_TRUE(probe.ok()) << probe.status();
  const uint64_t words = probe->bytes() / 8;
  // As many 4 KiB chunks as the buffer holds: every word read once, whatever the order.
  uint64_t before = probe->sum();
  auto all = probe->RunChunks(4096, 1u << 30, 7);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->bytes, probe->bytes());
  EXPECT_EQ(probe->sum() - before, words * (words - 1) / 2);
  // A part: count chunks of 1 KiB, each a whole chunk-aligned piece (its words' sum is that of
  // 128 consecutive word indices starting at a multiple of 128, so the total is
  // 128 * sum(starts) + count * 128 * 127 / 2, and sum(starts) is a multiple of 128).
  before = probe->sum();
  auto part = probe->RunChunks(1024, 100, 8);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->bytes, 100u * 1024);
  const uint64_t got = probe->sum() - before - 100 * (128 * 127 / 2);
  EXPECT_EQ(got % (128 * 128), 0u) << "a chunk not at a chunk-aligned place";
  EXPECT_GT(part->wall_s, 0);
  // Fewer chunks than threads: one each.
  auto few = probe->RunChunks(256, 1, 9);
  ASSERT_TRUE(few.ok()) << few.status();
  EXPECT_EQ(few->bytes, 2u * 256);
  // Every chunk of the shares less their last 1 MiB: each share's first 1 MiB, once.
  before = probe->sum();
  auto head = probe->RunChunks(4096, 1u << 30, 10, kMiB);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(head->bytes, 2 * kMiB);
  const uint64_t half = words / 2, quarter = words / 4;  // shares [0, half) and [half, words)
  const uint64_t want =
      quarter * (quarter - 1) / 2 + (half * quarter + quarter * (quarter - 1) / 2);
  EXPECT_EQ(probe->sum() - before, want) << "not the shares' first halves";
}

TEST(ReadProbe, NamesTheBadChunk) {
  auto probe = ReadProbe::Create(2 * kMiB, 2);
  ASSERT_TRUE(probe.ok()) << probe.status();
  for (size_t bad : {size_t{0}, size_t{100}, size_t{2} << 20}) {
    auto r = probe->RunChunks(bad, 10, 1);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find("chunk_bytes " + std::to_string(bad)), std::string::npos)
        << r.status();
  }
  auto no_room = probe->RunChunks(4096, 10, 1, kMiB);  // 1 MiB shares, all tail
  ASSERT_EQ(no_room.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(no_room.status().message().find("tail_bytes 1048576"), std::string::npos)
      << no_room.status();
}

TEST(ReadProbe, NamesTheBadValue) {
  auto small = ReadProbe::Create(4096, 1);
  ASSERT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("bytes 4096"), std::string::npos) << small.status();
  auto threads = ReadProbe::Create(8 * kMiB, -1);
  ASSERT_EQ(threads.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(threads.status().message().find("threads -1"), std::string::npos) << threads.status();
}

TEST(FmaChainValue, StrictlyIncreasesWithTheSteps) {
  // The check below tells step counts apart only because the chain never settles.
  float prev = FmaChainValue(0);
  EXPECT_EQ(prev, 1.0f);
  for (const int64_t n : {1, 2, 1000, 1001, 100000}) {
    const float v = FmaChainValue(n);
    EXPECT_GT(v, prev) << n;
    prev = v;
  }
}

TEST(MeasureFmaRate, RunsEveryStepOfEveryThread) {
  auto r = MeasureFmaRate(2, 1000);
  if (r.status().code() == absl::StatusCode::kFailedPrecondition) {
    GTEST_SKIP() << r.status();  // no AVX-512 here: the rate is not measured, by design
  }
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->threads, 2);
  EXPECT_EQ(r->macs, int64_t{2} * 1000 * kFmaChains * 16);
  // Both threads' chains end where 1000 scalar steps do, and not where 999 or 1001 do: a loop
  // that ran a step more or less (or a thread that ran none) fails here.
  EXPECT_EQ(r->result, FmaChainValue(1000));
  EXPECT_NE(r->result, FmaChainValue(999));
  EXPECT_NE(r->result, FmaChainValue(1001));
  // Above zero, and below 4 FMA units x 16 lanes at 10 GHz per thread: a miscounted rate (lanes
  // or chains counted twice over) would not pass the second with any margin on real cores.
  EXPECT_GT(r->gmacs_per_s, 0);
  EXPECT_LT(r->gmacs_per_s, 2 * 4 * 16 * 10.0);
}

TEST(MeasureFmaRate, NamesTheBadValue) {
  auto threads = MeasureFmaRate(0, 10);
  ASSERT_EQ(threads.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(threads.status().message().find("threads 0"), std::string::npos) << threads.status();
  auto iters = MeasureFmaRate(1, -5);
  ASSERT_EQ(iters.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(iters.status().message().find("iters -5"), std::string::npos) << iters.status();
}

}  // namespace
}  // namespace mempipe
