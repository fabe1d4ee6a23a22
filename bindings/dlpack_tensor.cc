#include "bindings/dlpack_tensor.h"

#include <Python.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mempipe::bindings {
namespace {

absl::StatusOr<ElemType> ToElemType(const DLDataType& t, const std::string& name) {
  if (t.lanes != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": vector dtypes are not supported, got lanes=", t.lanes));
  }
  if (t.code == kDLFloat && t.bits == 32) return ElemType::kFloat32;
  if (t.code == kDLFloat && t.bits == 16) return ElemType::kFloat16;
  if (t.code == kDLBfloat && t.bits == 16) return ElemType::kBFloat16;
  if (t.code == kDLInt && t.bits == 32) return ElemType::kInt32;
  if (t.code == kDLInt && t.bits == 64) return ElemType::kInt64;
  if (t.code == kDLUInt && t.bits == 8) return ElemType::kUInt8;
  if (t.code == kDLInt && t.bits == 8) return ElemType::kInt8;
  return absl::InvalidArgumentError(
      absl::StrCat(name,
                   ": dtype must be float32, float16, bfloat16, int32, int64, uint8 or int8; "
                   "got DLPack code ",
                   static_cast<int>(t.code), " bits ", static_cast<int>(t.bits)));
}

// A torch.Tensor's capsule from torch._C._to_dlpack, the C function behind Tensor.__dlpack__:
// the same legacy "dltensor" capsule (no stream synchronization either way) for ~0.5 us, where
// the Python method's argument checks cost 3-9 us per tensor, i.e. tens of us per call.
// torch is never imported here; once the caller has imported it, it is looked up once.
py::object TorchCapsule(const py::handle& obj) {
  static PyObject* tensor_type = nullptr;  // NOTE: borrowed for the process lifetime
  static PyObject* to_dlpack = nullptr;
  if (tensor_type == nullptr) {
    PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");  // borrowed
    if (torch == nullptr) return py::object();
    py::module_ t = py::reinterpret_borrow<py::module_>(torch);
    if (!py::hasattr(t, "Tensor") || !py::hasattr(t, "_C") ||
        !py::hasattr(t.attr("_C"), "_to_dlpack")) {
      return py::object();  // torch still importing, or a torch without the C entry point
    }
    to_dlpack = py::object(t.attr("_C").attr("_to_dlpack")).release().ptr();
    tensor_type = py::object(t.attr("Tensor")).release().ptr();
  }
  const int is_tensor = PyObject_IsInstance(obj.ptr(), tensor_type);
  if (is_tensor != 1) {
    if (is_tensor < 0) PyErr_Clear();
    return py::object();
  }
  return py::reinterpret_steal<py::object>(PyObject_CallOneArg(to_dlpack, obj.ptr()));
}

}  // namespace

std::string ElemTypeName(ElemType t) {
  switch (t) {
    case ElemType::kFloat32:
      return "float32";
    case ElemType::kFloat16:
      return "float16";
    case ElemType::kBFloat16:
      return "bfloat16";
    case ElemType::kInt32:
      return "int32";
    case ElemType::kInt64:
      return "int64";
    case ElemType::kUInt8:
      return "uint8";
    case ElemType::kInt8:
      return "int8";
  }
  return "?";
}

std::string DeviceName(const DLDevice& device) {
  const char* type = "other";
  switch (device.device_type) {
    case kDLCPU:
      type = "cpu";
      break;
    case kDLCUDA:
      type = "cuda";
      break;
    case kDLCUDAHost:
      type = "cuda_host";
      break;
    case kDLROCM:
      type = "rocm";
      break;
    case kDLCUDAManaged:
      type = "cuda_managed";
      break;
    default:
      break;
  }
  return absl::StrCat(type, ":", device.device_id);
}

bool IsHostDevice(const DLDevice& device) {
  return device.device_type == kDLCPU || device.device_type == kDLCUDAHost;
}

std::string BorrowedTensor::Describe() const {
  return absl::StrCat(name, " (", DeviceName(device), ", ", ElemTypeName(type), ", shape [",
                      absl::StrJoin(shape, ", "), "])");
}

int64_t BorrowedTensor::NumElems() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<DType> BorrowedTensor::FloatDType() const {
  switch (type) {
    case ElemType::kFloat32:
      return DType::kFloat32;
    case ElemType::kFloat16:
      return DType::kFloat16;
    case ElemType::kBFloat16:
      return DType::kBFloat16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(Describe(), " must be float32, float16 or bfloat16"));
  }
}

absl::Status BorrowedTensor::RequireRank(int rank) const {
  if (Rank() == rank) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(Describe(), " must have ", rank, " dimensions"));
}

absl::Status BorrowedTensor::RequireType(ElemType t) const {
  if (type == t) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(Describe(), " must be ", ElemTypeName(t)));
}

absl::Status BorrowedTensor::RequireDim(int dim, int64_t expected, const char* what) const {
  if (shape[dim] == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(Describe(), ": dimension ", dim, " (", what,
                                                 ") must be ", expected, ", got ", shape[dim]));
}

absl::StatusOr<BorrowedTensor> BorrowTensor(const py::handle& obj, const std::string& name,
                                            bool strided) {
  if (obj.is_none() || !py::hasattr(obj, "__dlpack__")) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " must be a tensor or array with __dlpack__ (torch.Tensor, numpy.ndarray), got ",
        std::string(py::str(py::type::of(obj).attr("__name__")))));
  }
  BorrowedTensor t;
  t.name = name;
  // Without max_version the producer returns a legacy (unversioned) "dltensor" capsule, whose
  // layout this header describes. The capsule is not renamed, so the producer's deleter runs
  // when the capsule is collected: we only borrow.
  t.capsule = TorchCapsule(obj);
  if (!t.capsule) {
    if (PyErr_Occurred()) throw py::error_already_set();
    t.capsule = obj.attr("__dlpack__")();
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(t.capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": __dlpack__() did not return a 'dltensor' capsule"));
  }
  const DLTensor& dl = managed->dl_tensor;
  t.device = dl.device;
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  auto type = ToElemType(dl.dtype, absl::StrCat(name, " (", DeviceName(t.device), ", shape [",
                                                absl::StrJoin(t.shape, ", "), "])"));
  if (!type.ok()) return type.status();
  t.type = *type;
  t.data = static_cast<char*>(dl.data) + dl.byte_offset;
  // Strides may be null (compact) or explicit; size-1 dimensions may carry any stride.
  if (strided) {  // the caller checks them (one allocation, only for the arguments that need it)
    t.strides.assign(dl.ndim, 0);
    for (int64_t d = dl.ndim - 1, expected = 1; d >= 0; expected *= dl.shape[d], --d) {
      t.strides[d] = dl.strides != nullptr ? dl.strides[d] : expected;
    }
  } else if (dl.strides != nullptr) {
    int64_t expected = 1;
    for (int d = dl.ndim - 1; d >= 0; --d) {
      if (dl.shape[d] != 1 && dl.strides[d] != expected) {
        return absl::InvalidArgumentError(
            absl::StrCat(t.Describe(), " must be C-contiguous: dimension ", d, " has stride ",
                         dl.strides[d], ", expected ", expected, " (call .contiguous())"));
      }
      expected *= dl.shape[d];
    }
  }
  if (t.NumElems() > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(t.Describe(), " has a null data pointer"));
  }
  return t;
}

void ThrowIfError(const absl::Status& status) {
  if (status.ok()) return;
  PyObject* type = PyExc_RuntimeError;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      type = PyExc_ValueError;
      break;
    case absl::StatusCode::kUnimplemented:
      type = PyExc_NotImplementedError;
      break;
    case absl::StatusCode::kDeadlineExceeded:
      type = PyExc_TimeoutError;
      break;
    case absl::StatusCode::kResourceExhausted:
      type = PyExc_MemoryError;
      break;
    default:
      break;
  }
  PyErr_SetString(type, std::string(status.message()).c_str());
  throw py::error_already_set();
}

}  // namespace mempipe::bindings
