// The bounded thread pool behind ForEachSeqHeads (issue 14, item 4): a request for any number
// of threads is capped, a thread the system refuses is absorbed (the work still runs, once per
// task), and Reserve reports the refusal as a Status.
//
// Before the pool, ForEachSeqHeads started one std::thread per requested thread on every call:
// ForEachSeqHeadsCapsThreadsAndRunsEachPairOnce asked for a million and either exhausted the
// process or (on a refused thread) ended it in std::terminate.
#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "core/parallel.h"
#include "gtest/gtest.h"

namespace mempipe {
namespace {

TEST(ThreadPool, ForEachSeqHeadsCapsThreadsAndRunsEachPairOnce) {
  const int seqs = 300, heads = 7;
  std::vector<std::atomic<int>> hits(seqs * heads);
  std::mutex mu;
  std::set<std::thread::id> threads;
  ForEachSeqHeads(seqs, heads, 1 << 20, [&](int s, int h0, int h1) {
    {
      std::lock_guard<std::mutex> lock(mu);
      threads.insert(std::this_thread::get_id());
    }
    for (int h = h0; h < h1; ++h) hits[s * heads + h].fetch_add(1);
  });
  for (int i = 0; i < seqs * heads; ++i) ASSERT_EQ(hits[i].load(), 1) << "pair " << i;
  EXPECT_LE(static_cast<int>(threads.size()), ThreadPool::DefaultMaxWorkers() + 1);
  EXPECT_LE(ThreadPool::Default().num_workers(), ThreadPool::DefaultMaxWorkers());
  // A second call reuses the same workers rather than starting new ones.
  const int before = ThreadPool::Default().num_workers();
  ForEachSeqHeads(seqs, heads, 1 << 20, [](int, int, int) {});
  EXPECT_EQ(ThreadPool::Default().num_workers(), before);
}

// ForEachItemRange (sparse decode's split): one contiguous, non-empty range per thread, in
// order, covering every item once; at most min(threads, items, pool + 1) ranges, one range for
// one thread, none for no items.
TEST(ThreadPool, ForEachItemRangeGivesEachThreadOneContiguousRange) {
  for (const auto& [items, asked] : {std::pair<int64_t, int>{1, 4}, {5, 3}, {1000, 7}, {9, 1}}) {
    std::mutex mu;
    std::vector<std::pair<int64_t, int64_t>> ranges;
    ForEachItemRange(items, asked, [&](int64_t begin, int64_t end) {
      std::lock_guard<std::mutex> lock(mu);
      ranges.emplace_back(begin, end);
    });
    std::sort(ranges.begin(), ranges.end());
    const int64_t cap = std::min<int64_t>({asked, items, ThreadPool::DefaultMaxWorkers() + 1});
    EXPECT_EQ(static_cast<int64_t>(ranges.size()), cap) << items << " items, " << asked;
    int64_t next = 0;
    for (const auto& [begin, end] : ranges) {
      EXPECT_EQ(begin, next) << items << " items, " << asked;
      EXPECT_LT(begin, end) << items << " items, " << asked;
      next = end;
    }
    EXPECT_EQ(next, items);
  }
  int calls = 0;
  ForEachItemRange(0, 4, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ThreadPool, RefusedThreadsAreAbsorbedAndReported) {
  std::atomic<int> started{0};
  // The system starts two threads and then refuses, as under a thread or memory limit.
  ThreadPool pool(8, [&](std::function<void()> body) {
    if (started.fetch_add(1) >= 2) {
      throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                              "injected");
    }
    return std::thread(std::move(body));
  });
  std::vector<std::atomic<int>> hits(1000);
  pool.ParallelFor(1000, 8, [&](int i) { hits[i].fetch_add(1); });
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(hits[i].load(), 1) << "task " << i;
  EXPECT_EQ(pool.num_workers(), 2);
  const absl::Status st = pool.Reserve(8);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find("of 8"), absl::string_view::npos) << st;
}

TEST(ThreadPool, NoThreadsAtAllStillRunsEverythingOnTheCaller) {
  ThreadPool pool(4, [](std::function<void()>) -> std::thread {
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                            "injected");
  });
  int sum = 0;  // only the caller runs, so no race
  pool.ParallelFor(100, 4, [&](int i) { sum += i; });
  EXPECT_EQ(sum, 4950);
  EXPECT_EQ(pool.num_workers(), 0);
}

TEST(ThreadPool, ConcurrentAndNestedCallsComplete) {
  ThreadPool pool(3);
  std::atomic<int> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) {
        pool.ParallelFor(8, 4,
                         [&](int) { pool.ParallelFor(4, 4, [&](int) { total.fetch_add(1); }); });
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(total.load(), 4 * 50 * 8 * 4);
}

// Back-to-back calls of every size through the pool's slot (thread_pool.h, Dispatch), with the
// workers spinning between them as decode's layers keep them: each task of each call runs
// exactly once, on the call it belongs to. A worker that claimed a task with an earlier call's
// count, or ran an earlier call's task, shows as a count of 0 or 2, or as a task index out of
// range. Sizes from 1 to 100 take both of the slot's claims (a line per task up to 64, the
// counter above) and switch between them from call to call. A second caller meanwhile takes
// the queue (the slot is taken) and a task of the first sometimes throws, so the paths
// interleave.
TEST(ThreadPool, BackToBackCallsRunEachTaskOnceOnItsOwnCall) {
  ThreadPool pool(4, nullptr, absl::Milliseconds(5));
  constexpr int kCalls = 3000, kMaxTasks = 100;
  std::vector<std::atomic<int>> runs(static_cast<size_t>(kCalls) * kMaxTasks);
  std::atomic<int> out_of_range{0}, other_total{0};
  std::atomic<bool> stop{false};
  std::thread other([&] {  // the queue path, concurrently
    while (!stop.load()) pool.ParallelFor(6, 3, [&](int) { other_total.fetch_add(1); });
  });
  while (other_total.load() == 0) std::this_thread::yield();  // the second caller has begun
  int thrown = 0, other_before = 0;
  for (int call = 0; call < kCalls; ++call) {
    const int n = 1 + (call * 7) % kMaxTasks;  // every size from 1 to kMaxTasks
    const bool throws = call % 97 == 0;
    try {
      pool.ParallelFor(n, 1 + call % 5, [&, call, n](int i) {
        if (i < 0 || i >= n) {
          out_of_range.fetch_add(1);
          return;
        }
        runs[static_cast<size_t>(call) * kMaxTasks + i].fetch_add(1);
        if (call == kCalls / 2 && i == 0) {
          // Holds the slot until the second caller's queued batches have moved on (up to 5 s):
          // the spinners can finish 3,000 calls before that thread is scheduled at all.
          const int seen = other_total.load();
          const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
          while (other_total.load() == seen && std::chrono::steady_clock::now() < deadline) {
            std::this_thread::yield();
          }
        }
        if (throws && i == n - 1) throw std::runtime_error("last task");
      });
    } catch (const std::runtime_error&) {
      ++thrown;
    }
    if (call == 0) other_before = other_total.load();
  }
  stop.store(true);
  other.join();
  EXPECT_EQ(out_of_range.load(), 0);
  int wrong = 0;
  for (int call = 0; call < kCalls; ++call) {
    const int n = 1 + (call * 7) % kMaxTasks;
    for (int i = 0; i < kMaxTasks; ++i) {
      const int want = i < n ? 1 : 0;
      if (runs[static_cast<size_t>(call) * kMaxTasks + i].load() != want && ++wrong <= 5) {
        ADD_FAILURE() << "call " << call << " (" << n << " tasks), task " << i << " ran "
                      << runs[static_cast<size_t>(call) * kMaxTasks + i].load() << " times";
      }
    }
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(thrown, (kCalls + 96) / 97);
  EXPECT_EQ(other_total.load() % 6, 0);
  EXPECT_GT(other_total.load(), other_before);  // the second caller ran while the first did
}

// A caller whose spin ends before its helpers' tasks have finished sleeps, and the task that
// finishes last wakes it (thread_pool.cc, RunLineTask), for slot calls of either claim. With a
// spin of 0 the caller sleeps on every call whose tasks outlast its own; a lost wake-up hangs
// the test until ctest's timeout.
TEST(ThreadPool, ACallerAsleepIsWokenByTheLastTask) {
  ThreadPool pool(3, nullptr, absl::ZeroDuration(), /*max_spinners=*/3);
  ASSERT_TRUE(pool.Reserve(3).ok());
  for (const int n : {4, 3, 80}) {
    for (int rep = 0; rep < 100; ++rep) {
      std::vector<std::atomic<int>> runs(n);
      const std::thread::id caller = std::this_thread::get_id();
      pool.ParallelFor(n, 4, [&](int i) {
        // Tasks on the workers outlast the caller's, so the caller waits for them.
        if (std::this_thread::get_id() != caller) {
          std::this_thread::sleep_for(std::chrono::microseconds(50 + 10 * (i % 3)));
        }
        runs[i].fetch_add(1);
      });
      for (int i = 0; i < n; ++i) ASSERT_EQ(runs[i].load(), 1) << n << " tasks, call " << rep;
    }
  }
}

TEST(ThreadPool, TaskExceptionReachesTheCallerAfterAllTasksFinish) {
  ThreadPool pool(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(pool.ParallelFor(50, 3,
                                [&](int i) {
                                  ran.fetch_add(1);
                                  if (i == 7) throw std::runtime_error("task 7");
                                }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 50);
  // The pool is still usable.
  std::atomic<int> again{0};
  pool.ParallelFor(10, 3, [&](int) { again.fetch_add(1); });
  EXPECT_EQ(again.load(), 10);
}

// Runs `n` tasks that each wait (up to 5 s) until all n have started: they can only finish if
// n threads run them at once, so a worker that is never woken (asleep) or never sees the batch
// (spinning) fails the check instead of hanging the test. `helpers`, if given, receives how
// many threads other than the caller ran tasks.
bool AllTasksRanAtOnce(ThreadPool& pool, int n, int* helpers = nullptr) {
  std::atomic<int> started{0}, late{0};
  std::mutex mu;
  std::set<std::thread::id> ran;
  pool.ParallelFor(n, n, [&](int) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ran.insert(std::this_thread::get_id());
    }
    started.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (started.load() < n) {
      if (std::chrono::steady_clock::now() > deadline) {
        late.fetch_add(1);
        return;
      }
      std::this_thread::yield();
    }
  });
  ran.erase(std::this_thread::get_id());
  if (helpers != nullptr) *helpers = static_cast<int>(ran.size());
  return late.load() == 0;
}

// Waits up to 5 s for the pool to settle after a call has returned: every worker asleep or
// spinning, none still on its way out of a task or out of a spin that saw a post, and `want`
// of them spinning (any number when `want` < 0). On false, *spinning holds the last count.
//
// Spinning alone cannot tell: a spinner the scheduler had set aside before it saw the last
// call's post still counts, while a worker leaving that call's task has not begun to spin, and
// a count that matches by that coincidence let the next call start before the late worker's
// spin (CI's plain stage met 2 spinning vs 1 helper). Sleepers are read before spinners: once
// the call has returned, no worker goes from asleep to spinning (one that slept has run no task
// since), so none is counted twice, and one between states is counted in neither.
bool Settles(const ThreadPool& pool, int want, int* spinning = nullptr) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    const int asleep = pool.num_sleeping();
    const int spin = pool.num_spinning();
    if (spinning != nullptr) *spinning = spin;
    if (asleep + spin == pool.num_workers() && (want < 0 || spin == want)) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// The pool's waits (thread_pool.h): a worker that ran tasks spins `spin`, then sleeps. Both ways
// of taking a new batch must work: a sleeping worker is woken by the caller, and a spinning one
// sees the push itself (the caller does not wake it).
TEST(ThreadPool, SleepingAndSpinningWorkersBothTakeNewBatches) {
  ThreadPool asleep(3, nullptr, absl::ZeroDuration());    // sleeps as soon as it is idle
  ThreadPool spinning(3, nullptr, absl::Seconds(30), 3);  // does not sleep in this test
  for (ThreadPool* pool : {&asleep, &spinning}) {
    ASSERT_TRUE(pool->Reserve(3).ok());
    for (int rep = 0; rep < 20; ++rep) {
      ASSERT_TRUE(AllTasksRanAtOnce(*pool, 4))
          << "spin " << absl::FormatDuration(pool->spin()) << ", call " << rep;
      // Idle long enough for the zero-spin pool's workers to be asleep again.
      if (rep % 5 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  EXPECT_TRUE(Settles(asleep, 0));
  // A pool that spins a little and then sleeps: calls spaced past the spin find sleepers.
  ThreadPool brief(2, nullptr, absl::Microseconds(100));
  for (int rep = 0; rep < 5; ++rep) {
    ASSERT_TRUE(AllTasksRanAtOnce(brief, 3)) << "call " << rep;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(Settles(brief, 0));
  EXPECT_EQ(ThreadPool(1, nullptr, absl::Microseconds(-5)).spin(), absl::ZeroDuration());
}

// A worker spins until `spin` after its last task, also through calls whose tasks the others
// claimed first (a worker that slept then would cost the next call a wake-up), and then
// sleeps. And a pool whose workers spin is destroyed without waiting out the spin.
TEST(ThreadPool, WorkersSpinUntilTheirSpinAfterTheLastTaskAndShutdownEndsTheSpin) {
  const auto start = std::chrono::steady_clock::now();
  {
    const absl::Duration spin = absl::Seconds(2);
    ThreadPool pool(3, nullptr, spin, /*max_spinners=*/3);
    ASSERT_TRUE(pool.Reserve(3).ok());
    ASSERT_TRUE(AllTasksRanAtOnce(pool, 4));
    const auto used = std::chrono::steady_clock::now();
    ASSERT_TRUE(Settles(pool, 3));
    // Two tasks: one or both run on workers (the caller may be beaten to the first); the
    // spinners that found them claimed keep spinning.
    for (int rep = 0; rep < 3; ++rep) {
      int helpers = 0;
      ASSERT_TRUE(AllTasksRanAtOnce(pool, 2, &helpers)) << rep;
      ASSERT_GE(helpers, 1) << rep;
      ASSERT_LE(helpers, 2) << rep;
      int spinning = 0;
      ASSERT_TRUE(Settles(pool, 3, &spinning))
          << "call " << rep << ": " << spinning << " spinning of 3, " << pool.num_sleeping()
          << " asleep";
    }
    // Only meaningful while every worker's spin since its first call is still running.
    ASSERT_LT(std::chrono::steady_clock::now() - used, absl::ToChronoNanoseconds(spin))
        << "the machine was too slow for this check";
    // No calls: each sleeps once `spin` has passed since its last task.
    ASSERT_TRUE(Settles(pool, 0));
    EXPECT_GE(std::chrono::steady_clock::now() - used, absl::ToChronoNanoseconds(spin));
  }
  {
    ThreadPool pool(3, nullptr, absl::Seconds(30), /*max_spinners=*/3);
    ASSERT_TRUE(pool.Reserve(3).ok());
    ASSERT_TRUE(AllTasksRanAtOnce(pool, 4));
    ASSERT_TRUE(Settles(pool, 3));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

// No more workers spin at once than max_spinners (by default the hardware threads minus the
// caller's): the others sleep, and the caller wakes them when a call needs them.
TEST(ThreadPool, SpinnersAreCappedAndTheOthersAreWoken) {
  ThreadPool pool(3, nullptr, absl::Seconds(30), /*max_spinners=*/1);
  ASSERT_TRUE(pool.Reserve(3).ok());
  // Each call's three workers ran tasks, so one spins once the pool settles; none when the
  // first to finish found the place taken by a spinner that was on its way out (rare), so the
  // test asks for a spinner in some call, and for no more than one in any.
  int most = 0;
  for (int rep = 0; rep < 10; ++rep) {
    ASSERT_TRUE(AllTasksRanAtOnce(pool, 4)) << rep;
    int spinning = 0;
    ASSERT_TRUE(Settles(pool, -1, &spinning)) << rep;
    ASSERT_LE(spinning, 1) << rep;
    most = std::max(most, spinning);
  }
  EXPECT_EQ(most, 1);
  ThreadPool none(2, nullptr, absl::Seconds(30), /*max_spinners=*/0);
  for (int rep = 0; rep < 5; ++rep) ASSERT_TRUE(AllTasksRanAtOnce(none, 3)) << rep;
  EXPECT_TRUE(Settles(none, 0));
}

TEST(ThreadPool, SpinFromEnvParsesMicrosecondsAndNamesABadValue) {
  const char* old = std::getenv("MEMPIPE_POOL_SPIN_US");
  const std::string saved = old ? old : "";
  unsetenv("MEMPIPE_POOL_SPIN_US");
  EXPECT_EQ(*ThreadPool::SpinFromEnv(), ThreadPool::kDefaultSpin);
  setenv("MEMPIPE_POOL_SPIN_US", "0", 1);
  EXPECT_EQ(*ThreadPool::SpinFromEnv(), absl::ZeroDuration());
  setenv("MEMPIPE_POOL_SPIN_US", "250", 1);
  EXPECT_EQ(*ThreadPool::SpinFromEnv(), absl::Microseconds(250));
  for (const char* bad : {"abc", "-1", "1000001", "5ms", ""}) {
    setenv("MEMPIPE_POOL_SPIN_US", bad, 1);
    const absl::StatusOr<absl::Duration> spin = ThreadPool::SpinFromEnv();
    ASSERT_FALSE(spin.ok()) << "accepted \"" << bad << "\"";
    EXPECT_EQ(spin.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(spin.status().message().find(std::string("\"") + bad + "\""), absl::string_view::npos)
        << spin.status();
  }
  if (old) {
    setenv("MEMPIPE_POOL_SPIN_US", saved.c_str(), 1);
  } else {
    unsetenv("MEMPIPE_POOL_SPIN_US");
  }
}

}  // namespace
}  // namespace mempipe
