// What reading scattered chunks allows one thread, against the same bytes in order: chunks of
// CHUNK bytes (8192: one KV head's K page then V page of SmolLM2 bf16 at page 32 in page_kt, the
// piece sparse decode reads per selected page) in random order, prefetched as one planned
// stream DIST bytes ahead of the reads (the kernel's ReadAhead: kReadAheadBytes = 8 KiB, into
// L2), at several distances, into L2 or L3, and two chunks read line by line together. The
// buffer is 1 GiB with MADV_HUGEPAGE; each pass reads half of its chunks, a new order each pass.
// Not part of the build:
//   g++ -O2 -mavx512f -std=c++20 -o chunkstream chunkstream.cc && ./chunkstream 8192 3
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Prefetches the chunks of `order` line by line, one line per Step().
class Stream {
 public:
  Stream(const char* buf, const size_t* order, size_t n, size_t chunk, int hint, int together)
      : buf_(buf),
        order_(order),
        n_(n),
        lines_(chunk / 64),
        chunk_(chunk),
        hint_(hint),
        together_(together) {}
  void Step() {
    if (i_ + together_ > n_) return;
    for (int k = 0; k < together_; ++k) {
      const char* q = buf_ + order_[i_ + k] * chunk_ + 64 * line_;
      if (hint_ == 2) {
        _mm_prefetch(q, _MM_HINT_T2);
      } else {
        _mm_prefetch(q, _MM_HINT_T1);
      }
    }
    if (++line_ == lines_) line_ = 0, i_ += together_;
  }

 private:
  const char* buf_;
  const size_t* order_;
  size_t n_, lines_, chunk_;
  int hint_, together_;
  size_t i_ = 0, line_ = 0;
};

long long InOrder(const char* buf, size_t bytes) {
  __m512i x = _mm512_setzero_si512();
  for (size_t o = 0; o < bytes; o += 64) x = _mm512_xor_si512(x, _mm512_load_si512(buf + o));
  return _mm512_reduce_add_epi64(x);
}

// One chunk after another; the stream `dist` bytes ahead.
long long Scattered(const char* buf, const size_t* order, size_t n, size_t chunk, size_t dist,
                    int hint) {
  Stream s(buf, order, n, chunk, hint, 1);
  for (size_t i = 0; i < dist / 64; ++i) s.Step();
  __m512i x = _mm512_setzero_si512();
  for (size_t i = 0; i < n; ++i) {
    const char* p = buf + order[i] * chunk;
    for (size_t o = 0; o < chunk; o += 64) {
      s.Step();
      x = _mm512_xor_si512(x, _mm512_load_si512(p + o));
    }
  }
  return _mm512_reduce_add_epi64(x);
}

// Two chunks at a time, line by line; the stream `dist` bytes ahead over the pairs.
long long Pairs(const char* buf, const size_t* order, size_t n, size_t chunk, size_t dist) {
  Stream s(buf, order, n, chunk, 1, 2);
  for (size_t i = 0; i < dist / 128; ++i) s.Step();
  __m512i x = _mm512_setzero_si512(), y = x;
  for (size_t i = 0; i + 1 < n; i += 2) {
    const char* p = buf + order[i] * chunk;
    const char* q = buf + order[i + 1] * chunk;
    for (size_t o = 0; o < chunk; o += 64) {
      s.Step();
      x = _mm512_xor_si512(x, _mm512_load_si512(p + o));
      y = _mm512_xor_si512(y, _mm512_load_si512(q + o));
    }
  }
  return _mm512_reduce_add_epi64(_mm512_xor_si512(x, y));
}

}  // namespace

int main(int argc, char** argv) {
  const size_t chunk = argc > 1 ? std::atoi(argv[1]) : 8192;
  const int passes = argc > 2 ? std::atoi(argv[2]) : 3;
  if (chunk < 128 || chunk % 128 != 0 || passes < 1) {
    std::fprintf(stderr, "usage: chunkstream CHUNK_BYTES(multiple of 128) PASSES\n");
    return 2;
  }
  const size_t bytes = size_t{1} << 30;
  char* buf = static_cast<char*>(std::aligned_alloc(size_t{2} << 20, bytes));
  madvise(buf, bytes, MADV_HUGEPAGE);
  std::memset(buf, 1, bytes);
  const size_t n = bytes / chunk, take = n / 2;
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(1);
  std::printf("chunk %zu bytes, 1 thread, %zu MiB per read\n", chunk, take * chunk >> 20);
  volatile long long sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    std::shuffle(order.begin(), order.end(), rng);
    auto run = [&](const char* name, auto f) {
      const double t0 = Now();
      sink = sink + f();
      std::printf("pass %d  %-30s %6.1f GB/s\n", pass + 1, name,
                  static_cast<double>(take * chunk) / (Now() - t0) / 1e9);
    };
    run("in order", [&] { return InOrder(buf, take * chunk); });
    for (const size_t dist : {4096, 8192, 16384, 32768}) {
      char name[64];
      std::snprintf(name, sizeof(name), "scattered, %zu KiB ahead (L2)", dist / 1024);
      run(name, [&] { return Scattered(buf, order.data(), take, chunk, dist, 1); });
    }
    run("scattered, 16 KiB ahead (L3)",
        [&] { return Scattered(buf, order.data(), take, chunk, 16384, 2); });
    for (const size_t dist : {8192, 16384, 32768}) {
      char name[64];
      std::snprintf(name, sizeof(name), "pairs, %zu KiB ahead (L2)", dist / 1024);
      run(name, [&] { return Pairs(buf, order.data(), take, chunk, dist); });
    }
  }
  std::free(buf);
  return 0;
}
