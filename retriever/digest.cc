#include "retriever/digest.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/avx512.h"
#include "core/cpu_kernel.h"
#include "core/status_macros.h"
#include "retriever/int8_quant.h"

namespace mempipe {
namespace {

// The exact (native) digest that builds and updates work on: `digests` itself for kNative.
DigestView ExactView(const DigestView& digests) {
  DigestView e = digests;
  if (digests.format == DigestFormat::kInt8) {
    e.data = digests.exact;
    e.format = DigestFormat::kNative;
    e.scales = nullptr;
    e.exact = nullptr;
  }
  return e;
}

// Re-quantizes every (block, head) of `blocks` (negative entries skipped).
void QuantizeBlocks(const DigestView& digests, const int32_t* blocks, int num) {
  const int d = digests.head_dim;
  std::vector<float> mx(d), mn(d);
  DispatchDType(digests.dtype, [&]<typename T>() {
    const T* ex = static_cast<const T*>(digests.exact);
    int8_t* q = static_cast<int8_t*>(digests.data);
    for (int i = 0; i < num; ++i) {
      const int block = blocks[i];
      if (block < 0) continue;
      for (int h = 0; h < digests.num_kv_heads; ++h) {
        const size_t omx = digests.Offset(block, 0, h), omn = digests.Offset(block, 1, h);
        for (int c = 0; c < d; ++c) {
          mx[c] = ToFloat(ex[omx + c]);
          mn[c] = ToFloat(ex[omn + c]);
        }
        digests.scales[digests.ScaleIndex(block, h)] =
            int8_digest::QuantizeRows(mx.data(), mn.data(), d, q + omx, q + omn);
      }
    }
  });
}

}  // namespace

absl::StatusOr<DigestFormat> ParseDigestFormat(absl::string_view name) {
  if (name == "native") return DigestFormat::kNative;
  if (name == "int8") return DigestFormat::kInt8;
  return absl::InvalidArgumentError(
      absl::StrCat("digest format must be 'native' or 'int8', got '", name, "'"));
}

absl::string_view DigestFormatName(DigestFormat format) {
  return format == DigestFormat::kInt8 ? "int8" : "native";
}

absl::Status ValidateDigestFormat(DigestFormat format) {
  if (format != DigestFormat::kNative && format != DigestFormat::kInt8) {
    return absl::InvalidArgumentError(absl::StrCat("digest format code ", static_cast<int>(format),
                                                   " is neither native (0) nor int8 (1)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateDigests(const KvCacheView& cache, const DigestView& digests) {
  if (digests.data == nullptr) return absl::InvalidArgumentError("digest pointer is null");
  MEMPIPE_RETURN_IF_ERROR(ValidateDigestFormat(digests.format));
  if (digests.format == DigestFormat::kInt8 &&
      (digests.scales == nullptr || digests.exact == nullptr)) {
    return absl::InvalidArgumentError(
        "int8 digests need their scales and their exact max/min (a null pointer was given)");
  }
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

namespace {

// K's token rows in any layout: in place, or for transposed pages (head_kt, page_kt) read into
// one scratch row (ReadTransposedKeyRow), valid until the next call.
template <typename T>
class KeyRows {
 public:
  explicit KeyRows(const KvCacheView& cache)
      : cache_(cache), row_(cache.KeysTransposed() ? cache.head_dim : 0) {}
  const T* operator()(int block, int token, int head) {
    const T* kv = static_cast<const T*>(cache_.data);
    if (!cache_.KeysTransposed()) return kv + cache_.Offset(0, block, token, head);
    ReadTransposedKeyRow(cache_, kv + cache_.Offset(0, block, 0, head), token, row_.data());
    return row_.data();
  }

 private:
  const KvCacheView& cache_;
  std::vector<T> row_;
};

}  // namespace

absl::Status BuildDigests(const KvCacheView& cache, const BlockTableView& table,
                          const DigestView& digests) {
  MEMPIPE_RETURN_IF_ERROR(ValidateKvCache(cache));
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTable(table, cache.block_size, cache.num_blocks));
  const DigestView exact = ExactView(digests);
  DispatchDType(cache.dtype, [&]<typename T>() {
    T* dg = static_cast<T*>(exact.data);
    std::vector<float> fmx(cache.head_dim), fmn(cache.head_dim);
    KeyRows<T> key_row(cache);
    for (int s = 0; s < table.num_seqs; ++s) {
      const int len = table.seq_lens[s];
      for (int p = 0; p < NumPages(len, cache.block_size); ++p) {
        const int block = table.Block(s, p);
        const int n = std::min(cache.block_size, len - p * cache.block_size);
        for (int h = 0; h < cache.num_kv_heads; ++h) {
          // Widen in fp32 and store once: max/min pick stored values, so the round trip
          // through fp32 is exact.
          const T* first = key_row(block, 0, h);
          for (int c = 0; c < cache.head_dim; ++c) fmx[c] = fmn[c] = ToFloat(first[c]);
          for (int t = 1; t < n; ++t) {
            const T* key = key_row(block, t, h);
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
  if (digests.format == DigestFormat::kInt8) {
    for (int s = 0; s < table.num_seqs; ++s) {
      const int pages = NumPages(table.seq_lens[s], cache.block_size);
      QuantizeBlocks(digests, table.block_table + static_cast<size_t>(s) * table.max_blocks_per_seq,
                     pages);
    }
  }
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

// Widens a running fp32 max/min (d channels) by one stored key row: a channel is replaced when
// the key is strictly greater (smaller); NaN never replaces and is never replaced. Exact: the
// running values are stored values widened, and FromFloat brings them back unchanged.
template <typename T>
void WidenF32(const T* key, float* mx, float* mn, int d) {
  for (int c = 0; c < d; ++c) {
    const float k = ToFloat(key[c]);
    mx[c] = k > mx[c] ? k : mx[c];
    mn[c] = k < mn[c] ? k : mn[c];
  }
}

#if MEMPIPE_AVX512_KERNEL
// WidenF32 sixteen channels at a time (d is a multiple of 64: ValidateHeadDim). The compares
// are ordered and quiet (_CMP_GT_OQ, _CMP_LT_OQ): false for NaN on either side, as above.
MEMPIPE_TARGET_AVX512 inline __m512 Widen16(const float* k) { return _mm512_loadu_ps(k); }
MEMPIPE_TARGET_AVX512 inline __m512 Widen16(const Half* k) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
}
MEMPIPE_TARGET_AVX512 inline __m512 Widen16(const BFloat16* k) {
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
template <typename T>
MEMPIPE_TARGET_AVX512 void WidenF32Avx512(const T* key, float* mx, float* mn, int d) {
  for (int c = 0; c < d; c += 16) {
    const __m512 k = Widen16(key + c);
    const __m512 a = _mm512_loadu_ps(mx + c), b = _mm512_loadu_ps(mn + c);
    _mm512_storeu_ps(mx + c, _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(k, a, _CMP_GT_OQ), k));
    _mm512_storeu_ps(mn + c, _mm512_mask_mov_ps(b, _mm512_cmp_ps_mask(k, b, _CMP_LT_OQ), k));
  }
}
#endif

// Applies token t's key rows, found through `key_row(t, head)`, in append order. A run of
// tokens with consecutive slots in one block (a prompt's page) is folded into an fp32 max/min
// and stored once, the result the token-by-token update gives: one call of a 4 x 256-token bf16
// prompt (SmolLM2's 3 KV heads of 64) took 0.64 ms per layer token by token through the stored
// values, 25 times the cache write beside it.
template <typename T, typename KeyRow>
void ApplyKeys(const DigestView& digests, int block_size, const int64_t* slot_mapping,
               int num_tokens, KeyRow key_row) {
  T* dg = static_cast<T*>(ExactView(digests).data);
  const int d = digests.head_dim;
  std::vector<float> fmx(d), fmn(d);
  auto widen = WidenF32<T>;
#if MEMPIPE_AVX512_KERNEL
  if (UseAvx512Kernel()) widen = WidenF32Avx512<T>;
#endif
  for (int t = 0; t < num_tokens;) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) {
      ++t;
      continue;
    }
    const int block = static_cast<int>(slot / block_size);
    const int offset = static_cast<int>(slot % block_size);
    int end = t + 1;  // the run: slots slot, slot + 1, .. up to the block's end
    while (end < num_tokens && offset + (end - t) < block_size &&
           slot_mapping[end] == slot + (end - t)) {
      ++end;
    }
    for (int h = 0; h < digests.num_kv_heads; ++h) {
      T* mx = dg + digests.Offset(block, 0, h);
      T* mn = dg + digests.Offset(block, 1, h);
      int r = t;
      const T* from = mx;  // the block's digest so far, or its first token's key
      const T* from_min = mn;
      if (offset == 0) {  // the block's first token resets its digest
        from = from_min = key_row(t, h);
        ++r;
      }
      for (int c = 0; c < d; ++c) {
        fmx[c] = ToFloat(from[c]);
        fmn[c] = ToFloat(from_min[c]);
      }
      for (; r < end; ++r) widen(key_row(r, h), fmx.data(), fmn.data(), d);
      for (int c = 0; c < d; ++c) {
        mx[c] = FromFloat<T>(fmx[c]);
        mn[c] = FromFloat<T>(fmn[c]);
      }
    }
    t = end;
  }
  if (digests.format == DigestFormat::kInt8) {
    // Each touched block once, after all of its tokens: the same function of the exact digest
    // as the bulk build's.
    std::vector<int32_t> touched;
    for (int t = 0; t < num_tokens; ++t) {
      if (slot_mapping[t] >= 0)
        touched.push_back(static_cast<int32_t>(slot_mapping[t] / block_size));
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    QuantizeBlocks(digests, touched.data(), static_cast<int>(touched.size()));
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
    KeyRows<T> key_row(cache);
    ApplyKeys<T>(digests, cache.block_size, slot_mapping, num_tokens, [&](int t, int h) {
      const int64_t slot = slot_mapping[t];
      return key_row(static_cast<int>(slot / cache.block_size),
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
  MEMPIPE_RETURN_IF_ERROR(ValidateDigestFormat(digests.format));
  if (digests.format == DigestFormat::kInt8 &&
      (digests.scales == nullptr || digests.exact == nullptr)) {
    return absl::InvalidArgumentError(
        "int8 digests need their scales and their exact max/min (a null pointer was given)");
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

absl::Status QuantizeDigestBlocks(const DigestView& digests, const int32_t* blocks, int num) {
  if (digests.format != DigestFormat::kInt8) {
    return absl::InvalidArgumentError(absl::StrCat("QuantizeDigestBlocks needs int8 digests, got ",
                                                   DigestFormatName(digests.format)));
  }
  if (digests.data == nullptr || digests.scales == nullptr || digests.exact == nullptr ||
      (num > 0 && blocks == nullptr)) {
    return absl::InvalidArgumentError("int8 digest pointers and blocks must not be null");
  }
  for (int i = 0; i < num; ++i) {
    if (blocks[i] >= digests.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("blocks[", i, "] = ", blocks[i],
                                                     " is past the digests' ", digests.num_blocks,
                                                     " blocks"));
    }
  }
  QuantizeBlocks(digests, blocks, num);
  return absl::OkStatus();
}

absl::Status AppendKvAndDigests(const KvCacheView& cache, const int64_t* slot_mapping,
                                int num_tokens, const void* key, const void* value,
                                const DigestView& digests, int64_t key_row_stride,
                                int64_t value_row_stride) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDigests(cache, digests));
  MEMPIPE_RETURN_IF_ERROR(
      WriteKv(cache, slot_mapping, num_tokens, key, value, key_row_stride, value_row_stride));
  return UpdateDigests(cache, slot_mapping, num_tokens, digests);
}

}  // namespace mempipe
