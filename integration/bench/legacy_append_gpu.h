// The fused KV append + digest kernel as it was before the linear rewrite (one kernel; each
// token scanned the whole batch to learn whether it was its block's last: O(tokens^2)). Kept
// only as the baseline row of mempipe-gpu-append-bench; production code uses
// retriever/gpu/digest_gpu.h.
#ifndef MEMPIPE_INTEGRATION_BENCH_LEGACY_APPEND_GPU_H_
#define MEMPIPE_INTEGRATION_BENCH_LEGACY_APPEND_GPU_H_

#include <cstdint>

#include "absl/status/status.h"
#include "core/gpu/gpu_runtime.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"

namespace mempipe::bench {

[[nodiscard]] absl::Status LegacyAppendKvAndDigestsGpu(const KvCacheView& cache,
                                                       const int64_t* slot_mapping, int num_tokens,
                                                       const void* key, const void* value,
                                                       const DigestView& digests, GpuStream stream);

}  // namespace mempipe::bench

#endif  // MEMPIPE_INTEGRATION_BENCH_LEGACY_APPEND_GPU_H_
