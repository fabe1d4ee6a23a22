// mempipe backend: step 4 (apply) on a device other than the host.
//
// An ApplyDevice keeps a device-resident copy of every layer's paged KV cache and runs dense and
// sparse paged decode there. Its inputs stay in host memory (the pipeline's and the benchmark's
// contract: host queries, block tables, selections and outputs), so one request is: the
// micro-batch's query, block-table rows, lengths and selection copied to the device in one
// transfer, the decode kernel, the output copied back, and one wait for that copy (the
// hand-off: the caller reads the output on return). Nothing else synchronizes.
//
//   MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<ApplyDevice> dev, MakeApplyDevice(Device::kGpu));
//   MEMPIPE_RETURN_IF_ERROR(dev->AddLayer(0, host_cache));          // after prefill: uploads it
//   MEMPIPE_RETURN_IF_ERROR(WriteKv(host_cache, slots, n, k, v));   // each step, on the host
//   MEMPIPE_RETURN_IF_ERROR(dev->SyncTokens(0, slots, n));          // ... and on the device
//   MEMPIPE_RETURN_IF_ERROR(dev->Decode(0, io, table, &pages, scale));  // pages null: dense
//
// The CPU has no ApplyDevice: a null one means the host's own DenseDecode / SparseDecode.
// Implementations are registered per device by the program that links them (mempipe-bench
// registers the GPU one, backend/gpu/gpu_apply_device.h, on a GPU build with a device), as
// page selectors are (backend/selector_registry.h).
#ifndef MEMPIPE_BACKEND_APPLY_DEVICE_H_
#define MEMPIPE_BACKEND_APPLY_DEVICE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "attention/decode.h"
#include "backend/placement.h"
#include "core/paged_kv.h"

namespace mempipe {

class ApplyDevice {
 public:
  virtual ~ApplyDevice() = default;
  // "gpu"; shown in metrics and reports.
  virtual absl::string_view Name() const = 0;
  // Copies `host_cache` (all its blocks) to the device as `layer`'s cache; again for a layer
  // already added, replaces it (a new prefill). The host cache must outlive the device (tokens
  // are synced from it). Errors: an invalid cache, a geometry that the device's kernels do not
  // support, a failed allocation or copy.
  virtual absl::Status AddLayer(int layer, const KvCacheView& host_cache) = 0;
  // Copies the K and V rows of `slots` [num_tokens] (< 0: none) from the layer's host cache
  // to its device copy, stream-ordered before the next Decode. Errors: unknown layer, a slot
  // past the cache.
  virtual absl::Status SyncTokens(int layer, const int64_t* slots, int num_tokens) = 0;
  // Decodes `io` (host query and output) over the layer's device cache with the host `table`;
  // `pages` (host) selects pages, null decodes densely. Returns once io.out is written.
  // Errors: what the CPU decode rejects (same validators and messages), a kernel error.
  virtual absl::Status Decode(int layer, const DecodeIo& io, const BlockTableView& table,
                              const PageList* pages, float scale) = 0;
};

using ApplyDeviceFactory = std::function<absl::StatusOr<std::unique_ptr<ApplyDevice>>()>;

// Registers the apply device of `device` (replaces an earlier one); `description` names it.
void RegisterApplyDeviceFactory(Device device, std::string description, ApplyDeviceFactory factory);
// True when `device` has a registered apply device.
bool HasApplyDevice(Device device);
// Errors: Unimplemented naming the device when none is registered, or the factory's error.
absl::StatusOr<std::unique_ptr<ApplyDevice>> MakeApplyDevice(Device device);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_APPLY_DEVICE_H_
