// mempipe retriever on the GPU, step 1 (prepare memory): page digests and the fused KV append.
//
// Same contract as retriever/digest.h, every pointer in device memory:
//   cache   [2, num_blocks, block_size, num_kv_heads, head_dim]
//   digests [num_blocks, 2 (max, min), num_kv_heads, head_dim], cache dtype
//   slot_mapping [num_tokens] int64 (negative: skipped); key/value [num_tokens, num_kv_heads,
//   head_dim] in the cache dtype; block_table [num_seqs, max_blocks_per_seq], seq_lens
//   [num_seqs] int32.
// Results equal the CPU reference bit for bit (max/min select stored values, compared in fp32
// in the same order).
//
//   MEMPIPE_RETURN_IF_ERROR(BuildDigestsGpu(cache, table, digests, stream));     // after prefill
//   MEMPIPE_RETURN_IF_ERROR(AppendKvAndDigestsGpu(cache, slots, n, k, v, digests, stream));
//
// Device-resident indices cannot be checked from the host: a slot past the cache, a block id
// outside [0, num_blocks) and pages past max_blocks_per_seq are skipped, never written.
#ifndef MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_
#define MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_

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
// at offset 0 of its block resets the block's digest, any other widens it. One kernel; the
// last token of each block in the batch owns that block's digest update.
[[nodiscard]] absl::Status AppendKvAndDigestsGpu(const KvCacheView& cache,
                                                 const int64_t* slot_mapping, int num_tokens,
                                                 const void* key, const void* value,
                                                 const DigestView& digests, GpuStream stream);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_GPU_DIGEST_GPU_H_
