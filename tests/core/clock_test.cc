#include "core/clock.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

// A worker busy on its CPU counts while this thread sleeps, read while the worker still runs.
// The worker never reads its own clock while it spins, which would bring the process clock up to
// date too: so CLOCK_PROCESS_CPUTIME_ID, which adds a running thread's time at its ticks, misses
// up to a tick of it here (it failed 3 of 20 runs on the build VM, where a tick mostly landed
// close before the read); counting only the calling thread, which sleeps, misses all of it (20 of
// 20 failed).
TEST(ThreadsCpuMs, CountsOtherRunningThreads) {
  std::atomic<int> phase{0};  // 0: wait, 1: spin, 2: stop
  double worker_ms = 0;       // the worker's CPU time from the start of its spin to its end
  std::thread worker([&] {
    while (phase.load() == 0) std::this_thread::yield();
    const double start = ThreadCpuMs();
    volatile uint64_t x = 0;
    while (phase.load() == 1) x = x + 1;
    worker_ms = ThreadCpuMs() - start;
  });
  const double c0 = ThreadsCpuMs();
  const double own0 = ThreadCpuMs();
  phase.store(1);
  std::this_thread::sleep_for(std::chrono::milliseconds(6));
  const double c1 = ThreadsCpuMs();
  const double own = ThreadCpuMs() - own0;
  phase.store(2);
  worker.join();
  // What the worker ran after c1 was read: seeing phase 2 and reading its clock, microseconds.
  constexpr double kAfterMs = 0.2;
  EXPECT_GE(c1 - c0, worker_ms - kAfterMs) << "worker " << worker_ms << " ms, caller " << own;
  EXPECT_GT(worker_ms, 1.0) << "the worker should have spun through the caller's sleep";
}

// Differences are never negative while the threads live, and the calling thread's own work
// is counted.
TEST(ThreadsCpuMs, CountsTheCallingThread) {
  const double c0 = ThreadsCpuMs();
  const double own0 = ThreadCpuMs();
  volatile double x = 0;
  while (ThreadCpuMs() - own0 < 2.0) x = x + 1;
  EXPECT_GE(ThreadsCpuMs() - c0, 2.0);
}

}  // namespace
}  // namespace mempipe
