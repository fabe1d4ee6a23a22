// mempipe fpga: the request checks every FPGA selector runs before anything reaches a device,
// shared by the emulated U55C (fpga/emulation/) and the XRT host runtime (fpga/host/), so both
// accept and reject the same calls with the same messages.
//
//   MEMPIPE_RETURN_IF_ERROR(ValidateCacheShape(shape));  // AddLayer (retriever/page_selector.h)
//   MEMPIPE_RETURN_IF_ERROR(ValidateBuildRequest(layer, cache, table, shape));  // BuildDigests
//   MEMPIPE_RETURN_IF_ERROR(ValidateAppend(shape, slots, num_tokens, keys));    // AppendKeys
//   MEMPIPE_RETURN_IF_ERROR(ValidateScoreRequest(request, shape));      // Submit
#ifndef MEMPIPE_FPGA_REQUEST_CHECKS_H_
#define MEMPIPE_FPGA_REQUEST_CHECKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "core/paged_kv.h"
#include "retriever/page_selector.h"

namespace mempipe {

// Everything Submit checks before anything goes to the card: the selection config, the block
// table against the layer, finite queries of matching shape, the output view, and the kernel's
// on-chip limits (GQA ratio <= 16, max_blocks_per_seq <= 65536, middle pages <= 1024).
[[nodiscard]] absl::Status ValidateScoreRequest(const SelectRequest& request,
                                                const CacheShape& shape);

// Checks an AppendKeys call: slots inside the layer, keys non-null.
[[nodiscard]] absl::Status ValidateAppend(const CacheShape& shape, const int64_t* slots,
                                          int num_tokens, const void* keys);

// Checks a BuildDigests call: the cache matches the layer's shape (the message names both), the
// cache itself (ValidateKvCache) and the block table against it.
[[nodiscard]] absl::Status ValidateBuildRequest(int layer, const KvCacheView& cache,
                                                const BlockTableView& table,
                                                const CacheShape& shape);

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_REQUEST_CHECKS_H_
