#include "attention/decode.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"
#include "core/cpu_kernel.h"
#include "core/parallel.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Running softmax state of the G query heads of one KV head, updated a page at a time: the
// page's keys are converted once, scored for all G heads, and the running max is rescaled once
// per page rather than per token.
struct GroupAccumulator {
  int groups, head_dim;
  std::vector<float> q;       // [G, D] query rows, fp32
  std::vector<float> acc;     // [G, D] sum_j exp(s_j - m) v_j
  std::vector<float> m;       // [G] running max
  std::vector<float> l;       // [G] running sum of exp(s_j - m)
  std::vector<float> kpage;   // [D, block_size] keys of the page, fp32, transposed
  std::vector<float> vpage;   // [block_size, D] values of the page, fp32
  std::vector<float> logits;  // [G, block_size]

  GroupAccumulator(int g, int d, int block_size)
      : groups(g),
        head_dim(d),
        q(g * d),
        acc(g * d),
        m(g),
        l(g),
        kpage(block_size * d),
        vpage(block_size * d),
        logits(g * block_size) {}

  void Reset() {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
  }

  // Attends the group's heads to tokens [0, n) of `block`.
  template <typename T>
  void AddPage(const KvCacheView& cache, int block, int kv_head, int n, float scale) {
    const T* kbase = static_cast<const T*>(cache.data) + cache.Offset(0, block, 0, kv_head);
    const T* vbase = static_cast<const T*>(cache.data) + cache.Offset(1, block, 0, kv_head);
    const size_t stride = cache.TokenStride();
    const int d = head_dim;
    for (int t = 0; t < n; ++t) {
      const T* v = vbase + t * stride;
      float* vr = &vpage[t * d];
      for (int c = 0; c < d; ++c) kpage[c * n + t] = ToFloat(kbase[cache.KeyInPage(t, c)]);
      for (int c = 0; c < d; ++c) vr[c] = ToFloat(v[c]);
    }
    for (int g = 0; g < groups; ++g) {
      const float* qg = &q[g * d];
      float* lg = &logits[g * n];
      // Dot products for all n tokens at once, vectorised across tokens (each token's sum
      // still runs in channel order).
      std::fill(lg, lg + n, 0.0f);
      for (int c = 0; c < d; ++c) {
        const float qc = qg[c];
        const float* kc = &kpage[c * n];
        for (int t = 0; t < n; ++t) lg[t] += qc * kc[t];
      }
      float page_max = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < n; ++t) {
        lg[t] *= scale;
        page_max = std::max(page_max, lg[t]);
      }
      const float new_max = std::max(m[g], page_max);
      const float corr = std::exp(m[g] - new_max);  // 0 on the first page (m = -inf)
      float* ag = &acc[g * d];
      for (int c = 0; c < d; ++c) ag[c] *= corr;
      float sum = 0.0f;
      for (int t = 0; t < n; ++t) {
        const float p = std::exp(lg[t] - new_max);
        sum += p;
        const float* vr = &vpage[t * d];
        for (int c = 0; c < d; ++c) ag[c] += p * vr[c];
      }
      l[g] = l[g] * corr + sum;
      m[g] = new_max;
    }
  }

  void Store(void* out, DType dtype, size_t row0) const {
    for (int g = 0; g < groups; ++g) {
      const float inv = 1.0f / l[g];
      for (int c = 0; c < head_dim; ++c) {
        StoreFromFloat(out, dtype, (row0 + g) * head_dim + c, acc[g * head_dim + c] * inv);
      }
    }
  }
};

absl::Status ValidateCommon(const DecodeIo& io, const KvCacheView& cache,
                            const BlockTableView& table) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  if (io.query == nullptr || io.out == nullptr) {
    return absl::InvalidArgumentError("query and out must not be null");
  }
  if (io.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("query head_dim ", io.head_dim, " differs from the cache's ", cache.head_dim));
  }
  if (io.num_heads <= 0 || io.num_heads % cache.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_heads ", io.num_heads,
                                                   " must be a positive multiple of num_kv_heads ",
                                                   cache.num_kv_heads));
  }
  return absl::OkStatus();
}

// Loads query rows [row0, row0 + groups) as fp32, multiplied by `scale`.
void LoadQueryRows(const DecodeIo& io, size_t row0, int groups, float scale, float* q) {
  for (int j = 0; j < groups * io.head_dim; ++j) {
    q[j] = LoadAsFloat(io.query, io.dtype, row0 * io.head_dim + j) * scale;
  }
}

// The portable kernel: one GroupAccumulator per KV head of a range.
template <typename T>
class PortableHeads {
 public:
  // stage_rows: ignored (AddPage converts each page into its own scratch anyway).
  PortableHeads(int heads, int groups, int head_dim, int block_size, float scale,
                bool /*stage_rows*/ = false)
      : scale_(scale), acc_(heads, GroupAccumulator(groups, head_dim, block_size)) {}
  // AddPage ignores the next page: this kernel prefetches nothing. It is bound by its arithmetic
  // (9-20% of the read on the Zen 5 build VM), and a burst of prefetches two pages ahead made it
  // 0-10% slower there (2026-12-04, integration/bench/results/portable_prefetch/).
  static constexpr bool kPrefetchesNext = false;
  static constexpr bool kWritesOutput = true;

  void Begin(int i, const DecodeIo& io, size_t row0) {
    LoadQueryRows(io, row0, acc_[i].groups, 1.0f, acc_[i].q.data());
    acc_[i].Reset();
  }
  void AddPage(const KvCacheView& cache, int block, int kv_head, int i, int n,
               int /*next_block*/ = -1, int /*next_n*/ = 0, int /*next_head*/ = -1) {
    acc_[i].template AddPage<T>(cache, block, kv_head, n, scale_);
  }
  void Store(int i, const DecodeIo& io, size_t row0) const {
    acc_[i].Store(io.out, io.dtype, row0);
  }
  void StorePartial(int i, float* acc, float* m, float* l) const {
    const GroupAccumulator& a = acc_[i];
    std::copy(a.acc.begin(), a.acc.end(), acc);
    std::copy(a.m.begin(), a.m.end(), m);
    std::copy(a.l.begin(), a.l.end(), l);
  }

 private:
  float scale_;
  std::vector<GroupAccumulator> acc_;
};

#if MEMPIPE_AVX512_KERNEL || MEMPIPE_AVX2_KERNEL
// ---- Shared by the AVX-512 and AVX2 kernels ---------------------------------------------

// A page of a batch (Avx512Heads, Avx2Heads): its V rows and tokens.
template <typename T>
struct ValuePage {
  const T* v;  // token 0's row; the rows are the cache's token stride apart
  int n;
};

// Decode's rows in the order the AVX-512 kernel reads them over a thread's range (each batch's K
// pages, then its V pages: ReadAheadPlanner), prefetched a fixed distance ahead
// (kReadAheadBytes): Step, once for each row the kernel reads (the scores' PrefetchRow, P.V's
// per-token prefetch), prefetches the row that lies that distance further on. Decode knows
// every page it will read before it starts, so the misses keep the same distance ahead across
// pages, batches and items: the next batch's first K page is in flight during this batch's P.V,
// and the batch's V pages during its last scores. With NextPage instead (DecodeReadAhead
// kNextPage), the scores prefetch the next page's K rows and P.V its batch's V rows 48 tokens
// ahead, so P.V's last rows and the next batch's first scores had nothing new in flight.
// SmolLM2 4 x 6K bf16, budget 512, one thread, wall clock per layer, alternated: on the Zen 5
// build VM 0.099-0.100 against 0.115-0.126 ms (head-major), 0.076-0.077 against 0.095-0.108
// (page_kt); Llama-3-8B 1.27 against 1.45-1.51 ms. On an Emerald Rapids host, page_kt 0.133
// against 0.141-0.150 ms (results/read_ahead/). Dense decode (a slot per KV head of its range,
// every page's heads in turn) took the stream later: results/dense_stream/.
class ReadAhead {
 public:
  // A piece of the stream: `steps` steps of `lines` 64-byte lines each, `stride` bytes apart.
  struct Piece {
    const char* first;
    size_t stride;
    int steps, lines;
  };

  void Clear() {
    pieces_.clear();
    piece_ = 0;
    step_ = 0;
  }
  void Add(const char* first, size_t stride, int steps, int lines) {
    if (steps > 0) pieces_.push_back(Piece{first, stride, steps, lines});
  }
  // Lines per step of a transposed K page of `page_lines` lines read in n steps (one per token
  // the kernel scores): the whole page, spread over them.
  static int TransposedStepLines(int page_lines, int n) { return (page_lines + n - 1) / n; }
  // The first `steps` steps (the distance) at once.
  void Start(int steps) {
    for (int i = 0; i < steps; ++i) Step();
  }
  // Tried: a cursor (the row and the steps left, no Piece read per step). From cache it cut the
  // sparse kernel 7-14%, but from DRAM the reads got slower: SmolLM2 page_kt bf16, one thread,
  // Zen 5 build VM, 0.083-0.084 against 0.075-0.078 ms per layer, its bare reads 0.080-0.085
  // against 0.075-0.078 (results/compute_trim/). Issued faster, the prefetches bunch up.
  [[gnu::always_inline]] void Step() {
    if (piece_ == pieces_.size()) return;
    const Piece& p = pieces_[piece_];
    const char* row = p.first + step_ * p.stride;
    for (int j = 0; j < p.lines; ++j) _mm_prefetch(row + 64 * j, kReadAheadHint);
    if (++step_ == p.steps) step_ = 0, ++piece_;
  }

 private:
  static constexpr auto kReadAheadHint = _MM_HINT_T1;
  std::vector<Piece> pieces_;
  size_t piece_ = 0;
  int step_ = 0;
};

// The page AddPage computes after the current one. Its rows are prefetched one row per token of
// the current page's scores (PrefetchRow), so the misses of the next page overlap the
// arithmetic of this one; in the AVX-512 kernel its K rows only, P.V prefetching the V rows
// (kValueAheadTokens). A burst of prefetches at the start of a page, the
// next page read only when it is reached, or a distance of 2 pages, all measured slower on the
// build VM (one thread, CPU time, `mempipe-cpu-kernel-bench`): sparse Llama-3-8B bf16 2.16 ms
// per layer without it, 1.61 ms with it, 1.66 ms two pages ahead; dense 12.1 ms with the
// burst, 7.0 ms with it; SmolLM2 sparse fp32 0.084 -> 0.070 ms, bf16 0.062 -> 0.035 ms.
// Where a thread's range holds several KV heads (dense decode), the rows are taken in the order
// they lie in memory (token-major over the range), not head by head: a single thread's bare read
// of the dense rows went from 23 to 38 GB/s with it (40 GB/s sequential). Into L2 (T1) rather
// than L1 (T0): sparse apply 0.77 vs 0.88 ms per layer with 2 threads, and 31 vs 35 ms per
// step in `mempipe-bench` (30 sparse layers, 2 threads, 2026-11-30). On the Zen 5 build VM
// (2 threads, SmolLM2 4 x 6K bf16 sparse, wall clock, 2026-12-04, results/zen5_scatter/):
// 0.064-0.068 ms per layer; 2 or 3 pages ahead 0.065-0.068, into L1 (T0) 0.067-0.072, no
// prefetch 0.090-0.093.
struct NextPage {
  const char* k = nullptr;     // token 0, first KV head of the range, of the next page's K rows
  const char* v = nullptr;     // (nullptr: none)
  size_t stride = 0;           // bytes between its tokens
  size_t head_bytes = 0;       // bytes between its KV heads
  int n = 0;                   // tokens
  int lines = 0;               // 64-byte lines per row
  int heads = 1;               // KV heads of the range
  int tok = 0, head = 0;       // the cursor's row
  bool values = true;          // V rows too (false: P.V prefetches them, kValueAheadTokens)
  ReadAhead* ahead = nullptr;  // sparse decode: PrefetchRow steps this stream instead
};

// The cursor over `next_block`'s rows (next_n tokens) for the i-th of `heads` KV heads of a range
// that starts at KV head h0, when the current page has n tokens; none when next_block < 0.
template <typename T>
NextPage NextPageCursor(const KvCacheView& cache, int next_block, int next_n, int h0, int heads,
                        int i, int n) {
  NextPage next;
  if (next_block < 0) return next;
  next.k = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                         cache.Offset(0, next_block, 0, h0));
  next.v = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                         cache.Offset(1, next_block, 0, h0));
  next.stride = cache.TokenStride() * sizeof(T);
  next.head_bytes = cache.HeadStride() * sizeof(T);
  next.n = next_n;
  next.lines = cache.head_dim * static_cast<int>(sizeof(T)) / 64;
  next.heads = heads;
  next.tok = i * n / heads;
  next.head = i * n % heads;
  return next;
}

// The rows AddPage prefetches for the i-th of `heads` KV heads of a range when it computes KV
// head kv_head's page of n tokens: token-major, the i-th n of the next page's rows over the whole
// range, in memory order; head- or page-major, kv_head's own next page (one contiguous piece per
// plane, or one for both).
// next_head >= 0 (one KV head per range only): the next page is that KV head's, not kv_head's
// (sparse decode's next item).
template <typename T>
NextPage NextPageRows(const KvCacheView& cache, int next_block, int next_n, int kv_head, int heads,
                      int i, int n, int next_head = -1) {
  const int h = next_head < 0 ? kv_head : next_head;
  return cache.HeadMajor() ? NextPageCursor<T>(cache, next_block, next_n, h, 1, 0, n)
                           : NextPageCursor<T>(cache, next_block, next_n, h - i, heads, i, n);
}

// Prefetches the cursor's row (K, and V unless P.V does) and moves it on.
inline void PrefetchRow(NextPage& next) {
  if (next.ahead != nullptr) return next.ahead->Step();
  if (next.k == nullptr || next.tok >= next.n) return;
  const size_t off = next.tok * next.stride + next.head * next.head_bytes;
  for (int j = 0; j < next.lines; ++j) {
    _mm_prefetch(next.k + off + 64 * j, _MM_HINT_T1);
    if (next.values) _mm_prefetch(next.v + off + 64 * j, _MM_HINT_T1);
  }
  if (++next.head == next.heads) next.head = 0, ++next.tok;
}

// A batch's V rows in P.V's order (page by page, token by token): the first of them, which
// BatchedHeads::ScoreAndFlushIfFull prefetches for P.V (kValueAheadTokens).
template <typename T>
struct ValueRowCursor {
  const ValuePage<T>* pages;
  int count;
  size_t stride;  // elements between a page's rows
  int e = 0, t = 0;

  // The next row; nullptr past the batch's last.
  const T* Next() {
    while (e < count && t >= pages[e].n) ++e, t = 0;
    return e < count ? pages[e].v + static_cast<size_t>(t++) * stride : nullptr;
  }
};

// Prefetches a row of `lines` 64-byte lines into L2 (as PrefetchRow); none for nullptr. Always
// inlined: out of line, GCC finds it free of side effects (a prefetch is not one) and deletes
// the calls.
[[gnu::always_inline]] inline void PrefetchValueRow(const void* row, int lines) {
  if (row == nullptr) return;
  for (int j = 0; j < lines; ++j) {
    _mm_prefetch(static_cast<const char*>(row) + 64 * j, _MM_HINT_T1);
  }
}

// How many V rows ahead of its own P.V prefetches, in the AVX-512 kernel. Its scores prefetch
// only the next page's K rows, and P.V the V rows this many tokens ahead within the batch; the
// batch's first rows are prefetched before the scores of the page that fills the batch. Before,
// the scores prefetched the next page's K and V rows and P.V none, so nothing new was in flight
// while P.V ran. Zen 4 build VM, 2 threads, kernel bench, the two builds alternated
// (results/vpf_zen4/): dense SmolLM2 4 x 6K bf16 0.72-0.85 ms per layer against 0.95-0.99
// (65-70% of the read against 42-59%), fp32 1.31-1.47 against 1.44-1.66, Llama-3-8B 1 x 32K
// bf16 6.0-7.0 against 6.5-7.3; sparse unchanged. 32 and 64 rows did about as well, 96 and 128
// worse. On the H200 host (Intel) neither faster nor slower beyond its noise.
constexpr int kValueAheadTokens = 48;
// The most tokens a batch holds (BatchTokens: block sizes are at most 64, ValidateBlockSize).
constexpr int kMaxBatchTokens = 128;

// The state both vector kernels keep for each of `heads` KV heads (slot i) of a range: the G
// query heads' rows, their unnormalised accumulators (in the kernel's channel order:
// Derived::Position), running maxima and sums, and the batch of pages scored but not yet folded
// in. Derived (Avx512Heads, Avx2Heads) supplies Position(c), HeadScores<H>(k, stride, n, q0, p,
// next) (the scores of H <= 4 heads whose query rows start at q_[q0]), kSoftmaxValues<NB>
// (the function of a batch's running-max update and P.V, NB = head_dim / 16) and kValuesAhead
// (P.V prefetches the batch's V rows, the first kValueAheadTokens of them prefetched here before
// the scores of the page that fills the batch); the batch runs when full or when the state is
// read (Store, StorePartial).
template <typename Derived, typename T>
class BatchedHeads {
 public:
  static constexpr bool kPrefetchesNext = true;  // AddPage prefetches the next page (NextPage)
  static constexpr bool kWritesOutput = true;

  void Store(int i, const DecodeIo& io, size_t row0) {
    Flush(i);
    const size_t gd = static_cast<size_t>(groups_) * head_dim_;
    for (int g = 0; g < groups_; ++g) {
      const float inv = 1.0f / l_[i * groups_ + g];
      Derived::StoreRow(&acc_[i * gd + g * head_dim_], inv, head_dim_, io, (row0 + g) * head_dim_);
    }
  }

  // Output row `at` (head_dim elements of io.out) = a * inv, a in the accumulators' order
  // (Position), rounded as StoreFromFloat rounds. Derived may replace it with a vector one.
  static void StoreRow(const float* a, float inv, int head_dim, const DecodeIo& io, size_t at) {
    for (int c = 0; c < head_dim; ++c) {
      StoreFromFloat(io.out, io.dtype, at + c, a[Derived::Position(c)] * inv);
    }
  }

  // The G heads' unnormalised state in channel order: acc [G, D], m [G], l [G].
  void StorePartial(int i, float* acc, float* m, float* l) {
    Flush(i);
    const size_t gd = static_cast<size_t>(groups_) * head_dim_;
    for (int g = 0; g < groups_; ++g) {
      const float* a = &acc_[i * gd + g * head_dim_];
      for (int c = 0; c < head_dim_; ++c) acc[g * head_dim_ + c] = a[Derived::Position(c)];
      m[g] = m_[i * groups_ + g];
      l[g] = l_[i * groups_ + g];
    }
  }

 protected:
  // batch_tokens: a batch's capacity (whole pages, at least one); pstride: floats per score row
  // (>= batch_tokens); pad: floats after the last row that a vector may touch.
  BatchedHeads(int heads, int groups, int head_dim, int block_size, float scale, int batch_tokens,
               int pstride, int pad)
      : heads_(heads),
        groups_(groups),
        head_dim_(head_dim),
        block_size_(block_size),
        batch_tokens_(batch_tokens),
        pstride_(pstride),
        scale_(scale),
        q_(static_cast<size_t>(heads) * groups * head_dim),
        acc_(q_.size()),
        m_(heads * groups),
        l_(heads * groups),
        p_(static_cast<size_t>(heads) * groups * pstride + pad),
        corr_(groups),
        batches_(heads) {
    for (Batch& b : batches_) b.pages.resize(batch_tokens / block_size);
  }

  // Pages scored but not yet folded into a slot's state.
  struct Batch {
    std::vector<ValuePage<T>> pages;  // batch_tokens_ / block_size_ entries
    int count = 0, tokens = 0;
  };

  // Slot i's accumulators, maxima and sums for a new call (Begin).
  void ResetSlot(int i) {
    const size_t gd = static_cast<size_t>(groups_) * head_dim_;
    std::fill(acc_.begin() + i * gd, acc_.begin() + (i + 1) * gd, 0.0f);
    std::fill(m_.begin() + i * groups_, m_.begin() + (i + 1) * groups_, kNegInf);
    std::fill(l_.begin() + i * groups_, l_.begin() + (i + 1) * groups_, 0.0f);
  }

  // Adds the page (V rows at v, n tokens, the cache's token stride) to slot i's batch; returns
  // where head 0's scores of its tokens go (head g's at + g * pstride_).
  float* QueuePage(int i, const T* v, int n, size_t stride) {
    vstride_ = stride;
    Batch& batch = batches_[i];
    batch.pages[batch.count++] = ValuePage<T>{v, n};
    float* p = &p_[static_cast<size_t>(i) * groups_ * pstride_ + batch.tokens];
    batch.tokens += n;
    return p;
  }

  // The page's scores into p, four query heads at a time (Derived::HeadScores); the first four
  // prefetch the next page's rows. Then slot i's batch runs if another page would not fit.
  void ScoreAndFlushIfFull(const T* k, size_t stride, int n, int i, float* p, NextPage& next) {
    const size_t gd = static_cast<size_t>(groups_) * head_dim_;
    const bool full = batches_[i].tokens + block_size_ > batch_tokens_;
    // P.V's first rows (the rest it prefetches itself); with a stream (ahead_), none.
    if (Derived::kValuesAhead && full && ahead_ == nullptr) {
      const Batch& b = batches_[i];
      ValueRowCursor<T> rows{b.pages.data(), b.count, vstride_};
      const int lines = head_dim_ * static_cast<int>(sizeof(T)) / 64;
      for (int r = 0; r < kValueAheadTokens; ++r) PrefetchValueRow(rows.Next(), lines);
    }
    for (int g = 0; g < groups_; g += 4) {
      NextPage none;
      NextPage& pf = g == 0 ? next : none;
      float* pg = p + static_cast<size_t>(g) * pstride_;
      const size_t q0 = i * gd + static_cast<size_t>(g) * head_dim_;
      switch (std::min(4, groups_ - g)) {
        case 1:
          self().template HeadScores<1>(k, stride, n, q0, pg, pf);
          break;
        case 2:
          self().template HeadScores<2>(k, stride, n, q0, pg, pf);
          break;
        case 3:
          self().template HeadScores<3>(k, stride, n, q0, pg, pf);
          break;
        default:
          self().template HeadScores<4>(k, stride, n, q0, pg, pf);
          break;
      }
    }
    if (full) Flush(i);
  }

  // Folds slot i's batch into its running state (Derived::SoftmaxValues).
  void Flush(int i) {
    Batch& b = batches_[i];
    if (b.count == 0) return;
    const size_t gd = static_cast<size_t>(groups_) * head_dim_;
    float* acc = &acc_[i * gd];
    float* m = &m_[i * groups_];
    float* l = &l_[i * groups_];
    float* p = &p_[static_cast<size_t>(i) * groups_ * pstride_];
    switch (head_dim_) {
      case 64:
        Derived::template kSoftmaxValues<4>(b.pages.data(), b.count, vstride_, b.tokens, groups_,
                                            pstride_, acc, m, l, p, corr_.data(), ahead_);
        break;
      case 128:
        Derived::template kSoftmaxValues<8>(b.pages.data(), b.count, vstride_, b.tokens, groups_,
                                            pstride_, acc, m, l, p, corr_.data(), ahead_);
        break;
      default:  // 256 (ValidateKvCache admits 64, 128, 256)
        Derived::template kSoftmaxValues<16>(b.pages.data(), b.count, vstride_, b.tokens, groups_,
                                             pstride_, acc, m, l, p, corr_.data(), ahead_);
        break;
    }
    b.count = 0;
    b.tokens = 0;
  }

  Derived& self() { return static_cast<Derived&>(*this); }

  int heads_, groups_, head_dim_, block_size_;
  int batch_tokens_;  // a batch's capacity: whole pages, at least one
  int pstride_;       // floats per score row
  float scale_;
  size_t vstride_ = 0;          // the cache's token stride (elements)
  ReadAhead* ahead_ = nullptr;  // the range's stream (AVX-512 kernel), or none
  std::vector<float> q_, acc_, m_, l_;
  std::vector<float> p_;  // [heads, G, pstride_] the batches' scores, then probabilities
  std::vector<float> corr_;
  std::vector<Batch> batches_;  // [heads]
};
#endif  // MEMPIPE_AVX512_KERNEL || MEMPIPE_AVX2_KERNEL

#if MEMPIPE_AVX512_KERNEL
// ---- AVX-512 kernel ----------------------------------------------------------------------
// Per page and KV head: the G heads' scores of all n tokens (Avx512Scores: blocks of tokens,
// each K chunk loaded and widened once for up to four heads, one accumulator per (head, token),
// the block's sums reduced together by Sum16) into a batch of kBatchTokens; per batch: one
// running-max update with a vectorised exp for four heads at a time, then P.V with a tile of
// the G heads' output channels in registers over all the batch's tokens. Per page instead
// (before), the softmax's reductions and exps formed a dependency chain each page waited on,
// and the accumulators were loaded, rescaled and stored every page: one thread, a Llama-3-8B
// layer's sparse pages (bf16, page 16) resident in L2, 521-621 ns per page and KV head then,
// 454-486 ns batched (a 2-vCPU Emerald Rapids build VM, 2026-12-01; from DRAM, 2 threads:
// sparse 0.94x, dense 0.97x, integration/bench/results/decode_batch/).
// bf16 and fp16 are widened exactly (a shift, vcvtph2ps); all arithmetic is fp32. With kernel
// avx512-bf16, scores of a bf16 query over a bf16 cache use vdpbf16ps (Bf16DotScores: exact
// products, fp32 sums). P.V stays in fp32 FMAs: vdpbf16ps there would round the probabilities
// to bf16 (as flash attention does on GPUs), an error the host kernels' tolerances do not admit.
// Sparse apply, whose staged rows are read from L1 and so is bound by arithmetic, gained 8-11%
// from the bf16 scores on the build VM (mempipe-bench, 30 sparse layers, 2 threads: 29.8-30.5
// vs 32.2-36.2 ms); dense apply, bound by memory, no measurable change.
// The token blocks replaced a per-token loop (K row in registers, four heads' sums reduced by
// Reduce4, padded for G = 3, and stored one float at a time). Scores in L1 on the Emerald
// Rapids build VM (2026-12-01): Llama-3-8B page (16 tokens, G 4, D 128) fp32 177-185 -> 141-145
// ns, bf16 widened 180-190 -> 162-165, vdpbf16ps 257-262 -> 240-243; SmolLM2 page (32 tokens,
// G 3, D 64) fp32 192-199 -> 142-153, widened 216-218 -> 152-164, vdpbf16ps 250-254 -> 222-236.
// Whole kernel: 3-5% less time with the pages in L3, no change beyond noise from DRAM
// (0.97-1.03x; integration/bench/results/decode_scores/).

MEMPIPE_TARGET_AVX512 inline __m512 Load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 32 channels of a row as two fp32 vectors. bf16 is widened without shuffles: the low halves
// of the 32-bit words (even channels) shifted up, the high halves (odd channels) masked, so
// its vectors hold channels {0, 2, .., 30} and {1, 3, .., 31}; Interleaved<T> says so, and
// the query and the output use the same order (PermuteForKernel / UnpermuteFromKernel).
template <typename T>
constexpr bool kInterleaved = std::is_same_v<T, BFloat16>;

MEMPIPE_TARGET_AVX512 inline void Load32(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p);
  b = _mm512_loadu_ps(p + 16);
}
MEMPIPE_TARGET_AVX512 inline void Load32(const Half* p, __m512& a, __m512& b) {
  a = Load16(p);
  b = Load16(p + 16);
}
MEMPIPE_TARGET_AVX512 inline void Load32(const BFloat16* p, __m512& a, __m512& b) {
  const __m512i x = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// exp(x) for x <= 0 (scores minus their running max): Cody-Waite range reduction and the
// Cephes expf polynomial, about 1 ulp; inputs below -87.3 give about 1e-38 instead of 0.
MEMPIPE_TARGET_AVX512 inline __m512 Exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

inline __mmask16 TailMask(int remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                         : static_cast<__mmask16>((1u << remaining) - 1);
}

// acc[g] = corr[g] * acc[g] + sum_t p[g][t] v_t over the tokens of a batch of pages, for GB
// heads: a tile of kTile x 16 channels of the GB heads' accumulators stays in registers over
// the whole batch (loaded and stored once per batch, not per page).
// prefetch: in the first tile, prefetch the V row kValueAheadTokens ahead of each token's (the
// batch's first kValueAheadTokens are the caller's).
template <typename T, int ND, int GB>
MEMPIPE_TARGET_AVX512 void Avx512ValueTile(const ValuePage<T>* pages, int count, size_t stride,
                                           const float* p, int pstride, const float* corr,
                                           float* acc, bool prefetch, ReadAhead* ahead) {
  constexpr int kD = ND * 16;
  constexpr int kTile = std::min(ND, GB <= 2 ? 8 : 4);  // 16 (GB 4) or fewer accumulators
  constexpr int kLines = kD * static_cast<int>(sizeof(T)) / 64;
  // The batch's rows in P.V's order, indexed by the token's place in the batch.
  const T* rows[kMaxBatchTokens];
  int nrows = 0;
  if (prefetch && ahead == nullptr) {
    for (int e = 0; e < count; ++e) {
      for (int t = 0; t < pages[e].n && nrows < kMaxBatchTokens; ++t) {
        rows[nrows++] = pages[e].v + t * stride;
      }
    }
  }
  for (int c = 0; c < ND; c += kTile) {
    __m512 a[GB][kTile];
    for (int g = 0; g < GB; ++g) {
      const __m512 cg = _mm512_set1_ps(corr[g]);
      for (int j = 0; j < kTile; ++j) {
        a[g][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * kD + 16 * (c + j)), cg);
      }
    }
    const float* pt = p;  // the batch's token t0 + t
    for (int e = 0; e < count; ++e) {
      const T* vbase = pages[e].v + 16 * c;
      for (int t = 0; t < pages[e].n; ++t, ++pt) {
        if (prefetch && c == 0) {
          if (ahead != nullptr) {
            ahead->Step();
          } else {
            const int next = static_cast<int>(pt - p) + kValueAheadTokens;
            if (next < nrows) PrefetchValueRow(rows[next], kLines);
          }
        }
        __m512 v[kTile];
        for (int j = 0; j < kTile; j += 2) Load32(vbase + t * stride + 16 * j, v[j], v[j + 1]);
        for (int g = 0; g < GB; ++g) {
          const __m512 pg = _mm512_set1_ps(pt[g * pstride]);
          for (int j = 0; j < kTile; ++j) a[g][j] = _mm512_fmadd_ps(pg, v[j], a[g][j]);
        }
      }
    }
    for (int g = 0; g < GB; ++g) {
      for (int j = 0; j < kTile; ++j) _mm512_storeu_ps(acc + g * kD + 16 * (c + j), a[g][j]);
    }
  }
}

// a + b, or max(a, b) for kMax.
template <bool kMax = false>
MEMPIPE_TARGET_AVX512 inline __m512 Fold(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
}
// Horizontal sums (kMax: maxima) of s0..s3: [sum(s0), sum(s1), sum(s2), sum(s3)].
template <bool kMax = false>
MEMPIPE_TARGET_AVX512 inline __m128 Reduce4(__m512 s0, __m512 s1, __m512 s2, __m512 s3) {
  // 128-bit quarters: a = [s0.q0+s0.q2, s0.q1+s0.q3, s1.q0+s1.q2, s1.q1+s1.q3], b likewise.
  const __m512 a =
      Fold<kMax>(_mm512_shuffle_f32x4(s0, s1, 0x44), _mm512_shuffle_f32x4(s0, s1, 0xee));
  const __m512 b =
      Fold<kMax>(_mm512_shuffle_f32x4(s2, s3, 0x44), _mm512_shuffle_f32x4(s2, s3, 0xee));
  // Quarter i of c holds four partial sums of s_i.
  const __m512 c = Fold<kMax>(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
  const __m512 d = Fold<kMax>(c, _mm512_permute_ps(c, 0x4e));
  const __m512 e = Fold<kMax>(d, _mm512_permute_ps(d, 0xb1));
  return _mm512_castps512_ps128(
      _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), e));
}

// The sums of 16 vectors, in order: [sum(a[0]), .., sum(a[15])]. A transposing tree: 30
// shuffles and 15 adds for the 16 sums, where Reduce4 takes 9 and 5 for four.
// Always inlined: a call would take the 16 accumulators through memory.
[[gnu::always_inline]] MEMPIPE_TARGET_AVX512 inline __m512 Sum16(const __m512* a) {
  __m512 b[8], c[4];
  // b[i] per 128-bit lane: partial sums of a[2i], a[2i+1], a[2i], a[2i+1].
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  // c[j] per 128-bit lane: partial sums of a[4j], .., a[4j + 3].
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0xee));
  }
  // Lanes 0-1 of d0 hold halves of a[0..3]'s sums, lanes 2-3 of a[4..7]'s; d1 a[8..15]'s.
  const __m512 d0 =
      _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
  const __m512 d1 =
      _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}

// Channels [16c, 16c + 16) of row k as fp32, in the accumulators' order (Load32).
MEMPIPE_TARGET_AVX512 inline __m512 LoadChunk(const float* k, int c) {
  return _mm512_loadu_ps(k + 16 * c);
}
MEMPIPE_TARGET_AVX512 inline __m512 LoadChunk(const Half* k, int c) { return Load16(k + 16 * c); }
MEMPIPE_TARGET_AVX512 inline __m512 LoadChunk(const BFloat16* k, int c) {
  const __m512i x = _mm512_loadu_si512(k + 32 * (c >> 1));
  return _mm512_castsi512_ps(
      (c & 1) ? _mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))
              : _mm512_slli_epi32(x, 16));
}

// Stores a block's scores: lane h * kT + t of s is head h's score of token t0 + t, t < m. Head
// h's 16-lane window starts h * kT floats before its first score; the lanes it does not write
// lie in the neighbouring rows or, after the last row, in the padding of the rows' buffer.
template <int H, int kT>
MEMPIPE_TARGET_AVX512 inline void StoreScores(__m512 s, float* p, int pstride, int t0, int m) {
  for (int h = 0; h < H; ++h) {
    const __mmask16 lanes = static_cast<__mmask16>(((1u << m) - 1) << (h * kT));
    _mm512_mask_storeu_ps(p + h * pstride + t0 - h * kT, lanes, s);
  }
}

// Tokens per block of the scores for H (1-4) query heads: H * kT accumulators, at most 16.
constexpr int ScoreBlockTokens(int heads) {
  return heads == 1 ? 16 : heads == 2 ? 8 : heads == 3 ? 5 : 4;
}

// Scores of tokens [0, n) for H query heads: p[h * pstride + t] = q_h . k_t (q already scaled,
// rows of kD = 16 ND fp32 channels in Load32's order). Blocks of kT tokens: each K chunk is
// loaded (and widened) once and multiplied into the H heads' accumulators, one per (head,
// token); Sum16 then reduces the block's H * kT sums at once, for 2-3 shuffles and adds per
// score where Reduce4 took 3-4. Row t of `next` is prefetched with token t.
template <typename T, int ND, int H>
MEMPIPE_TARGET_AVX512 void Avx512Scores(const T* kbase, size_t stride, int n, int pstride,
                                        const float* q, float* p, NextPage& next) {
  constexpr int kD = ND * 16, kT = ScoreBlockTokens(H);
  for (int t0 = 0; t0 < n; t0 += kT) {
    const int m = std::min(kT, n - t0);
    const T* rows[kT];  // rows past the page repeat its last (their sums are not stored)
    for (int t = 0; t < kT; ++t) rows[t] = kbase + std::min(t0 + t, n - 1) * stride;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0, r = 0; c < ND; ++c) {
      for (; r < (c + 1) * m / ND; ++r) PrefetchRow(next);
#pragma GCC unroll 16
      for (int t = 0; t < kT; ++t) {
        const __m512 kc = LoadChunk(rows[t], c);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) {
          acc[h * kT + t] =
              _mm512_fmadd_ps(kc, _mm512_loadu_ps(q + h * kD + 16 * c), acc[h * kT + t]);
        }
      }
    }
    StoreScores<H, kT>(Sum16(acc), p, pstride, t0, m);
  }
}

// Avx512Scores for a bf16 query over a bf16 cache with AVX512_BF16 (kernel avx512-bf16):
// vdpbf16ps multiplies pairs of bf16 exactly and adds both products to an fp32 lane, so a K row
// needs neither widening nor half the instructions; the query is taken as it is (exact) and
// the scale applied to the fp32 sums. The arithmetic is the fp32 path's up to summation order.
// p[h * pstride + t] = scale * (q_h . k_t), rows of NZ chunks of 32 channels.
MEMPIPE_TARGET_AVX512_BF16 inline __m512 DotBf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

template <int NZ, int H>
MEMPIPE_TARGET_AVX512_BF16 void Bf16DotScores(const BFloat16* kbase, size_t stride, int n,
                                              int pstride, const BFloat16* q, float scale, float* p,
                                              NextPage& next) {
  constexpr int kD = NZ * 32, kT = ScoreBlockTokens(H);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int t0 = 0; t0 < n; t0 += kT) {
    const int m = std::min(kT, n - t0);
    const BFloat16* rows[kT];
    for (int t = 0; t < kT; ++t) rows[t] = kbase + std::min(t0 + t, n - 1) * stride;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0, r = 0; c < NZ; ++c) {
      for (; r < (c + 1) * m / NZ; ++r) PrefetchRow(next);
#pragma GCC unroll 16
      for (int t = 0; t < kT; ++t) {
        const __m512i kc = _mm512_loadu_si512(rows[t] + 32 * c);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) {
          acc[h * kT + t] = DotBf16(acc[h * kT + t], kc, _mm512_loadu_si512(q + h * kD + 32 * c));
        }
      }
    }
    StoreScores<H, kT>(_mm512_mul_ps(vscale, Sum16(acc)), p, pstride, t0, m);
  }
}

// Scores over a transposed K page (KvLayout::kHeadMajorKT: [D / x][block][x], x channels of 4
// bytes per group): 16 tokens lie in the lanes of one load, so each (head, 16 tokens) keeps its
// sums in vectors across the channels and needs no horizontal reduction, no shuffles and no
// masked stores of single lanes (Avx512Scores spends 2-3 shuffles and adds per score on Sum16).
// Up to 32 tokens per pass (NV vectors), two accumulators per (head, vector) (even and odd
// channels, or channel pairs) so that no FMA waits on the previous one. q: fp32, scaled, in the
// kernel's channel order (Position). Lanes past n are computed from whatever the page holds
// there and not stored. Row t of `next` is prefetched with token t of each pass, spread over its
// channel loop as Avx512Scores does. Taking the next page's lines as one range instead, a
// pointer compare per line (PrefetchRow's cursor arithmetic was half of the bf16 scores' samples
// from cache), was 8% faster from cache but 17% slower from DRAM (one thread, SmolLM2 bf16 4 x 6K
// sparse, Zen 5 build VM, 2026-12-04: 0.133 against 0.114 ms per layer; results/keys_transposed/).
// The same lines sooner, at the same rate per channel step: spacing the misses is what counts.
MEMPIPE_TARGET_AVX512 inline void WidenPairs(__m512i x, const BFloat16*, __m512& even,
                                             __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
MEMPIPE_TARGET_AVX512 inline void WidenPairs(__m512i x, const Half*, __m512& even, __m512& odd) {
  even = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
  odd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
}

// Stores lanes [0, m) of the H heads' NV score vectors (accumulator pairs summed, times scale).
template <int H, int NV>
MEMPIPE_TARGET_AVX512 inline void StoreKtScores(const __m512 (&acc)[H][NV][2], __m512 scale, int m,
                                                float* p, int pstride) {
  for (int h = 0; h < H; ++h) {
    for (int v = 0; v < NV && 16 * v < m; ++v) {
      _mm512_mask_storeu_ps(p + h * pstride + 16 * v, TailMask(m - 16 * v),
                            _mm512_mul_ps(scale, _mm512_add_ps(acc[h][v][0], acc[h][v][1])));
    }
  }
}

template <typename T, int H, int NV>
MEMPIPE_TARGET_AVX512 void Avx512KtScores(const T* kpage, int block, int n, int d, int pstride,
                                          const float* q, float* p, NextPage& next) {
  const int lg = std::countr_zero(static_cast<unsigned>(d));  // d: 64, 128 or 256
  for (int t0 = 0; t0 < n; t0 += 16 * NV) {
    const int m = std::min(16 * NV, n - t0);
    __m512 acc[H][NV][2];
    for (int h = 0; h < H; ++h) {
      for (int v = 0; v < NV; ++v) acc[h][v][0] = acc[h][v][1] = _mm512_setzero_ps();
    }
    if constexpr (std::is_same_v<T, float>) {
      const float* rows = kpage + t0;
      for (int c = 0, r = 0; c < d; c += 2) {
        for (; r < ((c + 2) * m >> lg); ++r) PrefetchRow(next);
#pragma GCC unroll 2
        for (int a = 0; a < 2; ++a) {
          __m512 k[NV];
          for (int v = 0; v < NV; ++v) k[v] = _mm512_loadu_ps(rows + (c + a) * block + 16 * v);
          for (int h = 0; h < H; ++h) {
            const __m512 qc = _mm512_set1_ps(q[h * d + c + a]);
            for (int v = 0; v < NV; ++v) acc[h][v][a] = _mm512_fmadd_ps(k[v], qc, acc[h][v][a]);
          }
        }
      }
    } else {
      const T* rows = kpage + 2 * t0;
      for (int j = 0, r = 0; j < d / 2; ++j) {
        for (; r < ((j + 1) * m >> (lg - 1)); ++r) PrefetchRow(next);
        // The query's channels 2j and 2j + 1 in the kernel's order (Load32 for bf16).
        const int even = kInterleaved<T> ? 32 * (j >> 4) + (j & 15) : 2 * j;
        const int odd = kInterleaved<T> ? even + 16 : 2 * j + 1;
        __m512 ke[NV], ko[NV];
        for (int v = 0; v < NV; ++v) {
          WidenPairs(_mm512_loadu_si512(rows + 2 * j * block + 32 * v), rows, ke[v], ko[v]);
        }
        for (int h = 0; h < H; ++h) {
          const __m512 qe = _mm512_set1_ps(q[h * d + even]), qo = _mm512_set1_ps(q[h * d + odd]);
          for (int v = 0; v < NV; ++v) {
            acc[h][v][0] = _mm512_fmadd_ps(ke[v], qe, acc[h][v][0]);
            acc[h][v][1] = _mm512_fmadd_ps(ko[v], qo, acc[h][v][1]);
          }
        }
      }
    }
    StoreKtScores<H, NV>(acc, _mm512_set1_ps(1.0f), m, p + t0, pstride);
  }
}

// Avx512KtScores for a bf16 query over a bf16 cache with AVX512_BF16: each 32-bit lane of a pair
// row holds one token's channels 2j and 2j + 1, so one vdpbf16ps against the broadcast query
// pair adds both products; two accumulators per (head, vector) split the pairs even and odd.
// q: the bf16 query as given, natural channel order; the scale applied to the fp32 sums.
template <int H, int NV>
MEMPIPE_TARGET_AVX512_BF16 void Bf16KtScores(const BFloat16* kpage, int block, int n, int d,
                                             int pstride, const BFloat16* q, float scale, float* p,
                                             NextPage& next) {
  const int lg = std::countr_zero(static_cast<unsigned>(d));  // d: 64, 128 or 256
  for (int t0 = 0; t0 < n; t0 += 16 * NV) {
    const int m = std::min(16 * NV, n - t0);
    __m512 acc[H][NV][2];
    for (int h = 0; h < H; ++h) {
      for (int v = 0; v < NV; ++v) acc[h][v][0] = acc[h][v][1] = _mm512_setzero_ps();
    }
    const BFloat16* rows = kpage + 2 * t0;
    for (int j = 0, r = 0; j < d / 2; j += 2) {
      for (; r < ((j + 2) * m >> (lg - 1)); ++r) PrefetchRow(next);
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) {
        __m512i k[NV];
        for (int v = 0; v < NV; ++v) k[v] = _mm512_loadu_si512(rows + 2 * (j + a) * block + 32 * v);
        for (int h = 0; h < H; ++h) {
          int32_t pair;
          std::memcpy(&pair, q + h * d + 2 * (j + a), sizeof(pair));
          const __m512i qp = _mm512_set1_epi32(pair);
          for (int v = 0; v < NV; ++v) acc[h][v][a] = DotBf16(acc[h][v][a], k[v], qp);
        }
      }
    }
    StoreKtScores<H, NV>(acc, _mm512_set1_ps(scale), m, p + t0, pstride);
  }
}

// The rest of a batch of pages for `groups` query heads, the scores of its n tokens already
// in `p` (row g at p + g * pstride, overwritten by the probabilities): the running-max update
// with a vectorised exp once per batch, then acc = corr * acc + P.V. `corr` is scratch for
// `groups` floats.
template <typename T, int ND>
MEMPIPE_TARGET_AVX512 void Avx512SoftmaxValues(const ValuePage<T>* pages, int count, size_t stride,
                                               int n, int groups, int pstride, float* acc, float* m,
                                               float* l, float* p, float* corr, ReadAhead* ahead) {
  constexpr int kD = ND * 16;
  const int nv = (n + 15) / 16;
  // Four heads at a time: their maxima, corrections and sums reduced together (Reduce4) and
  // the corrections taken by one vector exp, not a scalar std::exp per head.
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int g0 = 0; g0 < groups; g0 += 4) {
    const int h = std::min(4, groups - g0);
    const __mmask16 hm = static_cast<__mmask16>((1u << h) - 1);
    __m512 mx[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    // Each head's maximum and sum (below) in a local: indexed by the run-time j, the array's
    // element would make every step a store and a reload.
    for (int j = 0; j < h; ++j) {
      const float* pg = p + (g0 + j) * pstride;
      __m512 mj = neg_inf;
      for (int v = 0; v < nv; ++v) {
        mj = _mm512_max_ps(mj, _mm512_mask_loadu_ps(neg_inf, TailMask(n - 16 * v), pg + 16 * v));
      }
      mx[j] = mj;
    }
    // Lanes [0, h) hold the four heads' values; the others are not stored.
    const __m512 m_old = _mm512_mask_loadu_ps(neg_inf, hm, m + g0);
    const __m512 m_new =
        _mm512_max_ps(m_old, _mm512_zextps128_ps512(Reduce4<true>(mx[0], mx[1], mx[2], mx[3])));
    // 0 (about 1e-38, Exp512) on the first batch, where m = -inf; acc and l are 0 there.
    const __m512 c4 = Exp512(_mm512_sub_ps(m_old, m_new));
    alignas(64) float nmax[16];
    _mm512_store_ps(nmax, m_new);
    __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int j = 0; j < h; ++j) {
      float* pg = p + (g0 + j) * pstride;
      const __m512 nm = _mm512_set1_ps(nmax[j]);
      __m512 sj = _mm512_setzero_ps();
      for (int v = 0; v < nv; ++v) {
        const __mmask16 mask = TailMask(n - 16 * v);
        const __m512 e = _mm512_maskz_mov_ps(
            mask, Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, pg + 16 * v), nm)));
        _mm512_storeu_ps(pg + 16 * v, e);  // pstride is a multiple of 16: stays in the row
        sj = _mm512_add_ps(sj, e);
      }
      sum[j] = sj;
    }
    const __m512 l_new =
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(hm, l + g0), c4,
                        _mm512_zextps128_ps512(Reduce4(sum[0], sum[1], sum[2], sum[3])));
    _mm512_mask_storeu_ps(l + g0, hm, l_new);
    _mm512_mask_storeu_ps(m + g0, hm, m_new);
    _mm512_mask_storeu_ps(corr + g0, hm, c4);
  }
  for (int g0 = 0; g0 < groups; g0 += 4) {
    const float* pg = p + g0 * pstride;
    float* ag = acc + g0 * kD;
    switch (std::min(4, groups - g0)) {
      case 1:
        Avx512ValueTile<T, ND, 1>(pages, count, stride, pg, pstride, corr + g0, ag, g0 == 0, ahead);
        break;
      case 2:
        Avx512ValueTile<T, ND, 2>(pages, count, stride, pg, pstride, corr + g0, ag, g0 == 0, ahead);
        break;
      case 3:
        Avx512ValueTile<T, ND, 3>(pages, count, stride, pg, pstride, corr + g0, ag, g0 == 0, ahead);
        break;
      default:
        Avx512ValueTile<T, ND, 4>(pages, count, stride, pg, pstride, corr + g0, ag, g0 == 0, ahead);
        break;
    }
  }
}

// Copies the page's K rows (tokens [0, n) of one KV head, `stride` elements apart) into
// contiguous rows, 64 bytes at a time (V is read in place, a batch later, by P.V). Sparse decode
// reads each selected page of a KV head as 16 rows of head_dim elements scattered at the cache's
// token stride (2 KiB for Llama-3-8B bf16), and reading them inside the arithmetic keeps few misses
// in flight. Copied first, in a loop with nothing waiting on its loads, the misses overlap one
// another and the arithmetic then reads L1. On the build VM (one thread, Llama-3-8B layer, bf16,
// budget 4096 of 32K): 3.1 ms per layer reading the rows in place, 2.0 ms copied first; widening to
// fp32 while copying (twice the stores) 2.5 ms. With the next page prefetched while this one is
// computed (NextPage) the copy mostly reads L1: 1.61 ms staged, 1.70 ms in place (K and V staged
// then).
//   kout [n, d]
template <typename T>
MEMPIPE_TARGET_AVX512 void StageKeys(const T* k, size_t stride, int n, int d, T* kout) {
  const int lines = d * static_cast<int>(sizeof(T)) / 64;  // d >= 64: whole lines
  for (int t = 0; t < n; ++t) {
    const char* kr = reinterpret_cast<const char*>(k + t * stride);
    char* ko = reinterpret_cast<char*>(kout + t * d);
    for (int j = 0; j < lines; ++j)
      _mm512_storeu_si512(ko + 64 * j, _mm512_loadu_si512(kr + 64 * j));
  }
}

// Tokens of scores the AVX-512 kernel gathers (whole pages) before one softmax and P.V over them.
constexpr int kBatchTokens = 128;
static_assert(kBatchTokens <= kMaxBatchTokens);

// The AVX-512 kernel's state for the G query heads of `heads` KV heads (BatchedHeads).
template <typename T>
class Avx512Heads : public BatchedHeads<Avx512Heads<T>, T> {
  using Base = BatchedHeads<Avx512Heads<T>, T>;
  friend Base;

 public:
  // stage_rows: each token-major page's K rows are copied to contiguous scratch before its
  // scores (StageKeys; for sparse decode, whose pages are scattered); P.V reads V in place
  // (prefetched into L2 kValueAheadTokens rows ahead of it).
  Avx512Heads(int heads, int groups, int head_dim, int block_size, float scale,
              bool stage_rows = false)
      // Score rows of a batch's capacity, and 16 floats more, so that the masked-off lanes of
      // StoreScores' last stores stay inside the buffer.
      : Base(heads, groups, head_dim, block_size, scale, BatchTokens(block_size),
             BatchTokens(block_size), 16),
        stage_rows_(stage_rows),
        kstage_(stage_rows ? static_cast<size_t>(block_size) * head_dim : 0) {
    if constexpr (std::is_same_v<T, BFloat16>) q16_.resize(this->q_.size());
  }

  // BatchedHeads::StoreRow in vectors where the output's dtype is the cache's, fp32 or bf16:
  // the same roundings (BFloat16::FromFloat: to nearest even, NaN kept quiet), 32 channels a
  // step, bf16's even and odd channels (Load32's order) put back in place. The scalar stores
  // were 7-10% of a sparse call from cache at 512 tokens per KV head (perf, Zen 5 build VM);
  // SmolLM2's sparse layer from cache 0.044 against 0.047 ms (results/compute_trim/).
  MEMPIPE_TARGET_AVX512 static void StoreRow(const float* a, float inv, int head_dim,
                                             const DecodeIo& io, size_t at) {
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (io.dtype == DType::kBFloat16) {
        const __m512 vinv = _mm512_set1_ps(inv);
        auto* out = static_cast<BFloat16*>(io.out) + at;
        for (int c = 0; c < head_dim; c += 32) {
          const __m512i even = Bf16BitsFromFloat(_mm512_mul_ps(_mm512_loadu_ps(a + c), vinv));
          const __m512i odd = Bf16BitsFromFloat(_mm512_mul_ps(_mm512_loadu_ps(a + c + 16), vinv));
          _mm512_storeu_si512(out + c, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
        }
        return;
      }
    } else if constexpr (std::is_same_v<T, float>) {
      if (io.dtype == DType::kFloat32) {
        const __m512 vinv = _mm512_set1_ps(inv);
        float* out = static_cast<float*>(io.out) + at;
        for (int c = 0; c < head_dim; c += 16) {
          _mm512_storeu_ps(out + c, _mm512_mul_ps(_mm512_loadu_ps(a + c), vinv));
        }
        return;
      }
    }
    Base::StoreRow(a, inv, head_dim, io, at);
  }

  void Begin(int i, const DecodeIo& io, size_t row0) {
    const size_t gd = static_cast<size_t>(this->groups_) * this->head_dim_;
    dot_bf16_ =
        std::is_same_v<T, BFloat16> && io.dtype == DType::kBFloat16 && UseAvx512Bf16Kernel();
    this->ResetSlot(i);
    if (dot_bf16_) {  // the scores take the bf16 query as it is; no fp32 copy needed
      const BFloat16* src = static_cast<const BFloat16*>(io.query) + row0 * this->head_dim_;
      std::copy(src, src + gd, q16_.begin() + i * gd);
      return;
    }
    float* q = &this->q_[i * gd];
    LoadQueryRows(io, row0, this->groups_, this->scale_, q);
    if constexpr (kInterleaved<T>) {
      // Block of 32 channels: even channels first, then odd ones (Load32).
      float tmp[32];
      for (size_t b = 0; b < gd; b += 32) {
        for (int j = 0; j < 16; ++j) tmp[j] = q[b + 2 * j], tmp[16 + j] = q[b + 2 * j + 1];
        std::copy(tmp, tmp + 32, q + b);
      }
    }
  }

  // Sparse decode (SparseImpl) plans a range's stream in the order this kernel reads it: each
  // batch of pages that fill BatchTokens, its K pages, then its V pages.
  static constexpr bool kReadsAhead = true;
  static int BatchCapacity(int block_size) { return BatchTokens(block_size); }
  // Prefetch from `ahead` (which outlives the calls) rather than the next page; one KV head only.
  void ReadAheadWith(ReadAhead* ahead) { this->ahead_ = ahead; }

  // Scores the page into slot i's batch; the batch's softmax and P.V run when it is full or
  // the state is read (Store, StorePartial).
  void AddPage(const KvCacheView& cache, int block, int kv_head, int i, int n, int next_block = -1,
               int next_n = 0, int next_head = -1) {
    NextPage next;
    if (this->ahead_ != nullptr) {
      next.ahead = this->ahead_;  // the range's stream, not the next page
    } else {
      next = NextPageRows<T>(cache, next_block, next_n, kv_head, this->heads_, i, n, next_head);
      next.values = !kValuesAhead;  // V rows: prefetched by P.V instead (kValueAheadTokens)
    }
    const T* k = static_cast<const T*>(cache.data) + cache.Offset(0, block, 0, kv_head);
    const T* v = static_cast<const T*>(cache.data) + cache.Offset(1, block, 0, kv_head);
    size_t stride = cache.TokenStride();
    float* p = this->QueuePage(i, v, n, stride);
    kt_ = cache.KeysTransposed();
    if (kt_) {  // the page as it lies: HeadScores reads it with tokens in lanes
      this->ScoreAndFlushIfFull(k, cache.block_size, n, i, p, next);
      return;
    }
    if (stage_rows_ && !cache.HeadMajor()) {  // head- and page-major rows are contiguous already
      StageKeys(k, stride, n, this->head_dim_, kstage_.data());
      k = kstage_.data();
      stride = this->head_dim_;
    }
    this->ScoreAndFlushIfFull(k, stride, n, i, p, next);
  }

 private:
  // Position of channel c in the accumulators' order (Load32).
  static int Position(int c) {
    return kInterleaved<T> ? (c & ~31) + (c & 1) * 16 + ((c & 31) >> 1) : c;
  }

  // Scores for H query heads whose query rows start at q0.
  template <int H>
  void HeadScores(const T* k, size_t stride, int n, size_t q0, float* p, NextPage& next) {
    const int ps = this->pstride_;
    if (kt_) {  // a transposed K page; stride is the block size
      const int block = static_cast<int>(stride), d = this->head_dim_;
      if constexpr (std::is_same_v<T, BFloat16>) {
        if (dot_bf16_) {
          return block == 16
                     ? Bf16KtScores<H, 1>(k, block, n, d, ps, &q16_[q0], this->scale_, p, next)
                     : Bf16KtScores<H, 2>(k, block, n, d, ps, &q16_[q0], this->scale_, p, next);
        }
      }
      const float* q = &this->q_[q0];
      return block == 16 ? Avx512KtScores<T, H, 1>(k, block, n, d, ps, q, p, next)
                         : Avx512KtScores<T, H, 2>(k, block, n, d, ps, q, p, next);
    }
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (dot_bf16_) {
        const BFloat16* q16 = &q16_[q0];
        switch (this->head_dim_) {
          case 64:
            Bf16DotScores<2, H>(k, stride, n, ps, q16, this->scale_, p, next);
            return;
          case 128:
            Bf16DotScores<4, H>(k, stride, n, ps, q16, this->scale_, p, next);
            return;
          default:
            Bf16DotScores<8, H>(k, stride, n, ps, q16, this->scale_, p, next);
            return;
        }
      }
    }
    const float* q = &this->q_[q0];
    switch (this->head_dim_) {
      case 64:
        Avx512Scores<T, 4, H>(k, stride, n, ps, q, p, next);
        break;
      case 128:
        Avx512Scores<T, 8, H>(k, stride, n, ps, q, p, next);
        break;
      default:  // 256 (ValidateKvCache admits 64, 128, 256)
        Avx512Scores<T, 16, H>(k, stride, n, ps, q, p, next);
        break;
    }
  }

  template <int NB>
  static constexpr auto kSoftmaxValues = &Avx512SoftmaxValues<T, NB>;

  static int BatchTokens(int block_size) {
    return std::max(block_size, kBatchTokens / block_size * block_size);
  }

  // The scores prefetch the next page's K rows only; P.V its batch's V rows (kValueAheadTokens).
  static constexpr bool kValuesAhead = true;

  bool stage_rows_;
  bool kt_ = false;            // the cache's K pages transposed (AddPage reads the layout)
  bool dot_bf16_ = false;      // scores with AVX512_BF16 (Begin decides)
  std::vector<T> kstage_;      // [block_size, head_dim] when stage_rows_
  std::vector<BFloat16> q16_;  // [heads, G, D] the bf16 queries as given (dot_bf16_)
};
// The AVX-512 kernel's reads without its arithmetic: the same rows, in the same order
// (ReadDecodeRows), with each next page's K and V rows prefetched over the current page (the
// kernel prefetches V in P.V instead, kValueAheadTokens; here there is no P.V to do it).
// AddPage loads each K and V row of the page once, 64 bytes at a time, and folds them into a
// checksum so the loads cannot be dropped.
template <typename T>
class Avx512RowRead {
 public:
  Avx512RowRead(int heads, int /*groups*/, int head_dim, int block_size, float /*scale*/,
                bool /*stage_rows*/ = false)
      : heads_(heads),
        head_dim_(head_dim),
        block_size_(block_size),
        values_(heads),
        tokens_(heads, 0) {}
  static constexpr bool kPrefetchesNext = true;
  static constexpr bool kWritesOutput = false;  // DecodeChunks does not combine
  // The kernel's stream and its order: each slot's batch of K pages, then its V pages.
  static constexpr bool kReadsAhead = true;
  static int BatchCapacity(int block_size) { return Avx512Heads<T>::BatchCapacity(block_size); }
  void ReadAheadWith(ReadAhead* ahead) { ahead_ = ahead; }

  void Begin(int /*i*/, const DecodeIo& /*io*/, size_t /*row0*/) {}

  MEMPIPE_TARGET_AVX512 void AddPage(const KvCacheView& cache, int block, int kv_head, int i, int n,
                                     int next_block = -1, int next_n = 0, int next_head = -1) {
    const int lines = head_dim_ * static_cast<int>(sizeof(T)) / 64;
    const size_t stride = cache.TokenStride() * sizeof(T);
    const char* k = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                                  cache.Offset(0, block, 0, kv_head));
    const char* v = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                                  cache.Offset(1, block, 0, kv_head));
    if (ahead_ != nullptr) {
      // K now (a transposed page as the whole page, spread over its n steps), V with its batch.
      const bool kt = cache.KeysTransposed();
      const int page_lines = block_size_ * lines;
      const int step_lines = kt ? ReadAhead::TransposedStepLines(page_lines, n) : lines;
      for (int t = 0; t < n; ++t) {
        ahead_->Step();
        const char* row = kt ? k + static_cast<size_t>(t) * step_lines * 64 : k + t * stride;
        const int m = kt ? std::min(step_lines, page_lines - t * step_lines) : lines;
        for (int j = 0; j < m; ++j) sum_ ^= Fold(_mm512_loadu_si512(row + 64 * j));
      }
      values_[i].push_back(ValuePage<T>{reinterpret_cast<const T*>(v), n});
      tokens_[i] += n;
      vstride_ = stride;
      if (tokens_[i] + block_size_ > BatchCapacity(block_size_)) ReadValues(i);
      return;
    }
    NextPage next = NextPageRows<T>(cache, next_block, next_n, kv_head, heads_, i, n, next_head);
    __m512i x = _mm512_setzero_si512();
    for (int t = 0; t < n; ++t) {
      PrefetchRow(next);
      for (int j = 0; j < lines; ++j) {
        x = _mm512_xor_si512(x, _mm512_loadu_si512(k + t * stride + 64 * j));
        x = _mm512_xor_si512(x, _mm512_loadu_si512(v + t * stride + 64 * j));
      }
    }
    sum_ ^= Fold(x);
  }

  void Store(int i, const DecodeIo& /*io*/, size_t /*row0*/) {
    ReadValues(i);
    static thread_local volatile uint64_t sink = 0;
    sink = sink ^ sum_;
  }
  void StorePartial(int i, float* /*acc*/, float* /*m*/, float* /*l*/) { Store(i, DecodeIo{}, 0); }

 private:
  MEMPIPE_TARGET_AVX512 static uint64_t Fold(__m512i x) {
    alignas(64) uint64_t lanes[8];
    _mm512_store_si512(lanes, x);
    uint64_t sum = 0;
    for (uint64_t lane : lanes) sum ^= lane;
    return sum;
  }

  // Slot i's batch of V rows, as P.V reads them: one step of the stream per row.
  MEMPIPE_TARGET_AVX512 void ReadValues(int i) {
    const int lines = head_dim_ * static_cast<int>(sizeof(T)) / 64;
    __m512i x = _mm512_setzero_si512();
    for (const ValuePage<T>& page : values_[i]) {
      const char* v = reinterpret_cast<const char*>(page.v);
      for (int t = 0; t < page.n; ++t) {
        ahead_->Step();
        for (int j = 0; j < lines; ++j) {
          x = _mm512_xor_si512(x, _mm512_loadu_si512(v + t * vstride_ + 64 * j));
        }
      }
    }
    sum_ ^= Fold(x);
    values_[i].clear();
    tokens_[i] = 0;
  }

  int heads_, head_dim_, block_size_;
  ReadAhead* ahead_ = nullptr;
  std::vector<std::vector<ValuePage<T>>> values_;  // [heads] each slot's V pages not read yet
  std::vector<int> tokens_;                        // [heads] their tokens
  size_t vstride_ = 0;
  uint64_t sum_ = 0;
};
#endif  // MEMPIPE_AVX512_KERNEL

#if MEMPIPE_AVX2_KERNEL
// ---- AVX2 kernel --------------------------------------------------------------------------
// For CPUs without AVX-512 (AMD before Zen 4, Intel client cores): AVX2, FMA and F16C, eight
// fp32 lanes. The AVX-512 kernel's structure at half the width: per page and KV head, the G
// heads' scores of all n tokens (Avx2Scores: blocks of tokens, each K vector loaded and widened
// once for up to four heads, one accumulator per (head, token), the block's sums reduced
// together) into a batch of kBatchTokens2; per batch, one running-max update with a vectorised
// exp (Exp256), then P.V with a tile of the heads' output channels in registers over all the
// batch's tokens. The next page's rows are prefetched over the current page's scores
// (NextPage), and sparse decode's scattered K rows are read in place (at this width the
// arithmetic, not the misses, bounds a page read from L2). bf16 is widened without shuffles:
// each 16-channel block loads as one 256-bit vector whose 32-bit words give the even channels
// (shifted up) and the odd ones (masked), so the query and the accumulators hold each block's
// even channels first (Position2); fp16 is widened by vcvtph2ps. All arithmetic is fp32.

// Channels [16j, 16j + 16) of a row as two fp32 vectors: in order for fp32 and fp16; for bf16
// the even channels, then the odd ones (kInterleaved2).
template <typename T>
constexpr bool kInterleaved2 = std::is_same_v<T, BFloat16>;

MEMPIPE_TARGET_AVX2 inline void Load16x2(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
MEMPIPE_TARGET_AVX2 inline void Load16x2(const Half* p, __m256& a, __m256& b) {
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
MEMPIPE_TARGET_AVX2 inline void Load16x2(const BFloat16* p, __m256& a, __m256& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// exp(x) for x <= 0: Exp512's range reduction and polynomial at eight lanes; 2^n is built in
// the exponent field (n >= -126 after the clamp, so it stays a normal number).
MEMPIPE_TARGET_AVX2 inline __m256 Exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Lanes [0, remaining) set, as a float mask.
MEMPIPE_TARGET_AVX2 inline __m256 TailMask8(int remaining) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// The sums of a[0..7], in lanes 0-7.
[[gnu::always_inline]] MEMPIPE_TARGET_AVX2 inline __m256 Sum8x8(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 v = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u, v, 0x20), _mm256_permute2f128_ps(u, v, 0x31));
}

// Tokens per block of the scores for H (1-4) query heads: H * kT accumulators, 6 or 8. Three and
// four heads take two tokens, not four and three (12 accumulators): in L1 on a Zen 3, a SmolLM2
// page's scores (3 heads) took 0.82x the time in fp32 and 0.92x in bf16, a Llama-3-8B page's
// (4 heads) 0.70-0.73x (results/avx2_zen3/).
constexpr int ScoreBlockTokens2(int heads) { return heads == 1 ? 8 : heads == 2 ? 4 : 2; }

// Scores of tokens [0, n) for H query heads: p[h * pstride + t] = q_h . k_t (q already scaled,
// rows of 16 NB fp32 channels in Load16x2's order). Blocks of kT tokens: each K vector is
// loaded and widened once and multiplied into the H heads' accumulators (the query read from
// L1 as the FMA's operand); the block's H * kT sums are reduced together. Row t of `next` is
// prefetched with token t.
template <typename T, int NB, int H>
MEMPIPE_TARGET_AVX2 void Avx2Scores(const T* kbase, size_t stride, int n, int pstride,
                                    const float* q, float* p, NextPage& next) {
  constexpr int kD = NB * 16, kT = ScoreBlockTokens2(H), kA = H * kT;
  for (int t0 = 0; t0 < n; t0 += kT) {
    const int m = std::min(kT, n - t0);
    for (int t = 0; t < m; ++t) PrefetchRow(next);
    const T* rows[kT];  // rows past the page repeat its last (their sums are not stored)
    for (int t = 0; t < kT; ++t) rows[t] = kbase + std::min(t0 + t, n - 1) * stride;
    __m256 acc[kA];
    for (int i = 0; i < kA; ++i) acc[i] = _mm256_setzero_ps();
    for (int j = 0; j < NB; ++j) {
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) {
        __m256 a, b;
        Load16x2(rows[t] + 16 * j, a, b);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h) {
          const float* qh = q + h * kD + 16 * j;
          acc[h * kT + t] = _mm256_fmadd_ps(a, _mm256_loadu_ps(qh), acc[h * kT + t]);
          acc[h * kT + t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(qh + 8), acc[h * kT + t]);
        }
      }
    }
    // A whole block's sums go from the register to the score rows; a page's last, partial block
    // through `sums`, whose scalar reloads wait on the vector store (that took a sixth of the
    // scores' time on a Zen 3, in L2, when every block went that way).
    static_assert(kA == 6 || kA == 8);
    __m256 s;  // lane h * kT + t: head h, token t
    if constexpr (kA == 6) {
      const __m256 a8[8] = {acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[4], acc[5]};
      s = Sum8x8(a8);
    } else {
      s = Sum8x8(acc);
    }
    if (m == kT) {
      const __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
      if constexpr (kT == 8) {
        _mm256_storeu_ps(p + t0, s);
      } else if constexpr (kT == 4) {
        _mm_storeu_ps(p + t0, lo);
        _mm_storeu_ps(p + pstride + t0, hi);
      } else {
        _mm_storel_pi(reinterpret_cast<__m64*>(p + t0), lo);
        _mm_storeh_pi(reinterpret_cast<__m64*>(p + pstride + t0), lo);
        _mm_storel_pi(reinterpret_cast<__m64*>(p + 2 * pstride + t0), hi);
        if constexpr (H == 4) _mm_storeh_pi(reinterpret_cast<__m64*>(p + 3 * pstride + t0), hi);
      }
      continue;
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, s);
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < m; ++t) p[h * pstride + t0 + t] = sums[h * kT + t];
    }
  }
}

// Vectors of 8 channels per head in Avx2ValueTile's tile: at least 8 accumulators where 16
// registers allow, so the FMAs' 4-cycle latency does not bound them (a tile of 6 accumulators, 3
// heads x 2, ran P.V at 4 cycles per token and tile where 3 would do).
constexpr int ValueTileVectors2(int heads) {
  return heads == 1 ? 8 : heads == 2 ? 4 : heads == 3 ? 4 : 2;
}

// acc[g] = corr[g] * acc[g] + sum_t p[g][t] v_t over the tokens of a batch of pages, for GB
// heads: a tile of kTile x 8 channels of the GB heads' accumulators stays in registers over the
// whole batch.
template <typename T, int NB, int GB>
MEMPIPE_TARGET_AVX2 void Avx2ValueTile(const ValuePage<T>* pages, int count, size_t stride,
                                       const float* p, int pstride, const float* corr, float* acc) {
  constexpr int kD = NB * 16;
  constexpr int kTile = ValueTileVectors2(GB);
  // Where a token's kTile vectors of V beside the GB * kTile accumulators would not fit 14 of the
  // 16 registers (the others: a broadcast and bf16's mask), as at GB = 1 and 3, the row is
  // widened 16 channels at a time and its probabilities broadcast again for each 16, so that 2
  // vectors of V and 1 of p are live.
  constexpr bool kBySixteen = kTile + GB * kTile > 14;
  static_assert(kD % (8 * kTile) == 0);
  for (int c = 0; c < kD / 8; c += kTile) {
    __m256 a[GB][kTile];
    for (int g = 0; g < GB; ++g) {
      const __m256 cg = _mm256_set1_ps(corr[g]);
      for (int j = 0; j < kTile; ++j) {
        a[g][j] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * kD + 8 * (c + j)), cg);
      }
    }
    const float* pt = p;  // the batch's token t0 + t
    for (int e = 0; e < count; ++e) {
      const T* vbase = pages[e].v + 8 * c;
      for (int t = 0; t < pages[e].n; ++t, ++pt) {
        if constexpr (kBySixteen) {
#pragma GCC unroll 4
          for (int j = 0; j < kTile; j += 2) {
            // Keeps the compiler from loading the GB broadcasts once for all the tile's 16s: held
            // across them, they spilled an accumulator to the stack at GB = 3, and its store and
            // reload made P.V slower than the 6-accumulator tile.
            asm volatile("" ::: "memory");
            __m256 x, y;
            Load16x2(vbase + t * stride + 8 * j, x, y);
#pragma GCC unroll 4
            for (int g = 0; g < GB; ++g) {
              const __m256 pg = _mm256_broadcast_ss(pt + g * pstride);
              a[g][j] = _mm256_fmadd_ps(pg, x, a[g][j]);
              a[g][j + 1] = _mm256_fmadd_ps(pg, y, a[g][j + 1]);
            }
          }
        } else {
          __m256 v[kTile];
          for (int j = 0; j < kTile; j += 2) Load16x2(vbase + t * stride + 8 * j, v[j], v[j + 1]);
          for (int g = 0; g < GB; ++g) {
            const __m256 pg = _mm256_broadcast_ss(pt + g * pstride);
            for (int j = 0; j < kTile; ++j) a[g][j] = _mm256_fmadd_ps(pg, v[j], a[g][j]);
          }
        }
      }
    }
    for (int g = 0; g < GB; ++g) {
      for (int j = 0; j < kTile; ++j) _mm256_storeu_ps(acc + g * kD + 8 * (c + j), a[g][j]);
    }
  }
}

// The rest of a batch of pages for `groups` query heads, the scores of its n tokens in `p` (row
// g at p + g * pstride, a multiple of 8; overwritten by the probabilities): the running-max
// update, then acc = corr * acc + P.V. `corr` is scratch for `groups` floats.
template <typename T, int NB>
MEMPIPE_TARGET_AVX2 void Avx2SoftmaxValues(const ValuePage<T>* pages, int count, size_t stride,
                                           int n, int groups, int pstride, float* acc, float* m,
                                           float* l, float* p, float* corr, ReadAhead* /*ahead*/) {
  constexpr int kD = NB * 16;
  const int nv = (n + 7) / 8;
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int g = 0; g < groups; ++g) {
    float* pg = p + g * pstride;
    __m256 mx = neg_inf;
    for (int v = 0; v < nv; ++v) {
      mx = _mm256_max_ps(
          mx, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(pg + 8 * v), TailMask8(n - 8 * v)));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float m_new = std::max(m[g], _mm_cvtss_f32(h));
    corr[g] = std::exp(m[g] - m_new);  // 0 on the first batch (m = -inf; acc and l are 0)
    const __m256 nm = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int v = 0; v < nv; ++v) {
      const __m256 e = _mm256_and_ps(Exp256(_mm256_sub_ps(_mm256_loadu_ps(pg + 8 * v), nm)),
                                     TailMask8(n - 8 * v));
      _mm256_storeu_ps(pg + 8 * v, e);  // inside the row: pstride is a multiple of 8
      sum = _mm256_add_ps(sum, e);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    l[g] = l[g] * corr[g] + _mm_cvtss_f32(s);
    m[g] = m_new;
  }
  for (int g0 = 0; g0 < groups; g0 += 4) {
    const float* pg = p + g0 * pstride;
    float* ag = acc + g0 * kD;
    switch (std::min(4, groups - g0)) {
      case 1:
        Avx2ValueTile<T, NB, 1>(pages, count, stride, pg, pstride, corr + g0, ag);
        break;
      case 2:
        Avx2ValueTile<T, NB, 2>(pages, count, stride, pg, pstride, corr + g0, ag);
        break;
      case 3:
        Avx2ValueTile<T, NB, 3>(pages, count, stride, pg, pstride, corr + g0, ag);
        break;
      default:
        Avx2ValueTile<T, NB, 4>(pages, count, stride, pg, pstride, corr + g0, ag);
        break;
    }
  }
}

// Tokens of scores the AVX2 kernel gathers (whole pages) before one softmax and P.V over them.
constexpr int kBatchTokens2 = 128;

// The AVX2 kernel's state for the G query heads of `heads` KV heads (BatchedHeads; the Heads
// interface of DenseImpl, SparseImpl and PrefillImpl).
template <typename T>
class Avx2Heads : public BatchedHeads<Avx2Heads<T>, T> {
  using Base = BatchedHeads<Avx2Heads<T>, T>;
  friend Base;

 public:
  // stage_rows: ignored (the rows are read in place). Score rows are rounded up to 8 floats.
  Avx2Heads(int heads, int groups, int head_dim, int block_size, float scale,
            bool /*stage_rows*/ = false)
      : Base(heads, groups, head_dim, block_size, scale, BatchTokens(block_size),
             (BatchTokens(block_size) + 7) / 8 * 8, 0) {}

  void Begin(int i, const DecodeIo& io, size_t row0) {
    const size_t gd = static_cast<size_t>(this->groups_) * this->head_dim_;
    this->ResetSlot(i);
    float* q = &this->q_[i * gd];
    LoadQueryRows(io, row0, this->groups_, this->scale_, q);
    if constexpr (kInterleaved2<T>) {
      float tmp[16];
      for (size_t b = 0; b < gd; b += 16) {
        for (int j = 0; j < 16; ++j) tmp[Position(j)] = q[b + j];
        std::copy(tmp, tmp + 16, q + b);
      }
    }
  }

  void AddPage(const KvCacheView& cache, int block, int kv_head, int i, int n, int next_block = -1,
               int next_n = 0, int next_head = -1) {
    NextPage next =
        NextPageRows<T>(cache, next_block, next_n, kv_head, this->heads_, i, n, next_head);
    const T* k = static_cast<const T*>(cache.data) + cache.Offset(0, block, 0, kv_head);
    const T* v = static_cast<const T*>(cache.data) + cache.Offset(1, block, 0, kv_head);
    const size_t stride = cache.TokenStride();
    float* p = this->QueuePage(i, v, n, stride);
    if (cache.KeysTransposed()) {  // rows again, in scratch: this kernel scores by rows
      krows_.resize(static_cast<size_t>(cache.block_size) * cache.head_dim);
      for (int t = 0; t < n; ++t) {
        ReadTransposedKeyRow(cache, k, t, &krows_[static_cast<size_t>(t) * cache.head_dim]);
      }
      k = krows_.data();
    }
    this->ScoreAndFlushIfFull(k, stride, n, i, p, next);
  }

 private:
  // Position of channel c in the query's and accumulators' order (Load16x2).
  static int Position(int c) {
    return kInterleaved2<T> ? (c & ~15) + (c & 1) * 8 + ((c & 15) >> 1) : c;
  }

  template <int H>
  void HeadScores(const T* k, size_t stride, int n, size_t q0, float* p, NextPage& next) {
    const float* q = &this->q_[q0];
    switch (this->head_dim_) {
      case 64:
        return Avx2Scores<T, 4, H>(k, stride, n, this->pstride_, q, p, next);
      case 128:
        return Avx2Scores<T, 8, H>(k, stride, n, this->pstride_, q, p, next);
      default:  // 256 (ValidateKvCache admits 64, 128, 256)
        return Avx2Scores<T, 16, H>(k, stride, n, this->pstride_, q, p, next);
    }
  }

  template <int NB>
  static constexpr auto kSoftmaxValues = &Avx2SoftmaxValues<T, NB>;

  static int BatchTokens(int block_size) {
    return std::max(block_size, kBatchTokens2 / block_size * block_size);
  }

  // The scores prefetch the next page's K and V rows (NextPage), P.V none: not measured on a
  // CPU without AVX-512 with the AVX-512 kernel's split (kValueAheadTokens).
  static constexpr bool kValuesAhead = false;

  std::vector<T> krows_;  // a transposed K page's rows (kHeadMajorKT), [block_size, head_dim]
};

// Avx512RowRead at AVX2's width: the AVX2 kernel's reads (same rows, order and prefetch)
// without its arithmetic, for ReadDecodeRows.
template <typename T>
class Avx2RowRead {
 public:
  Avx2RowRead(int heads, int /*groups*/, int head_dim, int /*block_size*/, float /*scale*/,
              bool /*stage_rows*/ = false)
      : heads_(heads), head_dim_(head_dim) {}
  static constexpr bool kPrefetchesNext = true;
  static constexpr bool kWritesOutput = false;

  void Begin(int /*i*/, const DecodeIo& /*io*/, size_t /*row0*/) {}

  MEMPIPE_TARGET_AVX2 void AddPage(const KvCacheView& cache, int block, int kv_head, int i, int n,
                                   int next_block = -1, int next_n = 0, int next_head = -1) {
    NextPage next = NextPageRows<T>(cache, next_block, next_n, kv_head, heads_, i, n, next_head);
    const int vecs = head_dim_ * static_cast<int>(sizeof(T)) / 32;
    const size_t stride = cache.TokenStride() * sizeof(T);
    const char* k = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                                  cache.Offset(0, block, 0, kv_head));
    const char* v = reinterpret_cast<const char*>(static_cast<const T*>(cache.data) +
                                                  cache.Offset(1, block, 0, kv_head));
    __m256i x = _mm256_setzero_si256();
    for (int t = 0; t < n; ++t) {
      PrefetchRow(next);
      for (int j = 0; j < vecs; ++j) {
        x = _mm256_xor_si256(
            x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + t * stride + 32 * j)));
        x = _mm256_xor_si256(
            x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + t * stride + 32 * j)));
      }
    }
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), x);
    for (uint64_t lane : lanes) sum_ ^= lane;
  }

  void Store(int /*i*/, const DecodeIo& /*io*/, size_t /*row0*/) const {
    static thread_local volatile uint64_t sink = 0;
    sink = sink ^ sum_;
  }
  void StorePartial(int i, float* /*acc*/, float* /*m*/, float* /*l*/) const {
    Store(i, DecodeIo{}, 0);
  }

 private:
  int heads_, head_dim_;
  uint64_t sum_ = 0;
};
#endif  // MEMPIPE_AVX2_KERNEL

// Decode cuts each (sequence, KV head)'s pages (all of them for dense decode, the selected ones
// for sparse) into chunks of kDecodeChunkTokens tokens' worth of pages, and splits the (chunk,
// KV head) pairs over the threads: a short batch still spreads over all threads, and for dense
// decode a thread then streams every KV head of its chunks, the rows as they lie in memory.
// The chunks of a sequence with more than one are combined by whichever thread finishes the
// last of a KV head's chunks (the flash-decoding split), in chunk order. Chunks depend on the
// page lists only, so the result is the same for any thread count, and sparse decode over every
// page equals dense decode bit for bit.
class DecodeChunks {
 public:
  // entries(s): the most pages any KV head of sequence s attends to. write_output false: the
  // partial states are not combined (ReadDecodeRows).
  template <typename Entries>
  DecodeChunks(const DecodeIo& io, const KvCacheView& cache, Entries entries, bool write_output)
      : DecodeChunks(io, cache, write_output, /*one_per_sequence=*/false) {
    first_.assign(io.num_seqs + 1, 0);
    for (int s = 0; s < io.num_seqs; ++s) {
      first_[s + 1] = first_[s] + (entries(s) + chunk_pages_ - 1) / chunk_pages_;
    }
    if (chunks() > io.num_seqs) {
      const size_t rows = static_cast<size_t>(chunks()) * io.num_heads;
      acc_.resize(rows * io.head_dim);
      m_.resize(rows);
      l_.resize(rows);
      pending_ = std::make_unique<std::atomic<int>[]>(static_cast<size_t>(io.num_seqs) * kv_heads_);
      for (int s = 0; s < io.num_seqs; ++s) {
        for (int h = 0; h < kv_heads_; ++h) {
          pending_[static_cast<size_t>(s) * kv_heads_ + h].store(first_[s + 1] - first_[s],
                                                                 std::memory_order_relaxed);
        }
      }
    }
  }

  // One chunk per sequence, every sequence's entries at most one chunk (SparseDecodeRows): no
  // per-sequence table, so a call for one row costs nothing per sequence of the batch.
  struct OnePerSequence {};
  DecodeChunks(const DecodeIo& io, const KvCacheView& cache, OnePerSequence, bool write_output)
      : DecodeChunks(io, cache, write_output, /*one_per_sequence=*/true) {}

  int chunks() const { return one_per_sequence_ ? io_.num_seqs : first_[io_.num_seqs]; }
  int SeqOf(int u) const {
    if (one_per_sequence_) return u;
    return static_cast<int>(std::upper_bound(first_.begin(), first_.end(), u) - first_.begin() - 1);
  }
  // Entries [Begin, End) of chunk u (of sequence s) in a list of `count`.
  int Begin(int u, int s) const { return one_per_sequence_ ? 0 : (u - first_[s]) * chunk_pages_; }
  int End(int u, int s, int count) const { return std::min(count, Begin(u, s) + chunk_pages_); }

  // The output of KV head h for chunk u: the result itself for a sequence of one chunk, else the
  // chunk's unnormalised state; the last of the head's chunks to finish combines them.
  template <typename H>
  void Finish(H& heads, int i, int u, int s, int h) {
    const size_t row = static_cast<size_t>(s) * io_.num_heads + h * groups_;
    if (one_per_sequence_ || first_[s + 1] - first_[s] == 1) {
      heads.Store(i, io_, row);
      return;
    }
    const size_t crow = static_cast<size_t>(u) * io_.num_heads + h * groups_;
    heads.StorePartial(i, &acc_[crow * io_.head_dim], &m_[crow], &l_[crow]);
    // acq_rel: the last one sees every other chunk's state.
    if (pending_[static_cast<size_t>(s) * kv_heads_ + h].fetch_sub(1, std::memory_order_acq_rel) ==
            1 &&
        write_output_) {
      Combine(s, h);
    }
  }

 private:
  DecodeChunks(const DecodeIo& io, const KvCacheView& cache, bool write_output,
               bool one_per_sequence)
      : io_(io),
        kv_heads_(cache.num_kv_heads),
        groups_(io.num_heads / cache.num_kv_heads),
        chunk_pages_(DecodeChunkPages(cache.block_size)),
        write_output_(write_output),
        one_per_sequence_(one_per_sequence) {}

  // out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c with M = max_c m_c, for the query heads
  // of KV head h of sequence s. A chunk with no pages (a KV head that selected fewer) has l = 0
  // and is skipped; the first chunk is never empty.
  void Combine(int s, int h) const {
    std::vector<float> out(io_.head_dim);
    for (int qh = h * groups_; qh < (h + 1) * groups_; ++qh) {
      float mx = kNegInf;
      for (int u = first_[s]; u < first_[s + 1]; ++u) {
        mx = std::max(mx, m_[static_cast<size_t>(u) * io_.num_heads + qh]);
      }
      std::fill(out.begin(), out.end(), 0.0f);
      float l = 0.0f;
      for (int u = first_[s]; u < first_[s + 1]; ++u) {
        const size_t row = static_cast<size_t>(u) * io_.num_heads + qh;
        if (l_[row] == 0.0f) continue;  // an empty chunk
        const float w = std::exp(m_[row] - mx);
        l += w * l_[row];
        const float* a = &acc_[row * io_.head_dim];
        for (int c = 0; c < io_.head_dim; ++c) out[c] += w * a[c];
      }
      const size_t orow = static_cast<size_t>(s) * io_.num_heads + qh;
      for (int c = 0; c < io_.head_dim; ++c) {
        StoreFromFloat(io_.out, io_.dtype, orow * io_.head_dim + c, out[c] / l);
      }
    }
  }

  const DecodeIo& io_;
  int kv_heads_, groups_, chunk_pages_;
  bool write_output_;
  bool one_per_sequence_;
  std::vector<int> first_;          // sequence s owns chunks [first_[s], first_[s + 1])
  std::vector<float> acc_, m_, l_;  // [chunk, num_heads, D], [chunk, num_heads]
  std::unique_ptr<std::atomic<int>[]> pending_;  // [num_seqs, kv_heads] chunks not finished
};

// The process's DecodeReadAhead: MEMPIPE_READ_AHEAD's value at first use (or, where that is
// unset, its earlier name MEMPIPE_SPARSE_READ_AHEAD's), then SetDecodeReadAhead's.
std::atomic<int>& DecodeReadAheadSetting() {
  static std::atomic<int> setting{[] {
    const char* name = "MEMPIPE_READ_AHEAD";
    const char* env = std::getenv(name);
    if (env == nullptr || *env == '\0') {
      name = "MEMPIPE_SPARSE_READ_AHEAD";
      env = std::getenv(name);
    }
    if (env == nullptr || *env == '\0') return static_cast<int>(DecodeReadAhead::kStream);
    absl::StatusOr<DecodeReadAhead> mode = ParseDecodeReadAhead(env);
    if (!mode.ok()) {
      std::fprintf(stderr, "mempipe: %s ignored: %s\n", name,
                   std::string(mode.status().message()).c_str());
      return static_cast<int>(DecodeReadAhead::kStream);
    }
    return static_cast<int>(*mode);
  }()};
  return setting;
}

// Whether Heads prefetches decode's rows from a planned stream (kReadsAhead).
template <typename H, typename = void>
struct ReadsAhead : std::false_type {};
template <typename H>
struct ReadsAhead<H, std::void_t<decltype(H::kReadsAhead)>> : std::bool_constant<H::kReadsAhead> {};

#if MEMPIPE_AVX512_KERNEL
// How far ahead of the AVX-512 kernel's reads the stream runs (ReadAhead), set on sparse decode:
// kernel bench, sparse bf16, wall clock, alternated (results/read_ahead/): on the Zen 5 build VM 8
// and 12 KiB alike, 4 KiB 3-8% slower; on an Emerald Rapids host (the H200 machine's CPU),
// Llama-3-8B at 2 threads 0.96-1.02 ms per layer at 4 and 8 KiB, 1.13-1.16 at 12, 0.97-1.33 at 24
// and 48; prefetching into L1 (T0) instead, 1.21.
constexpr int kReadAheadBytes = 8 * 1024;

// Builds a ReadAhead in the order the AVX-512 kernel reads: a page's K rows when AddPage scores
// it, and each slot's batch of V pages when P.V reads it (Page flushes a slot's batch when the
// pages' tokens would overflow `capacity` with one more page, as ScoreAndFlushIfFull does;
// Values at the slot's end, as Store does). Start then prefetches the first kReadAheadBytes.
template <typename T>
class ReadAheadPlanner {
 public:
  ReadAheadPlanner(const KvCacheView& cache, int capacity, int slots, ReadAhead& ahead)
      : cache_(cache),
        ahead_(ahead),
        capacity_(capacity),
        lines_(cache.head_dim * static_cast<int>(sizeof(T)) / 64),
        stride_(cache.TokenStride() * sizeof(T)),
        base_(static_cast<const char*>(cache.data)) {
    ahead_.Clear();
    batches_.resize(std::max<size_t>(batches_.size(), slots));
    for (int i = 0; i < slots; ++i) batches_[i].pages.clear(), batches_[i].tokens = 0;
  }

  // Block `block`'s K page of `kv_head` (n tokens), then its V page into slot i's batch.
  void Page(int i, int block, int kv_head, int n) {
    const char* k = base_ + cache_.Offset(0, block, 0, kv_head) * sizeof(T);
    if (cache_.KeysTransposed()) {  // the whole page, over the n rows' steps
      const int step_lines = ReadAhead::TransposedStepLines(cache_.block_size * lines_, n);
      ahead_.Add(k, static_cast<size_t>(step_lines) * 64, n, step_lines);
    } else {
      ahead_.Add(k, stride_, n, lines_);
    }
    Batch& b = batches_[i];
    b.pages.push_back(Pending{block, kv_head, n});
    b.tokens += n;
    if (b.tokens + cache_.block_size > capacity_) Values(i);
  }
  // Slot i's batch of V pages, read now.
  void Values(int i) {
    Batch& b = batches_[i];
    for (const Pending& p : b.pages) {
      ahead_.Add(base_ + cache_.Offset(1, p.block, 0, p.head) * sizeof(T), stride_, p.n, lines_);
    }
    b.pages.clear();
    b.tokens = 0;
  }
  void Start() { ahead_.Start(std::max(1, kReadAheadBytes / (lines_ * 64))); }

 private:
  struct Pending {
    int block, head, n;
  };
  struct Batch {
    std::vector<Pending> pages;
    int tokens = 0;
  };
  const KvCacheView& cache_;
  ReadAhead& ahead_;
  int capacity_, lines_;
  size_t stride_;
  const char* base_;
  static thread_local std::vector<Batch> batches_;  // [slots], reused across calls
};
template <typename T>
thread_local std::vector<typename ReadAheadPlanner<T>::Batch> ReadAheadPlanner<T>::batches_;

#endif  // MEMPIPE_AVX512_KERNEL

template <template <typename> class Heads, typename T>
void DenseImpl(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
               float scale, int groups) {
  DecodeChunks chunks(
      io, cache, [&](int s) { return NumPages(table.seq_lens[s], cache.block_size); },
      Heads<T>::kWritesOutput);
  ForEachSeqHeads(chunks.chunks(), cache.num_kv_heads, io.num_threads, [&](int u, int h0, int h1) {
    // Page-major over this range's heads: each page's K/V rows are read once, contiguously.
    const int s = chunks.SeqOf(u);
    Heads<T> heads(h1 - h0, groups, io.head_dim, cache.block_size, scale);
    const size_t seq_row = static_cast<size_t>(s) * io.num_heads;
    for (int h = h0; h < h1; ++h) heads.Begin(h - h0, io, seq_row + h * groups);
    const int len = table.seq_lens[s];
    const int p0 = chunks.Begin(u, s), p1 = chunks.End(u, s, NumPages(len, cache.block_size));
    auto tokens = [&](int p) { return std::min(cache.block_size, len - p * cache.block_size); };
#if MEMPIPE_AVX512_KERNEL
    if constexpr (ReadsAhead<Heads<T>>::value) {
      thread_local ReadAhead ahead;
      if (ActiveDecodeReadAhead() == DecodeReadAhead::kStream) {
        // A slot per KV head of the range, each page's heads in turn (the loop below).
        ReadAheadPlanner<T> plan(cache, Heads<T>::BatchCapacity(cache.block_size), h1 - h0, ahead);
        for (int p = p0; p < p1; ++p) {
          for (int h = h0; h < h1; ++h) plan.Page(h - h0, table.Block(s, p), h, tokens(p));
        }
        for (int h = h0; h < h1; ++h) plan.Values(h - h0);
        plan.Start();
        heads.ReadAheadWith(&ahead);
      }
    }
#endif
    for (int p = p0; p < p1; ++p) {
      const int n = tokens(p);
      if (Heads<T>::kPrefetchesNext && p + 1 < p1) {
        for (int h = h0; h < h1; ++h)
          heads.AddPage(cache, table.Block(s, p), h, h - h0, n, table.Block(s, p + 1),
                        tokens(p + 1));
        continue;
      }
      for (int h = h0; h < h1; ++h) heads.AddPage(cache, table.Block(s, p), h, h - h0, n);
    }
    for (int h = h0; h < h1; ++h) chunks.Finish(heads, h - h0, u, s, h);
  });
}

// Sparse decode's items are (chunk u, KV head h), numbered u * kv_heads + h; a thread takes a
// contiguous range of them (ForEachItemRange) and one state for the range. The page after an
// item's last one is the next item's first, so the AVX-512 kernel's prefetch (NextPage) runs
// on across items and only the range's first page is read cold; by items (ForEachSeqHeads) the
// first page of every item was, one in 16 of SmolLM2's 4 x 6K at budget 512.
//
// SparseRange runs items [first, last) of `chunks`' split on the calling thread; it reads only
// those items' page lists.
template <template <typename> class Heads, typename T>
void SparseRange(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                 const PageList& pages, float scale, int groups, DecodeChunks& chunks,
                 int64_t first, int64_t last) {
  const int kv_heads = cache.num_kv_heads;
  struct Item {
    int u = 0, s = 0, h = 0;
    const int32_t* list = nullptr;  // the selected pages of (s, h)
    int begin = 0, end = 0;         // the chunk's entries of `list`
    // The cache block and token count of entry e.
    int Block(const BlockTableView& t, int e) const { return t.Block(s, list[e]); }
    int Tokens(const BlockTableView& t, int bs, int e) const {
      return std::min(bs, t.seq_lens[s] - list[e] * bs);
    }
  };
  auto item = [&](int64_t it) {
    Item x;
    x.u = static_cast<int>(it / kv_heads);
    x.h = static_cast<int>(it % kv_heads);
    x.s = chunks.SeqOf(x.u);
    const size_t row = static_cast<size_t>(x.s) * pages.num_kv_heads + x.h;
    x.list = pages.pages + row * pages.max_selected;
    x.begin = chunks.Begin(x.u, x.s);
    x.end = chunks.End(x.u, x.s, pages.counts[row]);
    return x;
  };
  const int bs = cache.block_size;
  Heads<T> heads(1, groups, io.head_dim, bs, scale, /*stage_rows=*/true);
#if MEMPIPE_AVX512_KERNEL
  if constexpr (ReadsAhead<Heads<T>>::value) {
    thread_local ReadAhead ahead;
    if (ActiveDecodeReadAhead() == DecodeReadAhead::kStream) {  // one slot; each item's end
                                                                // flushes its batch
      ReadAheadPlanner<T> plan(cache, Heads<T>::BatchCapacity(bs), 1, ahead);
      for (int64_t it = first; it < last; ++it) {
        const Item x = item(it);
        for (int e = x.begin; e < x.end; ++e) {
          plan.Page(0, x.Block(table, e), x.h, x.Tokens(table, bs, e));
        }
        plan.Values(0);
      }
      plan.Start();
      heads.ReadAheadWith(&ahead);
    }
  }
#endif
  Item cur = item(first);
  for (int64_t it = first; it < last; ++it) {
    const Item next = it + 1 < last ? item(it + 1) : Item{};  // an empty Item: none
    heads.Begin(0, io, static_cast<size_t>(cur.s) * io.num_heads + cur.h * groups);
    for (int e = cur.begin; e < cur.end; ++e) {
      const int block = cur.Block(table, e), n = cur.Tokens(table, bs, e);
      if constexpr (Heads<T>::kPrefetchesNext) {
        if (e + 1 < cur.end) {
          heads.AddPage(cache, block, cur.h, 0, n, cur.Block(table, e + 1),
                        cur.Tokens(table, bs, e + 1));
        } else if (next.begin < next.end) {
          heads.AddPage(cache, block, cur.h, 0, n, next.Block(table, next.begin),
                        next.Tokens(table, bs, next.begin), next.h);
        } else {
          heads.AddPage(cache, block, cur.h, 0, n);
        }
      } else {
        heads.AddPage(cache, block, cur.h, 0, n);
      }
    }
    chunks.Finish(heads, 0, cur.u, cur.s, cur.h);
    cur = next;
  }
}

template <template <typename> class Heads, typename T>
void SparseImpl(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                const PageList& pages, float scale, int groups) {
  DecodeChunks chunks(
      io, cache,
      [&](int s) {
        const int32_t* c = pages.counts + static_cast<size_t>(s) * pages.num_kv_heads;
        return *std::max_element(c, c + pages.num_kv_heads);
      },
      Heads<T>::kWritesOutput);
  ForEachItemRange(static_cast<int64_t>(chunks.chunks()) * cache.num_kv_heads, io.num_threads,
                   [&](int64_t first, int64_t last) {
                     SparseRange<Heads, T>(io, cache, table, pages, scale, groups, chunks, first,
                                           last);
                   });
}

template <template <typename> class Heads, typename T>
void PrefillImpl(const DecodeIo& io, const int32_t* query_start_loc, const KvCacheView& cache,
                 const BlockTableView& table, float scale, int groups) {
  // Items are (query token, KV head). A token's cost grows with its position, so item r stands
  // for token zigzag(r) = 0, last, 1, last - 1, ...: each thread's contiguous range of items
  // then holds cheap and expensive tokens alike.
  const int tokens = io.num_seqs;
  ForEachSeqHeads(tokens, cache.num_kv_heads, io.num_threads, [&](int r, int h0, int h1) {
    const int row = (r % 2 == 0) ? r / 2 : tokens - 1 - r / 2;
    const int s = static_cast<int>(
        std::upper_bound(query_start_loc, query_start_loc + table.num_seqs + 1, row) -
        query_start_loc - 1);
    const int q_len = query_start_loc[s + 1] - query_start_loc[s];
    const int pos = table.seq_lens[s] - q_len + (row - query_start_loc[s]);  // attends [0, pos]
    Heads<T> heads(h1 - h0, groups, io.head_dim, cache.block_size, scale);
    const size_t row0 = static_cast<size_t>(row) * io.num_heads;
    for (int h = h0; h < h1; ++h) heads.Begin(h - h0, io, row0 + h * groups);
    for (int p = 0; p * cache.block_size <= pos; ++p) {
      const int n = std::min(cache.block_size, pos + 1 - p * cache.block_size);
      for (int h = h0; h < h1; ++h) heads.AddPage(cache, table.Block(s, p), h, h - h0, n);
    }
    for (int h = h0; h < h1; ++h) heads.Store(h - h0, io, row0 + h * groups);
  });
}

// Runs Impl<Heads, T> with the selected kernel's Heads for the cache's dtype.
template <typename Run>
void WithKernel(DType dtype, Run run) {
  DispatchDType(dtype, [&]<typename T>() {
#if MEMPIPE_AVX512_KERNEL
    if (UseAvx512Kernel()) {
      run.template operator()<Avx512Heads, T>();
      return;
    }
#endif
#if MEMPIPE_AVX2_KERNEL
    if (UseAvx2Kernel()) {
      run.template operator()<Avx2Heads, T>();
      return;
    }
#endif
    run.template operator()<PortableHeads, T>();
  });
}

}  // namespace

absl::Status ValidateDecodeIo(const DecodeIo& io, const KvCacheView& cache,
                              const BlockTableView& table) {
  MEMPIPE_RETURN_IF_ERROR(ValidateCommon(io, cache, table));
  if (io.num_seqs != table.num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query has ", io.num_seqs, " sequences but the block table has ", table.num_seqs));
  }
  return absl::OkStatus();
}

absl::Status DenseDecode(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                         float scale) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, table));
  const int groups = io.num_heads / cache.num_kv_heads;
  WithKernel(cache.dtype, [&]<template <typename> class Heads, typename T>() {
    DenseImpl<Heads, T>(io, cache, table, scale, groups);
  });
  return absl::OkStatus();
}

namespace {

// ValidatePageList's checks of the list itself (pointers, KV heads, max_selected).
absl::Status ValidatePageListShape(const PageList& pages, const KvCacheView& cache) {
  if (pages.pages == nullptr || pages.counts == nullptr) {
    return absl::InvalidArgumentError("selected pages and counts must not be null");
  }
  if (pages.num_kv_heads != cache.num_kv_heads || pages.max_selected <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection has ", pages.num_kv_heads, " KV heads and max_selected ", pages.max_selected,
        "; expected ", cache.num_kv_heads, " KV heads and max_selected >= 1"));
  }
  return absl::OkStatus();
}

// ValidatePageList's checks of row (s, h): its count in [1, max_selected], its pages ascending
// inside the sequence's pages.
absl::Status ValidatePageRow(const PageList& pages, const BlockTableView& table,
                             const KvCacheView& cache, int s, int h) {
  const int num_pages = NumPages(table.seq_lens[s], cache.block_size);
  const size_t row = static_cast<size_t>(s) * pages.num_kv_heads + h;
  const int count = pages.counts[row];
  if (count < 1 || count > pages.max_selected) {
    return absl::InvalidArgumentError(absl::StrCat("selection count[", s, "][", h, "] = ", count,
                                                   " is outside [1, ", pages.max_selected, "]"));
  }
  const int32_t* list = pages.pages + row * pages.max_selected;
  for (int i = 0; i < count; ++i) {
    if (list[i] < 0 || list[i] >= num_pages || (i > 0 && list[i] <= list[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("selected page [", s, "][", h, "][", i,
                                                     "] = ", list[i], " is out of range [0, ",
                                                     num_pages, ") or not ascending"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidatePageList(const PageList& pages, const BlockTableView& table,
                              const KvCacheView& cache) {
  MEMPIPE_RETURN_IF_ERROR(ValidatePageListShape(pages, cache));
  for (int s = 0; s < table.num_seqs; ++s) {
    for (int h = 0; h < cache.num_kv_heads; ++h) {
      MEMPIPE_RETURN_IF_ERROR(ValidatePageRow(pages, table, cache, s, h));
    }
  }
  return absl::OkStatus();
}

absl::Status SparseDecode(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                          const PageList& pages, float scale) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, table));
  MEMPIPE_RETURN_IF_ERROR(ValidatePageList(pages, table, cache));
  const int groups = io.num_heads / cache.num_kv_heads;
  WithKernel(cache.dtype, [&]<template <typename> class Heads, typename T>() {
    SparseImpl<Heads, T>(io, cache, table, pages, scale, groups);
  });
  return absl::OkStatus();
}

absl::Status SparseDecodeRows(const DecodeIo& io, const KvCacheView& cache,
                              const BlockTableView& table, const PageList& pages, float scale,
                              int64_t first, int64_t last) {
  const int64_t rows = static_cast<int64_t>(io.num_seqs) * cache.num_kv_heads;
  if (first < 0 || first > last || last > rows) {
    return absl::InvalidArgumentError(absl::StrCat("rows [", first, ", ", last,
                                                   ") are outside the batch's ", rows,
                                                   " (sequence, KV head) rows"));
  }
  MEMPIPE_RETURN_IF_ERROR(ValidatePageListShape(pages, cache));
  // One chunk per sequence: each row is one item, attended whole.
  const int chunk_pages = DecodeChunkPages(cache.block_size);
  for (int64_t row = first; row < last; ++row) {
    const int s = static_cast<int>(row / cache.num_kv_heads);
    const int h = static_cast<int>(row % cache.num_kv_heads);
    MEMPIPE_RETURN_IF_ERROR(ValidatePageRow(pages, table, cache, s, h));
    if (pages.counts[row] > chunk_pages) {
      return absl::FailedPreconditionError(
          absl::StrCat("row (", s, ", ", h, ") selects ", pages.counts[row],
                       " pages, more than one decode chunk (", chunk_pages, " pages of ",
                       cache.block_size, " tokens): use SparseDecode"));
    }
  }
  if (first == last) return absl::OkStatus();
  const int groups = io.num_heads / cache.num_kv_heads;
  WithKernel(cache.dtype, [&]<template <typename> class Heads, typename T>() {
    DecodeChunks chunks(io, cache, DecodeChunks::OnePerSequence{}, Heads<T>::kWritesOutput);
    SparseRange<Heads, T>(io, cache, table, pages, scale, groups, chunks, first, last);
  });
  return absl::OkStatus();
}

void SetDecodeReadAhead(DecodeReadAhead mode) {
  DecodeReadAheadSetting().store(static_cast<int>(mode), std::memory_order_relaxed);
}

absl::StatusOr<DecodeReadAhead> ParseDecodeReadAhead(absl::string_view name) {
  if (name == "stream") return DecodeReadAhead::kStream;
  if (name == "next_page") return DecodeReadAhead::kNextPage;
  return absl::InvalidArgumentError(
      absl::StrCat("read-ahead \"", name, "\" is not one of stream, next_page"));
}

absl::string_view DecodeReadAheadName(DecodeReadAhead mode) {
  return mode == DecodeReadAhead::kStream ? "stream" : "next_page";
}

DecodeReadAhead ActiveDecodeReadAhead() {
  return static_cast<DecodeReadAhead>(DecodeReadAheadSetting().load(std::memory_order_relaxed));
}

absl::Status ReadDecodeRows(const DecodeIo& io, const KvCacheView& cache,
                            const BlockTableView& table, const PageList* pages) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, table));
  if (pages != nullptr) MEMPIPE_RETURN_IF_ERROR(ValidatePageList(*pages, table, cache));
  const int groups = io.num_heads / cache.num_kv_heads;
  auto read = [&]<template <typename> class Reader>() {
    DispatchDType(cache.dtype, [&]<typename T>() {
      if (pages == nullptr) {
        DenseImpl<Reader, T>(io, cache, table, 1.0f, groups);
      } else {
        SparseImpl<Reader, T>(io, cache, table, *pages, 1.0f, groups);
      }
    });
  };
#if MEMPIPE_AVX512_KERNEL
  if (UseAvx512Kernel()) {
    read.template operator()<Avx512RowRead>();
    return absl::OkStatus();
  }
#endif
#if MEMPIPE_AVX2_KERNEL
  if (UseAvx2Kernel()) {
    read.template operator()<Avx2RowRead>();
    return absl::OkStatus();
  }
#endif
  return absl::FailedPreconditionError(
      absl::StrCat("ReadDecodeRows reads as the AVX-512 or AVX2 kernel does; the active kernel is ",
                   ActiveCpuKernelName()));
}

absl::Status PrefillAttention(const DecodeIo& io, const int32_t* query_start_loc,
                              const KvCacheView& cache, const BlockTableView& table, float scale) {
  MEMPIPE_RETURN_IF_ERROR(ValidateCommon(io, cache, table));
  if (query_start_loc == nullptr) {
    return absl::InvalidArgumentError("query_start_loc must not be null");
  }
  if (query_start_loc[0] != 0 || query_start_loc[table.num_seqs] != io.num_seqs) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_start_loc must start at 0 and end at the token count ", io.num_seqs,
                     ", got ", query_start_loc[0], " .. ", query_start_loc[table.num_seqs]));
  }
  for (int s = 0; s < table.num_seqs; ++s) {
    const int q_len = query_start_loc[s + 1] - query_start_loc[s];
    if (q_len < 0 || q_len > table.seq_lens[s]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", s, " has ", q_len, " query tokens but seq_len ", table.seq_lens[s]));
    }
  }
  const int groups = io.num_heads / cache.num_kv_heads;
  WithKernel(cache.dtype, [&]<template <typename> class Heads, typename T>() {
    PrefillImpl<Heads, T>(io, query_start_loc, cache, table, scale, groups);
  });
  return absl::OkStatus();
}

}  // namespace mempipe
