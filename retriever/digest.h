// mempipe retriever, step 1 (prepare memory): page digests.
//
// A page's digest is the channel-wise max and min of its keys, per KV head (Quest):
//   digests [num_blocks, 2, num_kv_heads, head_dim] in the cache dtype; [b][0] max, [b][1] min
// Max and min select stored values, so the digest is exact in any dtype, and the incremental
// update (one token at a time, partial last page included) equals the bulk build bit for bit.
//
//   DigestView digests{ptr, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
//   MEMPIPE_RETURN_IF_ERROR(BuildDigests(cache, table, digests));      // after prefill
//   MEMPIPE_RETURN_IF_ERROR(UpdateDigests(cache, slots, n, digests));  // after each append
#ifndef MEMPIPE_RETRIEVER_DIGEST_H_
#define MEMPIPE_RETRIEVER_DIGEST_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "core/paged_kv.h"

namespace mempipe {

struct DigestView {
  void* data = nullptr;  // [num_blocks, 2, num_kv_heads, head_dim] in `dtype`
  DType dtype = DType::kFloat32;
  int num_blocks = 0;
  int num_kv_heads = 0;
  int head_dim = 0;

  size_t BlockStride() const { return 2 * static_cast<size_t>(num_kv_heads) * head_dim; }
  size_t NumElems() const { return BlockStride() * num_blocks; }
  size_t NumBytes() const { return NumElems() * DTypeSize(dtype); }
  // Element offset of (block, 0 = max / 1 = min, kv head, channel 0).
  size_t Offset(int block, int which, int head) const {
    return static_cast<size_t>(block) * BlockStride() +
           (static_cast<size_t>(which) * num_kv_heads + head) * head_dim;
  }
};

// Checks that the digest matches the cache (dtype, blocks, heads, head_dim).
[[nodiscard]] absl::Status ValidateDigests(const KvCacheView& cache, const DigestView& digests);

// Bulk build: for every page each sequence uses, max/min over its valid tokens
// (min(block_size, seq_len - page * block_size)). Other blocks are left untouched.
[[nodiscard]] absl::Status BuildDigests(const KvCacheView& cache, const BlockTableView& table,
                                        const DigestView& digests);

// Incremental update after `WriteKv` of the same slots, in append order: a token at offset 0
// of its block resets that block's digest to its key; any other offset widens it.
//   slot_mapping [num_tokens] int64, negative entries skipped
[[nodiscard]] absl::Status UpdateDigests(const KvCacheView& cache, const int64_t* slot_mapping,
                                         int num_tokens, const DigestView& digests);

// The same update from key rows given directly (a selector that keeps its own digests, e.g.
// on an FPGA, receives only the new keys):
//   keys [num_tokens, num_kv_heads, head_dim] in the digest dtype; slot_mapping as above
[[nodiscard]] absl::Status UpdateDigestsFromKeys(const DigestView& digests, int block_size,
                                                 const int64_t* slot_mapping, int num_tokens,
                                                 const void* keys);

// KV append fused with the digest update (WriteKv + UpdateDigests).
[[nodiscard]] absl::Status AppendKvAndDigests(const KvCacheView& cache, const int64_t* slot_mapping,
                                              int num_tokens, const void* key, const void* value,
                                              const DigestView& digests);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_DIGEST_H_
