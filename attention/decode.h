// mempipe attention, step 4 (apply): paged decode attention, dense and sparse, and causal
// prefill attention over the paged cache. Host (CPU) implementations; fp32 compute with a
// numerically stable (running-max) softmax.
//
// Two implementations, chosen at run time (core/cpu_kernel.h): an AVX-512 one (used when the
// CPU has AVX-512F; compiled with a target attribute, so the default build stays portable
// without -DMEMPIPE_CPU_ARCH; its scores of bf16 queries over a bf16 cache use AVX512_BF16 where
// the CPU has it) and a portable one. Each (sequence, KV head) reads its pages once for all its
// GQA query heads. Decode cuts each sequence's pages into chunks of 512 tokens and splits the
// (chunk, KV head) pairs over `io.num_threads`, combining a sequence's chunks at the end; the
// chunks depend on the lengths and selections only, so any thread count gives the same result.
//
//   query  [num_seqs, num_heads, head_dim] in `io.dtype`   (one decode token per sequence)
//   out    [num_seqs, num_heads, head_dim] in `io.dtype`
//   Query head h reads KV head h / (num_heads / num_kv_heads) (GQA).
//
//   DecodeIo io{query, out, DType::kBFloat16, num_seqs, num_heads, head_dim, /*num_threads=*/4};
//   MEMPIPE_RETURN_IF_ERROR(DenseDecode(io, cache, table, scale));
//   PageList pages{selection.pages, selection.counts, num_kv_heads, max_selected};
//   MEMPIPE_RETURN_IF_ERROR(SparseDecode(io, cache, table, pages, scale));
#ifndef MEMPIPE_ATTENTION_DECODE_H_
#define MEMPIPE_ATTENTION_DECODE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/cpu_kernel.h"  // IWYU pragma: export (SetCpuKernel, ParseCpuKernel)
#include "core/paged_kv.h"

namespace mempipe {

// Decode attends each sequence's pages in chunks of this many tokens (whole pages; all pages for
// dense decode, the selected ones for sparse), split over the threads with the KV heads and
// combined at the end; a sequence of one chunk is attended in one piece.
inline constexpr int kDecodeChunkTokens = 512;
// Pages of `block_size` tokens in one decode chunk (at least one).
inline int DecodeChunkPages(int block_size) {
  return block_size >= kDecodeChunkTokens ? 1 : kDecodeChunkTokens / block_size;
}

struct DecodeIo {
  const void* query = nullptr;  // [num_seqs, num_heads, head_dim]
  void* out = nullptr;          // [num_seqs, num_heads, head_dim]
  DType dtype = DType::kFloat32;
  int num_seqs = 0;
  int num_heads = 0;
  int head_dim = 0;
  int num_threads = 1;  // host threads sharing the (chunk, KV head) pairs; 1 = caller only
};

// Pages one (sequence, KV head) attends to: logical page indices, ascending.
struct PageList {
  const int32_t* pages = nullptr;   // [num_seqs, num_kv_heads, max_selected]
  const int32_t* counts = nullptr;  // [num_seqs, num_kv_heads]
  int num_kv_heads = 0;
  int max_selected = 0;
};

// Which host implementation runs (AVX-512, AVX2 or portable): SetCpuKernel in core/cpu_kernel.h.

// Checks io sizes against cache and table (GQA divisibility, head_dim, num_seqs, pointers).
[[nodiscard]] absl::Status ValidateDecodeIo(const DecodeIo& io, const KvCacheView& cache,
                                            const BlockTableView& table);

// Checks a selection (host memory) against the table: non-null pointers, num_kv_heads equal to
// the cache's, every count in [1, max_selected], every page in [0, num_pages) and ascending.
[[nodiscard]] absl::Status ValidatePageList(const PageList& pages, const BlockTableView& table,
                                            const KvCacheView& cache);

// Attention of each sequence's query over all its seq_len cached tokens.
[[nodiscard]] absl::Status DenseDecode(const DecodeIo& io, const KvCacheView& cache,
                                       const BlockTableView& table, float scale);

// Attention over the selected pages only (partial last page honoured). Errors: a page index
// outside [0, num_pages), a count outside [1, max_selected], or pages not ascending.
[[nodiscard]] absl::Status SparseDecode(const DecodeIo& io, const KvCacheView& cache,
                                        const BlockTableView& table, const PageList& pages,
                                        float scale);

// Rows [first, last) of SparseDecode, on the calling thread (row r is sequence r / num_kv_heads,
// KV head r % num_kv_heads): the query heads of each row's KV head attend the pages of that row
// of `pages`, and only their rows of io.out are written, with SparseDecode's arithmetic (the same
// bits) and its prefetch running on from one row into the next. It reads no other row of
// `pages`, so a caller can run it inside its own parallel call as soon as those rows are
// selected (backend/host_sparse_layer.h). Checks the rows: [first, last) inside the batch, each
// count in [1, max_selected] and its pages ascending inside the sequence (InvalidArgument), and
// at most one decode chunk of pages, DecodeChunkPages(block_size) (FailedPrecondition: a
// longer row needs SparseDecode's split). io, the cache and the table are not checked here:
// ValidateDecodeIo once, before the rows.
[[nodiscard]] absl::Status SparseDecodeRows(const DecodeIo& io, const KvCacheView& cache,
                                            const BlockTableView& table, const PageList& pages,
                                            float scale, int64_t first, int64_t last);

// What the AVX-512 or AVX2 kernel of DenseDecode (pages == nullptr) or SparseDecode reads, in
// its order, thread split and prefetch, without its arithmetic or output: a benchmark's measure
// of the rate the kernel's access pattern alone allows (mempipe-cpu-kernel-bench). Errors: those
// of DenseDecode / SparseDecode, and FailedPrecondition where the portable kernel is active.
[[nodiscard]] absl::Status ReadDecodeRows(const DecodeIo& io, const KvCacheView& cache,
                                          const BlockTableView& table, const PageList* pages);

// How the AVX-512 kernel prefetches the pages dense and sparse decode read (process-wide).
//   kStream (default): every page a thread's range will read is known before it starts, so its
//     rows are prefetched as one stream in the kernel's order, 8 KiB ahead of the reads.
//   kNextPage: the next page's K rows over the current page's scores, and P.V its batch's V
//     rows 48 tokens ahead (both decodes' scheme before 2026-12-04; dense decode's until
//     results/dense_stream/).
// Measured in integration/bench/results/read_ahead/ (sparse) and results/dense_stream/ (dense).
// The environment variable MEMPIPE_READ_AHEAD (stream, next_page; where unset, its earlier name
// MEMPIPE_SPARSE_READ_AHEAD) sets the process's starting value; a value it does not name is
// ignored with a message on stderr. For measurements, not tuning: the AVX2 and portable kernels
// ignore it.
enum class DecodeReadAhead : int { kStream = 0, kNextPage = 1 };
void SetDecodeReadAhead(DecodeReadAhead mode);
// Accepts stream, next_page; InvalidArgument naming anything else.
absl::StatusOr<DecodeReadAhead> ParseDecodeReadAhead(absl::string_view name);
// "stream" or "next_page".
absl::string_view DecodeReadAheadName(DecodeReadAhead mode);
DecodeReadAhead ActiveDecodeReadAhead();

// Causal prefill: the last q_len(s) = query_start_loc[s+1] - query_start_loc[s] tokens of each
// sequence attend to cached tokens [0, position] (the cache must already hold them).
//   query_start_loc [num_seqs + 1] int32, io.num_seqs is the total token count
[[nodiscard]] absl::Status PrefillAttention(const DecodeIo& io, const int32_t* query_start_loc,
                                            const KvCacheView& cache, const BlockTableView& table,
                                            float scale);

}  // namespace mempipe

#endif  // MEMPIPE_ATTENTION_DECODE_H_
