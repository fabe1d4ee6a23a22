// Test double: an ApplyDevice (backend/apply_device.h) whose "device memory" is a host copy of
// each layer's cache, decoded by the CPU's DenseDecode / SparseDecode. It behaves as a device
// copy does (a token written to the host cache after AddLayer is stale until SyncTokens), so the
// pipeline's step-4 dispatch and the ApplyDevice contract are tested on machines without a GPU.
#ifndef MEMPIPE_TESTS_TESTING_HOST_APPLY_DEVICE_H_
#define MEMPIPE_TESTS_TESTING_HOST_APPLY_DEVICE_H_

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention/decode.h"
#include "backend/apply_device.h"
#include "core/paged_kv.h"

namespace mempipe::testing {

class HostApplyDevice final : public ApplyDevice {
 public:
  static absl::StatusOr<std::unique_ptr<HostApplyDevice>> Create() {
    return std::make_unique<HostApplyDevice>();
  }
  absl::string_view Name() const override { return "host-copy"; }
  absl::Status AddLayer(int layer, const KvCacheView& cache) override {
    if (absl::Status s = ValidateKvCache(cache); !s.ok()) return s;
    Layer& l = layers_[layer];
    l.host = cache;
    const auto* p = static_cast<const uint8_t*>(cache.data);
    l.copy.assign(p, p + cache.NumBytes());
    return absl::OkStatus();
  }
  absl::Status SyncTokens(int layer, const int64_t* slots, int num_tokens) override {
    auto it = layers_.find(layer);
    if (it == layers_.end()) return absl::InvalidArgumentError(absl::StrCat("no layer ", layer));
    Layer& l = it->second;
    const KvCacheView& c = l.host;
    const int64_t num_slots = static_cast<int64_t>(c.num_blocks) * c.block_size;
    const size_t row = c.TokenStride() * DTypeSize(c.dtype);
    const size_t plane = c.PlaneElems() * DTypeSize(c.dtype);
    for (int i = 0; i < num_tokens; ++i) {
      const int64_t s = slots[i];
      if (s < 0) continue;
      if (s >= num_slots) {
        return absl::InvalidArgumentError(
            absl::StrCat("slots[", i, "] = ", s, " is past the cache (", num_slots, " slots)"));
      }
      for (size_t p : {size_t{0}, plane}) {
        std::memcpy(l.copy.data() + p + s * row, static_cast<const uint8_t*>(c.data) + p + s * row,
                    row);
      }
    }
    return absl::OkStatus();
  }
  absl::Status Decode(int layer, const DecodeIo& io, const BlockTableView& table,
                      const PageList* pages, float scale) override {
    auto it = layers_.find(layer);
    if (it == layers_.end()) return absl::InvalidArgumentError(absl::StrCat("no layer ", layer));
    KvCacheView c = it->second.host;
    c.data = it->second.copy.data();
    return pages != nullptr ? SparseDecode(io, c, table, *pages, scale)
                            : DenseDecode(io, c, table, scale);
  }

 private:
  struct Layer {
    KvCacheView host;
    std::vector<uint8_t> copy;
  };
  std::map<int, Layer> layers_;
};

}  // namespace mempipe::testing

#endif  // MEMPIPE_TESTS_TESTING_HOST_APPLY_DEVICE_H_
