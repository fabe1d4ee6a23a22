// The relevancy scan alone, from cache and from DRAM (README.md, "Exploration"): SmolLM2's
// layer (4 x 6K tokens, 3 KV / 9 query heads of 64, pages of 32), ComputeRelevancy at one thread
// on layer 0 again and again ("hot", its 576 KiB of bf16 digests in L2) and over LAYERS layers
// in turn ("cold"), and a plain read of the same layers; every digest pair has max >= min.
// `hash` fingerprints the last layer's scores, so variants can be checked bit for bit.
//   g++ -O2 -std=c++17 -mavx512f -I. integration/bench/results/scan_spread/scan_driver.cc \
//     build/rel/retriever/libmempipe_retriever.a build/rel/core/libmempipe_core.a \
//     -o /tmp/scan_driver $(ls /usr/lib/x86_64-linux-gnu/libabsl_*.so | \
//     sed 's/.*lib\(absl_[a-z0-9_]*\)\.so/-l\1/') -lpthread
//   [KERNEL=avx2] /tmp/scan_driver bf16|fp32 [LAYERS]   (1600 bf16, 800 fp32: about 0.9 GiB)
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/cpu_kernel.h"
#include "core/dtype.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
using namespace mempipe;
int main(int argc, char** argv) {
  if (getenv("KERNEL")) {
    auto k = ParseCpuKernel(getenv("KERNEL"));
    if (!k.ok() || !SetCpuKernel(*k).ok()) return 3;
  }
  const int seqs = 4, kv = 3, heads = 9, d = 64, bs = 32, ctx = 6144, pages = ctx / bs;
  DType dt = argc > 1 && !strcmp(argv[1], "fp32") ? DType::kFloat32 : DType::kBFloat16;
  const int layers = argc > 2 ? atoi(argv[2]) : 1600;
  static char dummy[64];
  KvCacheView cache{dummy, dt, seqs * pages, bs, kv, d, KvLayout::kPageMajorKT};
  DigestView dg{nullptr, dt, seqs * pages, kv, d};
  size_t nb = dg.NumBytes();
  char* mem =
      (char*)mmap(nullptr, nb * layers, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(mem, nb * layers, MADV_HUGEPAGE);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> tmp(dg.NumElems());
  for (auto& x : tmp) x = nd(rng);
  // valid digests: mx >= mn lane-wise
  for (int b = 0; b < dg.num_blocks; ++b)
    for (int h = 0; h < kv; ++h)
      for (int c = 0; c < d; ++c) {
        float& a = tmp[dg.Offset(b, 0, h) + c];
        float& z = tmp[dg.Offset(b, 1, h) + c];
        if (a < z) std::swap(a, z);
      }
  for (int l = 0; l < layers; ++l)
    for (size_t i = 0; i < dg.NumElems(); ++i)
      StoreFromFloat(mem + l * nb, dt, i, tmp[(i + (size_t)l * 2 * kv * d) % tmp.size()]);
  std::vector<int32_t> table(seqs * pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> lens(seqs, ctx);
  BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint8_t> q(seqs * heads * d * 4);
  for (int i = 0; i < seqs * heads * d; ++i) StoreFromFloat(q.data(), dt, i, nd(rng));
  QueryView qv{q.data(), dt, seqs, heads, d};
  std::vector<float> scores(seqs * kv * pages);
  auto run = [&](int l) {
    dg.data = mem + (size_t)l * nb;
    auto s = ComputeRelevancy(qv, cache, dg, tv, GroupAggregation::kMax, scores.data(), 1);
    if (!s.ok()) {
      puts(std::string(s.message()).c_str());
      exit(1);
    }
  };
  for (int rep = 0; rep < 5; ++rep) {
    // hot
    run(0);
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 400; ++i) run(0);
    double hot =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        400;
    t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) run(l);
    double cold =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        layers;
    // plain read of the same bytes, cold
    t0 = std::chrono::steady_clock::now();
    __m512i acc = _mm512_setzero_si512();
    for (int l = 0; l < layers; ++l) {
      const __m512i* p = (const __m512i*)(mem + (size_t)l * nb);
      for (size_t i = 0; i < nb / 64; ++i) acc = _mm512_xor_si512(acc, _mm512_load_si512(p + i));
    }
    double rd =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        layers;
    unsigned hash = 2166136261u;
    for (float f : scores) {
      unsigned u;
      memcpy(&u, &f, 4);
      hash = (hash ^ u) * 16777619u;
    }
    volatile long sink = _mm512_reduce_add_epi64(acc);
    (void)sink;
    printf("%s hot %.1f us  cold %.1f us  read %.1f us  cold/read %.0f%%  hash %08x\n",
           argc > 1 ? argv[1] : "bf16", hot, cold, rd, 100 * rd / cold, hash);
  }
}
