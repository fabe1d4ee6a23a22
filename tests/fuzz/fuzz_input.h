// mempipe fuzzing: builds small, self-consistent-or-not inputs (paged caches, block tables,
// selections) from a libFuzzer input, shared by the targets in this folder.
//
// Sizes are drawn from small ranges that include the invalid edges (0, negative, one past the
// end, values near INT32_MAX), so a target exercises both the accepting and the rejecting paths
// without asking for gigabytes. Buffers are exactly as large as the sizes say, so AddressSanitizer
// flags any read or write past them.
#ifndef MEMPIPE_TESTS_FUZZ_FUZZ_INPUT_H_
#define MEMPIPE_TESTS_FUZZ_FUZZ_INPUT_H_

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/dtype.h"
#include "core/paged_kv.h"

namespace mempipe::fuzz {

// A size from a small range, sometimes an edge value instead.
inline int SmallInt(FuzzedDataProvider& in, int lo, int hi) {
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0:
      return in.PickValueInArray(
          {-1, 0, std::numeric_limits<int>::max(), std::numeric_limits<int>::min(), hi + 1});
    default:
      return in.ConsumeIntegralInRange<int>(lo, hi);
  }
}

inline DType AnyDType(FuzzedDataProvider& in) {
  return in.PickValueInArray({DType::kFloat32, DType::kFloat16, DType::kBFloat16});
}

// Floats drawn from the input: mostly small normal values, sometimes NaN, Inf or huge ones.
inline float AnyFloat(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 31)) {
    case 0:
      return std::numeric_limits<float>::quiet_NaN();
    case 1:
      return std::numeric_limits<float>::infinity();
    case 2:
      return -std::numeric_limits<float>::infinity();
    case 3:
      return in.ConsumeFloatingPoint<float>();
    default:
      return in.ConsumeFloatingPointInRange<float>(-4.f, 4.f);
  }
}

// A cache with a valid geometry (the one the validating entry points accept), contents drawn
// from the input; unused elements NaN.
struct FuzzCache {
  KvCacheView view;
  std::vector<uint8_t> bytes;

  static FuzzCache Make(FuzzedDataProvider& in, int max_blocks) {
    FuzzCache c;
    c.view.dtype = AnyDType(in);
    c.view.num_blocks = in.ConsumeIntegralInRange<int>(1, max_blocks);
    c.view.block_size = in.PickValueInArray(kSupportedBlockSizes);
    c.view.num_kv_heads = in.ConsumeIntegralInRange<int>(1, 2);
    c.view.head_dim = 64;
    c.bytes.resize(c.view.NumBytes());
    c.view.data = c.bytes.data();
    const size_t n = c.view.NumElems();
    for (size_t i = 0; i < n; ++i) {
      StoreFromFloat(c.view.data, c.view.dtype, i,
                     in.remaining_bytes() ? AnyFloat(in) : static_cast<float>(i % 7) - 3.f);
    }
    return c;
  }
};

// A block table of `num_seqs` rows of `width` entries; lengths and ids drawn from the input,
// mostly inside the valid ranges.
struct FuzzTable {
  std::vector<int32_t> table, lens;
  BlockTableView view;

  static FuzzTable Make(FuzzedDataProvider& in, int num_seqs, int width, int block_size,
                        int num_blocks) {
    FuzzTable t;
    t.table.resize(static_cast<size_t>(std::max(num_seqs, 0)) * std::max(width, 0));
    t.lens.resize(std::max(num_seqs, 0));
    for (int32_t& b : t.table) {
      b = in.ConsumeIntegralInRange<int>(0, 31) == 0
              ? in.ConsumeIntegral<int32_t>()
              : in.ConsumeIntegralInRange<int>(0, num_blocks - 1);
    }
    const int64_t cap = static_cast<int64_t>(std::max(width, 0)) * block_size;
    for (int32_t& l : t.lens) {
      l = in.ConsumeIntegralInRange<int>(0, 31) == 0
              ? in.ConsumeIntegral<int32_t>()
              : static_cast<int32_t>(
                    in.ConsumeIntegralInRange<int64_t>(1, std::max<int64_t>(cap, 1)));
    }
    t.view = BlockTableView{t.table.data(), t.lens.data(), num_seqs, width};
    return t;
  }
};

}  // namespace mempipe::fuzz

#endif  // MEMPIPE_TESTS_FUZZ_FUZZ_INPUT_H_
