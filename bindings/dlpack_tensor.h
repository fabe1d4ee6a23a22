// mempipe bindings: borrowing tensors from Python through DLPack, without copies.
//
// Any object with `__dlpack__` (torch.Tensor, numpy.ndarray, cupy, jax ...) is accepted. The
// capsule it returns is kept alive for the duration of one call and never consumed, so the
// producer keeps ownership and its memory is used in place: what the kernels write lands in the
// caller's tensor.
//
//   BorrowedTensor kv = ValueOrThrow(BorrowTensor(obj, "kv_cache"));
//   ThrowIfError(kv.RequireRank(5));
//   KvCacheView view{kv.data, ValueOrThrow(kv.FloatDType()), ...};
//
// Device handling: every borrowed tensor records its DLPack device. The module's functions
// require that all tensors of one call share a device (kDLCUDAHost pinned memory counts as
// the CPU); host tensors run the CPU code, kDLCUDA tensors the GPU launchers of a CUDA build,
// on the stream the caller names (see module.cc).
#ifndef MEMPIPE_BINDINGS_DLPACK_TENSOR_H_
#define MEMPIPE_BINDINGS_DLPACK_TENSOR_H_

#include <dlpack/dlpack.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"

namespace mempipe::bindings {

namespace py = pybind11;

// Element types the kernels read: the three storage dtypes, the two index types, bytes (GPU
// workspaces) and int8 digest codes.
enum class ElemType { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8, kInt8 };

std::string ElemTypeName(ElemType t);

// "cpu:0", "cuda:1", "rocm:0", "cuda_host:0" ...
std::string DeviceName(const DLDevice& device);
// True for memory the CPU code can read (kDLCPU, and kDLCUDAHost pinned memory).
bool IsHostDevice(const DLDevice& device);

struct BorrowedTensor {
  std::string name;      // argument name, for error messages
  py::object capsule;    // keeps the producer's DLManagedTensor alive
  void* data = nullptr;  // first element (DLTensor.data + byte_offset)
  ElemType type = ElemType::kFloat32;
  DLDevice device{kDLCPU, 0};
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, per dimension; filled only when borrowed with
                                 // strided = true (otherwise the tensor is C-contiguous)

  int Rank() const { return static_cast<int>(shape.size()); }
  // "kv_cache (cuda:0, bfloat16, shape [2, 64, 16, 8, 128])": what an error message names.
  std::string Describe() const;
  int64_t NumElems() const;
  // The storage dtype of a float tensor (fp32/fp16/bf16); InvalidArgument for an index tensor.
  absl::StatusOr<DType> FloatDType() const;

  absl::Status RequireRank(int rank) const;
  absl::Status RequireType(ElemType t) const;
  // Dimension `dim` must equal `expected`; `what` names the dimension in the message.
  absl::Status RequireDim(int dim, int64_t expected, const char* what) const;
};

// Borrows `obj` through `obj.__dlpack__()`. Errors (InvalidArgument, naming `name`): no
// `__dlpack__`, an unsupported dtype, lanes != 1, or, unless `strided`, a layout that is not
// C-contiguous (with `strided` the caller checks `strides` itself).
absl::StatusOr<BorrowedTensor> BorrowTensor(const py::handle& obj, const std::string& name,
                                            bool strided = false);

// Raises the Python exception that matches `status` (ValueError for InvalidArgument,
// OutOfRange and FailedPrecondition; NotImplementedError for Unimplemented; TimeoutError for
// DeadlineExceeded; MemoryError for ResourceExhausted; RuntimeError otherwise), message intact.
// Must be called with the GIL held.
void ThrowIfError(const absl::Status& status);

template <typename T>
T ValueOrThrow(absl::StatusOr<T> v) {
  ThrowIfError(v.status());
  return *std::move(v);
}

}  // namespace mempipe::bindings

#endif  // MEMPIPE_BINDINGS_DLPACK_TENSOR_H_
