#include "core/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace mempipe {
namespace {

// THP's system mode from sysfs ("always", "madvise", "never"), or "" where there is none.
std::string ThpMode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t open = all.find('['), close = all.find(']');
  return open == std::string::npos || close == std::string::npos
             ? ""
             : all.substr(open + 1, close - open - 1);
}

// An anonymous mapping of `bytes` plus 1 MiB, so that its 2 MiB-aligned interior is smaller than
// the mapping; kept in 4 KiB pages (MADV_NOHUGEPAGE, unless `plain`: no advice, as vLLM's
// torch.zeros cache has) and filled with random bytes of a fresh seed (so every page is faulted
// in, as torch.zeros leaves vLLM's KV cache).
class Mapping {
 public:
  explicit Mapping(size_t bytes, bool plain = false) : bytes_(bytes + (size_t{1} << 20)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
    if (data_ == nullptr) return;
    if (!plain) madvise(data_, bytes_, MADV_NOHUGEPAGE);
    std::mt19937_64 rng(std::random_device{}());
    for (size_t i = 0; i < bytes_; i += 8) {
      const uint64_t x = rng();
      std::memcpy(data_ + i, &x, 8);
    }
  }
  ~Mapping() {
    if (data_ != nullptr) munmap(data_, bytes_);
  }
  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  uint8_t* data_ = nullptr;
};

TEST(HugePages, ParsesModesAndNamesABadOne) {
  EXPECT_EQ(*ParseHugePageMode("off"), HugePageMode::kOff);
  EXPECT_EQ(*ParseHugePageMode("advise"), HugePageMode::kAdvise);
  EXPECT_EQ(*ParseHugePageMode("collapse"), HugePageMode::kCollapse);
  const absl::StatusOr<HugePageMode> bad = ParseHugePageMode("always");
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("\"always\""), absl::string_view::npos);
}

TEST(HugePages, RejectsNullDataAndSkipsRangesWithoutAWholeHugePage) {
  EXPECT_EQ(BackWithHugePages(nullptr, 4096, HugePageMode::kCollapse).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> small(kHugePageBytes);  // never holds an aligned 2 MiB page whole
  const std::vector<uint8_t> copy = small;
  const absl::StatusOr<HugePageReport> r =
      BackWithHugePages(small.data() + 1, small.size() - 1, HugePageMode::kCollapse);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->advised_bytes, 0u);
  EXPECT_EQ(small, copy);
}

// Collapse moves the faulted-in interior into huge pages, keeps every byte, and HugePageBytes
// tells the two states apart (0 before, the interior after): a measure that always said "all
// huge" or "none" fails one of the two checks.
TEST(HugePages, CollapseKeepsContentsAndBacksTheInterior) {
  const std::string thp = ThpMode();
  Mapping m(8 * kHugePageBytes);
  ASSERT_NE(m.data(), nullptr);
  const std::vector<uint8_t> copy(m.data(), m.data() + m.bytes());
  // The range starts 4 KiB into the mapping: its interior has 8 whole huge pages or fewer.
  uint8_t* const lo = m.data() + 4096;
  const size_t bytes = m.bytes() - 4096;
  const absl::StatusOr<size_t> before = HugePageBytes(lo, bytes);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(*before, 0u) << "MADV_NOHUGEPAGE memory reads as huge";
  absl::StatusOr<HugePageReport> r = BackWithHugePages(lo, bytes, HugePageMode::kCollapse);
  EXPECT_EQ(std::memcmp(m.data(), copy.data(), copy.size()), 0) << "contents changed";
  if (thp.empty() || thp == "never") {
    // Without THP, collapse may be refused (FailedPrecondition, named) or do nothing.
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
    }
    GTEST_SKIP() << "THP mode \"" << thp << "\": collapse is not expected to work";
  }
  ASSERT_TRUE(r.ok()) << r.status();
  const uintptr_t begin =
      (reinterpret_cast<uintptr_t>(lo) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(lo) + bytes) & ~(kHugePageBytes - 1);
  EXPECT_EQ(r->advised_bytes, end - begin);
  EXPECT_GE(r->advised_bytes, 7 * kHugePageBytes);
  EXPECT_EQ(r->incomplete, "");
  EXPECT_EQ(r->huge_before, 0u);
  EXPECT_GE(r->huge_after, r->advised_bytes);
  EXPECT_LE(r->huge_after, bytes);
}

// CollapseHugePages (no advice, no smaps): the whole huge pages of the range it is given, and
// only those: the mapping as a whole holds exactly those two (a collapse of the whole mapping,
// or of nothing, fails that check).
TEST(HugePages, CollapseAloneBacksJustItsRangeAndKeepsContents) {
  const std::string thp = ThpMode();
  if (thp.empty() || thp == "never" || thp == "always") {
    GTEST_SKIP() << "THP mode \"" << thp << "\": needs madvise, where plain memory stays small";
  }
  Mapping m(8 * kHugePageBytes, /*plain=*/true);
  ASSERT_NE(m.data(), nullptr);
  const std::vector<uint8_t> copy(m.data(), m.data() + m.bytes());
  const uintptr_t first =
      (reinterpret_cast<uintptr_t>(m.data()) + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  // Three huge pages' worth, starting 4 KiB before the second whole page: it holds two whole ones.
  uint8_t* const lo = reinterpret_cast<uint8_t*>(first + kHugePageBytes - 4096);
  const absl::StatusOr<size_t> before = HugePageBytes(m.data(), m.bytes());
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_EQ(*before, 0u);
  const absl::StatusOr<HugePageReport> r = CollapseHugePages(lo, 3 * kHugePageBytes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(std::memcmp(m.data(), copy.data(), copy.size()), 0) << "contents changed";
  EXPECT_EQ(r->advised_bytes, 2 * kHugePageBytes);
  EXPECT_EQ(r->incomplete, "");
  EXPECT_EQ(r->huge_before, 0u);
  EXPECT_EQ(r->huge_after, 0u);  // not read: the caller asks HugePageBytes when it wants to know
  // No advice, so the mapping is not split: HugePageBytes counts the mapping's huge pages.
  const absl::StatusOr<size_t> after = HugePageBytes(m.data(), m.bytes());
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(*after, 2 * kHugePageBytes);
  EXPECT_EQ(CollapseHugePages(nullptr, 4096).status().code(), absl::StatusCode::kInvalidArgument);
  // [lo + 8 KiB, + 2 MiB) straddles a page boundary and holds no whole huge page.
  const absl::StatusOr<HugePageReport> none = CollapseHugePages(lo + 8192, kHugePageBytes);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->advised_bytes, 0u);
}

// Advise only marks the range (khugepaged may collapse it later): contents kept, no error.
TEST(HugePages, AdviseAndOffKeepContents) {
  Mapping m(4 * kHugePageBytes);
  ASSERT_NE(m.data(), nullptr);
  const std::vector<uint8_t> copy(m.data(), m.data() + m.bytes());
  for (const HugePageMode mode : {HugePageMode::kOff, HugePageMode::kAdvise}) {
    const absl::StatusOr<HugePageReport> r = BackWithHugePages(m.data(), m.bytes(), mode);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->advised_bytes == 0, mode == HugePageMode::kOff);
    EXPECT_EQ(std::memcmp(m.data(), copy.data(), copy.size()), 0);
  }
}

}  // namespace
}  // namespace mempipe
