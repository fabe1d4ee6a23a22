// libFuzzer target: page digests (retriever/digest.h): bulk build, incremental update from the
// cache and from key rows, and the fused append.
//
// Oracle: after a successful BuildDigests, each used page's digest is the channel-wise max and
// min of its valid keys (recomputed here with a plain loop); nothing is read or written past a
// buffer (ASan).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "retriever/digest.h"
#include "tests/fuzz/fuzz_input.h"

namespace mempipe::fuzz {
namespace {

void Run(FuzzedDataProvider& in) {
  FuzzCache c = FuzzCache::Make(in, 6);
  const KvCacheView& cache = c.view;
  DigestView d{nullptr, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
  if (in.ConsumeIntegralInRange<int>(0, 15) == 0) d.num_blocks = SmallInt(in, 0, 8);  // mismatch
  // A mismatched (possibly negative) block count must be rejected before any access; back it
  // with the matching size only.
  std::vector<uint8_t> dbytes(
      d.num_blocks > 0 && d.num_blocks <= 8 ? std::max<size_t>(d.NumBytes(), 1) : 1);
  d.data = dbytes.data();
  const int num_seqs = in.ConsumeIntegralInRange<int>(1, 3);
  const int width = in.ConsumeIntegralInRange<int>(1, 6);
  FuzzTable t = FuzzTable::Make(in, num_seqs, width, cache.block_size, cache.num_blocks);
  const absl::Status built = BuildDigests(cache, t.view, d);
  if (built.ok()) {
    for (int s = 0; s < num_seqs; ++s) {
      const int pages = NumPages(t.lens[s], cache.block_size);
      for (int p = 0; p < pages; ++p) {
        const int b = t.view.Block(s, p);
        const int valid = std::min(cache.block_size, t.lens[s] - p * cache.block_size);
        for (int h = 0; h < cache.num_kv_heads; ++h) {
          for (int ch = 0; ch < cache.head_dim; ++ch) {
            float mx = -INFINITY, mn = INFINITY;
            bool nan = false;
            for (int tok = 0; tok < valid; ++tok) {
              const float k = LoadAsFloat(cache.data, cache.dtype, cache.Offset(0, b, tok, h) + ch);
              nan |= std::isnan(k);
              mx = std::max(mx, k);
              mn = std::min(mn, k);
            }
            if (nan) continue;  // NaN keys: the digest's choice is documented elsewhere
            const float gmx = LoadAsFloat(d.data, d.dtype, d.Offset(b, 0, h) + ch);
            const float gmn = LoadAsFloat(d.data, d.dtype, d.Offset(b, 1, h) + ch);
            // A block shared by two sequences holds the digest of the last one built; only a
            // block used once is checked.
            int uses = 0;
            for (int s2 = 0; s2 < num_seqs; ++s2)
              for (int p2 = 0; p2 < NumPages(t.lens[s2], cache.block_size); ++p2)
                uses += t.view.Block(s2, p2) == b;
            if (uses == 1 && (gmx != mx || gmn != mn)) std::abort();
          }
        }
      }
    }
  }
  const int num_tokens = in.ConsumeIntegralInRange<int>(-1, 4);
  std::vector<int64_t> slots(std::max(num_tokens, 0));
  for (int64_t& s : slots) {
    s = in.ConsumeIntegralInRange<int>(0, 7) == 0
            ? in.ConsumeIntegral<int64_t>()
            : in.ConsumeIntegralInRange<int64_t>(
                  -1, static_cast<int64_t>(cache.num_blocks) * cache.block_size);
  }
  std::vector<uint8_t> keys(std::max(num_tokens, 0) * cache.TokenStride() * DTypeSize(cache.dtype) +
                            1);
  for (size_t i = 0; i + 1 < keys.size(); i += DTypeSize(cache.dtype)) {
    StoreFromFloat(keys.data(), cache.dtype, i / DTypeSize(cache.dtype), AnyFloat(in));
  }
  switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
      (void)UpdateDigests(cache, slots.data(), num_tokens, d);
      break;
    case 1:
      (void)UpdateDigestsFromKeys(d, cache.block_size, slots.data(), num_tokens, keys.data());
      break;
    default:
      (void)AppendKvAndDigests(cache, slots.data(), num_tokens, keys.data(), keys.data(), d);
  }
}

}  // namespace
}  // namespace mempipe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  mempipe::fuzz::Run(in);
  return 0;
}
