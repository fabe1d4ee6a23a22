// The bounded thread pool behind ForEachSeqHeads (issue 14, item 4): a request for any number
// of threads is capped, a thread the system refuses is absorbed (the work still runs, once per
// task), and Reserve reports the refusal as a Status.
//
// Before the pool, ForEachSeqHeads started one std::thread per requested thread on every call:
// ForEachSeqHeadsCapsThreadsAndRunsEachPairOnce asked for a million and either exhausted the
// process or (on a refused thread) ended it in std::terminate.
#include "core/thread_pool.h"

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

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

}  // namespace
}  // namespace mempipe
