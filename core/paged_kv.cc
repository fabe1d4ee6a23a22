#include "core/paged_kv.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace mempipe {

absl::Status ValidateBlockSize(int block_size) {
  for (int s : kSupportedBlockSizes) {
    if (s == block_size) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("block_size (page size) must be 16, 32 or 64, got ", block_size));
}

absl::Status ValidateHeadDim(int head_dim) {
  for (int d : kSupportedHeadDims) {
    if (d == head_dim) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("head_dim must be 64, 128 or 256, got ", head_dim));
}

absl::Status ValidateKvCache(const KvCacheView& cache) {
  if (cache.data == nullptr) return absl::InvalidArgumentError("KV cache pointer is null");
  if (cache.num_blocks <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache num_blocks must be positive, got ", cache.num_blocks));
  }
  if (cache.num_kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache num_kv_heads must be positive, got ", cache.num_kv_heads));
  }
  if (absl::Status s = ValidateBlockSize(cache.block_size); !s.ok()) return s;
  return ValidateHeadDim(cache.head_dim);
}

absl::StatusOr<KvLayout> ParseKvLayout(absl::string_view name) {
  if (name == "token") return KvLayout::kTokenMajor;
  if (name == "head") return KvLayout::kHeadMajor;
  if (name == "page") return KvLayout::kPageMajor;
  if (name == "head_kt") return KvLayout::kHeadMajorKT;
  if (name == "page_kt") return KvLayout::kPageMajorKT;
  return absl::InvalidArgumentError(
      absl::StrCat("kv_layout must be token, head, page, head_kt or page_kt, got '", name, "'"));
}

const char* KvLayoutName(KvLayout layout) {
  switch (layout) {
    case KvLayout::kTokenMajor:
      return "token";
    case KvLayout::kHeadMajor:
      return "head";
    case KvLayout::kPageMajor:
      return "page";
    case KvLayout::kHeadMajorKT:
      return "head_kt";
    case KvLayout::kPageMajorKT:
      return "page_kt";
  }
  return "unknown";
}

void ReadTransposedKeyRow(const KvCacheView& cache, const void* page, int token, void* row) {
  const char* src = static_cast<const char*>(page) + 4 * static_cast<size_t>(token);
  char* dst = static_cast<char*>(row);
  const size_t step = 4 * static_cast<size_t>(cache.block_size);
  const size_t groups = cache.head_dim / cache.KeyGroup();
  for (size_t g = 0; g < groups; ++g) std::memcpy(dst + 4 * g, src + g * step, 4);
}

void WriteTransposedKeyRow(const KvCacheView& cache, void* page, int token, const void* row) {
  char* dst = static_cast<char*>(page) + 4 * static_cast<size_t>(token);
  const char* src = static_cast<const char*>(row);
  const size_t step = 4 * static_cast<size_t>(cache.block_size);
  const size_t groups = cache.head_dim / cache.KeyGroup();
  for (size_t g = 0; g < groups; ++g) std::memcpy(dst + g * step, src + 4 * g, 4);
}

absl::Status RequireTokenMajor(const KvCacheView& cache, const char* who) {
  if (!cache.HeadMajor()) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(
      who, " reads token-major KV caches [2, num_blocks, block_size, num_kv_heads, head_dim] only;",
      " this one is ", KvLayoutName(cache.layout),
      "-major (each KV head's page contiguous), which the host steps read"));
}

absl::Status ValidateBlockTableShape(const BlockTableView& table) {
  if (table.num_seqs <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_seqs must be positive, got ", table.num_seqs));
  }
  if (table.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_blocks_per_seq must be positive, got ", table.max_blocks_per_seq));
  }
  if (table.block_table == nullptr || table.seq_lens == nullptr) {
    return absl::InvalidArgumentError("block_table and seq_lens must not be null");
  }
  return absl::OkStatus();
}

absl::Status ValidateBlockTable(const BlockTableView& table, int block_size, int num_blocks) {
  MEMPIPE_RETURN_IF_ERROR(ValidateBlockTableShape(table));
  const int64_t capacity = static_cast<int64_t>(table.max_blocks_per_seq) * block_size;
  for (int s = 0; s < table.num_seqs; ++s) {
    const int32_t len = table.seq_lens[s];
    if (len <= 0 || len > capacity) {
      return absl::InvalidArgumentError(absl::StrCat(
          "seq_lens[", s, "] = ", len, " is outside [1, ", capacity, "] (max_blocks_per_seq ",
          table.max_blocks_per_seq, " x block_size ", block_size, ")"));
    }
    const int pages = NumPages(len, block_size);
    // Per chunk of entries, the largest as unsigned (a negative entry is larger than any block):
    // a max reduction the compiler vectorizes, where a loop that returns at the first bad entry
    // stays scalar. Only a chunk holding a bad entry is searched for the one to name, and
    // nothing past it is read.
    const int32_t* row = &table.block_table[static_cast<size_t>(s) * table.max_blocks_per_seq];
    constexpr int kChunk = 1024;
    for (int p0 = 0; p0 < pages; p0 += kChunk) {
      const int p1 = std::min(pages, p0 + kChunk);
      uint32_t largest = 0;
      for (int p = p0; p < p1; ++p) largest = std::max(largest, static_cast<uint32_t>(row[p]));
      if (num_blocks > 0 && largest < static_cast<uint32_t>(num_blocks)) continue;
      for (int p = p0; p < p1; ++p) {
        const int32_t b = row[p];
        if (b < 0 || b >= num_blocks) {
          return absl::InvalidArgumentError(absl::StrCat("block_table[", s, "][", p, "] = ", b,
                                                         " is outside [0, ", num_blocks, ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status WriteKv(const KvCacheView& cache, const int64_t* slot_mapping, int num_tokens,
                     const void* key, const void* value, int64_t key_row_stride,
                     int64_t value_row_stride) {
  if (absl::Status s = ValidateKvCache(cache); !s.ok()) return s;
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 0, got ", num_tokens));
  }
  if (num_tokens == 0) return absl::OkStatus();
  if (slot_mapping == nullptr || key == nullptr || value == nullptr) {
    return absl::InvalidArgumentError("slot_mapping, key and value must not be null");
  }
  const int64_t num_slots = static_cast<int64_t>(cache.num_blocks) * cache.block_size;
  for (int t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", t, "] = ", slot_mapping[t],
                                                     " is past the cache's ", num_slots, " slots"));
    }
  }
  const int64_t row = static_cast<int64_t>(cache.num_kv_heads) * cache.head_dim;
  auto check_stride = [row](const char* name, int64_t stride) {
    if (stride == 0 || stride >= row) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        name, "_row_stride must be 0 (packed) or at least num_kv_heads * head_dim = ", row,
        " elements, got ", stride));
  };
  MEMPIPE_RETURN_IF_ERROR(check_stride("key", key_row_stride));
  MEMPIPE_RETURN_IF_ERROR(check_stride("value", value_row_stride));
  const size_t esize = DTypeSize(cache.dtype);
  const size_t head_bytes = static_cast<size_t>(cache.head_dim) * esize;
  // Bytes from one token's key (value) row to the next.
  const size_t key_step = static_cast<size_t>(key_row_stride != 0 ? key_row_stride : row) * esize;
  const size_t value_step =
      static_cast<size_t>(value_row_stride != 0 ? value_row_stride : row) * esize;
  const int run = cache.HeadsPerRun();  // heads copied in one piece
  auto* base = static_cast<char*>(cache.data);
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int block = static_cast<int>(slot / cache.block_size);
    const int off = static_cast<int>(slot % cache.block_size);
    for (int h = 0; h < cache.num_kv_heads; h += run) {
      const char* krow = static_cast<const char*>(key) + t * key_step + h * head_bytes;
      if (cache.KeysTransposed()) {  // run is 1
        WriteTransposedKeyRow(cache, base + cache.Offset(0, block, 0, h) * esize, off, krow);
      } else {
        std::memcpy(base + cache.Offset(0, block, off, h) * esize, krow, run * head_bytes);
      }
      std::memcpy(base + cache.Offset(1, block, off, h) * esize,
                  static_cast<const char*>(value) + t * value_step + h * head_bytes,
                  run * head_bytes);
    }
  }
  return absl::OkStatus();
}

}  // namespace mempipe
