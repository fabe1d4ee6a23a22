// The CPU time of the process's threads from their own clocks (see core/clock.h).
#include "core/clock.h"

#include <dirent.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

namespace mempipe {
namespace {

// Linux's CPU clock id of thread `tid`, as glibc's pthread_getcpuclockid builds it for a
// pthread: the id's complement shifted by three bits, "per thread" (4), the scheduler's clock (2).
clockid_t ThreadCpuClockId(pid_t tid) {
  return static_cast<clockid_t>((~static_cast<unsigned>(tid) << 3) | 4 | 2);
}

double ClockMs(clockid_t c) {
  timespec ts;
  return clock_gettime(c, &ts) == 0 ? ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6 : 0;
}

}  // namespace

double ThreadCpuMs() { return ClockMs(CLOCK_THREAD_CPUTIME_ID); }

ThreadsCpu ThreadsCpu::Now() {
  ThreadsCpu now;
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) {  // no procfs: this thread alone
    now.ms_.emplace_back(static_cast<pid_t>(gettid()), ThreadCpuMs());
    return now;
  }
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] >= '0' && e->d_name[0] <= '9') {
      const pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
      timespec ts;
      // A thread that has ended, though still listed, has no clock to read: left out.
      if (clock_gettime(ThreadCpuClockId(tid), &ts) == 0) {
        now.ms_.emplace_back(tid, ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6);
      }
    }
  }
  closedir(dir);
  std::sort(now.ms_.begin(), now.ms_.end());
  return now;
}

double ThreadsCpu::MsSince(const ThreadsCpu& earlier) const {
  double ms = 0;
  auto e = earlier.ms_.begin();
  for (const auto& [tid, now_ms] : ms_) {
    while (e != earlier.ms_.end() && e->first < tid) ++e;
    const bool was = e != earlier.ms_.end() && e->first == tid && e->second <= now_ms;
    ms += was ? now_ms - e->second : now_ms;
  }
  return ms;
}

double ThreadsCpuMs() { return ThreadsCpu::Now().MsSince(ThreadsCpu()); }

}  // namespace mempipe
