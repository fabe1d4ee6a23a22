// A GOMP_parallel stand-in built on std::thread, for tests of the host parallel runtime
// (core/host_parallel_runtime.h): ThreadSanitizer sees its synchronization (thread start and
// join), which it does not see in an uninstrumented libgomp.
//
//   ASSERT_TRUE(InstallHostParallelRuntime(testing::FakeOpenMpEntry(), "fake").ok());
#ifndef MEMPIPE_TESTS_TESTING_FAKE_OPENMP_H_
#define MEMPIPE_TESTS_TESTING_FAKE_OPENMP_H_

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "core/host_parallel_runtime.h"

namespace mempipe::testing {

inline thread_local int fake_omp_thread_num = 0;
inline thread_local int fake_omp_num_threads = 1;
// > 0: the team really started has at most this many threads, while thread numbers and team
// sizes are reported as asked (a runtime that reports more threads than it runs).
inline std::atomic<int> fake_omp_team_limit{0};
inline std::atomic<int> fake_omp_regions{0};    // FakeOmpParallel calls, ever
inline std::atomic<int> fake_omp_last_team{0};  // the team size the latest call asked for

// A team of `num_threads` (0: 1): num_threads - 1 new std::threads plus the caller as thread 0,
// each running fn(data) with its thread number and team size set; returns after all.
inline void FakeOmpParallel(void (*fn)(void*), void* data, unsigned num_threads,
                            unsigned /*flags*/) {
  fake_omp_regions.fetch_add(1);
  const int n = num_threads == 0 ? 1 : static_cast<int>(num_threads);
  fake_omp_last_team.store(n);
  const int limit = fake_omp_team_limit.load();
  const int run = limit > 0 ? std::min(n, limit) : n;
  std::vector<std::thread> team;
  for (int t = 1; t < run; ++t) {
    team.emplace_back([=] {
      fake_omp_thread_num = t;
      fake_omp_num_threads = n;
      fn(data);
    });
  }
  const int saved_num = fake_omp_thread_num, saved_size = fake_omp_num_threads;
  fake_omp_thread_num = 0;
  fake_omp_num_threads = n;
  fn(data);
  fake_omp_thread_num = saved_num;
  fake_omp_num_threads = saved_size;
  for (std::thread& t : team) t.join();
}
inline int FakeOmpThreadNum() { return fake_omp_thread_num; }
inline int FakeOmpNumThreads() { return fake_omp_num_threads; }

inline OpenMpEntryPoints FakeOpenMpEntry() {
  OpenMpEntryPoints e;
  e.parallel = &FakeOmpParallel;
  e.thread_num = &FakeOmpThreadNum;
  e.num_threads = &FakeOmpNumThreads;
  return e;
}

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_TESTING_FAKE_OPENMP_H_
