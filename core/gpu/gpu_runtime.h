// mempipe core/gpu: runtime helpers for host code that must not include a vendor header (tests,
// launchers' callers): device discovery, device buffers, copies, and error translation.
// Streams travel as the opaque `GpuStream` (a hipStream_t / cudaStream_t; nullptr is the
// default stream).
//
//   if (mempipe::GpuDeviceCount() == 0) GTEST_SKIP() << "no GPU";
//   MEMPIPE_ASSIGN_OR_RETURN(auto buf, mempipe::DeviceBuffer::Allocate(bytes));
//   MEMPIPE_RETURN_IF_ERROR(buf.CopyFromHost(host_ptr, bytes));
#ifndef MEMPIPE_CORE_GPU_GPU_RUNTIME_H_
#define MEMPIPE_CORE_GPU_GPU_RUNTIME_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mempipe {

using GpuStream = void*;

// Number of usable devices; 0 when there is no device or no driver (never an error).
int GpuDeviceCount();

// Streaming multiprocessors (NVIDIA) / compute units (AMD) of the current device.
[[nodiscard]] absl::StatusOr<int> GpuMultiprocessorCount();

// Waits for all work on the current device; reports any asynchronous kernel error.
[[nodiscard]] absl::Status GpuSynchronize();

// Returns the last launch error of this thread, if any, as an InternalError naming `what`.
[[nodiscard]] absl::Status GpuLastError(const char* what);

// Owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  [[nodiscard]] static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);

  [[nodiscard]] absl::Status CopyFromHost(const void* src, size_t bytes);
  [[nodiscard]] absl::Status CopyToHost(void* dst, size_t bytes) const;

  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace mempipe

#endif  // MEMPIPE_CORE_GPU_GPU_RUNTIME_H_
