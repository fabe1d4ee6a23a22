// The process-wide parallel-for on an installed OpenMP runtime (issue 16: mempipe's decode
// kernels on torch's OpenMP team inside vLLM's CPU worker).
//
// Most cases use tests/testing/fake_openmp.h, a GOMP_parallel stand-in on std::thread (TSan sees
// its synchronization; it does not see libgomp's). The RealLibgomp cases load the system's
// libgomp.so.1 the way torch has its copy loaded and install it by name; they are skipped where
// no libgomp exists and under TSan (libgomp is not instrumented, so its barriers look like races).
#include "core/host_parallel_runtime.h"

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/parallel.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_openmp.h"

#if defined(__SANITIZE_THREAD__)
#define MEMPIPE_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MEMPIPE_TEST_TSAN 1
#endif
#endif

namespace mempipe {
namespace {

using testing::FakeOmpThreadNum;
using testing::FakeOpenMpEntry;
std::atomic<int>& g_fake_team_limit = testing::fake_omp_team_limit;
std::atomic<int>& g_fake_regions = testing::fake_omp_regions;

// A runtime whose thread numbers are out of range of its team sizes.
int BadThreadNum() { return 7; }

OpenMpEntryPoints FakeEntry() { return FakeOpenMpEntry(); }

// Every task ran exactly once.
::testing::AssertionResult EachOnce(const std::vector<std::atomic<int>>& hits) {
  for (size_t i = 0; i < hits.size(); ++i) {
    if (hits[i].load() != 1) {
      return ::testing::AssertionFailure() << "task " << i << " ran " << hits[i].load() << " times";
    }
  }
  return ::testing::AssertionSuccess();
}

class HostParallelRuntimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ResetHostParallelRuntime();
    g_fake_team_limit = 0;
  }
  void TearDown() override {
    ResetHostParallelRuntime();
    g_fake_team_limit = 0;
  }
};

TEST_F(HostParallelRuntimeTest, EachOnceRejectsAKnownWrongAnswer) {
  std::vector<std::atomic<int>> hits(5);
  for (auto& h : hits) h = 1;
  EXPECT_TRUE(EachOnce(hits));
  hits[3] = 2;  // a task run twice
  EXPECT_FALSE(EachOnce(hits));
  hits[3] = 0;  // a task never run
  EXPECT_FALSE(EachOnce(hits));
}

TEST_F(HostParallelRuntimeTest, WithoutARuntimeThePoolRunsTheTasks) {
  const int64_t before = GetHostParallelRuntimeInfo().team_calls;
  std::vector<std::atomic<int>> hits(500);
  HostParallelFor(500, 4, [&](int i) { hits[i].fetch_add(1); });
  EXPECT_TRUE(EachOnce(hits));
  const HostParallelRuntimeInfo info = GetHostParallelRuntimeInfo();
  EXPECT_FALSE(info.installed);
  EXPECT_EQ(info.name, "");
  EXPECT_EQ(info.team_calls, before);
}

// Tasks 0 and 1 each wait (at most 60 s) until the other has started: a thread running one
// cannot take the other, so the call runs on at least two team threads whatever the scheduler
// does (met() is false only if the team never had a second thread).
class Rendezvous {
 public:
  void Task(int i) {
    if (i > 1) return;
    started_[i].store(true);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!started_[1 - i].load() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
  }
  bool met() const { return started_[0].load() && started_[1].load(); }

 private:
  std::atomic<bool> started_[2] = {false, false};
};

TEST_F(HostParallelRuntimeTest, TasksRunOnTheTeamOncePerTask) {
  ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
  const int regions = g_fake_regions.load();
  const int tasks = 103, threads = 4;
  std::vector<std::atomic<int>> hits(tasks);
  std::vector<int> ran_on(tasks, -1);
  Rendezvous rendezvous;
  HostParallelFor(tasks, threads, [&](int i) {
    rendezvous.Task(i);
    hits[i].fetch_add(1);
    ran_on[i] = FakeOmpThreadNum();
  });
  EXPECT_TRUE(EachOnce(hits));
  EXPECT_TRUE(rendezvous.met());
  EXPECT_EQ(g_fake_regions.load(), regions + 1);
  EXPECT_NE(ran_on[0], ran_on[1]);
  const std::set<int> distinct(ran_on.begin(), ran_on.end());
  HostParallelRuntimeInfo info = GetHostParallelRuntimeInfo();
  EXPECT_TRUE(info.installed);
  EXPECT_EQ(info.name, "fake");
  EXPECT_EQ(info.last_call_team, threads);
  EXPECT_EQ(info.last_call_threads, static_cast<int>(distinct.size()));
  EXPECT_GE(info.last_call_threads, 2);
  EXPECT_LE(info.last_call_threads, threads);
  EXPECT_GE(info.max_call_threads, info.last_call_threads);

  // One thread, or one task, runs inline: no region.
  HostParallelFor(tasks, 1, [](int) {});
  HostParallelFor(1, threads, [](int) {});
  EXPECT_EQ(g_fake_regions.load(), regions + 1);
  // A smaller call after it asks the runtime for the same team (libgomp forms its team again
  // whenever the size asked for changes), and only the call's own threads run its tasks.
  std::vector<int> small_on(40, -1);
  HostParallelFor(40, 2, [&](int i) {
    small_on[i] = FakeOmpThreadNum();
    // Slow enough that a team thread past the call's two, if it took tasks, would find some.
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  });
  EXPECT_EQ(testing::fake_omp_last_team.load(), threads);
  EXPECT_EQ(GetHostParallelRuntimeInfo().last_call_team, threads);
  for (int i = 0; i < 40; ++i) EXPECT_TRUE(small_on[i] == 0 || small_on[i] == 1) << small_on[i];
  // More threads than tasks: num_tasks threads run them, on the same team.
  HostParallelFor(3, 64, [](int) {});
  EXPECT_EQ(testing::fake_omp_last_team.load(), threads);
  EXPECT_LE(GetHostParallelRuntimeInfo().last_call_threads, 3);
  // A larger call raises the team for every later call.
  HostParallelFor(tasks, 6, [](int) {});
  EXPECT_EQ(testing::fake_omp_last_team.load(), 6);
  HostParallelFor(tasks, 2, [](int) {});
  EXPECT_EQ(testing::fake_omp_last_team.load(), 6);

  // Reset: back to the pool, the runtime is not called.
  ResetHostParallelRuntime();
  const int64_t calls = GetHostParallelRuntimeInfo().team_calls;
  std::vector<std::atomic<int>> again(tasks);
  HostParallelFor(tasks, threads, [&](int i) { again[i].fetch_add(1); });
  EXPECT_TRUE(EachOnce(again));
  EXPECT_EQ(g_fake_regions.load(), regions + 5);
  EXPECT_EQ(GetHostParallelRuntimeInfo().team_calls, calls);
  EXPECT_FALSE(GetHostParallelRuntimeInfo().installed);
}

TEST_F(HostParallelRuntimeTest, ForEachSeqHeadsCoversEveryPairOnceOnTheTeam) {
  ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
  const int seqs = 37, heads = 5;
  std::vector<std::atomic<int>> hits(seqs * heads);
  ForEachSeqHeads(seqs, heads, 3, [&](int s, int h0, int h1) {
    for (int h = h0; h < h1; ++h) hits[s * heads + h].fetch_add(1);
  });
  EXPECT_TRUE(EachOnce(hits));
  EXPECT_EQ(GetHostParallelRuntimeInfo().last_call_team, 3);
}

TEST_F(HostParallelRuntimeTest, TasksTheTeamDidNotRunRunOnTheCaller) {
  ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
  g_fake_team_limit = 2;  // reports a team of 6, runs 2 of them
  std::vector<std::atomic<int>> hits(50);
  HostParallelFor(50, 6, [&](int i) { hits[i].fetch_add(1); });
  EXPECT_TRUE(EachOnce(hits));
  EXPECT_EQ(GetHostParallelRuntimeInfo().last_call_team, 6);
  EXPECT_LE(GetHostParallelRuntimeInfo().last_call_threads, 2);

  OpenMpEntryPoints bad = FakeEntry();
  bad.thread_num = &BadThreadNum;
  ASSERT_TRUE(InstallHostParallelRuntime(bad, "bad thread numbers").ok());
  g_fake_team_limit = 0;
  std::vector<std::atomic<int>> hits2(50);
  HostParallelFor(50, 3, [&](int i) { hits2[i].fetch_add(1); });
  EXPECT_TRUE(EachOnce(hits2));
}

TEST_F(HostParallelRuntimeTest, ATaskExceptionIsRethrownOnTheCallerAfterEveryTask) {
  ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
  std::vector<std::atomic<int>> hits(40);
  EXPECT_THROW(HostParallelFor(40, 4,
                               [&](int i) {
                                 hits[i].fetch_add(1);
                                 if (i % 7 == 3) throw std::runtime_error("task failed");
                               }),
               std::runtime_error);
  EXPECT_TRUE(EachOnce(hits));
}

TEST_F(HostParallelRuntimeTest, NestedAndConcurrentCallersStayCorrect) {
  ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
  constexpr int kCallers = 4, kOuter = 6, kInner = 9;
  std::vector<std::atomic<int>> hits(kCallers * kOuter * kInner);
  std::atomic<bool> stop{false};
  // Install and reset race with the calls: each call uses the runtime it started with.
  std::thread toggler([&] {
    while (!stop.load()) {
      ResetHostParallelRuntime();
      ASSERT_TRUE(InstallHostParallelRuntime(FakeEntry(), "fake").ok());
    }
  });
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      HostParallelFor(kOuter, 3, [&](int o) {
        HostParallelFor(kInner, 2,
                        [&](int i) { hits[(c * kOuter + o) * kInner + i].fetch_add(1); });
      });
    });
  }
  for (std::thread& t : callers) t.join();
  stop = true;
  toggler.join();
  EXPECT_TRUE(EachOnce(hits));
}

TEST_F(HostParallelRuntimeTest, BadEntryPointsAreRejectedByName) {
  OpenMpEntryPoints e = FakeEntry();
  absl::Status st = InstallHostParallelRuntime(e, "");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("name is empty"), std::string::npos) << st;
  e.num_threads = nullptr;
  st = InstallHostParallelRuntime(e, "partial");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("omp_get_num_threads"), std::string::npos) << st;
  e = FakeEntry();
  e.parallel = nullptr;
  st = InstallHostParallelRuntime(e, "partial");
  EXPECT_NE(st.message().find("GOMP_parallel"), std::string::npos) << st;
  EXPECT_FALSE(GetHostParallelRuntimeInfo().installed);
}

TEST_F(HostParallelRuntimeTest, LibrariesNotLoadedOrWithoutTheSymbolsAreRejected) {
  absl::Status st = InstallLoadedOpenMpRuntime("");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  st = InstallLoadedOpenMpRuntime("/nonexistent/libgomp.so.1");
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_NE(st.message().find("'/nonexistent/libgomp.so.1' is not loaded"), std::string::npos)
      << st;
  // Loaded, but not an OpenMP runtime.
  st = InstallLoadedOpenMpRuntime("libc.so.6");
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_NE(st.message().find("no symbol GOMP_parallel"), std::string::npos) << st;
  EXPECT_FALSE(GetHostParallelRuntimeInfo().installed);
}

#ifndef MEMPIPE_TEST_TSAN
// Loads the system's libgomp.so.1 as torch loads its own; false if there is none.
int (*omp_thread_num)() = nullptr;  // libgomp's omp_get_thread_num
bool LoadLibgomp() {
  void* handle = dlopen("libgomp.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) return false;
  omp_thread_num = reinterpret_cast<int (*)()>(dlsym(handle, "omp_get_thread_num"));
  return omp_thread_num != nullptr;
}

TEST_F(HostParallelRuntimeTest, RealLibgompRunsTheTasksOnItsTeam) {
  if (!LoadLibgomp()) GTEST_SKIP() << "no libgomp.so.1 on this system";
  const absl::Status st = InstallLoadedOpenMpRuntime("libgomp.so.1");
  ASSERT_TRUE(st.ok()) << st;
  const int seqs = 11, heads = 4, threads = 3;
  std::vector<std::atomic<int>> hits(seqs * heads);
  std::mutex mu;
  std::set<std::thread::id> ids;
  ForEachSeqHeads(seqs, heads, threads, [&](int s, int h0, int h1) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    }
    for (int h = h0; h < h1; ++h) hits[s * heads + h].fetch_add(1);
  });
  EXPECT_TRUE(EachOnce(hits));
  HostParallelRuntimeInfo info = GetHostParallelRuntimeInfo();
  EXPECT_EQ(info.last_call_team, threads);
  EXPECT_EQ(info.last_call_threads, static_cast<int>(ids.size()));
  // Really on libgomp's threads: at least two of them run tasks.
  Rendezvous rendezvous;
  std::vector<int> ran_on(8, -1);
  HostParallelFor(8, 2, [&](int i) {
    rendezvous.Task(i);
    ran_on[i] = omp_thread_num();
  });
  EXPECT_TRUE(rendezvous.met());
  EXPECT_NE(ran_on[0], ran_on[1]);
  EXPECT_EQ(GetHostParallelRuntimeInfo().last_call_threads, 2);

  // Nested: the inner call runs on a team of one (libgomp's nesting is off by default).
  std::vector<std::atomic<int>> nested(4 * 16);
  HostParallelFor(4, 2, [&](int o) {
    HostParallelFor(16, 4, [&](int i) { nested[o * 16 + i].fetch_add(1); });
  });
  EXPECT_TRUE(EachOnce(nested));
  // Concurrent callers outside any team: each gets its own team.
  std::vector<std::atomic<int>> concurrent(3 * 64);
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c) {
    callers.emplace_back([&, c] {
      for (int rep = 0; rep < 20; ++rep) {
        HostParallelFor(64, 2, [&](int i) {
          if (rep == 0) concurrent[c * 64 + i].fetch_add(1);
        });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_TRUE(EachOnce(concurrent));
}
#endif  // MEMPIPE_TEST_TSAN

}  // namespace
}  // namespace mempipe
