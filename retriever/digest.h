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
//
// Formats (DigestFormat). kNative: the rows above. kInt8 (retriever/int8_quant.h): the rows as
// int8 codes, qmax_c rounded up and qmin_c rounded down against one fp32 scale per (page, KV
// head), so the dequantized bound fl(q * s) still contains every key; relevancy scores that
// bound in the canonical order of relevancy.h. An int8 digest has three arrays:
//   data   [num_blocks, 2, num_kv_heads, head_dim] int8  (the same indexing as kNative)
//   scales [num_blocks, num_kv_heads] fp32
//   exact  [num_blocks, 2, num_kv_heads, head_dim] in `dtype`: the exact max/min (a kNative
//          digest). Builds and updates keep it current and re-quantize every (page, head) they
//          touch from it, so the incremental update equals the bulk build bit for bit and the
//          bound stays valid after every token. Scoring never reads it.
// Scanned per page and KV head: kNative 2 x head_dim x dtype bytes (512 B for bf16 d = 128);
// kInt8 2 x head_dim + 4 bytes (260 B). A row is head_dim bytes, 64-byte aligned for head_dim a
// multiple of 64 (the FPGA keeps its own per-head record layout, fpga/device_layout.h).
#ifndef MEMPIPE_RETRIEVER_DIGEST_H_
#define MEMPIPE_RETRIEVER_DIGEST_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/paged_kv.h"

namespace mempipe {

enum class DigestFormat : int { kNative = 0, kInt8 = 1 };
absl::StatusOr<DigestFormat> ParseDigestFormat(absl::string_view name);  // "native" | "int8"
absl::string_view DigestFormatName(DigestFormat format);
// InvalidArgument naming the value unless `format` is kNative or kInt8.
[[nodiscard]] absl::Status ValidateDigestFormat(DigestFormat format);

struct DigestView {
  void* data = nullptr;  // [num_blocks, 2, num_kv_heads, head_dim] in `dtype` (kInt8: int8)
  DType dtype = DType::kFloat32;  // the cache dtype (kInt8: of `exact` and of appended keys)
  int num_blocks = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DigestFormat format = DigestFormat::kNative;
  float* scales = nullptr;  // kInt8: [num_blocks, num_kv_heads]
  void* exact = nullptr;    // kInt8: [num_blocks, 2, num_kv_heads, head_dim] in `dtype`

  size_t BlockStride() const { return 2 * static_cast<size_t>(num_kv_heads) * head_dim; }
  size_t NumElems() const { return BlockStride() * num_blocks; }
  // Bytes of `data`.
  size_t NumBytes() const {
    return NumElems() * (format == DigestFormat::kInt8 ? 1 : DTypeSize(dtype));
  }
  // kInt8: bytes of `scales` and of `exact` (0 for kNative).
  size_t ScaleBytes() const {
    return format == DigestFormat::kInt8
               ? static_cast<size_t>(num_blocks) * num_kv_heads * sizeof(float)
               : 0;
  }
  size_t ExactBytes() const {
    return format == DigestFormat::kInt8 ? NumElems() * DTypeSize(dtype) : 0;
  }
  // Bytes a scoring pass reads per (page, KV head): both rows, plus the scale for kInt8.
  size_t ScannedBytesPerPageHead() const {
    return format == DigestFormat::kInt8 ? 2 * static_cast<size_t>(head_dim) + sizeof(float)
                                         : 2 * static_cast<size_t>(head_dim) * DTypeSize(dtype);
  }
  size_t ScaleIndex(int block, int head) const {
    return static_cast<size_t>(block) * num_kv_heads + head;
  }
  // Element offset of (block, 0 = max / 1 = min, kv head, channel 0).
  size_t Offset(int block, int which, int head) const {
    return static_cast<size_t>(block) * BlockStride() +
           (static_cast<size_t>(which) * num_kv_heads + head) * head_dim;
  }
};

// Checks that the digest matches the cache (dtype, blocks, heads, head_dim), its format, and
// for kInt8 that `scales` and `exact` are set.
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
// (kInt8: the keys widen `exact`, then each touched (block, head) is re-quantized.)
[[nodiscard]] absl::Status UpdateDigestsFromKeys(const DigestView& digests, int block_size,
                                                 const int64_t* slot_mapping, int num_tokens,
                                                 const void* keys);

// kInt8 only: re-quantizes every (block, head) of `blocks` [num] from `exact` (negative and
// repeated entries allowed). What builds and updates call; exposed for devices that keep the
// exact digest elsewhere and for tests.
[[nodiscard]] absl::Status QuantizeDigestBlocks(const DigestView& digests, const int32_t* blocks,
                                                int num);

// KV append fused with the digest update (WriteKv + UpdateDigests); the row strides as WriteKv's.
[[nodiscard]] absl::Status AppendKvAndDigests(const KvCacheView& cache, const int64_t* slot_mapping,
                                              int num_tokens, const void* key, const void* value,
                                              const DigestView& digests, int64_t key_row_stride = 0,
                                              int64_t value_row_stride = 0);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_DIGEST_H_
