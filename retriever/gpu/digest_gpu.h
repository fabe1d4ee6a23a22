// mempipe retriever on the GPU, step 1 (prepare memory): page digests and the fused KV append.
//
// Same contract as retriever/digest.h, every pointer in device memory:
//   cache   [2, num_blocks, block_size, num_kv_heads, head_dim]
//   digests [num_blocks, 2 (max, min), num_kv_heads, head_dim], cache dtype
//   slot_mapping [num_tokens] int64 (negative: skipped); key/value [num_tokens, num_kv_heads,
//   head_dim] in the cache dtype; block_table [num_seqs, max_blocks_per_seq], seq_lens
//   [num_seqs] int32.
// Results equal the CPU reference bit for bit (max/min select stored values, compared in fp32
// in the same order). Int8 digests (DigestView::format kInt8, scales and exact rows in device
// memory too): the max/min kernels work on `exact`, then every touched (block, head) is
// re-quantized by retriever/int8_quant.h's functions (IEEE __fdiv_rn/__fmul_rn), so codes and
// scales equal the CPU's bit for bit as well.
//
//   MEMPIPE_RETURN_IF_ERROR(BuildDigestsGpu(cache, table, digests, stream));     // after prefill
//   MEMPIPE_RETURN_IF_ERROR(AppendKvAndDigestsGpu(cache, slots, n, k, v, digests, stream));
//   // or with a workspace of AppendWorkspaceBytes(cache) bytes (CUDA-graph capture):
//   MEMPIPE_RETURN_IF_ERROR(AppendKvAndDigestsGpu(cache, slots, n, k, v, digests, ws, bytes,
//                                                 stream));
//
// Device-resident indices cannot be checked from the host: a slot past the cache, a block id
// outside [0, num_blocks) and pages past max_blocks_per_seq are skipped, never written.
#ifndef MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_
#define MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"

namespace mempipe {

// Bulk build over every page each sequence uses. Errors: InvalidArgument for mismatched
// shapes or null pointers; Internal for a launch failure.
[[nodiscard]] absl::Status BuildDigestsGpu(const KvCacheView& cache, const BlockTableView& table,
                                           const DigestView& digests, GpuStream stream);

// vLLM reshape_and_cache fused with the incremental digest update, in append order: a token
// at offset 0 of its block resets the block's digest, any other widens it. The last token of
// each block in the batch owns that block's digest update. Cost: linear in num_tokens when
// each block's tokens are contiguous in the batch (vLLM's order); in general each block's
// owner scans the batch between the block's first (or reset) token and itself.
// This overload takes its bookkeeping memory from the device's stream-ordered pool
// (hipMallocAsync/hipFreeAsync on `stream`: no host synchronization).
[[nodiscard]] absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache,
                                                 const int64_t* slot_mapping, int num_tokens,
                                                 const void* key, const void* value,
                                                 const DigestView& digests, GpuStream stream);

// Bytes of the append workspace: 3 int32 per cache block. Any contents will do (the launcher
// sets the entries it uses); one workspace must not serve two appends running at once.
size_t AppendWorkspaceBytes(const KvCacheView& cache);

// The same with a caller-owned workspace (fixed addresses: for CUDA-graph capture).
// Errors as above, plus InvalidArgument for a null or too small workspace.
[[nodiscard]] absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache,
                                                 const int64_t* slot_mapping, int num_tokens,
                                                 const void* key, const void* value,
                                                 const DigestView& digests, void* workspace,
                                                 size_t workspace_bytes, GpuStream stream);

// Step 1 incremental without a device cache (the GPU page selector keeps digests only):
// keys [num_tokens, num_kv_heads, head_dim] just written at `slot_mapping`, folded exactly as
// AppendKvAndDigestsGpu folds them. Workspace: AppendWorkspaceBytes of a cache with the
// digests' num_blocks.
[[nodiscard]] absl::Status UpdateDigestsFromKeysGpu(const DigestView& digests, int block_size,
                                                    const int64_t* slot_mapping, int num_tokens,
                                                    const void* keys, void* workspace,
                                                    size_t workspace_bytes, GpuStream stream);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_
