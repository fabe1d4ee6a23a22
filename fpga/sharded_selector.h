// mempipe fpga: KV heads sharded over several cards, each a PageSelector of its own.
//
// Card i of N owns the KV heads [i*H/N, (i+1)*H/N) of every layer (contiguous, as even as
// possible; N <= H), with its own HBM, PCIe link and launches. Every call fans out: the host
// slices the keys (AppendKeys, BuildDigests) or the queries (Submit) by head, each card works on
// its slice concurrently, and Wait gathers the cards' selection rows back into the request's.
// Heads are independent in steps 1-3, so the selection is bit-identical to one card's.
//
// Costs (modeled where the cards are): a call's modeled time is the slowest card's plus the
// host's fan-out and fan-in (ShardingParams); its energy is the sum over the cards; measured
// host time is the whole call's. BuildDigests runs as AppendKeys of every key the table uses,
// page by page (the digests are equal to the bulk build's by construction, retriever/digest.h).
//
// Thread-safety: one caller thread at a time (the PageSelector contract); Costs() from any.
// The cards' AppendKeys/BuildDigests run on one host thread each; their Submit is called in
// card order from the caller's thread (an emulated card queues it and returns).
//
//   std::vector<std::unique_ptr<PageSelector>> cards = ...;  // e.g. MakeFpgaSelector x N
//   ShardedFpgaSelector sel(std::move(cards), ShardingParams{});
#ifndef MEMPIPE_FPGA_SHARDED_SELECTOR_H_
#define MEMPIPE_FPGA_SHARDED_SELECTOR_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/clock.h"
#include "retriever/page_selector.h"

namespace mempipe {

// The host side of sharding (all ESTIMATES, used only for modeled time).
struct ShardingParams {
  // Host time to issue one card's part of a call (slice its inputs, start its DMA and launch
  // from the host thread): a few microseconds of XRT calls per card, as U55cParams'
  // per_cu_start_s is per compute unit. Estimate.
  double fan_out_per_card_s = 5e-6;
  // Host time to collect one card's completion and scatter its selection rows. Estimate.
  double fan_in_per_card_s = 2e-6;
};

class ShardedFpgaSelector final : public PageSelector {
 public:
  // `cards` must be non-empty and non-null (MakeFpgaSelector checks); names must not matter.
  ShardedFpgaSelector(std::vector<std::unique_ptr<PageSelector>> cards,
                      const ShardingParams& params);

  absl::string_view Name() const override { return name_; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override;

  int num_cards() const { return static_cast<int>(cards_.size()); }
  PageSelector& card(int i) { return *cards_[i]; }
  // KV heads [begin, end) card `card` owns for a layer of `num_kv_heads` heads.
  static std::pair<int, int> HeadsOf(int card, int num_cards, int num_kv_heads);
  // The last completed call's per-card costs (tests check the max/sum rules against them).
  std::vector<SelectorCosts> LastCardCosts() const;

 private:
  struct Pending {
    SelectRequest request;
    std::vector<SelectTicket> tickets;          // per card
    std::vector<std::vector<uint8_t>> queries;  // per card, [seqs, slice * group, d]
    std::vector<std::vector<int32_t>> pages, counts;
    Clock::time_point submitted;
  };

  absl::StatusOr<CacheShape> Find(int layer) const;
  // Runs fn(card) for every card, each on its own thread but the last; the first error wins.
  absl::Status ForEachCard(const std::function<absl::Status(int)>& fn);
  void Combine(const std::vector<SelectorCosts>& per_card, Clock::time_point t0, bool select);

  std::vector<std::unique_ptr<PageSelector>> cards_;
  const ShardingParams params_;
  const std::string name_;
  std::map<int, CacheShape> layers_;
  std::map<SelectTicket, Pending> pending_;
  SelectTicket next_ticket_ = 1;

  mutable std::mutex mu_;  // guards costs_, card_costs_
  SelectorCosts costs_;
  std::vector<SelectorCosts> card_costs_;
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_SHARDED_SELECTOR_H_
