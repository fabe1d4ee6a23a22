// mempipe backend/gpu: the offload's kernels -- the gate, the staging copy and the wait.
//
//   GateKernel       1 block x 32: polls the mapped control block until the next request's
//                    staging entry is free (OffloadGateOpen over a ring: 1 entry for a select
//                    slot, the layer's append ring for keys) up to a timeout; writes gate_ok
//                    (device: 0 closed, else 1 + the entry) and, when closed, control->skip.
//   StageCopyKernel  grid-stride copy of up to three device -> mapped-host segments into the
//                    entry the gate picked, skipped when gate_ok == 0.
//   WaitKernel       1 block x 256: thread 0 polls the mapped result word until its sequence
//                    number is the slot's issued one or the deadline passes (GPU global timer);
//                    then the block copies the staged selection (mapped host) into the caller's
//                    device pages/counts (rows of k, padded with -1) when the code is 0.
// Mapped host memory is read with volatile loads (never cached on the GPU) and fenced at
// system scope after the flag is seen, so the data read after it is the data published before it.
#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "backend/gpu/offload_kernels.h"
#include "core/gpu/gpu_compat.h"

namespace mempipe::offload_gpu {
namespace {

using SlotControl = OffloadSlotControl;

constexpr int kWaitThreads = 256;
constexpr int kCopyThreads = 256;

absl::Status Check(hipError_t err, const char* what) {
  if (err == hipSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", hipGetErrorString(err)));
}

// The control block's words, read and written through volatile pointers (mapped host memory;
// std::atomic<uint32_t> has the layout of uint32_t).
__device__ __forceinline__ uint32_t LoadU32(const std::atomic<uint32_t>& a) {
  return *reinterpret_cast<const volatile uint32_t*>(&a);
}
__device__ __forceinline__ uint64_t LoadU64(const std::atomic<uint64_t>& a) {
  return *reinterpret_cast<const volatile uint64_t*>(&a);
}

__global__ void GateKernel(SlotControl* control, int32_t* gate_ok, int64_t* stamp_ns,
                           int64_t timeout_ns, uint32_t ring) {
  if (threadIdx.x != 0) return;
  const int64_t start = gpu::GlobalTimerNs();
  if (stamp_ns != nullptr) *stamp_ns = start;
  // The previous request's host function ran before this kernel (stream order): `issued` is
  // final, and the next request takes issued + 1.
  const uint32_t issued = LoadU32(control->issued);
  bool open = false;
  for (;;) {
    open = OffloadGateOpen(issued, LoadU32(control->holder), LoadU32(control->released), ring);
    if (open || gpu::GlobalTimerNs() - start > timeout_ns) break;
    gpu::PollPause();
  }
  *gate_ok = open ? 1 + static_cast<int32_t>(OffloadRingEntry(issued + 1, ring)) : 0;
  if (!open) {
    *reinterpret_cast<volatile int32_t*>(&control->skip) = 1;
    __threadfence_system();
  }
}

struct CopyArgs {
  CopySegment seg[3];
  int count;
  const int32_t* gate_ok;
  size_t entry_bytes;
};

__global__ void StageCopyKernel(CopyArgs a) {
  const int32_t gate = *a.gate_ok;
  if (gate == 0) return;
  const size_t entry_offset = static_cast<size_t>(gate - 1) * a.entry_bytes;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int s = 0; s < a.count; ++s) {
    const CopySegment& g = a.seg[s];
    uint8_t* const g_dst = static_cast<uint8_t*>(g.dst) + entry_offset;
    // 16-byte words where both ends allow it (the staging offsets are 64-byte aligned), bytes
    // for the tail.
    const bool wide = reinterpret_cast<uintptr_t>(g.src) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(g_dst) % 16 == 0;
    size_t done = 0;
    if (wide) {
      const size_t words = g.bytes / 16;
      const uint4* src = static_cast<const uint4*>(g.src);
      uint4* dst = reinterpret_cast<uint4*>(g_dst);
      for (size_t i = tid; i < words; i += stride) dst[i] = src[i];
      done = words * 16;
    }
    const auto* src = static_cast<const uint8_t*>(g.src);
    auto* dst = g_dst;
    for (size_t i = done + tid; i < g.bytes; i += stride) dst[i] = src[i];
  }
  // The host function that follows reads this memory: make the writes visible system-wide.
  __threadfence_system();
}

__global__ void __launch_bounds__(kWaitThreads) WaitKernel(WaitArgs a) {
  __shared__ int s_code;
  __shared__ int64_t s_start;
  if (threadIdx.x == 0) {
    const int64_t start = gpu::GlobalTimerNs();
    const uint32_t expected = LoadU32(a.control->issued);
    const int64_t deadline = *a.stamp_ns + a.deadline_ns;
    int code = static_cast<int>(OffloadReason::kTimeout);
    for (;;) {
      const uint64_t r = LoadU64(a.control->result);
      if (OffloadResultSeq(r) == expected) {
        code = OffloadResultCode(r);
        break;
      }
      if (gpu::GlobalTimerNs() > deadline) break;
      gpu::PollPause();
    }
    __threadfence_system();
    s_code = code;
    s_start = start;
  }
  __syncthreads();
  const int code = s_code;
  if (code == static_cast<int>(OffloadReason::kSelected)) {
    const volatile int32_t* pages = a.staged_pages;
    const volatile int32_t* counts = a.staged_counts;
    const size_t cells = static_cast<size_t>(a.rows) * a.max_selected;
    for (size_t i = threadIdx.x; i < cells; i += blockDim.x) {
      const size_t row = i / a.max_selected;
      const int j = static_cast<int>(i % a.max_selected);
      a.out_pages[i] = j < a.k ? pages[row * a.k + j] : -1;
    }
    for (int i = threadIdx.x; i < a.rows; i += blockDim.x) a.out_counts[i] = counts[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a.status[0] = code;
    atomicAdd(&a.counters[OffloadDeviceCounters::kWaited + code], 1ull);
    atomicAdd(&a.counters[OffloadDeviceCounters::kWaitNs],
              static_cast<unsigned long long>(gpu::GlobalTimerNs() - s_start));
    if (code == static_cast<int>(OffloadReason::kSelected)) {
      atomicAdd(&a.counters[OffloadDeviceCounters::kSelectionBytes],
                static_cast<unsigned long long>(a.rows) * (a.k + 1) * sizeof(int32_t));
    }
  }
}

}  // namespace

absl::Status LaunchGate(SlotControl* control, int32_t* gate_ok, int64_t* stamp_ns,
                        int64_t timeout_ns, int ring, GpuStream stream) {
  if (ring < 1) return absl::InvalidArgumentError(absl::StrCat("ring must be >= 1, got ", ring));
  GateKernel<<<1, 32, 0, static_cast<hipStream_t>(stream)>>>(control, gate_ok, stamp_ns, timeout_ns,
                                                             static_cast<uint32_t>(ring));
  return Check(hipGetLastError(), "offload GateKernel launch");
}

absl::Status LaunchStageCopy(const CopySegment* segments, int count, const int32_t* gate_ok,
                             size_t entry_bytes, GpuStream stream) {
  if (count < 0 || count > 3) {
    return absl::InvalidArgumentError(absl::StrCat("1 to 3 copy segments, got ", count));
  }
  CopyArgs a{};
  size_t most = 0;
  for (int i = 0; i < count; ++i) {
    a.seg[i] = segments[i];
    most = std::max(most, segments[i].bytes);
  }
  a.count = count;
  a.gate_ok = gate_ok;
  a.entry_bytes = entry_bytes;
  const int blocks =
      static_cast<int>(std::clamp<size_t>((most / 16 + kCopyThreads - 1) / kCopyThreads, 1, 256));
  StageCopyKernel<<<blocks, kCopyThreads, 0, static_cast<hipStream_t>(stream)>>>(a);
  return Check(hipGetLastError(), "offload StageCopyKernel launch");
}

absl::Status LaunchWait(const WaitArgs& args, GpuStream stream) {
  WaitKernel<<<1, kWaitThreads, 0, static_cast<hipStream_t>(stream)>>>(args);
  return Check(hipGetLastError(), "offload WaitKernel launch");
}

absl::Status LaunchHostFunction(GpuStream stream, void (*fn)(void*), void* data) {
  return Check(hipLaunchHostFunc(static_cast<hipStream_t>(stream), fn, data), "hipLaunchHostFunc");
}

absl::StatusOr<bool> IsCapturing(GpuStream stream) {
  hipStreamCaptureStatus status = hipStreamCaptureStatusNone;
  const hipError_t err = hipStreamIsCapturing(static_cast<hipStream_t>(stream), &status);
  if (err != hipSuccess) return Check(err, "hipStreamIsCapturing");
  return status != hipStreamCaptureStatusNone;
}

OffloadHostMemory MappedHostMemory() {
  OffloadHostMemory m;
  m.allocate = [](size_t bytes) -> absl::StatusOr<void*> {
    void* p = nullptr;
    const hipError_t err = hipHostMalloc(&p, std::max<size_t>(bytes, 64), hipHostMallocMapped);
    if (err != hipSuccess) {
      return absl::ResourceExhaustedError(absl::StrCat("pinned mapped host allocation of ", bytes,
                                                       " bytes failed: ", hipGetErrorString(err)));
    }
    return p;
  };
  m.release = [](void* p) { (void)hipHostFree(p); };
  m.device_pointer = [](void* p) -> void* {
    void* d = nullptr;
    if (hipHostGetDevicePointer(&d, p, 0) != hipSuccess) {
      (void)hipGetLastError();
      return nullptr;
    }
    return d;
  };
  return m;
}

}  // namespace mempipe::offload_gpu
