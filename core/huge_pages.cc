// Transparent huge pages for an allocated host buffer (see core/huge_pages.h).
#include "core/huge_pages.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/clock.h"
#include "core/status_macros.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1's value; older C libraries' headers lack it
#endif

namespace mempipe {
namespace {

// errno's symbolic name where it is one madvise gives, else its number.
std::string ErrnoName(int e) {
  switch (e) {
    case EINVAL:
      return "EINVAL";
    case EAGAIN:
      return "EAGAIN";
    case ENOMEM:
      return "ENOMEM";
    case EPERM:
      return "EPERM";
    default:
      return absl::StrCat("errno ", e);
  }
}

// madvise's errno, 0 on success.
int Madvise(uintptr_t begin, size_t bytes, int advice) {
  return madvise(reinterpret_cast<void*>(begin), bytes, advice) == 0 ? 0 : errno;
}

std::string MadviseError(uintptr_t begin, size_t bytes, absl::string_view name, int e) {
  return absl::StrCat("madvise(", name, ") of ", bytes, " bytes at 0x", absl::Hex(begin),
                      " failed: ", ErrnoName(e), " (", std::strerror(e), ")");
}

// MADV_COLLAPSE over [begin, end) (whole 2 MiB pages), retried while it fails with EAGAIN. A
// collapse that could not be had (EAGAIN after the retries, ENOMEM) is written to
// report.incomplete; any other failure is the error.
absl::Status Collapse(uintptr_t begin, uintptr_t end, HugePageReport& report) {
  int e = 0;
  for (int attempt = 0; attempt < kCollapseAttempts; ++attempt) {
    e = Madvise(begin, end - begin, MADV_COLLAPSE);
    if (e != EAGAIN) break;
  }
  if (e == EAGAIN || e == ENOMEM) {
    report.incomplete = MadviseError(begin, end - begin, "MADV_COLLAPSE", e);
    if (e == EAGAIN) absl::StrAppend(&report.incomplete, ", ", kCollapseAttempts, " times");
  } else if (e != 0) {
    return absl::FailedPreconditionError(MadviseError(begin, end - begin, "MADV_COLLAPSE", e));
  }
  return absl::OkStatus();
}

// The whole 2 MiB pages of [data, data + bytes): [begin, end), empty where end <= begin.
// InvalidArgument, naming `caller`, for a null data with bytes > 0.
struct Interior {
  uintptr_t begin = 0, end = 0;
};
absl::StatusOr<Interior> WholePages(const char* caller, const void* data, size_t bytes) {
  if (data == nullptr && bytes > 0) {
    return absl::InvalidArgumentError(absl::StrCat(caller, ": data is null for ", bytes, " bytes"));
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data);
  return Interior{(lo + kHugePageBytes - 1) & ~(kHugePageBytes - 1),
                  (lo + bytes) & ~(kHugePageBytes - 1)};
}

}  // namespace

absl::StatusOr<HugePageMode> ParseHugePageMode(absl::string_view name) {
  if (name == "off") return HugePageMode::kOff;
  if (name == "advise") return HugePageMode::kAdvise;
  if (name == "collapse") return HugePageMode::kCollapse;
  return absl::InvalidArgumentError(
      absl::StrCat("huge page mode must be off, advise or collapse, got \"", name, "\""));
}

absl::StatusOr<size_t> HugePageBytes(const void* data, size_t bytes) {
  std::FILE* f = std::fopen("/proc/self/smaps", "r");
  if (f == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot read /proc/self/smaps: ", std::strerror(errno)));
  }
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  size_t total = 0, overlap = 0;  // overlap: of the mapping being read with [lo, hi)
  char line[4096];                // a header line holds a path of up to PATH_MAX
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    uintptr_t start = 0, end = 0;
    size_t kib = 0;
    // A mapping's header "start-end perms ..." (hex), or one of its fields ("Name: value"; those
    // starting with a hex letter stop at the letter after it, not at a '-').
    if (std::sscanf(line, "%" SCNxPTR "-%" SCNxPTR " ", &start, &end) == 2) {
      overlap = start < hi && end > lo ? std::min(end, hi) - std::max(start, lo) : 0;
    } else if (overlap > 0 && std::sscanf(line, "AnonHugePages: %zu kB", &kib) == 1) {
      total += std::min(kib << 10, overlap);
    }
  }
  std::fclose(f);
  return total;
}

absl::StatusOr<HugePageReport> BackWithHugePages(void* data, size_t bytes, HugePageMode mode) {
  const absl::StatusOr<Interior> pages = WholePages("BackWithHugePages", data, bytes);
  if (!pages.ok()) return pages.status();
  const auto [begin, end] = *pages;
  HugePageReport report;
  if (mode == HugePageMode::kOff || end <= begin) return report;
  report.advised_bytes = end - begin;
  absl::StatusOr<size_t> before = HugePageBytes(data, bytes);
  if (!before.ok()) return before.status();
  report.huge_before = *before;
  const Clock::time_point t0 = Clock::now();
  if (const int e = Madvise(begin, end - begin, MADV_HUGEPAGE); e != 0) {
    return absl::FailedPreconditionError(MadviseError(begin, end - begin, "MADV_HUGEPAGE", e));
  }
  if (mode == HugePageMode::kCollapse) {
    MEMPIPE_RETURN_IF_ERROR(Collapse(begin, end, report));
  }
  report.ms = MsSince(t0);
  absl::StatusOr<size_t> after = HugePageBytes(data, bytes);
  if (!after.ok()) return after.status();
  report.huge_after = *after;
  return report;
}

absl::StatusOr<HugePageReport> CollapseHugePages(void* data, size_t bytes) {
  const absl::StatusOr<Interior> pages = WholePages("CollapseHugePages", data, bytes);
  if (!pages.ok()) return pages.status();
  const auto [begin, end] = *pages;
  HugePageReport report;
  if (end <= begin) return report;
  report.advised_bytes = end - begin;
  const Clock::time_point t0 = Clock::now();
  MEMPIPE_RETURN_IF_ERROR(Collapse(begin, end, report));
  report.ms = MsSince(t0);
  return report;
}

}  // namespace mempipe
