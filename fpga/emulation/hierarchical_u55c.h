// mempipe fpga: the emulated Alveo U55C with super-page digests (two-level selection).
//
// Keeps, per layer and KV head, the page digests and the super-page digests
// (retriever/hierarchical.h) in its emulated HBM (host memory), both on the head's pseudo-channel
// (CuFor, as EmulatedU55cSelector). Hierarchical requests (config.hierarchy not flat, with this
// card's pages_per_super_page) run SelectHierarchical; flat requests run the flat reference
// (ComputeRelevancy + SelectPages). The functional result is the CPU reference's, computed on
// the caller's thread in Submit (there is no HLS kernel for pass 2 yet); what the card would
// spend is priced by U55cModel (all modeled):
//  * a selection: the score request's DMAs as the flat kernel (queries, table, lengths in;
//    pages, counts out, per KV head), then per KV head two launches back to back on its compute
//    unit, priced as the RTL score kernel (ScoreLaunchWork): pass 1 over the super-page digests
//    it scores, emitting the kept super-pages into HBM (no DMA), pass 2 over the kept
//    super-pages' page digests (f consecutive blocks each, one burst of f page rows);
//  * a digest update: the flat update's keys, slots and page rows (UpdateLaunchWork), plus one
//    read and one write of the super row pair per run of tokens in a page.
// Paced mode: a request completes no earlier than its modeled time, in order behind the
// previous one, as EmulatedU55cSelector.
//
// Thread-safety: one caller thread at a time (the PageSelector contract); Costs() from any.
//
//   HierarchicalU55cSelector card(U55cParams{}, /*paced=*/true, /*pages_per_super_page=*/4);
#ifndef MEMPIPE_FPGA_EMULATION_HIERARCHICAL_U55C_H_
#define MEMPIPE_FPGA_EMULATION_HIERARCHICAL_U55C_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/clock.h"
#include "fpga/emulation/u55c_model.h"
#include "retriever/hierarchical.h"
#include "retriever/page_selector.h"

namespace mempipe {

class HierarchicalU55cSelector final : public PageSelector {
 public:
  // `pages_per_super_page`: 2, 4 or 8 (checked by MakeFpgaSelector; AddLayer refuses others).
  HierarchicalU55cSelector(const U55cParams& params, bool paced, int pages_per_super_page);

  absl::string_view Name() const override { return name_; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override;

  // The layer's page and super-page digests (tests compare them with the CPU reference).
  absl::StatusOr<DigestView> PageDigests(int layer);
  absl::StatusOr<DigestView> SuperDigests(int layer);
  // What the last completed selection read (zero for a flat one).
  HierarchyStats LastStats() const;

 private:
  struct Layer {
    CacheShape shape;
    std::vector<uint8_t> pages, exact;  // DigestView layouts (exact: kInt8 only)
    std::vector<float> scales;          // kInt8 only
    SuperDigestBuffers super;
    DigestView PageView();
  };
  struct Job {
    std::vector<int32_t> pages, counts;  // the selection, copied out at Wait
    SelectionView out;                   // over pages/counts
    SelectionView caller_out;            // the request's
    absl::Status status;
    CallEstimate estimate;
    HierarchyStats stats;
    Clock::time_point submitted, completed;
    double functional_ms = 0;
  };

  absl::StatusOr<Layer*> Find(int layer);
  // Prices a digest update of `slots` on every head of `layer` and paces it.
  void FinishUpdate(int layer_id, const Layer& layer, const int64_t* slots, int num_tokens,
                    Clock::time_point t0);

  const U55cModel model_;
  const bool paced_;
  const int f_;
  const std::string name_;
  std::map<int, Layer> layers_;
  std::vector<double> channel_bytes_;
  std::map<SelectTicket, std::unique_ptr<Job>> jobs_;
  SelectTicket next_ticket_ = 1;
  Clock::time_point device_free_;

  mutable std::mutex mu_;  // guards costs_ and stats_
  SelectorCosts costs_;
  HierarchyStats stats_;
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_EMULATION_HIERARCHICAL_U55C_H_
