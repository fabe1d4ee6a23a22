// libFuzzer target: decode attention (attention/decode.h): dense, sparse over a fuzzed page
// list (counts, order and indices arbitrary), and causal prefill over fuzzed query starts.
//
// Oracle: an accepted sparse decode over every page of every sequence equals the dense decode
// (same pages, same order of accumulation); nothing is read or written past a buffer (ASan).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention/decode.h"
#include "tests/fuzz/fuzz_input.h"

namespace mempipe::fuzz {
namespace {

void Run(FuzzedDataProvider& in) {
  FuzzCache c = FuzzCache::Make(in, 8);
  const KvCacheView& cache = c.view;
  const int num_seqs = in.ConsumeIntegralInRange<int>(1, 3);
  const int width = in.ConsumeIntegralInRange<int>(1, 8);
  FuzzTable t = FuzzTable::Make(in, num_seqs, width, cache.block_size, cache.num_blocks);
  const int group = in.ConsumeIntegralInRange<int>(1, 3);
  const int heads = cache.num_kv_heads * group + (in.ConsumeIntegralInRange<int>(0, 15) == 0);
  const size_t elems = static_cast<size_t>(num_seqs) * heads * cache.head_dim;
  const size_t esize = DTypeSize(cache.dtype);
  std::vector<uint8_t> q(elems * esize), out_dense(elems * esize), out_sparse(elems * esize);
  for (size_t i = 0; i < elems; ++i) {
    StoreFromFloat(q.data(), cache.dtype, i, in.ConsumeFloatingPointInRange<float>(-2.f, 2.f));
  }
  DecodeIo io{q.data(),
              out_dense.data(),
              cache.dtype,
              num_seqs,
              heads,
              cache.head_dim,
              in.ConsumeIntegralInRange<int>(0, 3)};
  const float scale = in.ConsumeBool() ? 0.125f : AnyFloat(in);
  const absl::Status dense = DenseDecode(io, cache, t.view, scale);

  const int max_selected = SmallInt(in, 1, width + 1);
  if (max_selected < 1 || max_selected > width + 1) {
    const PageList bad{nullptr, nullptr, cache.num_kv_heads, max_selected};
    io.out = out_sparse.data();
    (void)SparseDecode(io, cache, t.view, bad, scale);
    return;
  }
  const bool all_pages = in.ConsumeBool();
  std::vector<int32_t> pages(static_cast<size_t>(num_seqs) * cache.num_kv_heads * max_selected, -1);
  std::vector<int32_t> counts(static_cast<size_t>(num_seqs) * cache.num_kv_heads);
  for (int s = 0; s < num_seqs; ++s) {
    const int n = t.lens[s] > 0 ? NumPages(t.lens[s], cache.block_size) : 0;
    for (int h = 0; h < cache.num_kv_heads; ++h) {
      int32_t* row =
          pages.data() + (static_cast<size_t>(s) * cache.num_kv_heads + h) * max_selected;
      int32_t& count = counts[static_cast<size_t>(s) * cache.num_kv_heads + h];
      if (all_pages && n <= max_selected) {
        for (int p = 0; p < n; ++p) row[p] = p;
        count = n;
      } else {
        count = SmallInt(in, 0, max_selected);
        for (int i = 0; i < max_selected; ++i) row[i] = SmallInt(in, 0, width);
      }
    }
  }
  io.out = out_sparse.data();
  const PageList list{pages.data(), counts.data(), cache.num_kv_heads, max_selected};
  const absl::Status sparse = SparseDecode(io, cache, t.view, list, scale);
  if (all_pages && dense.ok() && sparse.ok() &&
      std::memcmp(out_dense.data(), out_sparse.data(), out_dense.size()) != 0) {
    // Bitwise equal unless NaN payloads differ: compare as floats, NaN == NaN.
    for (size_t i = 0; i < elems; ++i) {
      const float a = LoadAsFloat(out_dense.data(), cache.dtype, i);
      const float b = LoadAsFloat(out_sparse.data(), cache.dtype, i);
      if (!(a == b || (std::isnan(a) && std::isnan(b)))) std::abort();
    }
  }

  // Prefill: query_start_loc over the sequences, total tokens = io.num_seqs.
  std::vector<int32_t> starts(num_seqs + 1, 0);
  for (int s = 1; s <= num_seqs; ++s) {
    starts[s] = in.ConsumeIntegralInRange<int>(0, 15) == 0
                    ? in.ConsumeIntegral<int32_t>()
                    : starts[s - 1] + in.ConsumeIntegralInRange<int>(0, 3);
  }
  const int total = std::max(starts[num_seqs], 0);
  if (total > 16) return;
  std::vector<uint8_t> pq(static_cast<size_t>(std::max(total, 1)) * heads * cache.head_dim * esize);
  std::vector<uint8_t> po(pq.size());
  const DecodeIo pio{pq.data(), po.data(), cache.dtype, total, heads, cache.head_dim, 1};
  (void)PrefillAttention(pio, starts.data(), cache, t.view, scale);
}

}  // namespace
}  // namespace mempipe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  mempipe::fuzz::Run(in);
  return 0;
}
