// mempipe retriever: the device interface for memory processing (steps 1-3).
//
// A PageSelector keeps the page digests of every registered layer on its own device and, per
// decode step, turns queries into selected pages. The CPU selector (below) is the reference
// and the embedded default; the GPU and FPGA selectors implement the same contract, and the
// pipeline (backend/) drives any of them from its stage threads.
//
// Contract, for every implementation:
//  * Digests and selections are bit-identical to the CPU reference (retriever/relevancy.h
//    fixes the score's summation order; retriever/select.h the tie-breaking).
//  * Submit() returns as soon as the work is queued; Wait() blocks until it completes or the
//    deadline passes (DeadlineExceeded, the work's result then discarded). Each ticket is
//    waited for at most once. Calls for one selector come from one thread at a time unless the
//    implementation says otherwise.
//  * Inputs referenced by a request stay valid, unmodified, until its Wait() returns.
//  * Costs() reports what the last completed request cost: measured host time always;
//    modeled device time only where a model stands in for absent hardware (labeled so).
//
//   CpuPageSelector sel;
//   MEMPIPE_RETURN_IF_ERROR(sel.AddLayer(0, shape));
//   MEMPIPE_RETURN_IF_ERROR(sel.BuildDigests(0, cache, table));
//   MEMPIPE_ASSIGN_OR_RETURN(auto ticket, sel.Submit({0, query, table, config, selection}));
//   MEMPIPE_RETURN_IF_ERROR(sel.Wait(ticket, absl::InfiniteFuture()));
#ifndef MEMPIPE_RETRIEVER_PAGE_SELECTOR_H_
#define MEMPIPE_RETRIEVER_PAGE_SELECTOR_H_

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/select.h"

namespace mempipe {

// Geometry of one layer's paged cache (and so of its digests).
struct CacheShape {
  DType dtype = DType::kFloat32;
  int num_blocks = 0;
  int block_size = 16;
  int num_kv_heads = 0;
  int head_dim = 0;
  // How the selector stores and scans this layer's digests (digest.h). kInt8 selectors also
  // keep the exact max/min (never scanned) so that appended keys update bit-exactly.
  DigestFormat digest_format = DigestFormat::kNative;

  // A cache view with this geometry and a placeholder (non-null, never read) data pointer: the
  // shape checks and steps 2-3 take the layer's geometry through a KvCacheView.
  KvCacheView Geometry() const;
};

// Shape checks for AddLayer (what ValidateKvCache checks, without a pointer, and the digest
// format).
[[nodiscard]] absl::Status ValidateCacheShape(const CacheShape& shape);

// One selection: steps 2 and 3 for one layer and a batch (or micro-batch) of sequences.
struct SelectRequest {
  int layer = 0;
  QueryView query;       // host memory
  BlockTableView table;  // host memory
  SelectionConfig config;
  SelectionView out;  // host memory, written by the time Wait() returns OK
};

using SelectTicket = uint64_t;

// Cost of the last completed call. Times in milliseconds.
struct SelectorCosts {
  double host_ms = 0;                       // measured wall time on this machine
  double prepare_ms = 0;                    // measured: digest building/updating
  double relevancy_ms = 0;                  // measured: scoring
  double retrieval_ms = 0;                  // measured: top-k
  double transfer_ms = 0;                   // measured or modeled host<->device copies
  std::optional<double> modeled_device_ms;  // set only by a modeled device
  std::optional<double> modeled_energy_mj;  // set only by a modeled device
};

class PageSelector {
 public:
  virtual ~PageSelector() = default;

  // Short name for reports, e.g. "cpu", "gpu", "fpga-u55c-emulated", "fpga-xrt".
  virtual absl::string_view Name() const = 0;

  // Registers `layer` and allocates its digests. Errors: a layer added twice, bad shape.
  [[nodiscard]] virtual absl::Status AddLayer(int layer, const CacheShape& shape) = 0;

  // Step 1, bulk: digests of every page `table` uses, from the host cache `cache`.
  [[nodiscard]] virtual absl::Status BuildDigests(int layer, const KvCacheView& cache,
                                                  const BlockTableView& table) = 0;

  // Step 1, incremental: keys [num_tokens, num_kv_heads, head_dim] just written at `slots`.
  [[nodiscard]] virtual absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                                                const void* keys) = 0;

  // Steps 2+3. Returns once queued.
  [[nodiscard]] virtual absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) = 0;

  // Waits for `ticket` until `deadline`: OK, the request's own error, or DeadlineExceeded.
  [[nodiscard]] virtual absl::Status Wait(SelectTicket ticket, absl::Time deadline) = 0;

  virtual SelectorCosts Costs() const = 0;
};

// The reference selector: digests in host memory, work done inside Submit() on the caller's
// thread (so Wait() never blocks).
class CpuPageSelector final : public PageSelector {
 public:
  // `num_threads` host threads score the (sequence, KV head) pairs of a request.
  explicit CpuPageSelector(int num_threads = 1) : num_threads_(num_threads < 1 ? 1 : num_threads) {}
  absl::string_view Name() const override { return "cpu"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override { return costs_; }

  // The layer's digests (for tests and for callers that share them).
  absl::StatusOr<DigestView> Digests(int layer);

 private:
  struct Layer {
    CacheShape shape;
    std::vector<uint8_t> digests;
    std::vector<float> scales;   // kInt8
    std::vector<uint8_t> exact;  // kInt8
    DigestView View();
  };
  absl::StatusOr<Layer*> Find(int layer);

  int num_threads_;
  std::map<int, Layer> layers_;
  std::map<SelectTicket, absl::Status> done_;
  SelectTicket next_ticket_ = 1;
  SelectorCosts costs_;
  std::vector<float> scores_;
};

}  // namespace mempipe

#endif  // MEMPIPE_RETRIEVER_PAGE_SELECTOR_H_
