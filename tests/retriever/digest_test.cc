#include "retriever/digest.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "core/cpu_kernel.h"
#include "gtest/gtest.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

using testing::PagedFixture;
using testing::TestSeed;

// Parameters: dtype, block size, head_dim, cache layout, host kernel (the incremental update's
// fp32 widening: portable or AVX-512).
class DigestTest
    : public ::testing::TestWithParam<std::tuple<DType, int, int, KvLayout, CpuKernel>> {
 protected:
  void TearDown() override { ASSERT_TRUE(SetCpuKernel(CpuKernel::kAuto).ok()); }
};

// The bulk build equals a plain max/min over each page's valid tokens, and appending the same
// tokens (fused KV write + incremental digest) gives the same bytes, whether one token per
// sequence per call (decode) or in runs of consecutive slots (prompts, chunked prefill) that
// start and end anywhere in a page.
TEST_P(DigestTest, BulkMatchesReferenceAndIncrementalMatchesBulk) {
  const auto [dtype, block_size, head_dim, layout, kernel] = GetParam();
  if (!CpuKernelAvailable(kernel)) GTEST_SKIP() << "this CPU lacks the kernel's instructions";
  ASSERT_TRUE(SetCpuKernel(kernel).ok());
  std::mt19937_64 rng(TestSeed());
  std::uniform_int_distribution<int> len_dist(1, 5 * block_size + 3);
  std::vector<int> lens = {1, block_size, block_size + 1, len_dist(rng), len_dist(rng)};
  PagedFixture f(rng, {.dtype = dtype,
                       .block_size = block_size,
                       .num_kv_heads = 3,
                       .head_dim = head_dim,
                       .seq_lens = lens,
                       .layout = layout});
  const DigestView bulk = f.digest_view();
  ASSERT_TRUE(BuildDigests(f.cache_view(), f.table_view(), bulk).ok());

  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int p = 0; p < NumPages(lens[s], block_size); ++p) {
      const int block = f.Block(s, p);
      for (int h = 0; h < 3; ++h) {
        for (int c = 0; c < head_dim; ++c) {
          double mx = -1e300, mn = 1e300;
          for (int t = p * block_size; t < std::min(lens[s], (p + 1) * block_size); ++t) {
            mx = std::max(mx, f.Kv(0, s, t, h, c));
            mn = std::min(mn, f.Kv(0, s, t, h, c));
          }
          ASSERT_EQ(LoadAsFloat(bulk.data, dtype, bulk.Offset(block, 0, h) + c), mx);
          ASSERT_EQ(LoadAsFloat(bulk.data, dtype, bulk.Offset(block, 1, h) + c), mn);
        }
      }
    }
  }

  // Replays every token into a fresh NaN-poisoned cache through the fused append, call by call
  // (each call: (sequence, token) pairs in order, then a padding slot), and checks the digests
  // of every page against the bulk build and the cache against the source.
  using Calls = std::vector<std::vector<std::pair<int, int>>>;
  KvCacheView src = f.cache_view();
  const size_t head_row = static_cast<size_t>(head_dim) * DTypeSize(dtype);  // one KV head
  // One token's row of one KV head (kv 0: K, 1: V) as bytes, in any layout (head_kt's K rows
  // are gathered through ElementOffset).
  const size_t esize = DTypeSize(dtype);
  auto row_of = [&](const void* data, int kv, int64_t slot, int h) {
    std::vector<uint8_t> row(head_row);
    for (int c = 0; c < head_dim; ++c) {
      const size_t o = src.ElementOffset(kv, static_cast<int>(slot / block_size),
                                         static_cast<int>(slot % block_size), h, c);
      std::memcpy(row.data() + c * esize, static_cast<const uint8_t*>(data) + o * esize, esize);
    }
    return row;
  };
  auto replay = [&](const Calls& calls, const char* how) {
    std::vector<uint8_t> cache2(src.NumBytes()), dig2(bulk.NumBytes());
    for (size_t i = 0; i < src.NumElems(); ++i) StoreFromFloat(cache2.data(), dtype, i, NAN);
    for (size_t i = 0; i < bulk.NumElems(); ++i) StoreFromFloat(dig2.data(), dtype, i, NAN);
    KvCacheView dst = src;
    dst.data = cache2.data();
    DigestView inc = bulk;
    inc.data = dig2.data();
    for (const auto& call : calls) {
      std::vector<int64_t> slots;
      std::vector<uint8_t> k, v;
      for (const auto& [s, t] : call) {
        const int64_t slot = f.Slot(s, t);
        slots.push_back(slot);
        for (int h = 0; h < 3; ++h) {  // the token's rows [kv_heads, head_dim], as a model gives
          const std::vector<uint8_t> kr = row_of(src.data, 0, slot, h);
          const std::vector<uint8_t> vr = row_of(src.data, 1, slot, h);
          k.insert(k.end(), kr.begin(), kr.end());
          v.insert(v.end(), vr.begin(), vr.end());
        }
      }
      slots.push_back(-1);  // padding slot: skipped
      k.resize(k.size() + 3 * head_row, 0xff);
      v.resize(v.size() + 3 * head_row, 0xff);
      ASSERT_TRUE(AppendKvAndDigests(dst, slots.data(), static_cast<int>(slots.size()), k.data(),
                                     v.data(), inc)
                      .ok());
    }
    for (int s = 0; s < f.num_seqs(); ++s) {
      for (int p = 0; p < NumPages(lens[s], block_size); ++p) {
        const size_t off = bulk.Offset(f.Block(s, p), 0, 0) * DTypeSize(dtype);
        ASSERT_EQ(std::memcmp(static_cast<uint8_t*>(bulk.data) + off, dig2.data() + off,
                              bulk.BlockStride() * DTypeSize(dtype)),
                  0)
            << how << ": seq " << s << " page " << p;
      }
    }
    // The cache written by appends equals the source on every valid slot.
    for (int s = 0; s < f.num_seqs(); ++s) {
      for (int t = 0; t < lens[s]; ++t) {
        const int64_t slot = f.Slot(s, t);
        for (int kv = 0; kv < 2; ++kv) {
          for (int h = 0; h < 3; ++h) {
            ASSERT_EQ(row_of(src.data, kv, slot, h), row_of(cache2.data(), kv, slot, h)) << how;
          }
        }
      }
    }
  };
  // Decoding: one token of every sequence per call.
  Calls decode;
  const int max_len = *std::max_element(lens.begin(), lens.end());
  for (int t = 0; t < max_len; ++t) {
    decode.emplace_back();
    for (int s = 0; s < f.num_seqs(); ++s) {
      if (t < lens[s]) decode.back().emplace_back(s, t);
    }
  }
  replay(decode, "token by token");
  // Chunked prefill: each sequence in chunks of random length (1 to two pages and more), the
  // sequences' chunks of a round in one call.
  Calls chunks;
  std::uniform_int_distribution<int> chunk_dist(1, 2 * block_size + 3);
  std::vector<int> done(f.num_seqs(), 0);
  for (bool more = true; more;) {
    more = false;
    chunks.emplace_back();
    for (int s = 0; s < f.num_seqs(); ++s) {
      const int n = std::min(chunk_dist(rng), lens[s] - done[s]);
      for (int i = 0; i < n; ++i) chunks.back().emplace_back(s, done[s]++);
      more |= done[s] < lens[s];
    }
  }
  replay(chunks, "in chunks");
  // Whole prompts, all sequences in one call.
  Calls prompts(1);
  for (int s = 0; s < f.num_seqs(); ++s) {
    for (int t = 0; t < lens[s]; ++t) prompts[0].emplace_back(s, t);
  }
  replay(prompts, "whole prompts");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DigestTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 32, 64), ::testing::Values(64, 128, 256),
                       ::testing::Values(KvLayout::kTokenMajor, KvLayout::kHeadMajor),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512)));

// Page-major differs from head-major only in its block, KV head and K-to-V strides.
INSTANTIATE_TEST_SUITE_P(
    PageMajor, DigestTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 64), ::testing::Values(64),
                       ::testing::Values(KvLayout::kPageMajor),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512)));

// Head-major with transposed K pages: the bulk build and the append read K through KeyInPage.
INSTANTIATE_TEST_SUITE_P(
    HeadMajorKT, DigestTest,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                       ::testing::Values(16, 64), ::testing::Values(64, 128),
                       ::testing::Values(KvLayout::kHeadMajorKT, KvLayout::kPageMajorKT),
                       ::testing::Values(CpuKernel::kPortable, CpuKernel::kAvx512)));

TEST(DigestErrors, NameTheBadValue) {
  std::mt19937_64 rng(TestSeed());
  PagedFixture f(rng, {.seq_lens = {20}});
  DigestView d = f.digest_view();
  d.head_dim = 128;
  absl::Status s = BuildDigests(f.cache_view(), f.table_view(), d);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("128"), absl::string_view::npos) << s;

  const int64_t bad_slot = static_cast<int64_t>(f.num_blocks()) * 16 + 5;
  s = UpdateDigests(f.cache_view(), &bad_slot, 1, f.digest_view());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(std::to_string(bad_slot)), absl::string_view::npos) << s;

  f.mutable_block_table()[1] = f.num_blocks() + 4;  // page 1 of sequence 0 (20 tokens = 2 pages)
  s = BuildDigests(f.cache_view(), f.table_view(), f.digest_view());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(std::to_string(f.num_blocks() + 4)), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace mempipe
