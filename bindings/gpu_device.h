// mempipe bindings: the CUDA device and stream of one call (CUDA builds of the module only).
//
// The launchers run on the calling thread's current device and take the stream as an opaque
// handle. The module makes the tensors' device current for the duration of a call and checks
// that a stream the caller names belongs to that device:
//
//   MEMPIPE_ASSIGN_OR_RETURN(ScopedDevice guard, ScopedDevice::Enter(tensor_device_id));
//   MEMPIPE_RETURN_IF_ERROR(CheckStreamDevice(stream, tensor_device_id, "cuda:0"));
#ifndef MEMPIPE_BINDINGS_GPU_DEVICE_H_
#define MEMPIPE_BINDINGS_GPU_DEVICE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe::bindings {

// Makes `device` the current device and restores the previous one when destroyed.
class ScopedDevice {
 public:
  [[nodiscard]] static absl::StatusOr<ScopedDevice> Enter(int device);
  ScopedDevice(ScopedDevice&& other) noexcept : previous_(other.previous_) { other.previous_ = -1; }
  ScopedDevice& operator=(ScopedDevice&&) = delete;
  ScopedDevice(const ScopedDevice&) = delete;
  ~ScopedDevice();

 private:
  explicit ScopedDevice(int previous) : previous_(previous) {}
  int previous_;  // -1: nothing to restore
};

// FailedPrecondition when `stream` (a cudaStream_t) was created on a device other than
// `device`; the special handles 0 (legacy default), 1 and 2 (per-thread default) pass.
[[nodiscard]] absl::Status CheckStreamDevice(GpuStream stream, int device);

}  // namespace mempipe::bindings

#endif  // MEMPIPE_BINDINGS_GPU_DEVICE_H_
