// SelectPages alone, hot (README.md): SmolLM2's shape, 4 sequences x 3 KV heads of 192 pages,
// budget 512 tokens at pages of 32; 20,000 calls per repetition, the selection's hash printed so
// that variants can be compared bit for bit. Build line in README.md.
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "retriever/select.h"
using namespace mempipe;
int main() {
  const int seqs = 4, kv = 3, bs = 32, pages = 192, k = 16, rows = seqs * kv;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> scores(rows * pages);
  for (auto& x : scores) x = nd(rng);
  std::vector<int32_t> table(seqs * pages);
  std::iota(table.begin(), table.end(), 0);
  std::vector<int32_t> lens(seqs, pages * bs);
  BlockTableView tv{table.data(), lens.data(), seqs, pages};
  std::vector<int32_t> sp(rows * k), sc(rows);
  SelectionConfig config;
  config.budget_tokens = k * bs;
  SelectionView sel{sp.data(), sc.data(), seqs, kv, k};
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    const int n = 20000;
    for (int i = 0; i < n; ++i) {
      scores[i % scores.size()] += 1e-3f;
      if (!SelectPages(scores.data(), tv, bs, kv, config, sel, 1).ok()) return 1;
    }
    double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
        n;
    unsigned h = 0;
    for (int x : sp) h = h * 31 + x;
    printf("SelectPages 12 rows: %.2f us (%.3f us/row) hash %08x\n", us, us / rows, h);
  }
}
