// The scan's input checks alone, hot (README.md, "Per-call checks"): ValidateQuery,
// ValidateBlockTable, ValidateDigests and ValidateKvCache on SmolLM2's 4 x 6K layer (bf16 query
// of 4 x 9 x 64, 768 table entries), 100,000 calls each, twice. Built as layer_timeline.cc is,
// with only the retriever and core libraries.
#include <chrono>
#include <cstdio>
#include <numeric>
#include <vector>

#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
using namespace mempipe;
int main() {
  const int seqs = 4, kv = 3, heads = 9, d = 64, bs = 32, pages = 192;
  DType dt = DType::kBFloat16;
  static char dummy[64];
  KvCacheView cache{dummy, dt, seqs * pages, bs, kv, d, KvLayout::kPageMajorKT};
  DigestView dg{dummy, dt, seqs * pages, kv, d};
  std::vector<int32_t> table(seqs * pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> lens(seqs, pages * bs);
  BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<uint8_t> q(seqs * heads * d * 2, 0);
  QueryView qv{q.data(), dt, seqs, heads, d};
  auto t = [&](const char* n, auto f) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 100000; ++i) (void)f();
    std::printf(
        "%-16s %.3f us\n", n,
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
            100000);
  };
  for (int r = 0; r < 2; ++r) {
    t("query", [&] { return ValidateQuery(qv, cache, tv); });
    t("block table", [&] { return ValidateBlockTable(tv, bs, cache.num_blocks); });
    t("digests", [&] { return ValidateDigests(cache, dg); });
    t("kv cache", [&] { return ValidateKvCache(cache); });
  }
}
