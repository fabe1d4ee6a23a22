// From-cache sparse/dense decode of any shape, for perf (results/compute_trim/README.md), not part
// of the build.   hot_shapes <sparse|dense> <iters> [threads]
// env: SEQS KV HEADS D BS CTX SEL (pages selected per sequence and KV head) LAYOUT L (caches)
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/decode.h"
#include "core/paged_kv.h"
using namespace mempipe;
static int E(const char* n, int d) {
  const char* v = getenv(n);
  return v ? atoi(v) : d;
}
int main(int argc, char** argv) {
  const bool sparse = std::strcmp(argv[1], "sparse") == 0;
  const int iters = std::atoi(argv[2]);
  const int threads = argc > 3 ? std::atoi(argv[3]) : 1;
  const int seqs = E("SEQS", 1), kv = E("KV", 8), heads = E("HEADS", 32), d = E("D", 128),
            bs = E("BS", 16), context = E("CTX", 8192), k = E("SEL", 32), L = E("L", 1);
  const int pages = context / bs;
  KvCacheView cache{nullptr, DType::kBFloat16, seqs * pages, bs, kv, d};
  std::string lay = getenv("LAYOUT") ? getenv("LAYOUT") : "head_kt";
  cache.layout = lay == "head"      ? KvLayout::kHeadMajor
                 : lay == "page_kt" ? KvLayout::kPageMajorKT
                 : lay == "page"    ? KvLayout::kPageMajor
                                    : KvLayout::kHeadMajorKT;
  std::vector<uint16_t*> mems;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto bf = [&] {
    float f = normal(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t(u >> 16);
  };
  for (int l = 0; l < L; ++l) {
    size_t bytes = (cache.NumElems() * 2 + (2u << 20) - 1) & ~size_t((2u << 20) - 1);
    auto* p = static_cast<uint16_t*>(std::aligned_alloc(2u << 20, bytes));
    madvise(p, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < cache.NumElems(); ++i) p[i] = bf();
    mems.push_back(p);
  }
  cache.data = mems[0];
  std::vector<int32_t> table(seqs * pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> lens(seqs, context);
  BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint16_t> q(seqs * heads * d), out(q.size());
  for (auto& x : q) x = bf();
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
    return sparse ? SparseDecode(io, cache, tv, pl, 0.088f) : DenseDecode(io, cache, tv, 0.088f);
  };
  if (!run().ok()) {
    std::puts("fail");
    return 1;
  }
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      cache.data = mems[i % L];
      (void)run();
    }
    double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        iters;
    best = std::min(best, us);
  }
  const double th = double(seqs) * kv * (sparse ? double(k) * bs : context);
  const double bytes = th * d * 2 * 2;
  std::printf("%s %s: %.2f us per call, %.2f ns per token-KV-head, %.1f GB/s, out[0]=%04x\n",
              sparse ? "sparse" : "dense", lay.c_str(), best, best * 1e3 / th, bytes / best / 1e3,
              out[0]);
}
