#include "attention/decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

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
      const T* k = kbase + t * stride;
      const T* v = vbase + t * stride;
      float* vr = &vpage[t * d];
      for (int c = 0; c < d; ++c) kpage[c * n + t] = ToFloat(k[c]);
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

// Loads query rows [row0, row0 + G) into the accumulator.
void LoadQuery(GroupAccumulator& a, const DecodeIo& io, size_t row0) {
  for (int g = 0; g < a.groups; ++g) {
    for (int c = 0; c < a.head_dim; ++c) {
      a.q[g * a.head_dim + c] = LoadAsFloat(io.query, io.dtype, (row0 + g) * io.head_dim + c);
    }
  }
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
  DispatchDType(cache.dtype, [&]<typename T>() {
    ForEachSeqHeads(io.num_seqs, cache.num_kv_heads, io.num_threads, [&](int s, int h0, int h1) {
      // Page-major over this range's heads: each page's K/V rows are read contiguously.
      std::vector<GroupAccumulator> acc(h1 - h0,
                                        GroupAccumulator(groups, io.head_dim, cache.block_size));
      for (int h = h0; h < h1; ++h) {
        LoadQuery(acc[h - h0], io, static_cast<size_t>(s) * io.num_heads + h * groups);
        acc[h - h0].Reset();
      }
      const int len = table.seq_lens[s];
      for (int p = 0; p < NumPages(len, cache.block_size); ++p) {
        const int n = std::min(cache.block_size, len - p * cache.block_size);
        for (int h = h0; h < h1; ++h) acc[h - h0].AddPage<T>(cache, table.Block(s, p), h, n, scale);
      }
      for (int h = h0; h < h1; ++h) {
        acc[h - h0].Store(io.out, io.dtype, static_cast<size_t>(s) * io.num_heads + h * groups);
      }
    });
  });
  return absl::OkStatus();
}

absl::Status ValidatePageList(const PageList& pages, const BlockTableView& table,
                              const KvCacheView& cache) {
  if (pages.pages == nullptr || pages.counts == nullptr) {
    return absl::InvalidArgumentError("selected pages and counts must not be null");
  }
  if (pages.num_kv_heads != cache.num_kv_heads || pages.max_selected <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection has ", pages.num_kv_heads, " KV heads and max_selected ", pages.max_selected,
        "; expected ", cache.num_kv_heads, " KV heads and max_selected >= 1"));
  }
  for (int s = 0; s < table.num_seqs; ++s) {
    const int num_pages = NumPages(table.seq_lens[s], cache.block_size);
    for (int h = 0; h < cache.num_kv_heads; ++h) {
      const size_t row = static_cast<size_t>(s) * pages.num_kv_heads + h;
      const int count = pages.counts[row];
      if (count < 1 || count > pages.max_selected) {
        return absl::InvalidArgumentError(absl::StrCat("selection count[", s, "][", h,
                                                       "] = ", count, " is outside [1, ",
                                                       pages.max_selected, "]"));
      }
      const int32_t* list = pages.pages + row * pages.max_selected;
      for (int i = 0; i < count; ++i) {
        if (list[i] < 0 || list[i] >= num_pages || (i > 0 && list[i] <= list[i - 1])) {
          return absl::InvalidArgumentError(absl::StrCat("selected page [", s, "][", h, "][", i,
                                                         "] = ", list[i], " is out of range [0, ",
                                                         num_pages, ") or not ascending"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status SparseDecode(const DecodeIo& io, const KvCacheView& cache, const BlockTableView& table,
                          const PageList& pages, float scale) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDecodeIo(io, cache, table));
  MEMPIPE_RETURN_IF_ERROR(ValidatePageList(pages, table, cache));
  const int groups = io.num_heads / cache.num_kv_heads;
  DispatchDType(cache.dtype, [&]<typename T>() {
    ForEachSeqHeads(io.num_seqs, cache.num_kv_heads, io.num_threads, [&](int s, int h0, int h1) {
      GroupAccumulator a(groups, io.head_dim, cache.block_size);
      const int len = table.seq_lens[s];
      for (int h = h0; h < h1; ++h) {
        const size_t row = static_cast<size_t>(s) * pages.num_kv_heads + h;
        const int32_t* list = pages.pages + row * pages.max_selected;
        const size_t row0 = static_cast<size_t>(s) * io.num_heads + h * groups;
        LoadQuery(a, io, row0);
        a.Reset();
        for (int i = 0; i < pages.counts[row]; ++i) {
          const int p = list[i];
          const int n = std::min(cache.block_size, len - p * cache.block_size);
          a.AddPage<T>(cache, table.Block(s, p), h, n, scale);
        }
        a.Store(io.out, io.dtype, row0);
      }
    });
  });
  return absl::OkStatus();
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
  GroupAccumulator a(groups, io.head_dim, cache.block_size);
  DispatchDType(cache.dtype, [&]<typename T>() {
    for (int s = 0; s < table.num_seqs; ++s) {
      const int len = table.seq_lens[s];
      const int q0 = query_start_loc[s];
      const int q_len = query_start_loc[s + 1] - q0;
      for (int i = 0; i < q_len; ++i) {
        const int pos = len - q_len + i;  // attends tokens [0, pos]
        for (int h = 0; h < cache.num_kv_heads; ++h) {
          const size_t row0 = static_cast<size_t>(q0 + i) * io.num_heads + h * groups;
          LoadQuery(a, io, row0);
          a.Reset();
          for (int p = 0; p * cache.block_size <= pos; ++p) {
            const int n = std::min(cache.block_size, pos + 1 - p * cache.block_size);
            a.AddPage<T>(cache, table.Block(s, p), h, n, scale);
          }
          a.Store(io.out, io.dtype, row0);
        }
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace mempipe
