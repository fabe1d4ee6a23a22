// The CPU time of the process's threads from their own clocks (see core/clock.h).
#include "core/clock.h"

#include <dirent.h>
#include <sys/types.h>

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

double ThreadsCpuMs() {
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return ThreadCpuMs();  // no procfs: this thread alone
  double ms = 0;
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] >= '0' && e->d_name[0] <= '9')
      ms += ClockMs(ThreadCpuClockId(static_cast<pid_t>(std::atoi(e->d_name))));
  }
  closedir(dir);
  return ms;
}

}  // namespace mempipe
