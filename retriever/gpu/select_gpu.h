// mempipe retriever on the GPU, steps 2 + 3: Quest relevancy and top-k page selection.
//
// Same contract as retriever/relevancy.h and retriever/select.h, every pointer in device
// memory. Scores follow the canonical order of relevancy.h (32 lanes by channel % 32, each
// lane in increasing channel, xor-butterfly 16,8,4,2,1, fp32 without FMA, group aggregation
// in head order), so scores and selections equal the CPU's bit for bit (for finite queries,
// which ValidateQuery demands, and finite keys).
//   query    [num_seqs, num_heads, head_dim] in the cache dtype
//   digests  [num_blocks, 2, num_kv_heads, head_dim]
//   scores   [num_seqs, num_kv_heads, max_blocks_per_seq] fp32 (-inf past a sequence's pages)
//   selected [num_seqs, num_kv_heads, max_selected] int32 logical pages, ascending, -1 padded
//   counts   [num_seqs, num_kv_heads] int32
//
// Pipeline: ScorePagesKernel streams the digests once (the bandwidth-bound part). Besides the
// scores (1/128 of the digest bytes at head_dim 128 bf16) it writes, per 32 pages, the largest
// score among the middle pages. SelectPagesKernel, one block per (sequence, KV head), takes
// the want-th largest of those maxima as a floor that the exact threshold cannot be below,
// gathers the pages at or above it in index order into shared memory (a few hundred of
// 65536 at 1M tokens), and runs an exact radix select on the order-preserving bit pattern of
// the scores plus an ordered compaction there: sinks, locals, every page above the threshold
// and the lowest-index ties, ascending, with no sort. If the candidates overflow shared memory
// (e.g. massive ties), the same select and compaction run over the whole row.
//
//   size_t bytes = SelectWorkspaceBytes(table, num_kv_heads);
//   MEMPIPE_RETURN_IF_ERROR(ScoreAndSelectGpu(q, cache, digests, table, config, out,
//                                             workspace, bytes, stream));
#ifndef MEMPIPE_RETRIEVER_GPU_SELECT_GPU_H_
#define MEMPIPE_RETRIEVER_GPU_SELECT_GPU_H_

#include <cstddef>

#include "absl/status/status.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {

// Scratch bytes ScoreAndSelectGpu needs (the score tensor and per-32-page maxima).
size_t SelectWorkspaceBytes(const BlockTableView& table, int num_kv_heads);

// Step 2 alone: writes `scores` (device, [num_seqs, num_kv_heads, max_blocks_per_seq]).
// `cache` supplies shapes only (its data pointer is not read).
[[nodiscard]] absl::Status ComputeRelevancyGpu(const QueryView& query, const KvCacheView& cache,
                                               const DigestView& digests,
                                               const BlockTableView& table, GroupAggregation agg,
                                               float* scores, GpuStream stream);

// Step 3 alone, from device scores.
[[nodiscard]] absl::Status SelectPagesGpu(const float* scores, const BlockTableView& table,
                                          int block_size, int num_kv_heads,
                                          const SelectionConfig& config, const SelectionView& out,
                                          GpuStream stream);

// Steps 2 and 3. With `predicate` set (core/gpu/gpu_runtime.h), the kernels do nothing unless
// it holds (e.g. the offload's status != 0: select on the GPU only as a fallback). Errors:
// InvalidArgument for a bad config, mismatched shapes, unsupported dtype/head_dim, a query dtype
// other than the cache's, null pointers or too small a workspace; Internal for a launch failure.
[[nodiscard]] absl::Status ScoreAndSelectGpu(const QueryView& query, const KvCacheView& cache,
                                             const DigestView& digests, const BlockTableView& table,
                                             const SelectionConfig& config,
                                             const SelectionView& out, void* workspace,
                                             size_t workspace_bytes, GpuStream stream,
                                             DevicePredicate predicate = {});

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_GPU_SELECT_GPU_H_
