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
#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mempipe {

using GpuStream = void*;

// A device-resident switch for one launch (the offload's fallback, backend/gpu/): with `flag`
// set, the launch's kernels do their work only when *flag == 0 (run_when_zero) or *flag != 0
// (otherwise); their blocks exit at once when it does not hold. The kernels read the flag, so
// no host reads it: stream-ordered and capturable in a CUDA graph. nullptr: always run.
struct DevicePredicate {
  const int32_t* flag = nullptr;  // [1] int32, device memory
  bool run_when_zero = true;
};

// Number of usable devices; 0 when there is no device or no driver (never an error).
int GpuDeviceCount();

// Streaming multiprocessors (NVIDIA) / compute units (AMD) of the current device.
[[nodiscard]] absl::StatusOr<int> GpuMultiprocessorCount();

// Waits for all work on the current device; reports any asynchronous kernel error.
[[nodiscard]] absl::Status GpuSynchronize();

// Returns the last launch error of this thread, if any, as an InternalError naming `what`.
[[nodiscard]] absl::Status GpuLastError(const char* what);

// Copies `bytes` of device memory to the host in `stream` order and waits for that stream: a
// host synchronization, for checked modes and tests, never for the decode path.
[[nodiscard]] absl::Status CopyToHostSync(void* dst, const void* device_src, size_t bytes,
                                          GpuStream stream);

// An owned non-blocking stream of the current device.
class GpuStreamOwner {
 public:
  GpuStreamOwner() = default;
  GpuStreamOwner(GpuStreamOwner&& other) noexcept;
  GpuStreamOwner& operator=(GpuStreamOwner&& other) noexcept;
  GpuStreamOwner(const GpuStreamOwner&) = delete;
  GpuStreamOwner& operator=(const GpuStreamOwner&) = delete;
  ~GpuStreamOwner();

  [[nodiscard]] static absl::StatusOr<GpuStreamOwner> Create();
  GpuStream get() const { return stream_; }
  // Waits for the work queued on this stream; reports an asynchronous kernel error.
  [[nodiscard]] absl::Status Synchronize() const;

 private:
  GpuStream stream_ = nullptr;
};

// A CUDA/HIP graph captured from the work `record` queues on `stream` (thread-local capture:
// the calls must not synchronize the host or allocate outside the stream's pool), then
// instantiated. Replaying it re-runs the same kernels on the same addresses; new inputs are
// written into those buffers before Launch.
//   MEMPIPE_ASSIGN_OR_RETURN(GpuGraph g, GpuGraph::Capture(s.get(), [&] { return Step(s); }));
//   MEMPIPE_RETURN_IF_ERROR(g.Launch(s.get()));
class GpuGraph {
 public:
  GpuGraph() = default;
  GpuGraph(GpuGraph&& other) noexcept;
  GpuGraph& operator=(GpuGraph&& other) noexcept;
  GpuGraph(const GpuGraph&) = delete;
  GpuGraph& operator=(const GpuGraph&) = delete;
  ~GpuGraph();

  // Errors: the first error `record` returns (the capture is then ended and discarded), or
  // Internal for a capture/instantiation failure (e.g. a host synchronization inside).
  [[nodiscard]] static absl::StatusOr<GpuGraph> Capture(GpuStream stream,
                                                        absl::FunctionRef<absl::Status()> record);
  [[nodiscard]] absl::Status Launch(GpuStream stream) const;

 private:
  void Reset();
  void* graph_ = nullptr;  // hipGraph_t
  void* exec_ = nullptr;   // hipGraphExec_t
};

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
