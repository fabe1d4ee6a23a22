// Prototype: sparse decode over a head-major cache whose K pages are stored transposed in
// channel pairs ([D/2][block][2] bf16), so the scores need no horizontal reduction.
// g++ -O3 -march=native -std=c++20 kt.cc -o kt ; ./kt iters layers
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

constexpr int B = 32, D = 64, G = 3, KV = 3, SEQS = 4, K = 16;

static inline float bf(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One (seq, kv head): pages[k] index a page of `kt` ([pages][D/2][B][2]) and `v` ([pages][B][D]).
// q: [G][D] bf16 (pairs as uint32), out: [G][D] fp32.
__attribute__((noinline)) void Item(const uint16_t* kt, const uint16_t* v, const int32_t* pages,
                                    int count, const uint32_t* q, float scale, float* out) {
  __m512 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
  float m[G], l[G];
  for (int g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.f;
  alignas(64) float p[G][B];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int e = 0; e < count; ++e) {
    const uint16_t* kp = kt + size_t(pages[e]) * B * D;
    const uint16_t* vp = v + size_t(pages[e]) * B * D;
    const char* nk =
        e + 1 < count ? reinterpret_cast<const char*>(kt + size_t(pages[e + 1]) * B * D) : nullptr;
    const char* nv =
        e + 1 < count ? reinterpret_cast<const char*>(v + size_t(pages[e + 1]) * B * D) : nullptr;
    __m512 s[G][2][2];
    for (int g = 0; g < G; ++g)
      for (int a = 0; a < 2; ++a) s[g][a][0] = s[g][a][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int j = 0; j < D / 2; j += 2) {
      if (nk) {
        _mm_prefetch(nk + 64 * 2 * j, _MM_HINT_T1);
        _mm_prefetch(nk + 64 * (2 * j + 1), _MM_HINT_T1);
        _mm_prefetch(nk + 64 * (2 * j + 2), _MM_HINT_T1);
        _mm_prefetch(nk + 64 * (2 * j + 3), _MM_HINT_T1);
      }
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) {
        const __m512i k0 = _mm512_loadu_si512(kp + (j + a) * 2 * B);
        const __m512i k1 = _mm512_loadu_si512(kp + (j + a) * 2 * B + 32);
        for (int g = 0; g < G; ++g) {
          const __m512i qb = _mm512_set1_epi32(int(q[g * (D / 2) + j + a]));
          s[g][a][0] = _mm512_dpbf16_ps(s[g][a][0], (__m512bh)k0, (__m512bh)qb);
          s[g][a][1] = _mm512_dpbf16_ps(s[g][a][1], (__m512bh)k1, (__m512bh)qb);
        }
      }
    }
    float corr[G];
    for (int g = 0; g < G; ++g) {
      const __m512 s0 = _mm512_mul_ps(vscale, _mm512_add_ps(s[g][0][0], s[g][1][0]));
      const __m512 s1 = _mm512_mul_ps(vscale, _mm512_add_ps(s[g][0][1], s[g][1][1]));
      const float mx = std::max(m[g], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
      corr[g] = std::exp(m[g] - mx);
      m[g] = mx;
      // exp via the scalar-free path would be a vector exp; keep the prototype's cost honest
      // with a polynomial exp below.
      const __m512 nm = _mm512_set1_ps(mx);
      auto vexp = [](__m512 x) {
        x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
        const __m512 fx =
            _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 8);
        __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
        r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
        __m512 y = _mm512_set1_ps(1.9875691500e-4f);
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
        y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
        return _mm512_scalef_ps(y, fx);
      };
      const __m512 e0 = vexp(_mm512_sub_ps(s0, nm)), e1 = vexp(_mm512_sub_ps(s1, nm));
      _mm512_store_ps(p[g], e0);
      _mm512_store_ps(p[g] + 16, e1);
      l[g] = l[g] * corr[g] + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
      const __m512 c = _mm512_set1_ps(corr[g]);
      for (int jj = 0; jj < 4; ++jj) acc[g][jj] = _mm512_mul_ps(acc[g][jj], c);
    }
#pragma GCC unroll 2
    for (int t = 0; t < B; ++t) {
      if (nv) {
        _mm_prefetch(nv + 128 * t, _MM_HINT_T1);
        _mm_prefetch(nv + 128 * t + 64, _MM_HINT_T1);
      }
      const __m512i x0 = _mm512_loadu_si512(vp + t * D), x1 = _mm512_loadu_si512(vp + t * D + 32);
      const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
      __m512 w[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(x0, 16)),
                     _mm512_castsi512_ps(_mm512_and_si512(x0, hi)),
                     _mm512_castsi512_ps(_mm512_slli_epi32(x1, 16)),
                     _mm512_castsi512_ps(_mm512_and_si512(x1, hi))};
      for (int g = 0; g < G; ++g) {
        const __m512 pb = _mm512_set1_ps(p[g][t]);
        for (int jj = 0; jj < 4; ++jj) acc[g][jj] = _mm512_fmadd_ps(pb, w[jj], acc[g][jj]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    alignas(64) float tmp[64];
    const __m512 il = _mm512_set1_ps(1.f / l[g]);
    for (int jj = 0; jj < 4; ++jj) _mm512_store_ps(tmp + 16 * jj, _mm512_mul_ps(acc[g][jj], il));
    // tmp holds, per 32-channel block: even channels then odd ones
    for (int b = 0; b < 2; ++b)
      for (int i = 0; i < 16; ++i)
        out[g * D + 32 * b + 2 * i] = tmp[32 * b + i],
                                 out[g * D + 32 * b + 2 * i + 1] = tmp[32 * b + 16 + i];
  }
}

int main(int argc, char** argv) {
  const int iters = std::atoi(argv[1]);
  const int L = argc > 2 ? std::atoi(argv[2]) : 1;
  const int context = 6144, pages_per_seq = context / B;
  const size_t plane = size_t(SEQS) * pages_per_seq * KV * B * D;  // elements per K or V plane
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto tobf = [&](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t(u >> 16);
  };
  std::vector<uint16_t*> kts(L), vs(L);
  for (int l = 0; l < L; ++l) {
    size_t bytes = (plane * 2 * 2 + (2u << 20) - 1) & ~size_t((2u << 20) - 1);
    void* p = std::aligned_alloc(2u << 20, bytes);
    madvise(p, bytes, MADV_HUGEPAGE);
    kts[l] = static_cast<uint16_t*>(p);
    vs[l] = kts[l] + plane;
    for (size_t i = 0; i < 2 * plane; ++i) kts[l][i] = tobf(normal(rng));
  }
  // page index of (seq, head, page) = (seq * pages_per_seq + page) * KV + head (head-major pages)
  std::vector<int32_t> sel(SEQS * KV * K);
  for (int h = 0; h < SEQS * KV; ++h) {
    std::vector<int32_t> mm(pages_per_seq - 2);
    std::iota(mm.begin(), mm.end(), 1);
    std::shuffle(mm.begin(), mm.end(), rng);
    mm.resize(K - 2);
    mm.push_back(0);
    mm.push_back(pages_per_seq - 1);
    std::sort(mm.begin(), mm.end());
    const int seq = h / KV, head = h % KV;
    for (int i = 0; i < K; ++i) sel[h * K + i] = (seq * pages_per_seq + mm[i]) * KV + head;
  }
  std::vector<uint32_t> q(SEQS * KV * G * D / 2);
  for (auto& x : q) x = uint32_t(tobf(normal(rng))) | (uint32_t(tobf(normal(rng))) << 16);
  std::vector<float> out(SEQS * KV * G * D);
  const float scale = 0.125f;
  auto run = [&](int l) {
    for (int h = 0; h < SEQS * KV; ++h)
      Item(kts[l], vs[l], &sel[h * K], K, &q[h * G * D / 2], scale, &out[h * G * D]);
  };
  // reference for item 0 of layer 0
  run(0);
  {
    double maxerr = 0;
    for (int g = 0; g < G; ++g) {
      std::vector<double> sc(K * B);
      double mx = -1e300;
      for (int e = 0; e < K; ++e)
        for (int t = 0; t < B; ++t) {
          double s = 0;
          for (int c = 0; c < D; ++c) {
            const uint16_t qc = (q[g * D / 2 + c / 2] >> (16 * (c & 1))) & 0xffff;
            const uint16_t kc = kts[0][size_t(sel[e]) * B * D + (c / 2) * 2 * B + 2 * t + (c & 1)];
            s += double(bf(qc)) * bf(kc);
          }
          sc[e * B + t] = s * scale;
          mx = std::max(mx, sc[e * B + t]);
        }
      double l = 0;
      for (auto& s : sc) {
        s = std::exp(s - mx);
        l += s;
      }
      for (int c = 0; c < D; ++c) {
        double o = 0;
        for (int e = 0; e < K; ++e)
          for (int t = 0; t < B; ++t)
            o += sc[e * B + t] * bf(vs[0][size_t(sel[e]) * B * D + t * D + c]);
        maxerr = std::max(maxerr, std::abs(o / l - out[g * D + c]));
      }
    }
    std::printf("max abs err vs fp64 reference: %.3g\n", maxerr);
  }
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) run(i % L);
    double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        iters;
    best = std::min(best, us);
  }
  const double th = double(SEQS) * KV * K * B;
  std::printf("kt sparse: %.2f us per call, %.2f ns per token-KV-head, out[0]=%g\n", best,
              best * 1e3 / th, out[0]);
}
