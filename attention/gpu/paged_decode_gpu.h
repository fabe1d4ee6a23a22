// mempipe attention on the GPU, step 4 (apply): dense and sparse paged decode attention.
//
// Same contract as attention/decode.h (DenseDecode, SparseDecode), with every pointer in
// device memory: query/out [num_seqs, num_heads, head_dim], the cache in vLLM layout
// [2, num_blocks, block_size, num_kv_heads, head_dim], block_table [num_seqs,
// max_blocks_per_seq], seq_lens [num_seqs], and for the sparse kernel the selection
// pages [num_seqs, num_kv_heads, max_selected] (logical, ascending) with counts
// [num_seqs, num_kv_heads]. fp32/fp16/bf16, page 16/32/64, head_dim 64/128/256, GQA group
// sizes kSupportedGpuGroupSizes (core/paged_kv.h: 1-8, 12, 16).
//
// Design (flash-decoding): one thread block per (KV-split, KV head, sequence) reads each page of
// its KV head once for all the group's query heads (groups of 12 and 16: two blocks of 6 / 8
// heads per KV head); a long context is cut into splits whose partial results (fp32 output +
// log-sum-exp) a second kernel merges. The host plans the splits from the SM count; the caller
// owns the scratch memory. On CUDA, fp16/bf16 compute q.k and p.v on tensor cores (m16n8k16,
// fp32 accumulation; the softmax weights enter p.v rounded to the cache dtype, as in
// FlashAttention; head_dim 256 loads a tile's V after its scores, single-buffered); fp32 and
// HIP builds use CUDA-core arithmetic throughout.
//
//   size_t bytes = PagedDecodeWorkspaceBytes(num_seqs, num_heads, num_kv_heads, max_items);
//   // max_items = table.max_blocks_per_seq (dense) or max_selected (sparse)
//   MEMPIPE_RETURN_IF_ERROR(DenseDecodeGpu(io, cache, table, scale, ws, bytes, stream));
//   MEMPIPE_RETURN_IF_ERROR(SparseDecodeGpu(io, cache, table, pages, scale, ws, bytes, stream));
//
// Device-resident indices cannot be checked from the host: the kernels skip (never read
// through) a page index outside [0, num_pages), a block id outside [0, num_blocks) and a
// count outside [0, max_selected]; a sequence with no valid page gets a zero output row.
// Tokens past seq_len in the last page are never read, so they may hold anything.
#ifndef MEMPIPE_ATTENTION_GPU_PAGED_DECODE_GPU_H_
#define MEMPIPE_ATTENTION_GPU_PAGED_DECODE_GPU_H_

#include <cstddef>

#include "absl/status/status.h"
#include "attention/decode.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"

namespace mempipe {

// Scratch bytes DenseDecodeGpu / SparseDecodeGpu need on the current device for a batch of
// this shape (max_items: pages per (sequence, KV head) at most).
size_t PagedDecodeWorkspaceBytes(int num_seqs, int num_heads, int num_kv_heads, int max_items);

// `predicate` (core/gpu/gpu_runtime.h): with its flag set, the kernels do nothing unless it
// holds -- the offload's fallback on the device (sparse when status == 0, dense otherwise).
// Errors: InvalidArgument for unsupported dtype/block size/head_dim/group size, shape
// mismatches, null or non-16-byte-aligned pointers, or too small a workspace; Internal for a
// launch failure.
[[nodiscard]] absl::Status DenseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                                          const BlockTableView& table, float scale, void* workspace,
                                          size_t workspace_bytes, GpuStream stream,
                                          DevicePredicate predicate = {});

[[nodiscard]] absl::Status SparseDecodeGpu(const DecodeIo& io, const KvCacheView& cache,
                                           const BlockTableView& table, const PageList& pages,
                                           float scale, void* workspace, size_t workspace_bytes,
                                           GpuStream stream, DevicePredicate predicate = {});

// Checked mode: what the CPU decode checks of the same request, on device-resident inputs.
// Copies the block table, seq_lens (and the selection, when `pages` is not null) to the host
// on `stream`, waits for it, and runs the CPU's own validators (ValidateDecodeIo,
// ValidatePageList), so a seq_len past the block table, a block id outside the cache or a bad
// selection gets the CPU's error message. A host synchronization: for tests, debugging and
// front doors that opt in, not for the decode path (the kernels skip such entries instead).
[[nodiscard]] absl::Status ValidateDecodeInputsGpu(const DecodeIo& io, const KvCacheView& cache,
                                                   const BlockTableView& table,
                                                   const PageList* pages, GpuStream stream);

}  // namespace mempipe

#endif  // MEMPIPE_ATTENTION_GPU_PAGED_DECODE_GPU_H_
