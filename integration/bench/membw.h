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
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// The STREAM-like read as a probe a benchmark can repeat between the runs of what it measures:
// on a machine whose bandwidth drifts with other tenants' load (the 2-vCPU build VMs: 32-77
// GB/s between back-to-back 2-thread reads), a kernel's rate is compared with the reads taken
// just before and after it rather than with one read at another moment.
//
//   MEMPIPE_ASSIGN_OR_RETURN(ReadProbe probe, ReadProbe::Create(MemoryReadBytes(), threads));
//   ReadProbe::Pass before = probe.Run();  ... kernel ...  ReadProbe::Pass after = probe.Run();
class ReadProbe {
 public:
  struct Pass {
    double wall_s = 0;  // the read's wall time (the threads start before it, meet after it)
    double cpu_s = 0;   // the readers' own CPU seconds, mean over the threads
    size_t bytes = 0;   // bytes read
  };

  // A `bytes` buffer (whole 256-byte chunks; 2 MiB aligned and huge pages asked for, like the
  // benches' KV caches), first-touched by the threads that will read it. Errors: bytes < 1 MiB
  // or threads < 1 (InvalidArgument, naming the value), no memory (ResourceExhausted).
  static absl::StatusOr<ReadProbe> Create(size_t bytes, int threads);

  // One read of the whole buffer by `threads` threads, each its own contiguous share.
  Pass Run();

  // The pattern of sparse decode's pages: `count` chunks of `chunk_bytes` (a multiple of 256)
  // at distinct random chunk-aligned places, drawn from `seed`; thread t reads its share of
  // them, all inside its own share of the buffer (Run's) less that share's last `tail_bytes`,
  // in ascending address order, prefetching the next chunk into L2 a line per line read, as
  // the kernels prefetch the next page (attention/decode.cc, NextPage). After Run, the end of
  // each share is in the last-level cache: pass about twice the cache over the threads as
  // tail_bytes to keep the chunks in DRAM. Each thread's count is clamped to [1, the chunks
  // its part holds]. Errors: a chunk size that is not a positive multiple of 256, or a part
  // without room for one chunk (InvalidArgument, naming the values).
  absl::StatusOr<Pass> RunChunks(size_t chunk_bytes, size_t count, uint64_t seed,
                                 size_t tail_bytes = 0);

  size_t bytes() const { return words_ * 8; }
  int threads() const { return threads_; }
  const std::string& kernel() const { return kernel_; }  // "avx512" or "portable"
  // The sum, mod 2^64, of every word the passes read (word i of the buffer holds i): a check
  // that a pass read the whole buffer once.
  uint64_t sum() const { return sum_; }
  // Bytes per second of a pass, wall and CPU time; 1 GB = 1e9 bytes.
  double GBytesPerS(const Pass& p) const { return p.wall_s > 0 ? p.bytes / p.wall_s / 1e9 : 0; }
  double GBytesPerCpuS(const Pass& p) const { return p.cpu_s > 0 ? p.bytes / p.cpu_s / 1e9 : 0; }

 private:
  struct FreeDeleter {
    void operator()(uint64_t* p) const;
  };
  ReadProbe(std::unique_ptr<uint64_t, FreeDeleter> buf, size_t words, int threads);
  // Thread t's share of the words: [begin, end).
  void Share(int t, size_t& begin, size_t& end) const;
  // Runs read(t) on `threads_` threads between two barriers; read returns its sum (folded into
  // sum_), the pass its wall time and the threads' mean CPU time.
  template <typename Read>
  Pass RunThreads(Read read);

  std::unique_ptr<uint64_t, FreeDeleter> buf_;
  size_t words_;
  int threads_;
  std::string kernel_;
  uint64_t sum_ = 0;  // the reads' sums, kept so that the loads are not dropped
};

// The median, least and greatest of a sample (all 0 when it is empty): how the benches report
// a ratio measured pass by pass.
struct Spread {
  double median = 0, min = 0, max = 0;
};
Spread SpreadOf(std::vector<double> sample);

// Reads a `bytes` buffer (2 MiB aligned, transparent huge pages asked for, like the benches'
// KV caches; first-touched by the reading threads; MemoryReadBytes() sizes it past the
// last-level cache) `passes` times with `threads` threads and keeps the fastest pass.
// Errors: bytes < 1 MiB, threads < 1 or passes < 1 (InvalidArgument).
absl::StatusOr<ReadBandwidth> MeasureReadBandwidth(size_t bytes, int threads, int passes);

// The other roofline: how many fp32 multiply-adds per second the host's cores do, so that a
// benchmark can set a kernel's arithmetic beside its bytes. Each thread runs kFmaChains
// independent chains of 16-lane fused multiply-adds (AVX-512, a = a * x + y), `iters` steps of
// each, between two barriers; a lane of a step counts one multiply-add. kFmaChains covers an
// FMA's latency times the FMA units of current cores (4 x 2 on Zen 4/5, Sapphire Rapids).
struct FmaRate {
  double gmacs_per_s = 0;  // multiply-adds per wall second, all threads, 1 G = 1e9
  int threads = 0;
  int64_t macs = 0;  // threads * iters * kFmaChains * 16
  float result = 0;  // one lane of one chain after `iters` steps (every chain starts alike)
};
inline constexpr int kFmaChains = 12;

// The chains' step, a = fma(a, x, y), from a0 as the threads start it: the value a chain holds
// after `iters` steps, for a check of MeasureFmaRate's loop.
float FmaChainValue(int64_t iters);

// Errors: threads < 1 or iters < 1 (InvalidArgument, naming the value); FailedPrecondition
// where the CPU (or the build) has no AVX-512.
absl::StatusOr<FmaRate> MeasureFmaRate(int threads, int64_t iters);

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_MEMBW_H_
