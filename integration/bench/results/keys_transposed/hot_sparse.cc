// From-cache sparse/dense decode loop for perf: hot <sparse|dense> <iters> [threads]
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "attention/decode.h"
#include "core/paged_kv.h"
using namespace mempipe;
int main(int argc, char** argv) {
  const bool sparse = std::strcmp(argv[1], "sparse") == 0;
  const int iters = std::atoi(argv[2]);
  const int threads = argc > 3 ? std::atoi(argv[3]) : 1;
  const int bs = 32, context = argc > 4 ? std::atoi(argv[4]) : 6144, seqs = 4, kv = 3, d = 64,
            heads = 9, k = 16;
  const int pages = context / bs;
  KvCacheView cache{nullptr, DType::kBFloat16, seqs * pages, bs, kv, d};
  cache.layout = getenv("KT") ? KvLayout::kHeadMajorKT : KvLayout::kHeadMajor;
  const int L = argc > 5 ? std::atoi(argv[5]) : 1;
  struct Mem {
    uint16_t* p;
    size_t n;
    uint16_t* data() { return p; }
    uint16_t* begin() { return p; }
    uint16_t* end() { return p + n; }
  };
  std::vector<Mem> mems;
  for (int l = 0; l < L; ++l) {
    size_t bytes = (cache.NumElems() * 2 + (2u << 20) - 1) & ~size_t((2u << 20) - 1);
    void* p = std::aligned_alloc(2u << 20, bytes);
    madvise(p, bytes, MADV_HUGEPAGE);
    mems.push_back({static_cast<uint16_t*>(p), cache.NumElems()});
  }
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& mm : mems)
    for (auto& x : mm) {
      float f = normal(rng);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      x = u >> 16;
    }
  cache.data = mems[0].data();
  std::vector<int32_t> table(seqs * pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> lens(seqs, context);
  BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint16_t> q(seqs * heads * d), out(q.size());
  for (auto& x : q) {
    float f = normal(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x = u >> 16;
  }
  std::vector<int32_t> selected(seqs * kv * k), counts(seqs * kv, k);
  for (int h = 0; h < seqs * kv; ++h) {
    std::vector<int32_t> m(pages - 2);
    std::iota(m.begin(), m.end(), 1);
    std::shuffle(m.begin(), m.end(), rng);
    m.resize(k - 2);
    m.push_back(0);
    m.push_back(pages - 1);
    std::sort(m.begin(), m.end());
    std::copy(m.begin(), m.end(), &selected[h * k]);
  }
  PageList pl{selected.data(), counts.data(), kv, k};
  DecodeIo io{q.data(), out.data(), DType::kBFloat16, seqs, heads, d, threads};
  auto run = [&] {
    return sparse ? SparseDecode(io, cache, tv, pl, 0.125f) : DenseDecode(io, cache, tv, 0.125f);
  };
  if (!run().ok()) {
    std::puts("fail");
    return 1;
  }
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      cache.data = mems[i % L].data();
      (void)run();
    }
    double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        iters;
    best = std::min(best, us);
  }
  const double th = double(seqs) * kv * (sparse ? k * bs : context);
  std::printf("%s: %.2f us per call, %.2f ns per token-KV-head (x threads %.2f), out[0]=%04x\n",
              sparse ? "sparse" : "dense", best, best * 1e3 / th, best * 1e3 * threads / th,
              out[0]);
}
