// SpscChannel: element lifetimes, capacity, blocking without spinning, close/drain, and a
// threaded producer/consumer run checked by its sum.
#include "backend/spsc_channel.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <random>
#include <thread>

#include "core/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

// Counts live instances, so a leak or a double destruction shows as a non-zero balance.
struct Tracked {
  static inline std::atomic<int64_t> alive{0};
  static inline std::atomic<int64_t> constructed{0};
  int64_t value = 0;
  bool valid = true;

  Tracked() { Born(); }
  explicit Tracked(int64_t v) : value(v) { Born(); }
  Tracked(const Tracked& o) : value(o.value), valid(o.valid) { Born(); }
  Tracked(Tracked&& o) noexcept : value(o.value), valid(o.valid) { Born(); }
  Tracked& operator=(const Tracked& o) = default;
  Tracked& operator=(Tracked&& o) noexcept = default;
  ~Tracked() {
    EXPECT_TRUE(valid) << "destroyed twice";
    valid = false;
    alive.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  static void Born() {
    alive.fetch_add(1, std::memory_order_relaxed);
    constructed.fetch_add(1, std::memory_order_relaxed);
  }
};

TEST(SpscChannel, LifetimesBalanceWhenDestroyedNonEmpty) {
  const int64_t before = Tracked::alive.load();
  {
    SpscChannel<Tracked> ch(8);
    for (int i = 0; i < 8; ++i) ASSERT_TRUE(ch.TryPush(Tracked(i)));
    for (int i = 0; i < 3; ++i) {
      std::optional<Tracked> t = ch.TryPop();
      ASSERT_TRUE(t.has_value());
      EXPECT_EQ(t->value, i);
    }
    EXPECT_EQ(ch.Depth(), 5u);
    EXPECT_EQ(Tracked::alive.load() - before, 5);  // the 5 still queued
  }
  EXPECT_EQ(Tracked::alive.load(), before);  // the channel destroyed what it still held
}

TEST(SpscChannel, CompileTimeCapacityAndFullEvents) {
  SpscChannel<int, 4> ch;
  EXPECT_EQ(ch.capacity(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(ch.TryPush(i));
  EXPECT_FALSE(ch.TryPush(99));
  const ChannelStats s = ch.Stats();
  EXPECT_EQ(s.pushes, 4u);
  EXPECT_EQ(s.full_events, 1u);
  EXPECT_EQ(s.max_depth, 4u);
  EXPECT_DOUBLE_EQ(s.MeanDepth(), (1 + 2 + 3 + 4) / 4.0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ch.TryPop(), i);
  EXPECT_FALSE(ch.TryPop().has_value());
}

TEST(SpscChannel, ThreadedSumWithBackPressure) {
  const uint64_t seed = testing::TestSeed();
  constexpr int64_t kItems = 30000;
  const int64_t before = Tracked::alive.load();
  SpscChannel<Tracked> ch(16);
  int64_t sum = 0, count = 0, last = -1;
  bool in_order = true;
  std::thread consumer([&] {
    std::mt19937_64 rng(seed);
    while (std::optional<Tracked> t = ch.Pop()) {
      in_order &= t->value == last + 1;
      last = t->value;
      sum += t->value;
      ++count;
      // Now and then a slow consumer, so the producer meets a full channel and must wait.
      if (rng() % 1024 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  for (int64_t i = 0; i < kItems; ++i) ASSERT_TRUE(ch.Push(Tracked(i)));
  ch.Close();
  consumer.join();
  EXPECT_TRUE(in_order);
  EXPECT_EQ(count, kItems);
  EXPECT_EQ(sum, kItems * (kItems - 1) / 2);
  EXPECT_EQ(ch.Stats().pushes, static_cast<uint64_t>(kItems));
  EXPECT_LE(ch.Stats().max_depth, 16u);
  EXPECT_EQ(Tracked::alive.load(), before);
}

TEST(SpscChannel, FullChannelBlocksProducerUntilConsumerPops) {
  SpscChannel<int> ch(2);
  ASSERT_TRUE(ch.Push(1));
  ASSERT_TRUE(ch.Push(2));
  std::atomic<bool> pushed{false};
  double producer_cpu_ms = 0;
  std::thread producer([&] {
    const double cpu0 = ThreadCpuMs();
    EXPECT_TRUE(ch.Push(3));  // blocks: the channel is full
    producer_cpu_ms = ThreadCpuMs() - cpu0;
    pushed.store(true);
  });
  // Once the producer has met the full channel (it counts that before waiting), give it time
  // to park; a loaded machine may start the thread late, so wait for the event, not a clock.
  while (ch.Stats().full_events == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  EXPECT_FALSE(pushed.load());
  EXPECT_EQ(ch.TryPop(), 1);
  producer.join();
  EXPECT_TRUE(pushed.load());
  // Parked, not spinning: a 150 ms wait costs far less than 150 ms of CPU.
  EXPECT_LT(producer_cpu_ms, 30.0);
  EXPECT_EQ(ch.TryPop(), 2);
  EXPECT_EQ(ch.TryPop(), 3);
}

TEST(SpscChannel, EmptyChannelParksConsumerAndCloseWakesIt) {
  SpscChannel<int> ch(4);
  double consumer_cpu_ms = 0;
  std::vector<int> got;
  std::thread consumer([&] {
    const double cpu0 = ThreadCpuMs();
    while (std::optional<int> v = ch.Pop()) got.push_back(*v);
    consumer_cpu_ms = ThreadCpuMs() - cpu0;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  ASSERT_TRUE(ch.Push(7));
  ASSERT_TRUE(ch.Push(8));
  ch.Close();  // values pushed before Close are still delivered
  consumer.join();
  EXPECT_EQ(got, (std::vector<int>{7, 8}));
  EXPECT_LT(consumer_cpu_ms, 30.0);
  EXPECT_FALSE(ch.Push(9));
  EXPECT_FALSE(ch.TryPush(9));
  EXPECT_FALSE(ch.Pop().has_value());
}

TEST(SpscChannel, CloseWakesBlockedProducer) {
  SpscChannel<int> ch(1);
  ASSERT_TRUE(ch.Push(1));
  std::thread producer([&] { EXPECT_FALSE(ch.Push(2)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ch.Close();
  producer.join();
  EXPECT_EQ(ch.Pop(), 1);
  EXPECT_FALSE(ch.Pop().has_value());
}

}  // namespace
}  // namespace mempipe

namespace mempipe {
namespace {

// A value whose copy into the ring pauses until released, to hold a producer between its
// closed check and the moment its value becomes visible.
struct Gate {
  std::atomic<bool> in_copy{false};
  std::atomic<bool> go{false};
};
struct Paused {
  Gate* gate = nullptr;
  int value = 0;
  Paused() = default;
  Paused(Gate* g, int v) : gate(g), value(v) {}
  Paused(const Paused& o) : gate(o.gate), value(o.value) {
    if (gate != nullptr && !gate->go.load()) {
      gate->in_copy.store(true);
      while (!gate->go.load()) std::this_thread::yield();
    }
  }
  Paused& operator=(const Paused&) = default;
};

// Issue 14, item 6: Close() from a third thread between a producer's closed check and its
// push. Before the fix, the consumer saw the channel closed and empty and ended, and then the
// producer's Push returned true for a value nobody would ever pop. Now a Push that reports
// success has queued a value that Pop returns.
TEST(SpscChannel, PushThatSucceedsIsDeliveredEvenWhenAThirdThreadCloses) {
  Gate gate;
  SpscChannel<Paused> ch(4);
  bool pushed = false;
  std::thread producer([&] { pushed = ch.Push(Paused(&gate, 42)); });
  while (!gate.in_copy.load()) std::this_thread::yield();  // past the closed check
  ch.Close();                                              // the third thread
  std::optional<Paused> got;
  bool popped_once = false;
  std::thread consumer([&] {
    got = ch.Pop();
    popped_once = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  gate.go.store(true);
  producer.join();
  consumer.join();
  ASSERT_TRUE(popped_once);
  if (pushed) {
    ASSERT_TRUE(got.has_value()) << "Push reported success but Pop ended without the value";
    EXPECT_EQ(got->value, 42);
    EXPECT_FALSE(ch.Pop().has_value());
  } else {
    EXPECT_FALSE(got.has_value());
  }
}

// The same contract under random timing: every successful push is popped exactly once.
TEST(SpscChannel, CloseFromAThirdThreadLosesNoAcceptedValue) {
  std::mt19937 rng(testing::TestSeed());
  for (int round = 0; round < 300; ++round) {
    SpscChannel<int> ch(2);
    std::atomic<int64_t> accepted{0}, delivered{0};
    std::thread producer([&] {
      for (int i = 1; i <= 1000; ++i) {
        if (!ch.Push(i)) break;
        accepted += i;
      }
    });
    std::thread consumer([&] {
      while (std::optional<int> v = ch.Pop()) delivered += *v;
    });
    const int wait_us = static_cast<int>(rng() % 200);
    std::this_thread::sleep_for(std::chrono::microseconds(wait_us));
    ch.Close();
    producer.join();
    consumer.join();
    ASSERT_EQ(accepted.load(), delivered.load()) << "round " << round;
  }
}

}  // namespace
}  // namespace mempipe
