// mempipe core/gpu: the one dtype x head_dim x GQA-group dispatch of every .hip file.
//
// A runtime (dtype, head_dim, group) becomes template arguments of a generic lambda; an
// unsupported value is an InvalidArgument naming it. The lists are core/paged_kv.h's
// kSupported* (static_asserts below keep them equal).
//
//   return gpu::DispatchShape(dtype, head_dim, group, [&]<typename T, int kHeadDim, int kGroup>() {
//     MyKernel<T, kHeadDim, kGroup><<<grid, threads, 0, stream>>>(params);
//     return GpuLastError("MyKernel launch");
//   });
//   return gpu::DispatchDType(dtype, [&]<typename T>() { ... });  // T: float, gpu::F16, gpu::BF16
//
// Include only from .hip files (it needs core/gpu/gpu_compat.h's storage types).
#ifndef MEMPIPE_CORE_GPU_DISPATCH_H_
#define MEMPIPE_CORE_GPU_DISPATCH_H_

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/dtype.h"
#include "core/gpu/gpu_compat.h"
#include "core/paged_kv.h"

namespace mempipe::gpu {

// Compile-time lists; each must equal its kSupported* counterpart in core/paged_kv.h.
template <int... kValues>
struct IntList {};
using HeadDims = IntList<64, 128, 256>;
using GroupSizes = IntList<1, 2, 3, 4, 5, 6, 7, 8, 12, 16>;

template <size_t N, int... kValues>
constexpr bool Matches(IntList<kValues...>, const int (&want)[N]) {
  constexpr int items[] = {kValues...};
  if (sizeof...(kValues) != N) return false;
  for (size_t i = 0; i < N; ++i) {
    if (items[i] != want[i]) return false;
  }
  return true;
}
// "64, 128, 256".
template <int... kValues>
std::string ListString(IntList<kValues...>) {
  return absl::StrJoin({kValues...}, ", ");
}

static_assert(Matches(HeadDims{}, kSupportedHeadDims), "update HeadDims with kSupportedHeadDims");
static_assert(Matches(GroupSizes{}, kSupportedGpuGroupSizes),
              "update GroupSizes with kSupportedGpuGroupSizes");

// fn.template operator()<T>() for the storage type of `dtype`.
template <typename Fn>
absl::Status DispatchDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn.template operator()<float>();
    case DType::kFloat16:
      return fn.template operator()<F16>();
    case DType::kBFloat16:
      return fn.template operator()<BF16>();
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype code ", static_cast<int>(dtype)));
}

namespace internal {

// fn.template operator()<kValue>() for the kValue of `Rest` equal to `value`; `All` names the
// whole list in the error.
template <typename All, typename Fn>
absl::Status DispatchInt(All, IntList<>, int value, const char* what, Fn&&) {
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must be one of ", ListString(All{}), ", got ", value));
}
template <typename All, int kFirst, int... kRest, typename Fn>
absl::Status DispatchInt(All all, IntList<kFirst, kRest...>, int value, const char* what, Fn&& fn) {
  if (value == kFirst) return fn.template operator()<kFirst>();
  return DispatchInt(all, IntList<kRest...>{}, value, what, std::forward<Fn>(fn));
}

}  // namespace internal

// fn.template operator()<kHeadDim>().
template <typename Fn>
absl::Status DispatchHeadDim(int head_dim, Fn&& fn) {
  return internal::DispatchInt(HeadDims{}, HeadDims{}, head_dim, "head_dim", std::forward<Fn>(fn));
}

// fn.template operator()<kGroup>() for group = num_heads / num_kv_heads.
template <typename Fn>
absl::Status DispatchGroup(int group, Fn&& fn) {
  return internal::DispatchInt(GroupSizes{}, GroupSizes{}, group,
                               "GQA group size (num_heads / num_kv_heads)", std::forward<Fn>(fn));
}

// fn.template operator()<T, kHeadDim, kGroup>().
template <typename Fn>
absl::Status DispatchShape(DType dtype, int head_dim, int group, Fn&& fn) {
  return gpu::DispatchDType(dtype, [&]<typename T>() {
    return gpu::DispatchHeadDim(head_dim, [&]<int kHeadDim>() {
      return gpu::DispatchGroup(
          group, [&]<int kGroup>() { return fn.template operator()<T, kHeadDim, kGroup>(); });
    });
  });
}

}  // namespace mempipe::gpu

#endif  // MEMPIPE_CORE_GPU_DISPATCH_H_
