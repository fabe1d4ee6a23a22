// mempipe core: the one clock every timing uses, and milliseconds from it; and the CPU time of
// the process's threads, for benchmarks that time kernels in CPU time on a shared machine.
//
//   const Clock::time_point t0 = Clock::now();
//   ...
//   costs.host_ms = MsSince(t0);
//
//   const ThreadsCpu c0 = ThreadsCpu::Now();
//   ...
//   const double cpu_ms = ThreadsCpu::Now().MsSince(c0);
#ifndef MEMPIPE_CORE_CLOCK_H_
#define MEMPIPE_CORE_CLOCK_H_

#include <sys/types.h>
#include <time.h>

#include <chrono>
#include <utility>
#include <vector>

namespace mempipe {

// Monotonic: wall-clock adjustments never make a duration negative.
using Clock = std::chrono::steady_clock;

inline double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
inline double MsBetween(Clock::time_point a, Clock::time_point b) { return Ms(b - a); }
inline double MsSince(Clock::time_point t0) { return Ms(Clock::now() - t0); }

// Milliseconds of CPU time so far of this process's threads that exist now (/proc/self/task),
// each read from its own clock. A difference of two readings is exact across a thread's start
// (its clock starts at zero), but a thread that ends in between takes all its time out of the
// second: time intervals with ThreadsCpu, which counts per thread. Costs a few microseconds (7 us
// with 4 threads on the build VM).
//
// Not CLOCK_PROCESS_CPUTIME_ID: Linux adds another thread's running time to the process clock
// only at that thread's ticks and context switches, so a difference over a few milliseconds can
// leave out most of it (on the build VM, two busy threads read as one busy thread in some 0.05 to
// 1 ms intervals, and as 0.9 of two in some 5 ms ones), and a best-of-N pass picks exactly those.
// Reading a thread's own clock brings it up to date.
double ThreadsCpuMs();

// The CPU clocks of this process's threads at one moment, per thread, for intervals:
//   const ThreadsCpu c0 = ThreadsCpu::Now();  ...  const double ms = ThreadsCpu::Now().MsSince(c0);
// A thread that ends in between counts nothing (its time before the end is lost), where a
// difference of ThreadsCpuMs() subtracts its whole time: mempipe-cpu-kernel-bench, timing a
// kernel right after its read probe's threads were joined, saw -0.35 ms per layer.
class ThreadsCpu {
 public:
  static ThreadsCpu Now();
  // Per thread alive now: its clock less its clock in `earlier` (a thread not there, or whose
  // clock was higher there, so a reused id, from zero); summed, in milliseconds. Never negative.
  double MsSince(const ThreadsCpu& earlier) const;

 private:
  std::vector<std::pair<pid_t, double>> ms_;  // (thread id, CPU ms), ascending by id
};

// Milliseconds of CPU time so far of the calling thread (CLOCK_THREAD_CPUTIME_ID, exact).
double ThreadCpuMs();

}  // namespace mempipe

#endif  // MEMPIPE_CORE_CLOCK_H_
