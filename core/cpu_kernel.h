// mempipe core: which host (CPU) kernel family runs, chosen at run time.
//
// The decode kernels (attention/decode.h) and the relevancy scan (retriever/relevancy.h) each
// have an AVX-512 and an AVX2 implementation, compiled with target attributes (core/avx512.h)
// so the default build stays portable without -DMEMPIPE_CPU_ARCH, and a portable one. One
// process-wide switch picks between them, so a benchmark or a test sets both at once:
//
//   MEMPIPE_ASSIGN_OR_RETURN(CpuKernel k, ParseCpuKernel("portable"));
//   MEMPIPE_RETURN_IF_ERROR(SetCpuKernel(k));
//   if (UseAvx512Kernel()) { ... }
#ifndef MEMPIPE_CORE_CPU_KERNEL_H_
#define MEMPIPE_CORE_CPU_KERNEL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mempipe {

// Which host implementation the kernels use (process-wide; default kAuto).
enum class CpuKernel : int {
  kAuto = 0,      // the first the CPU has of avx512-bf16, avx512, avx2, portable
  kPortable = 1,  // plain C++ (what the compiler vectorizes for the build's -march)
  kAvx512 = 2,    // AVX-512F intrinsics (FailedPrecondition where the CPU lacks it)
  // kAvx512 plus AVX512_BF16's vdpbf16ps for the attention scores of bf16 queries over a bf16
  // cache (exact products, fp32 sums: the fp32 arithmetic up to summation order); other dtypes
  // run kAvx512. FailedPrecondition where the CPU lacks AVX512_BF16 or AVX512BW.
  kAvx512Bf16 = 3,
  // AVX2, FMA and F16C intrinsics (x86-64-v3), for CPUs without AVX-512 (AMD before Zen 4,
  // Intel client cores). FailedPrecondition where the CPU lacks any of the three.
  kAvx2 = 4,
};
// FailedPrecondition for a kernel whose instructions the CPU (or this build's compiler) lacks.
[[nodiscard]] absl::Status SetCpuKernel(CpuKernel kernel);
// Accepts auto, portable, avx512, avx512-bf16, avx2; InvalidArgument naming anything else.
absl::StatusOr<CpuKernel> ParseCpuKernel(absl::string_view name);
bool CpuKernelAvailable(CpuKernel kernel);
// The name ParseCpuKernel accepts for `kernel`.
absl::string_view CpuKernelName(CpuKernel kernel);
// True when the next kernel call takes its AVX-512 path.
bool UseAvx512Kernel();
// True when the next kernel call takes its AVX2 path.
bool UseAvx2Kernel();
// True when the next decode call over a bf16 cache with bf16 queries takes the AVX512_BF16
// path (implies UseAvx512Kernel()).
bool UseAvx512Bf16Kernel();
// "avx512-bf16", "avx512", "avx2" or "portable": the implementation the next call will use.
absl::string_view ActiveCpuKernelName();
// The CPU, for the record of a measurement: its brand string and, on x86, the family and model
// numbers CPUID reports (display values, as /proc/cpuinfo's "cpu family" and "model"; a brand
// string such as "AMD EPYC" names no generation), and the logical CPUs this process may use:
// "AMD EPYC (x86 family 25 model 17), 2 logical CPUs".
std::string CpuDescription();

}  // namespace mempipe

#endif  // MEMPIPE_CORE_CPU_KERNEL_H_
