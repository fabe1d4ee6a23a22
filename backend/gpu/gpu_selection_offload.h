// mempipe backend/gpu: the stream-ordered GPU side of the selection-offload engine
// (backend/selection_offload.h): the GPU's stream consumes selections made by the selector
// device (the emulated or XRT U55C) with no host-side blocking call in the decode thread.
//
// Per call, on the caller's stream (all capturable in a CUDA graph):
//   Append(layer, slots, keys):  gate kernel -> copy kernel (device -> pinned, mapped staging)
//                                -> host function (pushes the job; never blocks, no GPU API)
//   Submit(slot, layer, q, tbl): gate kernel (also stamps the GPU clock: the deadline's start)
//                                -> copy kernel (query, table rows, lengths) -> host function
//   Wait(slot, pages, counts, status): wait kernel -- polls the slot's mapped result word
//                                (volatile, system scope) until it shows the request's sequence
//                                number or the deadline passes on the GPU's global timer;
//                                copies the selection into `pages`/`counts` (device) when the
//                                result is kSelected, writes status[0] (0 or the fallback
//                                reason), and counts it by reason in device-resident counters.
// The gate kernel of a select waits (at most gate_timeout_ms) until the selector is done with
// the slot's previous inputs; if it is not, nothing is copied and the request fails as kBusy.
// An append writes the next entry of its layer's ring (SelectionOffloadOptions::append_ring)
// and its gate waits only when every entry is still held by a queued append (at most
// append_timeout_ms; past it the selector is declared dead, since its digests would go stale).
// A layer's appends must be queued on one stream.
//
// Fallback stays on the device: status[0] feeds the `when_zero` / `when_nonzero` predicates of
// ScoreAndSelectGpu / SparseDecodeGpu / DenseDecodeGpu, so no host ever reads it per step.
//
//   MEMPIPE_ASSIGN_OR_RETURN(auto off, GpuSelectionOffload::Create(std::move(selector), {}));
//   MEMPIPE_RETURN_IF_ERROR(off->engine().AddLayer(0, shape));
//   MEMPIPE_RETURN_IF_ERROR(off->Append(0, d_slots, n, d_keys, stream));
//   MEMPIPE_RETURN_IF_ERROR(off->Submit(0, 0, d_query, d_table, config, stream));
//   MEMPIPE_RETURN_IF_ERROR(off->Wait(0, d_selection, d_status, stream));
//   SparseDecodeGpu(..., DevicePredicate{d_status, /*run_when_zero=*/true});
#ifndef MEMPIPE_BACKEND_GPU_GPU_SELECTION_OFFLOAD_H_
#define MEMPIPE_BACKEND_GPU_GPU_SELECTION_OFFLOAD_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "backend/gpu/offload_kernels.h"
#include "backend/selection_offload.h"
#include "core/gpu/gpu_runtime.h"

namespace mempipe {

class GpuSelectionOffload {
 public:
  // On the current device. Errors: the engine's; Internal for a GPU allocation failure.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<GpuSelectionOffload>> Create(
      std::unique_ptr<PageSelector> selector, SelectionOffloadOptions options);
  // Waits for the device (host functions still queued refer to this object), then shuts the
  // engine down.
  ~GpuSelectionOffload();
  GpuSelectionOffload(const GpuSelectionOffload&) = delete;
  GpuSelectionOffload& operator=(const GpuSelectionOffload&) = delete;

  SelectionOffload& engine() { return *engine_; }

  // Device pointers throughout; shapes as the engine's CPU-mode calls. Errors at enqueue time
  // (InvalidArgument / FailedPrecondition naming the value); runtime outcomes go to status[0].
  // A slot's Submit and Wait must be queued on one stream, Wait before the slot's next Submit.
  [[nodiscard]] absl::Status Append(int layer, const int64_t* slots, int num_tokens,
                                    const void* keys, GpuStream stream);
  [[nodiscard]] absl::Status Submit(int slot, int layer, const QueryView& query,
                                    const BlockTableView& table, const SelectionConfig& config,
                                    GpuStream stream);
  [[nodiscard]] absl::Status Wait(int slot, const SelectionView& out, int32_t* status,
                                  GpuStream stream);

  // The engine's metrics plus the device counters (waits by reason, GPU wait time, selection
  // bytes host -> GPU). Copies the counters to the host: not for the decode path.
  [[nodiscard]] absl::StatusOr<OffloadMetrics> Metrics(double* gpu_wait_ms = nullptr);
  [[nodiscard]] absl::Status ResetMetrics();
  void Shutdown();

 private:
  // What a host function needs; pooled (a captured one is kept: graph replays reuse it).
  struct IssueRecord {
    GpuSelectionOffload* owner = nullptr;
    bool select = true;
    bool persistent = false;
    SelectionOffload::SelectPlan select_plan;
    SelectionOffload::AppendPlan append_plan;
  };
  static void IssueHost(void* record);

  GpuSelectionOffload() = default;
  [[nodiscard]] absl::StatusOr<IssueRecord*> TakeRecord(GpuStream stream);
  void ReturnRecord(IssueRecord* record);

  std::unique_ptr<SelectionOffload> engine_;
  int device_ = 0;
  DeviceBuffer state_;  // device memory: the counters, then the stamps, then the gate flags
  unsigned long long* counters_ = nullptr;
  int32_t* gate_ok_ = nullptr;   // [slots + max_layers]
  int64_t* stamp_ns_ = nullptr;  // [slots]
  std::mutex records_mu_;
  std::vector<std::unique_ptr<IssueRecord>> records_;  // every record ever made
  std::vector<IssueRecord*> free_records_;
  bool shut_down_ = false;
};

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_GPU_GPU_SELECTION_OFFLOAD_H_
