// mempipe core: splitting (sequence, KV head) work across host threads.
//
//   ForEachSeqHeads(num_seqs, num_kv_heads, threads, [&](int seq, int h0, int h1) { ... });
#ifndef MEMPIPE_CORE_PARALLEL_H_
#define MEMPIPE_CORE_PARALLEL_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace mempipe {

// Splits the (sequence, KV head) pairs, ordered sequence-major, into contiguous ranges, one
// per thread; `fn(seq, head_begin, head_end)` runs for each sequence's part of a range.
template <typename Fn>
void ForEachSeqHeads(int num_seqs, int num_kv_heads, int num_threads, Fn fn) {
  const int items = num_seqs * num_kv_heads;
  const int threads = std::max(1, std::min(num_threads, items));
  auto run = [&](int t) {
    const int begin = static_cast<int>(static_cast<int64_t>(items) * t / threads);
    const int end = static_cast<int>(static_cast<int64_t>(items) * (t + 1) / threads);
    for (int i = begin; i < end;) {
      const int s = i / num_kv_heads;
      const int h0 = i % num_kv_heads;
      const int h1 = std::min(num_kv_heads, h0 + (end - i));
      fn(s, h0, h1);
      i += h1 - h0;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}

}  // namespace mempipe

#endif  // MEMPIPE_CORE_PARALLEL_H_
