// The experiment behind the stream (results/read_ahead/README.md), not part of the build: sparse
// decode's consumption order (per batch of B pages, the K pages, then the V pages; 4 KiB pieces
// scattered over a 1 GiB buffer), read with the kernel-like prefetch (mode 1), one stream D lines
// ahead (mode 2), none (3), or in order (0), with W fake FMAs per line. On the Zen 5 build VM, one
// thread, W 16: mode 1 14.3-14.5 GB/s, mode 2 D 128 18.3-20.1 GB/s, in order 29.6-30.0 GB/s.
//   g++ -O2 -mavx512f -std=c++20 -o pattern pattern.cc && ./pattern MODE D W B
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
static double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
constexpr size_t kChunk = 4096, kLines = kChunk / 64;
int W = 0;
bool getenv_t0 = false;
#define WORK(y)                               \
  do {                                        \
    const __m512 f_ = _mm512_castsi512_ps(y); \
    for (int i_ = 0; i_ < W; i_ += 8) {       \
      a0 = _mm512_fmadd_ps(f_, f_, a0);       \
      a1 = _mm512_fmadd_ps(f_, f_, a1);       \
      a2 = _mm512_fmadd_ps(f_, f_, a2);       \
      a3 = _mm512_fmadd_ps(f_, f_, a3);       \
      a4 = _mm512_fmadd_ps(f_, f_, a4);       \
      a5 = _mm512_fmadd_ps(f_, f_, a5);       \
      a6 = _mm512_fmadd_ps(f_, f_, a6);       \
      a7 = _mm512_fmadd_ps(f_, f_, a7);       \
    }                                         \
  } while (0)
int main(int argc, char** argv) {
  const int mode = atoi(argv[1]);  // 0 in order, 1 kernel-like, 2 unified D, 3 none
  const int D = argc > 2 ? atoi(argv[2]) : 64;
  W = argc > 3 ? atoi(argv[3]) : 0;
  getenv_t0 = getenv("T0") != nullptr;
  const int B = argc > 4 ? atoi(argv[4]) : 4;  // pages per batch
  const int P = 16;                            // pages per item
  const size_t bytes = size_t(1) << 30;
  char* buf = static_cast<char*>(std::aligned_alloc(2 << 20, bytes));
  madvise(buf, bytes, MADV_HUGEPAGE);
  memset(buf, 1, bytes);
  if (getenv("SHOWHP"))
    system("grep AnonHuge /proc/$PPID/smaps_rollup; grep AnonHuge /proc/meminfo");
  const size_t nchunks = bytes / 2 / kChunk - 64;  // per plane
  const char* kb = buf;
  const char* vb = buf + bytes / 2 - (getenv("VOFF") ? atoi(getenv("VOFF")) : 0) * kChunk;
  std::mt19937_64 rng(7);
  const int items = 4096;  // 4096*16*8K = 512 MiB
  // consumption order of chunks
  std::vector<const char*> order;
  for (int it = 0; it < items; ++it) {
    std::vector<size_t> sel(P);
    for (auto& s : sel) s = rng() % nchunks;
    if (!getenv("NOSORT")) std::sort(sel.begin(), sel.end());
    for (int b0 = 0; b0 < P; b0 += B) {
      for (int b = b0; b < std::min(P, b0 + B); ++b) order.push_back(kb + sel[b] * kChunk);
      for (int b = b0; b < std::min(P, b0 + B); ++b) order.push_back(vb + sel[b] * kChunk);
    }
  }
  const size_t n = order.size();
  double best = 1e9;
  for (int pass = 0; pass < 5; ++pass) {
    // evict: touch another region? buffer is 1 GiB >> L3; the order touches 512 MiB of it
    double t0 = Now();
    __m512i x = _mm512_setzero_si512();
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    if (mode == 0) {
      for (size_t i = 0; i < n; ++i) {
        const char* p = buf + (i * kChunk) % bytes;
        for (size_t o = 0; o < kChunk; o += 64) {
          __m512i y = _mm512_load_si512(p + o);
          x = _mm512_xor_si512(x, y);
          WORK(y);
        }
      }
    } else if (mode == 2) {
      size_t pf = 0;  // next line to prefetch, global line index
      for (; pf < size_t(D) && pf < n * kLines; ++pf)
        _mm_prefetch(order[pf / kLines] + (pf % kLines) * 64, _MM_HINT_T1);
      for (size_t i = 0; i < n; ++i) {
        const char* p = order[i];
        for (size_t o = 0; o < kChunk; o += 64) {
          if (pf < n * kLines) {
            if (getenv_t0)
              _mm_prefetch(order[pf / kLines] + (pf % kLines) * 64, _MM_HINT_T0);
            else
              _mm_prefetch(order[pf / kLines] + (pf % kLines) * 64, _MM_HINT_T1);
            ++pf;
          }
          __m512i y = _mm512_load_si512(p + o);
          x = _mm512_xor_si512(x, y);
          WORK(y);
        }
      }
    } else {
      // kernel-like: order is [K b0..][V b0..] per batch; K chunk i prefetches the next K chunk
      // (the one after, skipping V chunks) over its lines; before the last K of a batch, the
      // batch's first 48 rows of V (96 lines); during V, 96 lines ahead within the batch.
      const size_t perItem = 2 * P;
      for (size_t i = 0; i < n; ++i) {
        const char* p = order[i];
        const size_t it = i / perItem, w = i % perItem;
        const size_t b0 = (w / (2 * B)) * (2 * B);
        const size_t nb = std::min<size_t>(B, P - b0 / 2);
        const size_t wi = w - b0;
        const bool isK = wi < nb;
        const char* nextK = nullptr;
        if (mode == 1 && isK) {
          size_t j = i + 1;
          if (wi + 1 < nb)
            nextK = order[j];
          else {
            size_t nw = b0 + 2 * nb;
            size_t ni = (nw < perItem) ? it * perItem + nw : (it + 1) * perItem;
            if (ni < n) nextK = order[ni];
          }
          if (wi + 1 == nb) {  // burst: first 96 lines of the batch's V
            size_t base = it * perItem + b0 + nb;
            for (int l = 0; l < 96; ++l)
              _mm_prefetch(order[base + l / kLines] + (l % kLines) * 64, _MM_HINT_T1);
          }
        }
        for (size_t o = 0, l = 0; o < kChunk; o += 64, ++l) {
          if (nextK) _mm_prefetch(nextK + o, _MM_HINT_T1);
          if (mode == 1 && !isK) {
            size_t a = (wi - nb) * kLines + l + 96;
            if (a < nb * kLines) {
              size_t c = it * perItem + b0 + nb + a / kLines;
              _mm_prefetch(order[c] + (a % kLines) * 64, _MM_HINT_T1);
            }
          }
          __m512i y = _mm512_load_si512(p + o);
          x = _mm512_xor_si512(x, y);
          WORK(y);
        }
      }
    }
    double dt = Now() - t0;
    best = std::min(best, dt);
    volatile long long s = _mm512_reduce_add_epi64(x);
    (void)s;
    volatile float s3 = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                      _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7))));
    (void)s3;
  }
  std::printf("mode %d D %d W %d B %d: %.1f GB/s (%.1f ms)\n", mode, D, W, B,
              n * kChunk / best / 1e9, best * 1e3);
}
