// mempipe backend: the GPU's ApplyDevice (backend/apply_device.h). Step 4 on the GPU decode
// kernels (attention/gpu/paged_decode_gpu.h) over device-resident copies of the layers' caches,
// on its own stream.
//
// One request: the CPU decode's own validators run on the host inputs (same errors as the CPU);
// the query, block-table rows, lengths and selection are packed into pinned memory and copied
// to the device in one transfer; DenseDecodeGpu / SparseDecodeGpu run; the output comes back
// into pinned memory, an event marks it, and the host waits for that event alone before copying
// the output out (the hand-off). New tokens' K/V rows are copied from the host cache
// (SyncTokens), stream-ordered before the next decode. Buffers grow to the largest request and
// are reused (a growing allocation synchronizes once). Calls come from one thread at a time.
//
//   MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<GpuApplyDevice> dev, GpuApplyDevice::Create());
#ifndef MEMPIPE_BACKEND_GPU_GPU_APPLY_DEVICE_H_
#define MEMPIPE_BACKEND_GPU_GPU_APPLY_DEVICE_H_

#include <map>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "backend/apply_device.h"
#include "core/gpu/gpu_events.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe {

class GpuApplyDevice final : public ApplyDevice {
 public:
  // Errors: Unavailable without a GPU; Internal when the stream or event cannot be created.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<GpuApplyDevice>> Create();

  absl::string_view Name() const override { return "gpu"; }
  absl::Status AddLayer(int layer, const KvCacheView& host_cache) override;
  absl::Status SyncTokens(int layer, const int64_t* slots, int num_tokens) override;
  absl::Status Decode(int layer, const DecodeIo& io, const BlockTableView& table,
                      const PageList* pages, float scale) override;

  GpuStream stream() const { return stream_.get(); }

 private:
  GpuApplyDevice() = default;
  struct Layer {
    KvCacheView host;
    DeviceBuffer cache;
    KvCacheView DeviceView() const;
  };
  absl::StatusOr<Layer*> Find(int layer);
  static absl::Status Reserve(DeviceBuffer& buf, size_t bytes);
  static absl::Status Reserve(PinnedHostBuffer& buf, size_t bytes);

  GpuStreamOwner stream_;
  GpuEventOwner done_;
  std::map<int, Layer> layers_;
  PinnedHostBuffer staging_in_, staging_out_;
  DeviceBuffer inputs_, output_, workspace_;
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_GPU_GPU_APPLY_DEVICE_H_
