// mempipe core: the paged KV cache and the views every step works on.
//
// Layouts follow vLLM's FlashAttention backend so its block tables and slot mappings apply
// unchanged:
//   KV cache   [2, num_blocks, block_size, num_kv_heads, head_dim]   (K at index 0, V at 1)
//              token-major, or on the host also head-major: [2, num_blocks, num_kv_heads,
//              block_size, head_dim] in memory, or page-major: [num_blocks, num_kv_heads, 2,
//              block_size, head_dim], or head-major with each K page transposed (head_kt);
//              the same logical cache (KvLayout)
//   block table [num_seqs, max_blocks_per_seq] int32 physical block ids
//   seq_lens    [num_seqs] int32, tokens in each sequence (the last page may be partial)
//   slot         block_id * block_size + offset; negative slots are padding and are skipped
//
// Views are non-owning and framework-free: a pointer, a dtype and the sizes. The same structs
// describe host and device memory; which one is meant is the caller's contract.
//
//   KvCacheView cache{data, DType::kBFloat16, num_blocks, 16, 8, 128};
//   MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
//   MEMPIPE_RETURN_IF_ERROR(WriteKv(cache, slots, keys, values));
#ifndef MEMPIPE_CORE_PAGED_KV_H_
#define MEMPIPE_CORE_PAGED_KV_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/dtype.h"

namespace mempipe {

// The supported sizes, defined here only (Python reads them from the module:
// mempipe._mempipe.supported_*). Page sizes and head sizes every implementation supports:
inline constexpr int kSupportedBlockSizes[] = {16, 32, 64};
inline constexpr int kSupportedHeadDims[] = {64, 128, 256};
// GQA group sizes (num_heads / num_kv_heads) the GPU kernels are compiled for; the CPU steps
// take any group, the FPGA kernel up to 16 (fpga/hls/kernel_common.h).
inline constexpr int kSupportedGpuGroupSizes[] = {1, 2, 3, 4, 5, 6, 7, 8, 12, 16};
// Cache and query dtypes: kSupportedDTypes in core/dtype.h.

[[nodiscard]] absl::Status ValidateBlockSize(int block_size);
[[nodiscard]] absl::Status ValidateHeadDim(int head_dim);

// How a cache orders the K/V planes, tokens and KV heads of a block in memory. All hold the same
// logical cache [2, num_blocks, block_size, num_kv_heads, head_dim]; Offset() maps it each way.
enum class KvLayout : uint8_t {
  // [2, num_blocks, block_size, num_kv_heads, head_dim]: vLLM's FlashAttention layout, the one
  // the GPU kernels take.
  kTokenMajor,
  // [2, num_blocks, num_kv_heads, block_size, head_dim]: each KV head's page is one contiguous
  // piece, as in vLLM's CPU attention. The host steps take it (sparse decode reads whole pieces
  // instead of head_dim-long rows at the token stride); the GPU kernels refuse it.
  kHeadMajor,
  // [num_blocks, num_kv_heads, 2, block_size, head_dim]: a KV head's page of K followed by the
  // same page of V, one contiguous piece twice the size of head-major's (vLLM's per-layer region
  // [num_blocks, ...] keeps each block whole, too). Host steps only, as head-major.
  kPageMajor,
  // Head-major, with each KV head's K page stored transposed in groups of 4 bytes of channels:
  // [head_dim / x, block_size, x] with x = 4 / element size (fp32 1, fp16 and bf16 2), so that a
  // page's tokens lie in the lanes of a vector load and the scores need no horizontal sums
  // (vLLM's earlier CPU cache split K the same way, [head_dim / x, block_size, x], x = 16 bytes).
  // V pages are head-major's. Element (t, c) of a K page: KeyInPage(t, c); a token's row:
  // ReadTransposedKeyRow. Host steps only; the GPU kernels refuse it, as they do head-major.
  kHeadMajorKT,
  // Page-major, with each K page transposed as in kHeadMajorKT: a KV head's transposed K page
  // followed by its V page, one piece.
  kPageMajorKT,
};

// "token", "head", "page", "head_kt" or "page_kt" (the benches' --kv_layout); InvalidArgument
// naming anything else.
[[nodiscard]] absl::StatusOr<KvLayout> ParseKvLayout(absl::string_view name);
// The name ParseKvLayout takes: "token", "head", "page", "head_kt" or "page_kt".
const char* KvLayoutName(KvLayout layout);

struct KvCacheView {
  void* data = nullptr;  // [2, num_blocks, ...] in `dtype`, ordered as `layout` says
  DType dtype = DType::kFloat32;
  int num_blocks = 0;
  int block_size = 16;
  int num_kv_heads = 0;
  int head_dim = 0;
  KvLayout layout = KvLayout::kTokenMajor;

  // Each KV head's page rows contiguous (head- or page-major): head_dim elements apart, and the
  // host steps read them as one piece per plane.
  bool HeadMajor() const { return layout != KvLayout::kTokenMajor; }
  // A KV head's K and V pages one piece (page-major, with or without transposed K pages).
  bool PageMajor() const {
    return layout == KvLayout::kPageMajor || layout == KvLayout::kPageMajorKT;
  }
  // Elements between consecutive tokens of one KV head, and between consecutive KV heads of one
  // token.
  size_t TokenStride() const {
    return HeadMajor() ? static_cast<size_t>(head_dim)
                       : static_cast<size_t>(num_kv_heads) * head_dim;
  }
  size_t HeadStride() const {
    const size_t page = static_cast<size_t>(block_size) * head_dim;
    return PageMajor() ? 2 * page : HeadMajor() ? page : static_cast<size_t>(head_dim);
  }
  // KV heads whose rows of one token are adjacent in memory: all of them token-major, one
  // head- or page-major (what a copy of a token's [num_kv_heads, head_dim] rows does in one piece).
  int HeadsPerRun() const { return HeadMajor() ? 1 : num_kv_heads; }
  // Elements of one block of K (or of V), and between consecutive blocks.
  size_t PlaneBlockElems() const {
    return static_cast<size_t>(num_kv_heads) * head_dim * block_size;
  }
  size_t BlockStride() const { return PageMajor() ? 2 * PlaneBlockElems() : PlaneBlockElems(); }
  size_t PlaneElems() const { return PlaneBlockElems() * num_blocks; }  // elements of K (or V)
  // Elements from a K row to the V row of the same block, token and KV head.
  size_t KvStride() const {
    return PageMajor() ? static_cast<size_t>(block_size) * head_dim : PlaneElems();
  }
  // K pages transposed (kHeadMajorKT): a K row of one token is not contiguous; read K through
  // KeyInPage / ElementOffset.
  bool KeysTransposed() const {
    return layout == KvLayout::kHeadMajorKT || layout == KvLayout::kPageMajorKT;
  }
  // Channels per group of a transposed K page: 4 bytes of them.
  int KeyGroup() const { return static_cast<int>(4 / DTypeSize(dtype)); }
  // Elements from K's (block, token 0, head) offset to its (token, channel) element.
  size_t KeyInPage(int token, int channel) const {
    if (!KeysTransposed()) return static_cast<size_t>(token) * TokenStride() + channel;
    const int x = KeyGroup();
    return (static_cast<size_t>(channel / x) * block_size + token) * x + channel % x;
  }
  size_t NumElems() const { return 2 * PlaneElems(); }
  size_t NumBytes() const { return NumElems() * DTypeSize(dtype); }
  // Element offset of (K or V, block, token-in-block, kv head, channel 0). With transposed K
  // pages (KeysTransposed), K's row of a token is not contiguous: there only Offset(0, block, 0,
  // head), the page's start, is meaningful for K.
  size_t Offset(int kv, int block, int token, int head) const {
    return kv * KvStride() + static_cast<size_t>(block) * BlockStride() +
           static_cast<size_t>(token) * TokenStride() + static_cast<size_t>(head) * HeadStride();
  }
  // Element offset of one element (K or V, block, token-in-block, kv head, channel), any layout.
  size_t ElementOffset(int kv, int block, int token, int head, int channel) const {
    return kv == 0 ? Offset(0, block, 0, head) + KeyInPage(token, channel)
                   : Offset(1, block, token, head) + channel;
  }
};

// One token's K row of a transposed page (cache.KeysTransposed(); `page` at Offset(0, block, 0,
// head)) read into, or written from, `row` [head_dim] contiguous: its groups of 4 bytes lie
// block_size groups apart. Every reader and writer of K by rows goes through these two.
void ReadTransposedKeyRow(const KvCacheView& cache, const void* page, int token, void* row);
void WriteTransposedKeyRow(const KvCacheView& cache, void* page, int token, const void* row);

// Block tables and lengths of a batch of sequences.
struct BlockTableView {
  const int32_t* block_table = nullptr;  // [num_seqs, max_blocks_per_seq] physical block ids
  const int32_t* seq_lens = nullptr;     // [num_seqs] tokens per sequence, >= 1
  int num_seqs = 0;
  int max_blocks_per_seq = 0;

  int32_t Block(int seq, int page) const {
    return block_table[static_cast<size_t>(seq) * max_blocks_per_seq + page];
  }
};

// Pages holding `seq_len` tokens. Computed in 64 bits: `seq_len + block_size - 1` overflows int
// for a length near 2^31, and a negative page count would skip every check that loops over the
// pages. For seq_len in [0, INT32_MAX] and block_size >= 1 the result fits an int.
inline int NumPages(int seq_len, int block_size) {
  return static_cast<int>((static_cast<int64_t>(seq_len) + block_size - 1) / block_size);
}

// Checks sizes, supported block size and head dim, and a non-null pointer.
[[nodiscard]] absl::Status ValidateKvCache(const KvCacheView& cache);

// OK for a token-major cache; for a head-major one, Unimplemented naming `who` (the GPU kernels
// and the device copies read token-major caches only).
[[nodiscard]] absl::Status RequireTokenMajor(const KvCacheView& cache, const char* who);

// The part of ValidateBlockTable that reads no entry (positive sizes, non-null pointers): what
// a launcher can check of a device-resident table without synchronizing.
[[nodiscard]] absl::Status ValidateBlockTableShape(const BlockTableView& table);

// ValidateBlockTableShape, then every sequence: 1 <= seq_len <= max_blocks_per_seq *
// block_size, and every block id the sequence uses lies in [0, num_blocks). Entries past a
// sequence's pages are not read. Host memory; for a device-resident table the GPU launchers
// offer a checked mode that copies it and runs this very function (ValidateDecodeInputsGpu).
[[nodiscard]] absl::Status ValidateBlockTable(const BlockTableView& table, int block_size,
                                              int num_blocks);

// vLLM `reshape_and_cache`: writes token i's key and value into slot `slot_mapping[i]`.
//   slot_mapping [num_tokens] int64; negative entries are skipped
//   key, value   [num_tokens, num_kv_heads, head_dim] in the cache dtype; token i's row starts
//                key_row_stride (value_row_stride) elements after token i - 1's: 0 means packed
//                rows (num_kv_heads * head_dim), a larger stride reads rows of a wider tensor in
//                place (vLLM hands key and value over as column slices of one fused qkv output)
// Errors: InvalidArgument for a slot past the cache (naming token and slot), or a row stride
// that is neither 0 nor at least a row (naming it).
[[nodiscard]] absl::Status WriteKv(const KvCacheView& cache, const int64_t* slot_mapping,
                                   int num_tokens, const void* key, const void* value,
                                   int64_t key_row_stride = 0, int64_t value_row_stride = 0);

}  // namespace mempipe

#endif  // MEMPIPE_CORE_PAGED_KV_H_
