// mempipe backend: what the selection-offload engine (backend/selection_offload.h) shares with
// the GPU kernels that consume its results (backend/gpu/): the reason codes, the per-slot
// control block in host memory (pinned and mapped on the GPU) and the host-memory hooks. Kept
// free of anything a device compiler should not see.
#ifndef MEMPIPE_BACKEND_OFFLOAD_CONTROL_H_
#define MEMPIPE_BACKEND_OFFLOAD_CONTROL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mempipe {

// What a consumer got for one request. The values are shared with the GPU wait kernel and the
// Python binding's `status` tensor: 0 is the selector's (validated) selection, anything else a
// fallback reason.
enum class OffloadReason : int32_t {
  kSelected = 0,
  kTimeout = 1,  // the deadline passed before the result arrived
  kError = 2,    // the selector (or the request) failed
  kDead = 3,     // the selector was declared dead earlier
  kInvalid = 4,  // the selector reported success with a malformed selection (ValidateSelection)
  kBusy = 5,     // the slot's previous request still held its inputs, or the channel was full
};
inline constexpr int kNumOffloadReasons = 6;
absl::string_view OffloadReasonName(OffloadReason reason);

// Host memory for the staging buffers and control blocks: plain memory in CPU mode, pinned and
// device-mapped on the GPU. `device_pointer` maps a host pointer of an allocation to the address
// a kernel uses (identity on the host).
struct OffloadHostMemory {
  std::function<absl::StatusOr<void*>(size_t bytes)> allocate;
  std::function<void(void*)> release;
  std::function<void*(void*)> device_pointer;
};
// 64-byte aligned operator new / delete, identity device pointer.
OffloadHostMemory PlainHostMemory();

// Per-slot control block, shared with the GPU kernels (one cache line; std::atomic<uintN_t>
// has the layout of uintN_t, which the kernels read through volatile pointers). Sequence
// numbers start at 1; 0 means "none yet".
struct alignas(64) OffloadSlotControl {
  std::atomic<uint32_t> issued{0};    // newest request (IssueSelect / IssueAppend)
  std::atomic<uint32_t> holder{0};    // newest request whose inputs were handed to the selector
  std::atomic<uint32_t> released{0};  // newest request whose inputs the selector is done with
  std::atomic<int32_t> skip{0};       // the stage kernel found the gate closed: no copy made
  // (seq << 32) | OffloadReason of the newest published result. Only ever moves forward
  // (compare-exchange), so a late publish of an older request cannot hide a newer one.
  std::atomic<uint64_t> result{0};
};
static_assert(sizeof(std::atomic<uint32_t>) == 4 && sizeof(std::atomic<uint64_t>) == 8);

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEMPIPE_OFFLOAD_HD __host__ __device__
#else
#define MEMPIPE_OFFLOAD_HD
#endif
MEMPIPE_OFFLOAD_HD constexpr uint32_t OffloadResultSeq(uint64_t r) {
  return static_cast<uint32_t>(r >> 32);
}
MEMPIPE_OFFLOAD_HD constexpr int32_t OffloadResultCode(uint64_t r) {
  return static_cast<int32_t>(r & 0xffffffffu);
}
// The gate of a request's staging (host and GPU alike): the next request (sequence number
// issued + 1) writes staging entry (issued % ring) of a ring of `ring` entries (1 for a select
// slot; the layer's append ring for key appends), which is free once every request that used it
// and was handed to the selector (sequence numbers up to issued + 1 - ring, and at most
// `holder`: a request never handed over reads nothing) has been released. The selector
// releases a control's requests in order. Serial-number arithmetic: the counters may wrap.
MEMPIPE_OFFLOAD_HD constexpr bool OffloadGateOpen(uint32_t issued, uint32_t holder,
                                                  uint32_t released, uint32_t ring) {
  const uint32_t need = issued + 1 - ring;  // the newest request that used the same entry
  const uint32_t target = static_cast<int32_t>(holder - need) < 0 ? holder : need;
  return static_cast<int32_t>(released - target) >= 0;
}
// The ring entry of request `seq` (>= 1).
MEMPIPE_OFFLOAD_HD constexpr uint32_t OffloadRingEntry(uint32_t seq, uint32_t ring) {
  return (seq - 1) % ring;
}
#undef MEMPIPE_OFFLOAD_HD

// Device-resident counters the GPU wait kernel keeps (uint64 each).
struct OffloadDeviceCounters {
  static constexpr int kWaited = 0;                    // [kNumOffloadReasons] by reason
  static constexpr int kWaitNs = kNumOffloadReasons;   // GPU time inside wait kernels
  static constexpr int kSelectionBytes = kWaitNs + 1;  // selections copied host -> GPU
  static constexpr int kCount = kSelectionBytes + 1;
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_OFFLOAD_CONTROL_H_
