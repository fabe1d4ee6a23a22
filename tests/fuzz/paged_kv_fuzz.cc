// libFuzzer target: the paged-cache views and block tables (core/paged_kv.h) and the FPGA
// front end's request checks built on them (fpga/request_checks.h).
//
// Oracle: whatever ValidateBlockTable accepts, every block id a sequence uses is inside the
// cache (re-checked here independently); WriteKv never writes past the cache (ASan).
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/paged_kv.h"
#include "fpga/request_checks.h"
#include "tests/fuzz/fuzz_input.h"

namespace mempipe::fuzz {
namespace {

void Run(FuzzedDataProvider& in) {
  // Geometry, invalid values included.
  KvCacheView c;
  c.dtype = AnyDType(in);
  c.num_blocks = SmallInt(in, 1, 6);
  c.block_size = in.PickValueInArray({-16, 0, 1, 15, 16, 32, 64, 128});
  c.num_kv_heads = SmallInt(in, 1, 3);
  c.head_dim = in.PickValueInArray({-64, 0, 63, 64, 128, 256, 512});
  std::vector<uint8_t> bytes;
  const bool valid_geometry = [&] {
    KvCacheView probe = c;
    probe.data = &probe;  // any non-null pointer: only the sizes are checked
    return ValidateKvCache(probe).ok();
  }();
  // A valid geometry may still be huge (num_blocks near INT32_MAX): only small ones get memory.
  const bool allocate = valid_geometry && c.num_blocks <= 6 && c.num_kv_heads <= 3;
  if (allocate) {
    bytes.resize(c.NumBytes());
    c.data = bytes.data();
  } else if (in.ConsumeBool()) {
    c.data = &bytes;  // never dereferenced if validation works: ASan would flag it
  }
  (void)ValidateKvCache(c);
  const CacheShape shape{c.dtype, c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
  (void)ValidateCacheShape(shape);

  const int num_seqs = SmallInt(in, 1, 4);
  const int width = SmallInt(in, 1, 8);
  const int bs = c.block_size > 0 ? c.block_size : 16;
  // Rows as wide as `width` says are allocated only for sane widths; a huge width stays
  // rejected or unread (the lengths drawn below exceed what the allocation covers otherwise).
  if (num_seqs > 0 && num_seqs <= 4 && width > 0 && width <= 9) {
    FuzzTable t = FuzzTable::Make(in, num_seqs, width, bs, std::max(c.num_blocks, 1));
    const absl::Status st = ValidateBlockTable(t.view, c.block_size, c.num_blocks);
    if (st.ok()) {
      for (int s = 0; s < num_seqs; ++s) {
        const int32_t len = t.lens[s];
        if (len < 1 || static_cast<int64_t>(len) > static_cast<int64_t>(width) * c.block_size)
          std::abort();  // accepted a length outside the table
        const int pages = NumPages(len, c.block_size);
        if (pages < 1 || pages > width) std::abort();
        for (int p = 0; p < pages; ++p) {
          if (t.view.Block(s, p) < 0 || t.view.Block(s, p) >= c.num_blocks) std::abort();
        }
      }
    }
  } else {
    // A table the caller claims is huge, backed by one row: must be rejected or read in bounds
    // only if the claimed sizes are consistent, so keep the claim honest in what is read.
    std::vector<int32_t> one(1, 0);
    std::vector<int32_t> lens(1, in.ConsumeIntegral<int32_t>());
    const BlockTableView v{one.data(), lens.data(), num_seqs > 0 ? 1 : num_seqs,
                           width > 0 ? 1 : width};
    (void)ValidateBlockTable(v, c.block_size, c.num_blocks);
  }
  if (allocate) {
    const int num_tokens = in.ConsumeIntegralInRange<int>(-1, 4);
    std::vector<int64_t> slots(std::max(num_tokens, 0));
    for (int64_t& s : slots) {
      s = in.ConsumeBool() ? in.ConsumeIntegral<int64_t>()
                           : in.ConsumeIntegralInRange<int64_t>(
                                 -1, static_cast<int64_t>(c.num_blocks) * c.block_size);
    }
    std::vector<uint8_t> key(std::max(num_tokens, 0) * c.TokenStride() * DTypeSize(c.dtype) + 1);
    std::vector<uint8_t> value(key.size());
    (void)WriteKv(c, slots.data(), num_tokens, key.data(), value.data());
    (void)ValidateAppend(shape, slots.data(), num_tokens, key.data());
  }
}

}  // namespace
}  // namespace mempipe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  mempipe::fuzz::Run(in);
  return 0;
}
