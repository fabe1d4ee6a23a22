#include "retriever/digest.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

// Max/min on storage values through fp32: exact, since every value is a stored one.
template <typename T>
void ResetRow(const T* key, T* mx, T* mn, int head_dim) {
  std::copy(key, key + head_dim, mx);
  std::copy(key, key + head_dim, mn);
}

template <typename T>
void WidenRow(const T* key, T* mx, T* mn, int head_dim) {
  for (int c = 0; c < head_dim; ++c) {
    const float k = ToFloat(key[c]);
    if (k > ToFloat(mx[c])) mx[c] = key[c];
    if (k < ToFloat(mn[c])) mn[c] = key[c];
  }
}

}  // namespace

absl::Status ValidateDigests(const KvCacheView& cache, const DigestView& digests) {
  if (digests.data == nullptr) return absl::InvalidArgumentError("digest pointer is null");
  if (digests.dtype != cache.dtype || digests.num_blocks != cache.num_blocks ||
      digests.num_kv_heads != cache.num_kv_heads || digests.head_dim != cache.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "digests [", digests.num_blocks, ", 2, ", digests.num_kv_heads, ", ", digests.head_dim,
        "] ", DTypeName(digests.dtype), " do not match the KV cache (", cache.num_blocks,
        " blocks, ", cache.num_kv_heads, " KV heads, head_dim ", cache.head_dim, ", ",
        DTypeName(cache.dtype), ")"));
  }
  return absl::OkStatus();
}

absl::Status BuildDigests(const KvCacheView& cache, const BlockTableView& table,
                          const DigestView& digests) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  DispatchDType(cache.dtype, [&]<typename T>() {
    const T* kv = static_cast<const T*>(cache.data);
    T* dg = static_cast<T*>(digests.data);
    std::vector<float> fmx(cache.head_dim), fmn(cache.head_dim);
    for (int s = 0; s < table.num_seqs; ++s) {
      const int len = table.seq_lens[s];
      for (int p = 0; p < NumPages(len, cache.block_size); ++p) {
        const int block = table.Block(s, p);
        const int n = std::min(cache.block_size, len - p * cache.block_size);
        for (int h = 0; h < cache.num_kv_heads; ++h) {
          // Widen in fp32 and store once: max/min pick stored values, so the round trip
          // through fp32 is exact.
          const T* first = kv + cache.Offset(0, block, 0, h);
          for (int c = 0; c < cache.head_dim; ++c) fmx[c] = fmn[c] = ToFloat(first[c]);
          for (int t = 1; t < n; ++t) {
            const T* key = kv + cache.Offset(0, block, t, h);
            for (int c = 0; c < cache.head_dim; ++c) {
              const float k = ToFloat(key[c]);
              fmx[c] = k > fmx[c] ? k : fmx[c];
              fmn[c] = k < fmn[c] ? k : fmn[c];
            }
          }
          T* mx = dg + digests.Offset(block, 0, h);
          T* mn = dg + digests.Offset(block, 1, h);
          for (int c = 0; c < cache.head_dim; ++c) {
            mx[c] = FromFloat<T>(fmx[c]);
            mn[c] = FromFloat<T>(fmn[c]);
          }
        }
      }
    }
  });
  return absl::OkStatus();
}

namespace {

absl::Status CheckSlots(const int64_t* slot_mapping, int num_tokens, int64_t num_slots) {
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens > 0 && slot_mapping == nullptr) {
    return absl::InvalidArgumentError("slot_mapping must not be null");
  }
  for (int t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", t, "] = ", slot_mapping[t],
                                                     " is past the cache's ", num_slots, " slots"));
    }
  }
  return absl::OkStatus();
}

// Applies token t's key rows, found through `key_row(t, head)`, in append order.
template <typename T, typename KeyRow>
void ApplyKeys(const DigestView& digests, int block_size, const int64_t* slot_mapping,
               int num_tokens, KeyRow key_row) {
  T* dg = static_cast<T*>(digests.data);
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int block = static_cast<int>(slot / block_size);
    const bool first = slot % block_size == 0;
    for (int h = 0; h < digests.num_kv_heads; ++h) {
      const T* key = key_row(t, h);
      T* mx = dg + digests.Offset(block, 0, h);
      T* mn = dg + digests.Offset(block, 1, h);
      if (first) {
        ResetRow(key, mx, mn, digests.head_dim);
      } else {
        WidenRow(key, mx, mn, digests.head_dim);
      }
    }
  }
}

}  // namespace

absl::Status UpdateDigests(const KvCacheView& cache, const int64_t* slot_mapping, int num_tokens,
                           const DigestView& digests) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(CheckSlots(slot_mapping, num_tokens,
                                     static_cast<int64_t>(cache.num_blocks) * cache.block_size));
  DispatchDType(cache.dtype, [&]<typename T>() {
    const T* kv = static_cast<const T*>(cache.data);
    ApplyKeys<T>(digests, cache.block_size, slot_mapping, num_tokens, [&](int t, int h) {
      const int64_t slot = slot_mapping[t];
      return kv + cache.Offset(0, static_cast<int>(slot / cache.block_size),
                               static_cast<int>(slot % cache.block_size), h);
    });
  });
  return absl::OkStatus();
}

absl::Status UpdateDigestsFromKeys(const DigestView& digests, int block_size,
                                   const int64_t* slot_mapping, int num_tokens, const void* keys) {
  if (digests.data == nullptr || (num_tokens > 0 && keys == nullptr)) {
    return absl::InvalidArgumentError("digests and keys must not be null");
  }
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockSize(block_size));
  MEMPIPE_RETURN_IF_ERROR(ValidateHeadDim(digests.head_dim));
  MEMPIPE_RETURN_IF_ERROR(
      CheckSlots(slot_mapping, num_tokens, static_cast<int64_t>(digests.num_blocks) * block_size));
  const size_t row = static_cast<size_t>(digests.num_kv_heads) * digests.head_dim;
  DispatchDType(digests.dtype, [&]<typename T>() {
    const T* k = static_cast<const T*>(keys);
    ApplyKeys<T>(digests, block_size, slot_mapping, num_tokens, [&](int t, int h) {
      return k + t * row + static_cast<size_t>(h) * digests.head_dim;
    });
  });
  return absl::OkStatus();
}

absl::Status AppendKvAndDigests(const KvCacheView& cache, const int64_t* slot_mapping,
                                int num_tokens, const void* key, const void* value,
                                const DigestView& digests) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(WriteKv(cache, slot_mapping, num_tokens, key, value));
  return UpdateDigests(cache, slot_mapping, num_tokens, digests);
}

}  // namespace mempipe
