// mempipe backend/gpu: the launchers of the selection offload's kernels
// (gpu_selection_offload.hip), used by GpuSelectionOffload and its tests. The control block
// and the reason codes are backend/offload_control.h's.
#ifndef MEMPIPE_BACKEND_GPU_OFFLOAD_KERNELS_H_
#define MEMPIPE_BACKEND_GPU_OFFLOAD_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "backend/offload_control.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe {

// The launchers (gpu_selection_offload.hip), for the class below and the tests.
namespace offload_gpu {

// Polls `control` (device pointer of a mapped SlotControl) until the next request's staging
// entry in a ring of `ring` entries is free (OffloadGateOpen; ring 1: released == holder), at
// most `timeout_ns`; writes control->skip = 1 and *gate_ok = 0 when it stays closed, else
// *gate_ok = 1 + the entry (OffloadRingEntry of issued + 1). `stamp_ns` (device, may be null)
// receives the GPU global timer at the start.
[[nodiscard]] absl::Status LaunchGate(OffloadSlotControl* control, int32_t* gate_ok,
                                      int64_t* stamp_ns, int64_t timeout_ns, int ring,
                                      GpuStream stream);
// Copies up to three (src device -> dst mapped host) segments when *gate_ok != 0, each
// destination moved (*gate_ok - 1) * entry_bytes further (the ring entry the gate picked).
struct CopySegment {
  const void* src = nullptr;
  void* dst = nullptr;
  size_t bytes = 0;
};
[[nodiscard]] absl::Status LaunchStageCopy(const CopySegment* segments, int count,
                                           const int32_t* gate_ok, size_t entry_bytes,
                                           GpuStream stream);
// The wait kernel (see the banner). `control`, `staged_pages` [rows, k], `staged_counts` [rows]
// are device pointers of mapped host memory; `out_pages` [rows, max_selected], `out_counts`
// [rows], `status` [1] and `counters` [OffloadDeviceCounters::kCount] device memory.
struct WaitArgs {
  const OffloadSlotControl* control = nullptr;
  const int64_t* stamp_ns = nullptr;
  int64_t deadline_ns = 0;
  const int32_t* staged_pages = nullptr;
  const int32_t* staged_counts = nullptr;
  int rows = 0;  // num_seqs * num_kv_heads
  int k = 0;
  int32_t* out_pages = nullptr;
  int32_t* out_counts = nullptr;
  int max_selected = 0;
  int32_t* status = nullptr;
  unsigned long long* counters = nullptr;
};
[[nodiscard]] absl::Status LaunchWait(const WaitArgs& args, GpuStream stream);
// Enqueues `fn(data)` on `stream` (cudaLaunchHostFunc / hipLaunchHostFunc).
[[nodiscard]] absl::Status LaunchHostFunction(GpuStream stream, void (*fn)(void*), void* data);
// True when `stream` is capturing a graph.
[[nodiscard]] absl::StatusOr<bool> IsCapturing(GpuStream stream);
// Pinned, device-mapped host memory for the engine (OffloadHostMemory).
OffloadHostMemory MappedHostMemory();

}  // namespace offload_gpu

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_GPU_OFFLOAD_KERNELS_H_
