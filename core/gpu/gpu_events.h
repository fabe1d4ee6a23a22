// mempipe core/gpu: events and stream-ordered copies for host code that must not include a
// vendor header (the GPU page selector): completion by event instead of a host wait.
//
//   MEMPIPE_ASSIGN_OR_RETURN(GpuEventOwner done, GpuEventOwner::Create());
//   MEMPIPE_RETURN_IF_ERROR(CopyToDeviceAsync(dev, host, bytes, stream));
//   ... launches on `stream` ...
//   MEMPIPE_RETURN_IF_ERROR(done.Record(stream));
//   MEMPIPE_ASSIGN_OR_RETURN(bool finished, done.Query());   // never blocks
#ifndef MEMPIPE_CORE_GPU_GPU_EVENTS_H_
#define MEMPIPE_CORE_GPU_GPU_EVENTS_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe {

// An owned event (timing disabled) of the current device.
class GpuEventOwner {
 public:
  GpuEventOwner() = default;
  GpuEventOwner(GpuEventOwner&& other) noexcept;
  GpuEventOwner& operator=(GpuEventOwner&& other) noexcept;
  GpuEventOwner(const GpuEventOwner&) = delete;
  GpuEventOwner& operator=(const GpuEventOwner&) = delete;
  ~GpuEventOwner();

  [[nodiscard]] static absl::StatusOr<GpuEventOwner> Create();
  // Marks the point in `stream` that Query / Synchronize wait for.
  [[nodiscard]] absl::Status Record(GpuStream stream);
  // True once the work before the recorded point has finished; an asynchronous kernel error
  // of that work is returned as Internal.
  [[nodiscard]] absl::StatusOr<bool> Query() const;
  [[nodiscard]] absl::Status Synchronize() const;

 private:
  void* event_ = nullptr;  // hipEvent_t
};

// Owned page-locked host memory: copies from and to it are truly asynchronous.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  ~PinnedHostBuffer();

  [[nodiscard]] static absl::StatusOr<PinnedHostBuffer> Allocate(size_t bytes);
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Stream-ordered copies (host memory may be pageable; then the host copy is staged first).
[[nodiscard]] absl::Status CopyToDeviceAsync(void* device_dst, const void* src, size_t bytes,
                                             GpuStream stream);
[[nodiscard]] absl::Status CopyToHostAsync(void* dst, const void* device_src, size_t bytes,
                                           GpuStream stream);

}  // namespace mempipe

#endif  // MEMPIPE_CORE_GPU_GPU_EVENTS_H_
