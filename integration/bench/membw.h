// mempipe bench: the host's memory read bandwidth, measured like STREAM's read-only kernel, so
// a benchmark can state its decode kernels' bytes per second as a fraction of what the machine
// delivers in the same run.
//
//   MEMPIPE_ASSIGN_OR_RETURN(ReadBandwidth bw,
//                            MeasureReadBandwidth(MemoryReadBytes(), threads, 5));
//   std::printf("%.1f GB/s\n", bw.gbytes_per_s);
#ifndef MEMPIPE_INTEGRATION_BENCH_MEMBW_H_
#define MEMPIPE_INTEGRATION_BENCH_MEMBW_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace mempipe {

struct ReadBandwidth {
  double gbytes_per_s = 0;  // best pass: bytes / wall seconds, 1 GB = 1e9 bytes
  // Best pass: bytes / (CPU seconds of all threads / threads), the rate while the threads run
  // (on a machine shared with other work, wall time also counts time spent descheduled).
  double gbytes_per_cpu_s = 0;
  size_t bytes = 0;  // buffer size (each pass reads all of it once)
  int threads = 0;   // threads reading disjoint contiguous shares
  int passes = 0;
  std::string kernel;  // "avx512" (64-byte loads) or "portable" (what the compiler emits)
};

// The last-level cache's size in bytes as the kernel reports it (the highest-level data or
// unified cache of cpu0 under /sys/devices/system/cpu, else sysconf's level 3), 0 if unknown.
size_t LastLevelCacheBytes();

// A read buffer size that measures memory, not cache: STREAM's rule of at least four times the
// last-level cache, at least 256 MiB, and at least `at_least`, rounded up to whole MiB. (On the
// H200 host, whose KVM guest sees a 300 MiB L3, a 256 MiB read ran at 250-420 GB/s on 16 threads
// where reads from DRAM ran at about 160.)
size_t MemoryReadBytes(size_t at_least = 0);

// Reads a `bytes` buffer (2 MiB aligned, transparent huge pages asked for, like the benches'
// KV caches; first-touched by the reading threads; MemoryReadBytes() sizes it past the
// last-level cache) `passes` times with `threads` threads and keeps the fastest pass.
// Errors: bytes < 1 MiB, threads < 1 or passes < 1 (InvalidArgument).
absl::StatusOr<ReadBandwidth> MeasureReadBandwidth(size_t bytes, int threads, int passes);

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_MEMBW_H_
