#include "core/huge_pages.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace mempipe {
namespace {

constexpr size_t kChunk = kHugePageBytes;

// THP's system mode: "always", "madvise" or "never".
std::string ThpMode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all;
  std::getline(in, all);
  const size_t a = all.find('['), b = all.find(']');
  return a == std::string::npos || b == std::string::npos ? "" : all.substr(a + 1, b - a - 1);
}

// `chunks` 2 MiB chunks of private anonymous memory, 2 MiB aligned, mapped in 4 KiB pages as
// vLLM's zero-filled KV cache is (MADV_NOHUGEPAGE while they are first touched).
class Mapping {
 public:
  explicit Mapping(size_t chunks, int flags = MAP_PRIVATE | MAP_ANONYMOUS)
      : size_(chunks * kChunk + kChunk) {
    raw_ = mmap(nullptr, size_, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (raw_ == MAP_FAILED) {
      raw_ = nullptr;
      return;
    }
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw_) + kChunk - 1) & ~(kChunk - 1);
    data_ = reinterpret_cast<unsigned char*>(a);
    madvise(data_, chunks * kChunk, MADV_NOHUGEPAGE);
  }
  ~Mapping() {
    if (raw_ != nullptr) munmap(raw_, size_);
  }
  unsigned char* data() const { return data_; }

 private:
  size_t size_;
  void* raw_ = nullptr;
  unsigned char* data_ = nullptr;
};

TEST(HugePages, KeepsEveryByteReleasesZeroChunksAndCollapsesTheOthers) {
  if (ThpMode() == "never" || ThpMode().empty()) GTEST_SKIP() << "THP is off on this kernel";
  // Chunks: 0 zeros (touched), 1 data, 2 untouched, 3 zeros but one byte, 4 zeros (touched), 5
  // data. The range handed over starts 1 byte into chunk 0 and ends 1 byte into chunk 6, so
  // chunk 0 (partial) is not the call's and chunks 1-5 are.
  constexpr size_t kChunks = 7;
  Mapping m(kChunks);
  ASSERT_NE(m.data(), nullptr);
  unsigned char* p = m.data();
  std::mt19937_64 rng(std::random_device{}());
  std::memset(p, 0, kChunk);
  for (size_t i = 0; i < kChunk; ++i) p[1 * kChunk + i] = static_cast<unsigned char>(rng() | 1);
  std::memset(p + 3 * kChunk, 0, kChunk);
  p[3 * kChunk + rng() % kChunk] = 0x5a;  // one nonzero byte anywhere in the chunk
  std::memset(p + 4 * kChunk, 0, kChunk);
  for (size_t i = 0; i < kChunk; ++i) p[5 * kChunk + i] = static_cast<unsigned char>(rng());
  p[6 * kChunk] = 0x77;
  std::vector<unsigned char> before(p, p + kChunks * kChunk);

  auto advice = AdviseHugePages(p + 1, 6 * kChunk);
  ASSERT_TRUE(advice.ok()) << advice.status();
  EXPECT_EQ(advice->advised_bytes, 5 * kChunk);   // chunks 1-5
  EXPECT_EQ(advice->released_bytes, 2 * kChunk);  // chunks 2 and 4 (3 holds a byte)
  EXPECT_EQ(advice->collapsed_bytes + advice->failed_bytes, 3 * kChunk);  // 1, 3, 5
  // Every byte, the partial chunks' included, is what it was.
  EXPECT_EQ(std::memcmp(p, before.data(), before.size()), 0);

  // The released chunks fault in as huge pages when written (the kernel may lack a free one, so
  // at least one of the two is asked for); the collapsed ones are huge already. Chunks 1-5 are
  // one mapping now (smaps counts per mapping).
  p[2 * kChunk + 5] = 1;
  p[4 * kChunk + 9] = 1;
  auto huge = HugePageBytes(p + kChunk, 5 * kChunk);
  ASSERT_TRUE(huge.ok()) << huge.status();
  const size_t collapsed = advice->collapse_status.ok() ? 3 * kChunk : 0;
  if (!advice->collapse_status.ok()) GTEST_LOG_(INFO) << "collapse: " << advice->collapse_status;
  EXPECT_GE(*huge, collapsed + kChunk);
  // Chunk 0 (outside the call's whole chunks) stays in small pages.
  auto outside = HugePageBytes(p, kChunk);
  ASSERT_TRUE(outside.ok());
  EXPECT_EQ(*outside, 0u);
}

TEST(HugePages, ZerosOfASharedMappingAreNotGivenBack) {
  if (ThpMode() == "never" || ThpMode().empty()) GTEST_SKIP() << "THP is off on this kernel";
  // MADV_DONTNEED of shared memory does not make it read as zeros: it must be collapsed instead.
  Mapping m(2, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_NE(m.data(), nullptr);
  std::memset(m.data(), 0, 2 * kChunk);
  auto advice = AdviseHugePages(m.data(), 2 * kChunk);
  ASSERT_TRUE(advice.ok()) << advice.status();
  EXPECT_EQ(advice->advised_bytes, 2 * kChunk);
  EXPECT_EQ(advice->released_bytes, 0u);
  EXPECT_EQ(advice->collapsed_bytes + advice->failed_bytes, 2 * kChunk);
}

TEST(HugePages, RangesWithoutAWholeChunkAndBadArguments) {
  Mapping m(2);
  ASSERT_NE(m.data(), nullptr);
  auto small = AdviseHugePages(m.data() + 4096, kChunk);  // straddles, holds no whole chunk
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ(small->advised_bytes, 0u);
  auto empty = AdviseHugePages(nullptr, 0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->advised_bytes, 0u);
  auto null = AdviseHugePages(nullptr, kChunk);
  EXPECT_EQ(null.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(null.status().message().find(std::to_string(kChunk)), std::string::npos);
}

}  // namespace
}  // namespace mempipe
