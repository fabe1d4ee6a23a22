#include "integration/bench/membw.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"
#include "core/clock.h"

namespace mempipe {
namespace {

// Sums [p, p + n) 64-bit words; the sum keeps the loads from being optimized away.
uint64_t ReadPortable(const uint64_t* p, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  for (; i < n; ++i) s0 += p[i];
  return s0 + s1 + s2 + s3;
}

#if MEMPIPE_AVX512_KERNEL
// n is a multiple of 32 words (four 64-byte lines).
MEMPIPE_TARGET_AVX512 uint64_t ReadAvx512(const uint64_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 32) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
  }
  return _mm512_reduce_add_epi64(
      _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}
#endif

bool HasAvx512() {
#if MEMPIPE_AVX512_KERNEL
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

struct FreeDeleter {
  void operator()(uint64_t* p) const { std::free(p); }
};

// The first line of a small text file under /sys, "" when it cannot be read.
std::string ReadSysLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// "300M", "32768K", "1048576" as /sys/.../cache/index*/size writes sizes; 0 if malformed.
size_t ParseCacheSize(const std::string& text) {
  size_t value = 0, i = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i)
    value = value * 10 + (text[i] - '0');
  if (i == 0) return 0;
  if (i == text.size()) return value;
  switch (text[i]) {
    case 'K':
      return value << 10;
    case 'M':
      return value << 20;
    case 'G':
      return value << 30;
    default:
      return 0;
  }
}

}  // namespace

size_t LastLevelCacheBytes() {
  int best_level = 0;
  size_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    const std::string level = ReadSysLine(dir + "/level");
    if (level.empty()) break;
    if (ReadSysLine(dir + "/type") == "Instruction") continue;
    const int l = std::atoi(level.c_str());
    const size_t bytes = ParseCacheSize(ReadSysLine(dir + "/size"));
    if (l > best_level && bytes > 0) {
      best_level = l;
      best = bytes;
    }
  }
  if (best > 0) return best;
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return static_cast<size_t>(l3);
#endif
  return 0;
}

size_t MemoryReadBytes(size_t at_least) {
  constexpr size_t kMiB = size_t{1} << 20;
  const size_t bytes = std::max({at_least, 256 * kMiB, 4 * LastLevelCacheBytes()});
  return (bytes + kMiB - 1) / kMiB * kMiB;
}

absl::StatusOr<ReadBandwidth> MeasureReadBandwidth(size_t bytes, int threads, int passes) {
  if (bytes < (1u << 20) || threads < 1 || passes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("read bandwidth needs bytes >= 1 MiB, threads",
                                                   " >= 1 and passes >= 1; got bytes ", bytes,
                                                   ", threads ", threads, ", passes ", passes));
  }
  // Each thread's share is a whole number of 256-byte chunks.
  const size_t chunk_words = 32;
  const size_t chunks = bytes / (chunk_words * 8);
  const size_t words = chunks * chunk_words;
  // 2 MiB aligned and huge pages asked for, as the benches' KV caches are: on the build VM the
  // same 2-thread read ran at 35 GB/s from a 64-byte aligned buffer and at 65-83 GB/s from a
  // 2 MiB aligned one (65-67 even where no huge page was granted; the cause is not known), so
  // the old buffer understated the bandwidth the kernels' caches have.
  constexpr size_t kAlign = size_t{2} << 20;
  const size_t alloc_bytes = (words * 8 + kAlign - 1) / kAlign * kAlign;
  std::unique_ptr<uint64_t, FreeDeleter> buf(
      static_cast<uint64_t*>(std::aligned_alloc(kAlign, alloc_bytes)));
  if (buf) madvise(buf.get(), alloc_bytes, MADV_HUGEPAGE);  // advisory; failure is harmless
  if (!buf) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
  const bool avx512 = HasAvx512();
  auto share = [&](int t, size_t& begin, size_t& end) {
    begin = chunks * t / threads * chunk_words;
    end = chunks * (t + 1) / threads * chunk_words;
  };
  std::vector<uint64_t> sums(threads);
  std::vector<double> cpu_s(threads);  // each thread's CPU seconds in the pass
  ReadBandwidth r;
  r.bytes = words * 8;
  r.threads = threads;
  r.passes = passes;
  r.kernel = avx512 ? "avx512" : "portable";
  // The threads start once and meet at a barrier before and after each pass, so a pass's wall
  // time is the read alone, not the threads' start (tens of microseconds per thread on a VM).
  std::barrier sync(threads);
  auto read = [&](size_t b, size_t e) {
#if MEMPIPE_AVX512_KERNEL
    if (avx512) return ReadAvx512(buf.get() + b, e - b);
#endif
    return ReadPortable(buf.get() + b, e - b);
  };
  auto body = [&](int t) {
    size_t b, e;
    share(t, b, e);
    for (size_t i = b; i < e; ++i) buf.get()[i] = i;  // first touch by the thread that reads it
    for (int pass = 0; pass < passes; ++pass) {
      sync.arrive_and_wait();
      const double c0 = ThreadCpuMs();  // each reader's own clock (core/clock.h)
      std::chrono::steady_clock::time_point t0;
      if (t == 0) t0 = std::chrono::steady_clock::now();
      sums[t] += read(b, e);
      cpu_s[t] = (ThreadCpuMs() - c0) * 1e-3;
      sync.arrive_and_wait();
      if (t != 0) continue;
      const double sec =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double cpu = 0;
      for (const double c : cpu_s) cpu += c;
      cpu /= threads;
      r.gbytes_per_s = std::max(r.gbytes_per_s, r.bytes / sec / 1e9);
      if (cpu > 0) r.gbytes_per_cpu_s = std::max(r.gbytes_per_cpu_s, r.bytes / cpu / 1e9);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
  body(0);
  for (auto& th : pool) th.join();
  static volatile uint64_t sink;  // keeps the sums, and so the loads, alive
  for (uint64_t s : sums) sink = sink + s;
  return r;
}

}  // namespace mempipe
