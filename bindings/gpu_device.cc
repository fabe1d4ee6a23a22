#include "bindings/gpu_device.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"

namespace mempipe::bindings {
namespace {

absl::Status CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace

absl::StatusOr<ScopedDevice> ScopedDevice::Enter(int device) {
  int previous = 0;
  if (absl::Status s = CudaError(cudaGetDevice(&previous), "cudaGetDevice"); !s.ok()) return s;
  if (previous == device) return ScopedDevice(-1);
  int count = 0;
  if (absl::Status s = CudaError(cudaGetDeviceCount(&count), "cudaGetDeviceCount"); !s.ok()) {
    return s;
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " devices)"));
  }
  if (absl::Status s = CudaError(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  return ScopedDevice(previous);
}

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

absl::Status CheckStreamDevice(GpuStream stream, int device) {
  const auto handle = reinterpret_cast<uintptr_t>(stream);
  if (handle <= 2) return absl::OkStatus();  // default-stream aliases: valid on every device
  // NOTE: a capturing stream is not queried (querying may invalidate a global-mode capture);
  // a launch on a stream of another device fails the capture anyway.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &capture) == cudaSuccess &&
      capture != cudaStreamCaptureStatusNone) {
    return absl::OkStatus();
  }
#if CUDART_VERSION >= 12080
  int stream_device = -1;
  if (absl::Status s =
          CudaError(cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &stream_device),
                    "cudaStreamGetDevice");
      !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stream 0x", absl::Hex(handle), " is not a valid CUDA stream (", s.message(), ")"));
  }
  if (stream_device != device) {
    return absl::FailedPreconditionError(absl::StrCat("stream 0x", absl::Hex(handle),
                                                      " belongs to cuda:", stream_device,
                                                      " but the tensors are on cuda:", device));
  }
#else
  (void)device;  // NOTE: older runtimes cannot tell a stream's device; the launch would fail.
#endif
  return absl::OkStatus();
}

}  // namespace mempipe::bindings
