// mempipe core: splitting (sequence, KV head) work across host threads.
//
//   ForEachSeqHeads(num_seqs, num_kv_heads, threads, [&](int seq, int h0, int h1) { ... });
//   ForEachItemRange(items, threads, [&](int64_t begin, int64_t end) { ... });
//
// The threads come from the process-wide parallel-for (core/host_parallel_runtime.h): mempipe's
// bounded pool (core/thread_pool.h) by default, or the thread team of a host OpenMP runtime the
// process installed (torch's, inside vLLM's CPU worker). Asking for more threads than the pool
// holds, or a system that refuses to start one, only means fewer helpers; the call itself cannot
// fail for lack of threads (the caller always takes part).
#ifndef MEMPIPE_CORE_PARALLEL_H_
#define MEMPIPE_CORE_PARALLEL_H_

#include <algorithm>
#include <cstdint>

#include "core/host_parallel_runtime.h"
#include "core/thread_pool.h"

namespace mempipe {

// Splits items [0, items) into contiguous ranges, one per thread (at most num_threads, the
// items, and ThreadPool::DefaultMaxWorkers() + 1 ranges, and at least one); `fn(begin, end)`
// runs once for each range, which is never empty. Which thread runs a range does not change
// what `fn` is called with.
template <typename Fn>
void ForEachItemRange(int64_t items, int num_threads, Fn fn) {
  if (items <= 0) return;
  const int64_t cap = static_cast<int64_t>(ThreadPool::DefaultMaxWorkers()) + 1;
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min({int64_t{num_threads}, items, cap})));
  auto run = [&](int t) { fn(items * t / threads, items * (t + 1) / threads); };
  if (threads == 1) {
    run(0);
    return;
  }
  HostParallelFor(threads, threads, run);
}

// `fn(seq, head_begin, head_end)` for each sequence's part of the (sequence, KV head) pairs
// [begin, end), ordered sequence-major (pair i is sequence i / num_kv_heads, head
// i % num_kv_heads), in order.
template <typename Fn>
void ForSeqHeadsIn(int64_t begin, int64_t end, int num_kv_heads, Fn fn) {
  for (int64_t i = begin; i < end;) {
    const int s = static_cast<int>(i / num_kv_heads);
    const int h0 = static_cast<int>(i % num_kv_heads);
    const int h1 = static_cast<int>(std::min<int64_t>(num_kv_heads, h0 + (end - i)));
    fn(s, h0, h1);
    i += h1 - h0;
  }
}

// Splits the (sequence, KV head) pairs, ordered sequence-major, into contiguous ranges, one
// per thread (ForEachItemRange); `fn(seq, head_begin, head_end)` runs for each sequence's part
// of a range (ForSeqHeadsIn).
template <typename Fn>
void ForEachSeqHeads(int num_seqs, int num_kv_heads, int num_threads, Fn fn) {
  const int64_t items = static_cast<int64_t>(std::max(num_seqs, 0)) * std::max(num_kv_heads, 0);
  ForEachItemRange(items, num_threads, [&](int64_t begin, int64_t end) {
    ForSeqHeadsIn(begin, end, num_kv_heads, fn);
  });
}

}  // namespace mempipe

#endif  // MEMPIPE_CORE_PARALLEL_H_
