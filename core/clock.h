// mempipe core: the one clock every timing uses, and milliseconds from it.
//
//   const Clock::time_point t0 = Clock::now();
//   ...
//   costs.host_ms = MsSince(t0);
#ifndef MEMPIPE_CORE_CLOCK_H_
#define MEMPIPE_CORE_CLOCK_H_

#include <chrono>

namespace mempipe {

// Monotonic: wall-clock adjustments never make a duration negative.
using Clock = std::chrono::steady_clock;

inline double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
inline double MsBetween(Clock::time_point a, Clock::time_point b) { return Ms(b - a); }
inline double MsSince(Clock::time_point t0) { return Ms(Clock::now() - t0); }

}  // namespace mempipe

#endif  // MEMPIPE_CORE_CLOCK_H_
