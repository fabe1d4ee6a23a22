// mempipe-membw: the STREAM-like read (membw.h) over a sweep of buffer sizes and thread counts,
// in wall clock and in CPU time per thread, beside the last-level cache's size. It shows where a
// read stops being served by the cache, so a "% of memory bandwidth" figure is taken against
// DRAM (the other benches size their read with MemoryReadBytes()).
//
// With --chunk_kib it also reads the pattern of sparse decode's pages (ReadProbe::RunChunks):
// an eighth of the buffer's bytes as chunks of each size at random places (away from what the
// stream left in the last-level cache), each pass right after a
// streaming pass of the same buffer, and reports the chunks' rate over the stream's (median and
// range over the passes): what scattered pages of that size allow on this machine, whatever
// the kernel's arithmetic (a KV head's page of K or V is page_size x head_dim x dtype bytes:
// 4 KiB for SmolLM2 bf16 at page 32, and for Llama-3-8B bf16 at page 16).
//
//   mempipe-membw                                  # auto size, 1 thread and all hardware threads
//   mempipe-membw --mib=128,256,512,1024,2048,4096 --threads=1,16
//   mempipe-membw --threads=2 --chunk_kib=4,8,16,32 --passes=21
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
ABSL_FLAG(int, passes, 5,
          "Passes per size and thread count; the best is reported (with --chunk_kib: pairs of "
          "a streaming and a chunk pass per chunk size, the median reported)");
ABSL_FLAG(std::string, chunk_kib, "",
          "Comma-separated chunk sizes in KiB: also read an eighth of each buffer as chunks of "
          "that size at random places (sparse decode's scattered pages), against the stream "
          "(default: none)");

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
  std::vector<long> mibs, threads, chunks;
  if (!ParseList("mib", absl::GetFlag(FLAGS_mib), static_cast<long>(MemoryReadBytes() >> 20),
                 mibs) ||
      !ParseList("threads", threads_flag, hw, threads) ||
      (!absl::GetFlag(FLAGS_chunk_kib).empty() &&
       !ParseList("chunk_kib", absl::GetFlag(FLAGS_chunk_kib), 4, chunks))) {
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
  if (chunks.empty()) return 0;
  std::printf(
      "scattered chunks (an eighth of the buffer at random places, the next chunk prefetched) "
      "against the stream just before, wall clock, median (range) over %d passes:\n",
      absl::GetFlag(FLAGS_passes));
  std::printf("  %9s %6s %9s %12s %12s %16s\n", "MiB", "thr", "chunk KiB", "stream GB/s",
              "chunks GB/s", "chunks / stream");
  for (long t : threads) {
    for (long mib : mibs) {
      auto probe = ReadProbe::Create(static_cast<size_t>(mib) << 20, static_cast<int>(t));
      if (!probe.ok()) {
        std::fprintf(stderr, "mempipe-membw: %s\n", std::string(probe.status().message()).c_str());
        return 1;
      }
      for (long kib : chunks) {
        std::fprintf(stderr, "[chunks] %ld MiB, %ld thread(s), %ld KiB\n", mib, t, kib);
        std::vector<double> stream, scattered, ratio;
        for (int pass = 0; pass < absl::GetFlag(FLAGS_passes); ++pass) {
          const ReadProbe::Pass s = probe->Run();
          const size_t bytes = static_cast<size_t>(kib) << 10;
          // Away from what the stream left in the last-level cache (twice it, over the shares).
          auto c = probe->RunChunks(bytes, probe->bytes() / 8 / bytes, 1000 + pass,
                                    2 * LastLevelCacheBytes() / t);
          if (!c.ok()) {
            std::fprintf(stderr, "mempipe-membw: %s\n", std::string(c.status().message()).c_str());
            return 1;
          }
          stream.push_back(probe->GBytesPerS(s));
          scattered.push_back(probe->GBytesPerS(*c));
          ratio.push_back(scattered.back() / stream.back());
        }
        const Spread st = SpreadOf(stream), sc = SpreadOf(scattered), r = SpreadOf(ratio);
        std::printf("  %9ld %6ld %9ld %12.1f %12.1f %6.2f (%.2f-%.2f)\n", mib, t, kib, st.median,
                    sc.median, r.median, r.min, r.max);
        std::fflush(stdout);
      }
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
