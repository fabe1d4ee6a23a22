// mempipe retriever on the GPU: a PageSelector (retriever/page_selector.h) whose digests live in
// device memory and whose steps 1-3 run on its own stream; a request completes by event.
//
//   MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<GpuPageSelector> sel, GpuPageSelector::Create());
//   MEMPIPE_RETURN_IF_ERROR(sel->AddLayer(0, shape));
//   MEMPIPE_RETURN_IF_ERROR(sel->BuildDigests(0, host_cache, host_table));
//   MEMPIPE_ASSIGN_OR_RETURN(auto ticket, sel->Submit({0, query, table, config, selection}));
//   MEMPIPE_RETURN_IF_ERROR(sel->Wait(ticket, absl::Now() + absl::Milliseconds(50)));
//
// Requests carry host memory (the PageSelector contract): Submit validates them exactly as the
// CPU selector does (same validators, same messages), copies the query and block table to
// per-request device buffers on the selector's stream, queues ScoreAndSelectGpu and the copy
// of the selection back, and records an event; Wait polls that event until the deadline (no
// blocking host wait on the device). A request that fails validation gets a ticket whose Wait
// returns the error, as with the CPU selector. Up to kMaxInFlight requests may be in flight; their
// device buffers are reused across requests and grow only when a request is larger (a device
// allocation then synchronizes once). Calls come from one thread at a time. Selections equal
// the CPU selector's bit for bit.
#ifndef MEMPIPE_RETRIEVER_GPU_GPU_PAGE_SELECTOR_H_
#define MEMPIPE_RETRIEVER_GPU_GPU_PAGE_SELECTOR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/gpu/gpu_events.h"
#include "core/gpu/gpu_runtime.h"
#include "retriever/page_selector.h"

namespace mempipe {

class GpuPageSelector final : public PageSelector {
 public:
  static constexpr int kMaxInFlight = 16;

  // Errors: Unavailable without a GPU; Internal when the stream cannot be created.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<GpuPageSelector>> Create();

  absl::string_view Name() const override { return "gpu"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  // Host cache and table: the pages are copied to the device once, then digested there.
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override { return costs_; }

  // The layer's digests in device memory (tests compare them with the CPU selector's).
  absl::StatusOr<DigestView> DeviceDigests(int layer);
  GpuStream stream() const { return stream_.get(); }

 private:
  GpuPageSelector() = default;

  struct Layer {
    CacheShape shape;
    DeviceBuffer digests;
    DeviceBuffer scales, exact;  // int8 digests (CacheShape::digest_format): scales, exact rows
    DigestView View();
  };
  // Device buffers of one request, reused.
  struct Slot {
    DeviceBuffer query, block_table, seq_lens, workspace, pages, counts;
    PinnedHostBuffer staging_in;   // query, block table, seq_lens
    PinnedHostBuffer staging_out;  // pages, counts: copied into the request's view by Wait
    GpuEventOwner done;
    bool busy = false;
    bool abandoned = false;  // its Wait passed the deadline; freed once the event completes
  };
  struct Pending {
    int slot;
    absl::Time submitted;
    SelectionView out;
  };
  absl::StatusOr<Layer*> Find(int layer);
  // Queues the request; an invalid one returns its error (Submit hands it to Wait).
  absl::StatusOr<SelectTicket> Queue(const SelectRequest& request);
  // Grows `buf` to at least `bytes` (a synchronizing allocation only when it grows).
  static absl::Status Reserve(DeviceBuffer& buf, size_t bytes);
  static absl::Status Reserve(PinnedHostBuffer& buf, size_t bytes);

  GpuStreamOwner stream_;
  std::map<int, Layer> layers_;
  std::vector<Slot> slots_;
  std::map<SelectTicket, Pending> pending_;
  std::map<SelectTicket, absl::Status> failed_;  // requests refused at Submit, for Wait
  SelectTicket next_ticket_ = 1;
  SelectorCosts costs_;
  DeviceBuffer append_ws_, append_slots_, append_keys_;
};

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_GPU_GPU_PAGE_SELECTOR_H_
