// mempipe-membw: the STREAM-like read (membw.h) over a sweep of buffer sizes and thread counts,
// in wall clock and in CPU time per thread, beside the last-level cache's size. It shows where a
// read stops being served by the cache, so a "% of memory bandwidth" figure is taken against
// DRAM (the other benches size their read with MemoryReadBytes()).
//
//   mempipe-membw                                  # auto size, 1 thread and all hardware threads
//   mempipe-membw --mib=128,256,512,1024,2048,4096 --threads=1,16
#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "integration/bench/membw.h"

ABSL_FLAG(std::string, mib, "auto",
          "Comma-separated buffer sizes in MiB; auto is MemoryReadBytes(): at least 4x the "
          "last-level cache and 256 MiB");
ABSL_FLAG(std::string, threads, "",
          "Comma-separated thread counts (default: 1 and all hardware threads)");
ABSL_FLAG(int, passes, 5, "Passes per size and thread count; the best is reported");

namespace mempipe {
namespace {

// Parses "a,b,c" into positive integers; "auto" entries become `auto_value`.
bool ParseList(const std::string& flag, const std::string& text, long auto_value,
               std::vector<long>& out) {
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    long v = 0;
    if (item == "auto") {
      v = auto_value;
    } else if (!absl::SimpleAtoi(item, &v) || v < 1) {
      std::fprintf(stderr, "mempipe-membw: --%s wants positive integers, got \"%s\"\n",
                   flag.c_str(), std::string(item).c_str());
      return false;
    }
    out.push_back(v);
  }
  if (out.empty()) {
    std::fprintf(stderr, "mempipe-membw: --%s is empty\n", flag.c_str());
    return false;
  }
  return true;
}

int Run() {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string threads_flag = absl::GetFlag(FLAGS_threads);
  if (threads_flag.empty()) threads_flag = hw == 1 ? "1" : "1," + std::to_string(hw);
  std::vector<long> mibs, threads;
  if (!ParseList("mib", absl::GetFlag(FLAGS_mib), static_cast<long>(MemoryReadBytes() >> 20),
                 mibs) ||
      !ParseList("threads", threads_flag, hw, threads)) {
    return 2;
  }
  const size_t llc = LastLevelCacheBytes();
  std::printf("mempipe-membw: last-level cache %s; best of %d passes; 1 GB = 1e9 bytes\n",
              llc ? (std::to_string(llc >> 20) + " MiB").c_str() : "unknown",
              absl::GetFlag(FLAGS_passes));
  std::printf("  %9s %8s %6s %12s %14s\n", "MiB", "x LLC", "thr", "wall GB/s", "CPU-time GB/s");
  for (long t : threads) {
    for (long mib : mibs) {
      std::fprintf(stderr, "[read] %ld MiB, %ld thread(s)\n", mib, t);
      auto bw = MeasureReadBandwidth(static_cast<size_t>(mib) << 20, static_cast<int>(t),
                                     absl::GetFlag(FLAGS_passes));
      if (!bw.ok()) {
        std::fprintf(stderr, "mempipe-membw: %s\n", std::string(bw.status().message()).c_str());
        return 1;
      }
      std::printf("  %9ld %8.2f %6ld %12.1f %14.1f\n", mib,
                  llc ? static_cast<double>(bw->bytes) / llc : 0.0, t, bw->gbytes_per_s,
                  bw->gbytes_per_cpu_s);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace mempipe

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "The STREAM-like read over buffer sizes and thread counts (see membw_main.cc)");
  absl::ParseCommandLine(argc, argv);
  return mempipe::Run();
}
