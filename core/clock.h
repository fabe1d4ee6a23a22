// mempipe core: the one clock every timing uses, and milliseconds from it; and the process's
// CPU time, for benchmarks that time kernels in CPU time on a shared machine.
//
//   const Clock::time_point t0 = Clock::now();
//   ...
//   costs.host_ms = MsSince(t0);
#ifndef MEMPIPE_CORE_CLOCK_H_
#define MEMPIPE_CORE_CLOCK_H_

#include <time.h>

#include <chrono>

namespace mempipe {

// Monotonic: wall-clock adjustments never make a duration negative.
using Clock = std::chrono::steady_clock;

inline double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
inline double MsBetween(Clock::time_point a, Clock::time_point b) { return Ms(b - a); }
inline double MsSince(Clock::time_point t0) { return Ms(Clock::now() - t0); }

// CPU time used so far by all of this process's threads, milliseconds (CLOCK_PROCESS_CPUTIME_ID).
inline double ProcessCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

}  // namespace mempipe

#endif  // MEMPIPE_CORE_CLOCK_H_
