// mempipe core: transparent huge pages for host memory mempipe did not allocate.
//
// vLLM's CPU worker zero-fills each layer's KV cache when it allocates it. Where the kernel's
// THP mode is "madvise" (Debian's default) that touch maps the cache in 4 KiB pages, and the
// decode kernels, which read pages chosen anywhere in the cache, pay a TLB miss every 4 KiB
// (under a VM, a nested page walk). AdviseHugePages gives such a range huge pages without
// changing a byte of it:
//
//   MEMPIPE_ASSIGN_OR_RETURN(HugePageAdvice a, AdviseHugePages(data, bytes));
//   // a.released_bytes: all-zero 2 MiB chunks given back, refaulted as huge pages when
//   // written; a.collapsed_bytes: chunks holding data, collapsed in place (MADV_COLLAPSE)
//
// and HugePageBytes(data, bytes) tells how much of a range the kernel maps with huge pages.
// Linux only; elsewhere both return Unimplemented.
#ifndef MEMPIPE_CORE_HUGE_PAGES_H_
#define MEMPIPE_CORE_HUGE_PAGES_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mempipe {

// The huge page size AdviseHugePages works in (x86-64's and AArch64's 4 KiB-granule PMD size).
inline constexpr size_t kHugePageBytes = size_t{2} << 20;

struct HugePageAdvice {
  // The whole 2 MiB chunks inside the range, advised MADV_HUGEPAGE; the partial chunks at its
  // ends are left alone (they may hold other allocations).
  size_t advised_bytes = 0;
  // Chunks that held only zeros in a private anonymous mapping, given back (MADV_DONTNEED): the
  // next touch maps a zero-filled huge page, the same bytes. Cheap: one read of the chunk.
  size_t released_bytes = 0;
  // Chunks holding data (or not private anonymous memory) collapsed into huge pages in place
  // (MADV_COLLAPSE, Linux 6.1+; a copy of each, a few seconds per GiB on the build VM).
  size_t collapsed_bytes = 0;
  // Chunks whose collapse failed, and why: the kernel lacks MADV_COLLAPSE (before 6.1, or THP
  // off), or had no huge page to give (no memory to compact). They stay as they were.
  size_t failed_bytes = 0;
  absl::Status collapse_status;
};

// Gives the 2 MiB chunks of [data, data + bytes) huge pages, keeping every byte as it is.
// The range must not be written by another thread during the call: a chunk read as zeros and
// written before it is given back would lose that write. Errors: InvalidArgument for a null
// `data` with bytes > 0; Unimplemented off Linux or where the kernel has no THP (madvise's
// EINVAL); Internal for another madvise or /proc/self/maps failure, naming it. A failed
// collapse is not an error: it is counted in failed_bytes and described in collapse_status.
[[nodiscard]] absl::StatusOr<HugePageAdvice> AdviseHugePages(void* data, size_t bytes);

// Bytes of [data, data + bytes) the kernel maps with transparent huge pages: the AnonHugePages
// of /proc/self/smaps's mappings that lie inside the range (a lower bound where a mapping
// straddles its ends). Errors: Unimplemented off Linux, Internal if smaps cannot be read.
[[nodiscard]] absl::StatusOr<size_t> HugePageBytes(const void* data, size_t bytes);

}  // namespace mempipe

#endif  // MEMPIPE_CORE_HUGE_PAGES_H_
