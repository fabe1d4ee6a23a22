// What one access pattern allows on this machine: reading chunks of CHUNK bytes (4096: one KV
// head's K or V page of SmolLM2 bf16 at page 32) in random order, against reading the same
// number of bytes in order, with several software-prefetch strategies. T threads, each over its
// own share of the chunks (half of a 1 GiB buffer's chunks, a different random order per pass).
// Not part of the build:
//   g++ -O2 -mavx512f -std=c++20 -pthread -o chunkread chunkread.cc && ./chunkread 4096 2 3
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

enum Mode { kSeq, kNone, kSpread1, kSpread2, kSpread1T0, kSpread2T0, kBurst2, kModes };
const char* const kNames[] = {"in order, no prefetch",   "random, no prefetch",
                              "random, 1 chunk ahead",   "random, 2 chunks ahead",
                              "random, 1 ahead into L1", "random, 2 ahead into L1",
                              "random, 2 ahead at once"};

// Reads chunks order[0..n) of buf (in order: chunks first..first+n) as `mode` says.
long long ReadChunks(const char* buf, const size_t* order, size_t n, size_t chunk, Mode mode) {
  __m512i x = _mm512_setzero_si512();
  const size_t dist = (mode == kSpread2 || mode == kSpread2T0 || mode == kBurst2) ? 2 : 1;
  for (size_t i = 0; i < n; ++i) {
    const char* p = buf + order[i] * chunk;
    const char* q =
        (mode != kSeq && mode != kNone && i + dist < n) ? buf + order[i + dist] * chunk : nullptr;
    if (q != nullptr && mode == kBurst2) {
      for (size_t o = 0; o < chunk; o += 64) _mm_prefetch(q + o, _MM_HINT_T1);
      q = nullptr;
    }
    for (size_t o = 0; o < chunk; o += 64) {
      if (q != nullptr) {
        if (mode == kSpread1T0 || mode == kSpread2T0) {
          _mm_prefetch(q + o, _MM_HINT_T0);
        } else {
          _mm_prefetch(q + o, _MM_HINT_T1);
        }
      }
      x = _mm512_xor_si512(x, _mm512_load_si512(p + o));
    }
  }
  return _mm512_reduce_add_epi64(x);
}

}  // namespace

int main(int argc, char** argv) {
  const size_t chunk = argc > 1 ? std::atoi(argv[1]) : 4096;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int passes = argc > 3 ? std::atoi(argv[3]) : 3;
  if (chunk < 64 || chunk % 64 != 0 || threads < 1 || passes < 1) {
    std::fprintf(stderr, "usage: chunkread CHUNK_BYTES(multiple of 64) THREADS PASSES\n");
    return 2;
  }
  const size_t bytes = size_t{1} << 30;
  char* buf = static_cast<char*>(std::aligned_alloc(size_t{2} << 20, bytes));
  madvise(buf, bytes, MADV_HUGEPAGE);
  std::memset(buf, 1, bytes);
  const size_t n = bytes / chunk, take = n / 2, share = take / threads;
  std::vector<size_t> seq(n), order(n);
  for (size_t i = 0; i < n; ++i) seq[i] = order[i] = i;
  std::mt19937_64 rng(1);
  std::printf("chunk %zu bytes, %d thread(s), %zu MiB per pass\n", chunk, threads,
              take * chunk >> 20);
  volatile long long sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int m = 0; m < kModes; ++m) {
      const Mode mode = static_cast<Mode>(m);
      const size_t* o = mode == kSeq ? seq.data() : order.data();
      std::vector<std::thread> pool;
      std::vector<long long> sums(threads);
      const double t0 = Now();
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] { sums[t] = ReadChunks(buf, o + t * share, share, chunk, mode); });
      }
      for (std::thread& th : pool) th.join();
      const double s = Now() - t0;
      for (long long v : sums) sink = sink + v;
      std::printf("pass %d  %-26s %6.1f GB/s\n", pass + 1, kNames[m],
                  static_cast<double>(share) * threads * chunk / s / 1e9);
    }
  }
  std::free(buf);
  return 0;
}
