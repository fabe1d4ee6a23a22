#include <utility>

#include "absl/strings/str_cat.h"
#include "core/gpu/gpu_compat.h"
#include "core/gpu/gpu_runtime.h"
#include "core/status_macros.h"

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

absl::Status CopyToHostSync(void* dst, const void* device_src, size_t bytes, GpuStream stream) {
  if (bytes == 0) return absl::OkStatus();
  const auto s = static_cast<hipStream_t>(stream);
  MEMPIPE_RETURN_IF_ERROR(
      Check(hipMemcpyAsync(dst, device_src, bytes, hipMemcpyDeviceToHost, s), "hipMemcpyAsync"));
  return Check(hipStreamSynchronize(s), "hipStreamSynchronize");
}

GpuStreamOwner::GpuStreamOwner(GpuStreamOwner&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

GpuStreamOwner& GpuStreamOwner::operator=(GpuStreamOwner&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)hipStreamDestroy(static_cast<hipStream_t>(stream_));
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

GpuStreamOwner::~GpuStreamOwner() {
  if (stream_ != nullptr) (void)hipStreamDestroy(static_cast<hipStream_t>(stream_));
}

absl::StatusOr<GpuStreamOwner> GpuStreamOwner::Create() {
  GpuStreamOwner o;
  hipStream_t s = nullptr;
  MEMPIPE_RETURN_IF_ERROR(
      Check(hipStreamCreateWithFlags(&s, hipStreamNonBlocking), "hipStreamCreateWithFlags"));
  o.stream_ = s;
  return o;
}

absl::Status GpuStreamOwner::Synchronize() const {
  return Check(hipStreamSynchronize(static_cast<hipStream_t>(stream_)), "hipStreamSynchronize");
}

GpuGraph::GpuGraph(GpuGraph&& other) noexcept
    : graph_(std::exchange(other.graph_, nullptr)), exec_(std::exchange(other.exec_, nullptr)) {}

GpuGraph& GpuGraph::operator=(GpuGraph&& other) noexcept {
  if (this != &other) {
    Reset();
    graph_ = std::exchange(other.graph_, nullptr);
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

GpuGraph::~GpuGraph() { Reset(); }

void GpuGraph::Reset() {
  if (exec_ != nullptr) (void)hipGraphExecDestroy(static_cast<hipGraphExec_t>(exec_));
  if (graph_ != nullptr) (void)hipGraphDestroy(static_cast<hipGraph_t>(graph_));
  exec_ = graph_ = nullptr;
}

absl::StatusOr<GpuGraph> GpuGraph::Capture(GpuStream stream,
                                           absl::FunctionRef<absl::Status()> record) {
  const auto s = static_cast<hipStream_t>(stream);
  MEMPIPE_RETURN_IF_ERROR(
      Check(hipStreamBeginCapture(s, hipStreamCaptureModeThreadLocal), "hipStreamBeginCapture"));
  const absl::Status recorded = record();
  hipGraph_t graph = nullptr;
  const absl::Status ended = Check(hipStreamEndCapture(s, &graph), "hipStreamEndCapture");
  GpuGraph g;
  g.graph_ = graph;
  if (!recorded.ok()) return recorded;
  MEMPIPE_RETURN_IF_ERROR(ended);
  hipGraphExec_t exec = nullptr;
  MEMPIPE_RETURN_IF_ERROR(
      Check(hipGraphInstantiateWithFlags(&exec, graph, 0), "hipGraphInstantiateWithFlags"));
  g.exec_ = exec;
  return g;
}

absl::Status GpuGraph::Launch(GpuStream stream) const {
  if (exec_ == nullptr) return absl::FailedPreconditionError("GpuGraph: nothing captured");
  return Check(hipGraphLaunch(static_cast<hipGraphExec_t>(exec_), static_cast<hipStream_t>(stream)),
               "hipGraphLaunch");
}

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
