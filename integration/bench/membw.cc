#include "integration/bench/membw.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>
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

// Sums n words (a multiple of 8: whole lines) at p, prefetching the line as far into `next`
// (none when null) into L2 with each line read.
uint64_t ReadChunkPortable(const uint64_t* p, const uint64_t* next, size_t n) {
  uint64_t s0 = 0, s1 = 0;
  for (size_t i = 0; i < n; i += 8) {
    if (next != nullptr) __builtin_prefetch(next + i, 0, 2);
    for (size_t j = 0; j < 8; j += 2) {
      s0 += p[i + j];
      s1 += p[i + j + 1];
    }
  }
  return s0 + s1;
}

#if MEMPIPE_AVX512_KERNEL
MEMPIPE_TARGET_AVX512 uint64_t ReadChunkAvx512(const uint64_t* p, const uint64_t* next, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0;
  for (size_t i = 0; i < n; i += 16) {  // n is a multiple of 32 words (256 bytes)
    if (next != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + i + 8), _MM_HINT_T1);
    }
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 8));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(a0, a1));
}
#endif

// Every chain of every thread starts at kFmaA0 and steps a = fma(a, kFmaX, kFmaY). x is just
// above 1, so each step adds at least one ulp: a strictly increasing sequence (a step count off
// by one changes the value), which stays normal for billions of steps (about 10.8 after 2e7),
// and which a compiler cannot turn into adds (as it could fma(a, 1, y)).
constexpr float kFmaA0 = 1.0f, kFmaX = 1.0f + 0x1p-23f, kFmaY = 0x1p-20f;

#if MEMPIPE_AVX512_KERNEL
MEMPIPE_TARGET_AVX512 float FmaChainsAvx512(int64_t iters) {
  __m512 a[kFmaChains];
  for (__m512& v : a) v = _mm512_set1_ps(kFmaA0);
  const __m512 x = _mm512_set1_ps(kFmaX), y = _mm512_set1_ps(kFmaY);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (__m512& v : a) v = _mm512_fmadd_ps(v, x, y);
  }
  // Lane 0 of chain 0 is the result; the others are folded in with weight 0 so that no chain's
  // arithmetic is dead, and so dropped.
  __m512 rest = _mm512_setzero_ps();
  for (int c = 1; c < kFmaChains; ++c) rest = _mm512_add_ps(rest, a[c]);
  return _mm512_cvtss_f32(a[0]) + 0.0f * _mm512_reduce_add_ps(rest);
}
#endif

bool HasAvx512() {
#if MEMPIPE_AVX512_KERNEL
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

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

// Runs body(t) on `threads` threads (the caller is thread 0) that meet at a barrier before and
// after it, and returns the wall seconds between the two: the work alone, not the threads'
// start (tens of microseconds per thread on a VM).
template <typename Body>
double TimeBetweenBarriers(int threads, Body body) {
  std::barrier sync(threads);
  std::chrono::steady_clock::time_point t0, t1;
  auto run = [&](int t) {
    sync.arrive_and_wait();
    if (t == 0) t0 = std::chrono::steady_clock::now();
    body(t);
    sync.arrive_and_wait();
    if (t == 0) t1 = std::chrono::steady_clock::now();
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(t1 - t0).count();
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

Spread SpreadOf(std::vector<double> sample) {
  if (sample.empty()) return {};
  std::sort(sample.begin(), sample.end());
  const size_t n = sample.size();
  return {n % 2 ? sample[n / 2] : 0.5 * (sample[n / 2 - 1] + sample[n / 2]), sample.front(),
          sample.back()};
}

size_t MemoryReadBytes(size_t at_least) {
  constexpr size_t kMiB = size_t{1} << 20;
  const size_t bytes = std::max({at_least, 256 * kMiB, 4 * LastLevelCacheBytes()});
  return (bytes + kMiB - 1) / kMiB * kMiB;
}

void ReadProbe::FreeDeleter::operator()(uint64_t* p) const { std::free(p); }

ReadProbe::ReadProbe(std::unique_ptr<uint64_t, FreeDeleter> buf, size_t words, int threads)
    : buf_(std::move(buf)),
      words_(words),
      threads_(threads),
      kernel_(HasAvx512() ? "avx512" : "portable") {}

void ReadProbe::Share(int t, size_t& begin, size_t& end) const {
  constexpr size_t kChunkWords = 32;  // 256 bytes: ReadAvx512's four lines
  const size_t chunks = words_ / kChunkWords;
  begin = chunks * t / threads_ * kChunkWords;
  end = chunks * (t + 1) / threads_ * kChunkWords;
}

absl::StatusOr<ReadProbe> ReadProbe::Create(size_t bytes, int threads) {
  if (bytes < (1u << 20) || threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the read needs bytes >= 1 MiB and threads >= ",
                                                   "1; got bytes ", bytes, ", threads ", threads));
  }
  const size_t words = bytes / 256 * 32;  // whole 256-byte chunks
  // 2 MiB aligned and huge pages asked for, as the benches' KV caches are: on the build VM the
  // same 2-thread read ran at 35 GB/s from a 64-byte aligned buffer and at 65-83 GB/s from a
  // 2 MiB aligned one (65-67 even where no huge page was granted; the cause is not known), so
  // the old buffer understated the bandwidth the kernels' caches have.
  constexpr size_t kAlign = size_t{2} << 20;
  const size_t alloc_bytes = (words * 8 + kAlign - 1) / kAlign * kAlign;
  std::unique_ptr<uint64_t, FreeDeleter> buf(
      static_cast<uint64_t*>(std::aligned_alloc(kAlign, alloc_bytes)));
  if (!buf) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
  madvise(buf.get(), alloc_bytes, MADV_HUGEPAGE);  // advisory; failure is harmless
  ReadProbe probe(std::move(buf), words, threads);
  // First touch by the threads that read each share (their memory node, where there are several).
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&probe, t] {
      size_t b, e;
      probe.Share(t, b, e);
      uint64_t* p = probe.buf_.get();
      for (size_t i = b; i < e; ++i) p[i] = i;
    });
  }
  for (auto& th : pool) th.join();
  return probe;
}

template <typename Read>
ReadProbe::Pass ReadProbe::RunThreads(Read read) {
  std::vector<uint64_t> sums(threads_);
  std::vector<double> cpu_ms(threads_);  // each thread's CPU time in the read
  Pass pass;
  pass.wall_s = TimeBetweenBarriers(threads_, [&](int t) {
    const double c0 = ThreadCpuMs();  // each reader's own clock (core/clock.h)
    sums[t] = read(t);
    cpu_ms[t] = ThreadCpuMs() - c0;
  });
  for (int t = 0; t < threads_; ++t) {
    pass.cpu_s += cpu_ms[t] * 1e-3 / threads_;
    sum_ += sums[t];
  }
  static volatile uint64_t sink;  // keeps the sums, and so the loads, alive
  sink = sink + sum_;
  return pass;
}

ReadProbe::Pass ReadProbe::Run() {
  const bool avx512 = kernel_ == "avx512";
  Pass pass = RunThreads([&](int t) {
    size_t b, e;
    Share(t, b, e);
#if MEMPIPE_AVX512_KERNEL
    if (avx512) return ReadAvx512(buf_.get() + b, e - b);
#endif
    return ReadPortable(buf_.get() + b, e - b);
  });
  pass.bytes = bytes();
  return pass;
}

absl::StatusOr<ReadProbe::Pass> ReadProbe::RunChunks(size_t chunk_bytes, size_t count,
                                                     uint64_t seed, size_t tail_bytes) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk_bytes must be a positive multiple of 256 that fits in each thread's share of ",
        bytes() / threads_, " bytes less tail_bytes; got chunk_bytes ", chunk_bytes,
        ", tail_bytes ", tail_bytes));
  };
  if (chunk_bytes == 0 || chunk_bytes % 256 != 0) return bad();
  const size_t chunk_words = chunk_bytes / 8;
  const size_t tail_words = tail_bytes / 8;
  // Thread t's chunk-aligned places [first[t], first[t] + places[t]).
  std::vector<size_t> first(threads_), places(threads_);
  for (int t = 0; t < threads_; ++t) {
    size_t b, e;
    Share(t, b, e);
    e = e > b + tail_words ? e - tail_words : b;
    first[t] = (b + chunk_words - 1) / chunk_words;
    places[t] = e / chunk_words > first[t] ? e / chunk_words - first[t] : 0;
    if (places[t] == 0) return bad();
  }
  // Each thread's places: the first n of a partial Fisher-Yates shuffle of its part, ascending.
  std::vector<std::vector<size_t>> mine(threads_);
  size_t total = 0;
  for (int t = 0; t < threads_; ++t) {
    const size_t want = count * (t + 1) / threads_ - count * t / threads_;
    const size_t n = std::clamp<size_t>(want, 1, places[t]);
    std::vector<size_t>& p = mine[t];
    p.resize(places[t]);
    std::iota(p.begin(), p.end(), first[t]);
    std::mt19937_64 rng(seed + t);
    for (size_t i = 0; i < n; ++i) {
      std::swap(p[i], p[i + std::uniform_int_distribution<size_t>(0, places[t] - 1 - i)(rng)]);
    }
    p.resize(n);
    std::sort(p.begin(), p.end());
    total += n;
  }
  const bool avx512 = kernel_ == "avx512";
  Pass pass = RunThreads([&](int t) {
    uint64_t sum = 0;
    const std::vector<size_t>& p = mine[t];
    for (size_t i = 0; i < p.size(); ++i) {
      const uint64_t* c = buf_.get() + p[i] * chunk_words;
      const uint64_t* next = i + 1 < p.size() ? buf_.get() + p[i + 1] * chunk_words : nullptr;
#if MEMPIPE_AVX512_KERNEL
      if (avx512) {
        sum += ReadChunkAvx512(c, next, chunk_words);
        continue;
      }
#endif
      sum += ReadChunkPortable(c, next, chunk_words);
    }
    return sum;
  });
  pass.bytes = total * chunk_bytes;
  return pass;
}

float FmaChainValue(int64_t iters) {
  float a = kFmaA0;
  for (int64_t i = 0; i < iters; ++i) a = std::fma(a, kFmaX, kFmaY);
  return a;
}

absl::StatusOr<FmaRate> MeasureFmaRate(int threads, int64_t iters) {
  if (threads < 1 || iters < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("the FMA rate needs threads >= 1 and iters >= 1; got threads ", threads,
                     ", iters ", iters));
  }
#if MEMPIPE_AVX512_KERNEL
  if (HasAvx512()) {
    std::vector<float> result(threads);
    const double s =
        TimeBetweenBarriers(threads, [&](int t) { result[t] = FmaChainsAvx512(iters); });
    FmaRate r;
    r.threads = threads;
    r.macs = static_cast<int64_t>(threads) * iters * kFmaChains * 16;
    r.result = result[0];
    for (const float v : result) {  // every thread ran the same chains
      if (v != r.result) r.result = std::numeric_limits<float>::quiet_NaN();
    }
    r.gmacs_per_s = s > 0 ? r.macs / s / 1e9 : 0;
    return r;
  }
#endif
  return absl::FailedPreconditionError(
      "the FMA rate is measured with AVX-512, which this CPU "
      "or build lacks");
}

absl::StatusOr<ReadBandwidth> MeasureReadBandwidth(size_t bytes, int threads, int passes) {
  if (bytes < (1u << 20) || threads < 1 || passes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("read bandwidth needs bytes >= 1 MiB, threads",
                                                   " >= 1 and passes >= 1; got bytes ", bytes,
                                                   ", threads ", threads, ", passes ", passes));
  }
  absl::StatusOr<ReadProbe> probe = ReadProbe::Create(bytes, threads);
  if (!probe.ok()) return probe.status();
  ReadBandwidth r;
  r.bytes = probe->bytes();
  r.threads = threads;
  r.passes = passes;
  r.kernel = probe->kernel();
  for (int pass = 0; pass < passes; ++pass) {
    const ReadProbe::Pass p = probe->Run();
    r.gbytes_per_s = std::max(r.gbytes_per_s, probe->GBytesPerS(p));
    r.gbytes_per_cpu_s = std::max(r.gbytes_per_cpu_s, probe->GBytesPerCpuS(p));
  }
  return r;
}

}  // namespace mempipe
