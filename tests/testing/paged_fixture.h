// Test support: random paged KV caches with NaN-poisoned unused slots, ragged batches and
// shuffled block tables, plus float64 references that read the cache through the block table.
//
//   std::mt19937_64 rng(TestSeed());
//   PagedFixture f(rng, {.dtype = DType::kBFloat16, .block_size = 16, .num_kv_heads = 2,
//                        .head_dim = 64, .seq_lens = {17, 300}});
//   f.cache_view();  f.table_view();
#ifndef MEMPIPE_TESTS_TESTING_PAGED_FIXTURE_H_
#define MEMPIPE_TESTS_TESTING_PAGED_FIXTURE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"

namespace mempipe::testing {

// Fresh per run; MEMPIPE_TEST_SEED=N reproduces a failure. The seed is printed.
inline uint64_t TestSeed() {
  uint64_t seed;
  if (const char* env = std::getenv("MEMPIPE_TEST_SEED")) {
    seed = std::strtoull(env, nullptr, 10);
  } else {
    seed = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  }
  std::cout << "[ seed ] MEMPIPE_TEST_SEED=" << seed << "\n";
  return seed;
}

struct FixtureSpec {
  DType dtype = DType::kFloat32;
  int block_size = 16;
  int num_kv_heads = 2;
  int head_dim = 64;
  std::vector<int> seq_lens;
  int spare_blocks = 3;  // unused blocks, NaN-poisoned
  KvLayout layout = KvLayout::kTokenMajor;
};

class PagedFixture {
 public:
  PagedFixture(std::mt19937_64& rng, const FixtureSpec& spec) : spec_(spec) {
    num_seqs_ = static_cast<int>(spec.seq_lens.size());
    max_blocks_ = 1;
    int used = 0;
    for (int len : spec.seq_lens) {
      max_blocks_ = std::max(max_blocks_, NumPages(len, spec.block_size));
      used += NumPages(len, spec.block_size);
    }
    num_blocks_ = used + spec.spare_blocks;
    cache_.num_blocks = num_blocks_;
    cache_.block_size = spec.block_size;
    cache_.num_kv_heads = spec.num_kv_heads;
    cache_.head_dim = spec.head_dim;
    cache_.dtype = spec.dtype;
    cache_.layout = spec.layout;
    storage_.resize(cache_.NumBytes());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (size_t i = 0; i < cache_.NumElems(); ++i)
      StoreFromFloat(storage_.data(), spec.dtype, i, nan);
    cache_.data = storage_.data();

    // Shuffled physical blocks; table entries past a sequence's pages are poisoned with -7.
    std::vector<int32_t> perm(num_blocks_);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    block_table_.assign(static_cast<size_t>(num_seqs_) * max_blocks_, -7);
    int next = 0;
    for (int s = 0; s < num_seqs_; ++s) {
      for (int p = 0; p < NumPages(spec.seq_lens[s], spec.block_size); ++p) {
        block_table_[static_cast<size_t>(s) * max_blocks_ + p] = perm[next++];
      }
    }
    seq_lens_.assign(spec.seq_lens.begin(), spec.seq_lens.end());

    // Keys with structure: N(0, 1) plus a per-channel offset, so min/max differ per page, and
    // negative values throughout.
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> offset(spec.head_dim);
    for (float& o : offset) o = normal(rng);
    for (int s = 0; s < num_seqs_; ++s) {
      for (int t = 0; t < spec.seq_lens[s]; ++t) {
        for (int h = 0; h < spec.num_kv_heads; ++h) {
          for (int c = 0; c < spec.head_dim; ++c) {
            SetKv(0, s, t, h, c, normal(rng) + offset[c]);
            SetKv(1, s, t, h, c, normal(rng));
          }
        }
      }
    }
    digest_storage_.assign(
        num_blocks_ * 2ull * spec.num_kv_heads * spec.head_dim * DTypeSize(spec.dtype), 0);
  }

  KvCacheView cache_view() { return cache_; }
  BlockTableView table_view() const {
    return BlockTableView{block_table_.data(), seq_lens_.data(), num_seqs_, max_blocks_};
  }
  DigestView digest_view() {
    return DigestView{digest_storage_.data(), spec_.dtype, num_blocks_, spec_.num_kv_heads,
                      spec_.head_dim};
  }
  // Slot of token t of sequence s.
  int64_t Slot(int s, int t) const {
    return static_cast<int64_t>(Block(s, t / spec_.block_size)) * spec_.block_size +
           t % spec_.block_size;
  }
  int32_t Block(int s, int p) const {
    return block_table_[static_cast<size_t>(s) * max_blocks_ + p];
  }

  // Value of K (kv = 0) or V (kv = 1) as stored, read back as double.
  double Kv(int kv, int s, int t, int h, int c) const {
    return LoadAsFloat(storage_.data(), spec_.dtype, Index(kv, s, t, h, c));
  }
  void SetKv(int kv, int s, int t, int h, int c, float v) {
    StoreFromFloat(storage_.data(), spec_.dtype, Index(kv, s, t, h, c), v);
  }

  int num_seqs() const { return num_seqs_; }
  int num_blocks() const { return num_blocks_; }
  int max_blocks() const { return max_blocks_; }
  const FixtureSpec& spec() const { return spec_; }
  std::vector<int32_t>& mutable_block_table() { return block_table_; }
  std::vector<int32_t>& mutable_seq_lens() { return seq_lens_; }

 private:
  size_t Index(int kv, int s, int t, int h, int c) const {
    return cache_.ElementOffset(kv, Block(s, t / spec_.block_size), t % spec_.block_size, h, c);
  }

  FixtureSpec spec_;
  int num_seqs_ = 0, max_blocks_ = 0, num_blocks_ = 0;
  KvCacheView cache_;
  std::vector<uint8_t> storage_;
  std::vector<uint8_t> digest_storage_;
  std::vector<int32_t> block_table_;
  std::vector<int32_t> seq_lens_;
};

// Random values of `dtype`, rounded, as both storage bytes and the exact fp32 values.
struct RandomTensor {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
  RandomTensor(std::mt19937_64& rng, DType dtype, size_t n, float stddev = 1.0f)
      : bytes(n * DTypeSize(dtype)), values(n) {
    std::normal_distribution<float> normal(0.0f, stddev);
    for (size_t i = 0; i < n; ++i) {
      StoreFromFloat(bytes.data(), dtype, i, normal(rng));
      values[i] = LoadAsFloat(bytes.data(), dtype, i);
    }
  }
  const void* data() const { return bytes.data(); }
};

// float64 softmax attention of query q [D] over keys/values listed by (s, t) for KV head h.
inline std::vector<double> ReferenceAttention(const PagedFixture& f, const float* q, int s, int h,
                                              const std::vector<int>& tokens, double scale) {
  const int d = f.spec().head_dim;
  std::vector<double> logits(tokens.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < tokens.size(); ++i) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * f.Kv(0, s, tokens[i], h, c);
    logits[i] = dot * scale;
    mx = std::max(mx, logits[i]);
  }
  double denom = 0;
  std::vector<double> out(d, 0.0);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const double p = std::exp(logits[i] - mx);
    denom += p;
    for (int c = 0; c < d; ++c) out[c] += p * f.Kv(1, s, tokens[i], h, c);
  }
  for (double& v : out) v /= denom;
  return out;
}

// Absolute tolerance on attention outputs (values ~N(0,1)) per storage dtype of the output.
// Unit roundoff (half an ulp, relative) of each dtype: 2^-24, 2^-11, 2^-8.
inline double UnitRoundoff(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 0x1p-24;
    case DType::kFloat16:
      return 0x1p-11;
    case DType::kBFloat16:
      return 0x1p-8;
  }
  return 0;
}

// Tolerance for one attention output element against the float64 reference, derived rather
// than guessed. The kernels read the same rounded inputs as the reference, compute in fp32 and
// round the output once, so the error is
//   output rounding      u(dtype) * |ref|                      (half an ulp at the value)
//   fp32 accumulation    4 * sqrt(len + head_dim) * u(fp32) * max|v|
// where len is the softmax's reduction length (tokens attended) and the second term is the
// random-walk size of the fp32 rounding in the dot products and the weighted sum, with a
// factor 4 of margin; plus a floor of 1e-7 for fp16 subnormals. bf16 at |ref| ~ 0.05 gives
// ~2e-4, so a dropped page of a 5,120-token sequence (an error near 1e-3) fails the check
// (DecodeTolerance.RejectsADroppedPageAndAZeroedOutput).
inline double AttentionTolerance(DType dtype, double ref, int len, int head_dim,
                                 double max_abs_value = 5.0) {
  return UnitRoundoff(dtype) * std::abs(ref) +
         4.0 * std::sqrt(static_cast<double>(len + head_dim)) * UnitRoundoff(DType::kFloat32) *
             max_abs_value +
         1e-7;
}

// The bound for the GPU decode kernels: AttentionTolerance plus the rounding of the softmax
// probabilities to the cache dtype before the P.V product (as flash attention does), which adds
// up to u(dtype) x sum_j p_j |v_j| <= u(dtype) x max|v| per output element (fp32: none). The
// probability term is the one tests/python/test_gpu.py's decode_tol adds.
inline double GpuAttentionTolerance(DType dtype, double ref, int len, int head_dim,
                                    double max_abs_value = 5.0) {
  const double p_round = dtype == DType::kFloat32 ? 0.0 : UnitRoundoff(dtype) * max_abs_value;
  return AttentionTolerance(dtype, ref, len, head_dim, max_abs_value) + p_round;
}

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_TESTING_PAGED_FIXTURE_H_
