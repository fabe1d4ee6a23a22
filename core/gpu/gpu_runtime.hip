#include <utility>

#include "absl/strings/str_cat.h"
#include "core/gpu/gpu_compat.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe {
namespace {

absl::Status Check(hipError_t err, const char* what) {
  if (err == hipSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", hipGetErrorString(err)));
}

}  // namespace

int GpuDeviceCount() {
  int n = 0;
  if (hipGetDeviceCount(&n) != hipSuccess) {
    (void)hipGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

absl::StatusOr<int> GpuMultiprocessorCount() {
  int dev = 0;
  if (absl::Status s = Check(hipGetDevice(&dev), "hipGetDevice"); !s.ok()) return s;
  int n = 0;
  if (absl::Status s = Check(hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, dev),
                             "hipDeviceGetAttribute");
      !s.ok()) {
    return s;
  }
  return n;
}

absl::Status GpuSynchronize() { return Check(hipDeviceSynchronize(), "hipDeviceSynchronize"); }

absl::Status GpuLastError(const char* what) { return Check(hipGetLastError(), what); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) (void)hipFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) (void)hipFree(data_);
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  if (absl::Status s = Check(hipMalloc(&b.data_, bytes), "hipMalloc"); !s.ok()) {
    b.data_ = nullptr;
    return absl::ResourceExhaustedError(absl::StrCat(s.message(), " (", bytes, " bytes)"));
  }
  b.size_ = bytes;
  return b;
}

absl::Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("copy of ", bytes, " bytes into a ", size_, "-byte device buffer"));
  }
  return Check(hipMemcpy(data_, src, bytes, hipMemcpyHostToDevice), "hipMemcpy H2D");
}

absl::Status DeviceBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("copy of ", bytes, " bytes out of a ", size_, "-byte device buffer"));
  }
  return Check(hipMemcpy(dst, data_, bytes, hipMemcpyDeviceToHost), "hipMemcpy D2H");
}

}  // namespace mempipe
