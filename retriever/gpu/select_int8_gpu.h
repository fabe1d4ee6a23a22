// mempipe retriever on the GPU, steps 2 + 3 on int8 digests (retriever/digest.h kInt8).
//
// ScoreAndSelectGpu and ComputeRelevancyGpu (select_gpu.h) route int8 digests here; callers
// need not call these directly. The score kernel reads the int8 rows and the per-(page, head)
// scale, dequantizes each element with one fp32 multiply (int8_quant.h) and sums in the
// canonical order of relevancy.h (lane = channel % 32, increasing channel per lane, xor
// butterfly 16..1, no FMA, group heads in order), so scores equal the CPU reference bit for bit.
// It also writes the per-32-page maxima that SelectPagesKernel's candidate floor uses, so the
// top-k is select_gpu.hip's, unchanged.
//   digests.data   [num_blocks, 2, num_kv_heads, head_dim] int8 (device)
//   digests.scales [num_blocks, num_kv_heads] fp32 (device); digests.exact is not read
// Limits: head_dim <= 256, num_heads / num_kv_heads <= 16.
#ifndef MEMPIPE_RETRIEVER_GPU_SELECT_INT8_GPU_H_
#define MEMPIPE_RETRIEVER_GPU_SELECT_INT8_GPU_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {

inline constexpr int kInt8GpuMaxHeadDim = 256;
inline constexpr int kInt8GpuMaxGroup = 16;

// Step 2 on int8 digests; `group_max` [num_seqs, num_kv_heads, ceil(max_blocks_per_seq / 32)]
// may be null (then sinks/locals are unused). With `predicate` set, the kernel does nothing
// unless the device flag says to run (as select_gpu.h's kernels).
[[nodiscard]] absl::Status ComputeRelevancyInt8Gpu(
    const QueryView& query, const KvCacheView& cache, const DigestView& digests,
    const BlockTableView& table, GroupAggregation agg, float* scores, uint32_t* group_max,
    int sinks, int locals, GpuStream stream, DevicePredicate predicate = {});

// Step 3 from scores and (optional) group maxima: select_gpu.hip's SelectPagesKernel.
[[nodiscard]] absl::Status SelectPagesWithGroupMaxGpu(
    const float* scores, const uint32_t* group_max, const BlockTableView& table, int block_size,
    int num_kv_heads, const SelectionConfig& config, const SelectionView& out, GpuStream stream);

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_GPU_SELECT_INT8_GPU_H_
