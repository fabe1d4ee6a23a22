#include "core/cpu_kernel.h"

#include <atomic>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"

namespace mempipe {
namespace {

std::atomic<int> g_cpu_kernel{static_cast<int>(CpuKernel::kAuto)};

bool CpuHasAvx512() {
#if MEMPIPE_AVX512_KERNEL
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool UseAvx512Kernel() {
  const auto k = static_cast<CpuKernel>(g_cpu_kernel.load(std::memory_order_relaxed));
  return k == CpuKernel::kAvx512 || (k == CpuKernel::kAuto && CpuHasAvx512());
}

absl::Status SetCpuKernel(CpuKernel kernel) {
  if (kernel == CpuKernel::kAvx512 && !CpuHasAvx512()) {
    return absl::FailedPreconditionError(
        "cpu kernel avx512 asked for, but this CPU (or this build's compiler) has no AVX-512F");
  }
  g_cpu_kernel.store(static_cast<int>(kernel), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<CpuKernel> ParseCpuKernel(absl::string_view name) {
  if (name == "auto") return CpuKernel::kAuto;
  if (name == "portable") return CpuKernel::kPortable;
  if (name == "avx512") return CpuKernel::kAvx512;
  return absl::InvalidArgumentError(
      absl::StrCat("cpu kernel must be auto, portable or avx512, got '", name, "'"));
}

bool CpuKernelAvailable(CpuKernel kernel) { return kernel != CpuKernel::kAvx512 || CpuHasAvx512(); }

absl::string_view ActiveCpuKernelName() { return UseAvx512Kernel() ? "avx512" : "portable"; }

}  // namespace mempipe
