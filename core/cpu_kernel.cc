#include "core/cpu_kernel.h"

#include <atomic>
#include <cstring>
#include <thread>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "absl/strings/ascii.h"
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

bool CpuHasAvx512Bf16() {
#if MEMPIPE_AVX512_KERNEL
  static const bool has =
      CpuHasAvx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

bool CpuHasAvx2() {
#if MEMPIPE_AVX2_KERNEL
  // F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports has no "f16c". The
  // builtin's avx2 already requires the OS to save the YMM state (XGETBV).
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  return has;
#else
  return false;
#endif
}

CpuKernel Active() {
  const auto k = static_cast<CpuKernel>(g_cpu_kernel.load(std::memory_order_relaxed));
  if (k != CpuKernel::kAuto) return k;
  if (CpuHasAvx512Bf16()) return CpuKernel::kAvx512Bf16;
  if (CpuHasAvx512()) return CpuKernel::kAvx512;
  return CpuHasAvx2() ? CpuKernel::kAvx2 : CpuKernel::kPortable;
}

}  // namespace

bool UseAvx512Kernel() {
  const CpuKernel k = Active();
  return k == CpuKernel::kAvx512 || k == CpuKernel::kAvx512Bf16;
}

bool UseAvx2Kernel() { return Active() == CpuKernel::kAvx2; }

bool UseAvx512Bf16Kernel() { return Active() == CpuKernel::kAvx512Bf16; }

absl::Status SetCpuKernel(CpuKernel kernel) {
  if (!CpuKernelAvailable(kernel)) {
    return absl::FailedPreconditionError(
        absl::StrCat("cpu kernel ", CpuKernelName(kernel),
                     " asked for, but this CPU (or this build's compiler) ",
                     kernel == CpuKernel::kAvx512 ? "has no AVX-512F"
                     : kernel == CpuKernel::kAvx2 ? "lacks AVX2, FMA or F16C"
                                                  : "lacks AVX-512F, AVX512BW or AVX512_BF16"));
  }
  g_cpu_kernel.store(static_cast<int>(kernel), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<CpuKernel> ParseCpuKernel(absl::string_view name) {
  if (name == "auto") return CpuKernel::kAuto;
  if (name == "portable") return CpuKernel::kPortable;
  if (name == "avx512") return CpuKernel::kAvx512;
  if (name == "avx512-bf16") return CpuKernel::kAvx512Bf16;
  if (name == "avx2") return CpuKernel::kAvx2;
  return absl::InvalidArgumentError(absl::StrCat(
      "cpu kernel must be auto, portable, avx512, avx512-bf16 or avx2, got '", name, "'"));
}

absl::string_view CpuKernelName(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kAuto:
      return "auto";
    case CpuKernel::kPortable:
      return "portable";
    case CpuKernel::kAvx512:
      return "avx512";
    case CpuKernel::kAvx512Bf16:
      return "avx512-bf16";
    case CpuKernel::kAvx2:
      return "avx2";
  }
  return "unknown";
}

bool CpuKernelAvailable(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::kAvx512:
      return CpuHasAvx512();
    case CpuKernel::kAvx512Bf16:
      return CpuHasAvx512Bf16();
    case CpuKernel::kAvx2:
      return CpuHasAvx2();
    default:
      return true;
  }
}

absl::string_view ActiveCpuKernelName() { return CpuKernelName(Active()); }

std::string CpuDescription() {
  std::string brand = "unknown CPU", numbers;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned r[4] = {0, 0, 0, 0};
  if (__get_cpuid(0x80000000u, &r[0], &r[1], &r[2], &r[3]) != 0 && r[0] >= 0x80000004u) {
    char text[49] = {};
    for (unsigned leaf = 0; leaf < 3; ++leaf) {
      __get_cpuid(0x80000002u + leaf, &r[0], &r[1], &r[2], &r[3]);
      std::memcpy(text + 16 * leaf, r, sizeof(r));
    }
    if (std::string b(absl::StripAsciiWhitespace(text)); !b.empty()) brand = b;
  }
  if (__get_cpuid(1, &r[0], &r[1], &r[2], &r[3]) != 0) {
    const unsigned base_family = (r[0] >> 8) & 0xf, base_model = (r[0] >> 4) & 0xf;
    const unsigned family = base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family;
    const unsigned model = base_family == 0x6 || base_family == 0xf
                               ? base_model + (((r[0] >> 16) & 0xf) << 4)
                               : base_model;
    numbers = absl::StrCat(" (x86 family ", family, " model ", model, ")");
  }
#endif
  return absl::StrCat(brand, numbers, ", ", std::thread::hardware_concurrency(), " logical CPUs");
}

}  // namespace mempipe
