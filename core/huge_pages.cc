#include "core/huge_pages.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mempipe {

#if defined(__linux__)

namespace {

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1's value; glibc 2.36's headers predate it
#endif

using Range = std::pair<uintptr_t, uintptr_t>;  // [first, second)

// The mappings of /proc/self/maps (or smaps: its other lines do not start with a range), with
// each one's line for the caller to read further.
template <typename Fn>
absl::Status ForEachMapping(const char* file, Fn&& fn) {
  std::ifstream in(file);
  if (!in) return absl::InternalError(absl::StrCat("cannot read ", file));
  std::string line;
  while (std::getline(in, line)) {
    const char* s = line.c_str();
    char* end = nullptr;
    const uintptr_t lo = std::strtoull(s, &end, 16);
    if (end == s || *end != '-') {
      fn(Range{0, 0}, line);  // a field line of smaps
      continue;
    }
    const char* s2 = end + 1;
    const uintptr_t hi = std::strtoull(s2, &end, 16);
    if (end == s2 || *end != ' ') {
      fn(Range{0, 0}, line);
      continue;
    }
    fn(Range{lo, hi}, line);
  }
  return absl::OkStatus();
}

// Private anonymous mappings: a private mapping of no file (inode 0; no path, or "[heap]" or an
// "[anon:...]" name). Giving their pages back makes them read as zeros again; a shared or
// file mapping would read its object's bytes instead.
absl::StatusOr<std::vector<Range>> PrivateAnonymousMappings() {
  std::vector<Range> out;
  absl::Status st = ForEachMapping("/proc/self/maps", [&](Range r, const std::string& line) {
    if (r.first == r.second) return;
    char perms[8] = {};
    unsigned long long offset = 0, inode = 0;
    char dev[32] = {};
    int consumed = 0;
    // "lo-hi perms offset dev inode   path"
    const char* rest = std::strchr(line.c_str(), ' ');
    if (rest == nullptr ||
        std::sscanf(rest, " %7s %llx %31s %llu %n", perms, &offset, dev, &inode, &consumed) < 4) {
      return;
    }
    const std::string path = std::string(rest + consumed);
    const bool anon = inode == 0 && (path.empty() || path.rfind("[heap]", 0) == 0 ||
                                     path.rfind("[anon:", 0) == 0);
    if (perms[3] == 'p' && anon) {
      if (!out.empty() && out.back().second == r.first) {
        out.back().second = r.second;  // adjacent: one range
      } else {
        out.push_back(r);
      }
    }
  });
  if (!st.ok()) return st;
  return out;
}

bool Covered(const std::vector<Range>& ranges, uintptr_t lo, uintptr_t hi) {
  for (const Range& r : ranges) {
    if (r.first <= lo && hi <= r.second) return true;
  }
  return false;
}

// True when the 2 MiB at p are all zero: 4 KiB at a time, OR-ed as 64-bit words (which the
// compiler vectorizes), stopping at the first nonzero block.
bool AllZero(const unsigned char* p) {
  constexpr size_t kWords = 4096 / sizeof(uint64_t);
  for (size_t off = 0; off < kHugePageBytes; off += 4096) {
    uint64_t w[kWords];
    std::memcpy(w, p + off, sizeof(w));
    uint64_t any = 0;
    for (size_t i = 0; i < kWords; ++i) any |= w[i];
    if (any != 0) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<HugePageAdvice> AdviseHugePages(void* data, size_t bytes) {
  HugePageAdvice advice;
  if (bytes == 0) return advice;
  if (data == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdviseHugePages: null data with bytes ", bytes));
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHugePageBytes - 1);
  if (hi <= lo) return advice;  // no whole chunk inside
  advice.advised_bytes = hi - lo;
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) != 0) {
    const int err = errno;
    if (err == EINVAL) {
      return absl::UnimplementedError(
          "AdviseHugePages: madvise(MADV_HUGEPAGE) gave EINVAL: this kernel has no transparent "
          "huge pages");
    }
    return absl::InternalError(absl::StrCat("AdviseHugePages: madvise(MADV_HUGEPAGE) of ", hi - lo,
                                            " bytes failed: ", std::strerror(err)));
  }
  // After MADV_HUGEPAGE the range is its own mappings (split from their neighbours).
  auto anon = PrivateAnonymousMappings();
  if (!anon.ok()) return anon.status();

  // Adjacent chunks of the same kind go to one madvise call.
  auto flush = [&](int advice_kind, uintptr_t a, uintptr_t b) -> absl::Status {
    if (a == b) return absl::OkStatus();
    if (advice_kind == MADV_DONTNEED) {
      if (madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED) != 0) {
        return absl::InternalError(absl::StrCat("AdviseHugePages: madvise(MADV_DONTNEED) of ",
                                                b - a, " bytes failed: ", std::strerror(errno)));
      }
      advice.released_bytes += b - a;
      return absl::OkStatus();
    }
    if (madvise(reinterpret_cast<void*>(a), b - a, MADV_COLLAPSE) != 0) {
      const int err = errno;
      advice.failed_bytes += b - a;
      if (advice.collapse_status.ok()) {
        advice.collapse_status = absl::UnavailableError(
            absl::StrCat("madvise(MADV_COLLAPSE) failed: ", std::strerror(err),
                         err == EINVAL ? " (Linux before 6.1, or THP off)" : ""));
      }
    } else {
      advice.collapsed_bytes += b - a;
    }
    return absl::OkStatus();
  };
  int run_kind = 0;
  uintptr_t run_start = lo;
  for (uintptr_t c = lo; c < hi; c += kHugePageBytes) {
    const bool release =
        Covered(*anon, c, c + kHugePageBytes) && AllZero(reinterpret_cast<const unsigned char*>(c));
    const int kind = release ? MADV_DONTNEED : MADV_COLLAPSE;
    if (kind != run_kind) {
      if (absl::Status st = flush(run_kind, run_start, c); !st.ok()) return st;
      run_kind = kind;
      run_start = c;
    }
  }
  if (absl::Status st = flush(run_kind, run_start, hi); !st.ok()) return st;
  return advice;
}

absl::StatusOr<size_t> HugePageBytes(const void* data, size_t bytes) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  size_t total = 0;
  bool inside = false;
  absl::Status st = ForEachMapping("/proc/self/smaps", [&](Range r, const std::string& line) {
    if (r.first != r.second) {
      inside = lo <= r.first && r.second <= hi;
      return;
    }
    unsigned long long kb = 0;
    if (inside && std::sscanf(line.c_str(), "AnonHugePages: %llu kB", &kb) == 1) {
      total += static_cast<size_t>(kb) << 10;
    }
  });
  if (!st.ok()) return st;
  return total;
}

#else  // !__linux__

absl::StatusOr<HugePageAdvice> AdviseHugePages(void*, size_t) {
  return absl::UnimplementedError("AdviseHugePages: transparent huge pages are Linux's");
}
absl::StatusOr<size_t> HugePageBytes(const void*, size_t) {
  return absl::UnimplementedError("HugePageBytes: transparent huge pages are Linux's");
}

#endif

}  // namespace mempipe
