#include <utility>

#include "absl/strings/str_cat.h"
#include "core/gpu/gpu_compat.h"
#include "core/gpu/gpu_events.h"

namespace mempipe {
namespace {

absl::Status Check(hipError_t err, const char* what) {
  if (err == hipSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", hipGetErrorString(err)));
}

}  // namespace

GpuEventOwner::GpuEventOwner(GpuEventOwner&& other) noexcept
    : event_(std::exchange(other.event_, nullptr)) {}

GpuEventOwner& GpuEventOwner::operator=(GpuEventOwner&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) (void)hipEventDestroy(static_cast<hipEvent_t>(event_));
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

GpuEventOwner::~GpuEventOwner() {
  if (event_ != nullptr) (void)hipEventDestroy(static_cast<hipEvent_t>(event_));
}

absl::StatusOr<GpuEventOwner> GpuEventOwner::Create() {
  GpuEventOwner e;
  hipEvent_t ev = nullptr;
  if (absl::Status s =
          Check(hipEventCreateWithFlags(&ev, hipEventDisableTiming), "hipEventCreateWithFlags");
      !s.ok()) {
    return s;
  }
  e.event_ = ev;
  return e;
}

absl::Status GpuEventOwner::Record(GpuStream stream) {
  return Check(hipEventRecord(static_cast<hipEvent_t>(event_), static_cast<hipStream_t>(stream)),
               "hipEventRecord");
}

absl::StatusOr<bool> GpuEventOwner::Query() const {
  const hipError_t err = hipEventQuery(static_cast<hipEvent_t>(event_));
  if (err == hipSuccess) return true;
  if (err == hipErrorNotReady) {
    (void)hipGetLastError();  // not an error: clear it
    return false;
  }
  return Check(err, "hipEventQuery");
}

absl::Status GpuEventOwner::Synchronize() const {
  return Check(hipEventSynchronize(static_cast<hipEvent_t>(event_)), "hipEventSynchronize");
}

PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) (void)hipHostFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (data_ != nullptr) (void)hipHostFree(data_);
}

absl::StatusOr<PinnedHostBuffer> PinnedHostBuffer::Allocate(size_t bytes) {
  PinnedHostBuffer b;
  if (bytes == 0) return b;
  if (absl::Status s = Check(hipHostMalloc(&b.data_, bytes, 0), "hipHostMalloc"); !s.ok()) {
    b.data_ = nullptr;
    return absl::ResourceExhaustedError(
        absl::StrCat("pinned host allocation of ", bytes, " bytes failed: ", s.message()));
  }
  b.size_ = bytes;
  return b;
}

absl::Status CopyToDeviceAsync(void* device_dst, const void* src, size_t bytes, GpuStream stream) {
  if (bytes == 0) return absl::OkStatus();
  return Check(hipMemcpyAsync(device_dst, src, bytes, hipMemcpyHostToDevice,
                              static_cast<hipStream_t>(stream)),
               "hipMemcpyAsync (to device)");
}

absl::Status CopyToHostAsync(void* dst, const void* device_src, size_t bytes, GpuStream stream) {
  if (bytes == 0) return absl::OkStatus();
  return Check(hipMemcpyAsync(dst, device_src, bytes, hipMemcpyDeviceToHost,
                              static_cast<hipStream_t>(stream)),
               "hipMemcpyAsync (to host)");
}

}  // namespace mempipe
