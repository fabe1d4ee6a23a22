// mempipe fpga: the emulated Alveo U55C, a PageSelector running the HLS kernels on a host thread.
//
// Its "HBM" is host memory laid out as on the card (fpga/device_layout.h); Submit() packs the
// inputs (the host->card DMA), queues the launch and returns; a worker thread runs
// mempipe_score_topk once per KV head, exactly the kernel source of fpga/hls/, and Wait() unpacks
// the pages (the card->host DMA). Step-1 calls (BuildDigests, AppendKeys) run the digest kernel
// synchronously. Every call is also priced by U55cModel: Costs() gives the measured host time
// and, separately, the modeled U55C time and energy. In paced mode a request completes no earlier
// than its modeled completion time, and a digest update returns no earlier than its own; all
// queue in order behind each other, as on one command queue.
//
// Functional result: by default the HLS kernels in C simulation (slow: a few hundred ms per
// step at 32K tokens on a small host). EmulatedFunctional::kReference computes the same bits
// with the multi-threaded CPU reference (CpuPageSelector: digests in host memory, ScoreAndSelect)
// instead; the timing model, the pacing and every modeled figure are unchanged. Reports name
// which one ran (FunctionalName).
//
// Thread-safety: one caller thread at a time (the PageSelector contract); Costs() may be called
// from any thread.
//
//   EmulatedU55cSelector sel(U55cParams{}, /*paced=*/false);
//   MEMPIPE_RETURN_IF_ERROR(sel.AddLayer(0, shape));
#ifndef MEMPIPE_FPGA_EMULATION_EMULATED_U55C_H_
#define MEMPIPE_FPGA_EMULATION_EMULATED_U55C_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/clock.h"
#include "fpga/device_layout.h"
#include "fpga/emulation/u55c_model.h"
#include "fpga/hls/hls_compat.h"
#include "fpga/request_checks.h"
#include "retriever/page_selector.h"

namespace mempipe {

// What computes an emulated selection's functional result.
enum class EmulatedFunctional : int { kHls = 0, kReference = 1 };
// "hls" | "reference"; the error names the bad value.
absl::StatusOr<EmulatedFunctional> ParseEmulatedFunctional(absl::string_view name);
absl::string_view EmulatedFunctionalName(EmulatedFunctional functional);

class EmulatedU55cSelector final : public PageSelector {
 public:
  // `reference_threads`: host threads of the CPU reference (kReference only), >= 1.
  EmulatedU55cSelector(const U55cParams& params, bool paced,
                       EmulatedFunctional functional = EmulatedFunctional::kHls,
                       int reference_threads = 1);
  ~EmulatedU55cSelector() override;

  absl::string_view Name() const override { return "fpga-u55c-emulated"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override;

  // Copies a layer's digests out of the emulated HBM into `out` (the DigestView layout; for an
  // int8 layer an int8 view: codes, scales and exact rows), for tests comparing them with the
  // CPU reference.
  absl::Status ReadDigests(int layer, const DigestView& out) const;
  // HBM pseudo-channel holding (layer, kv_head), and bytes allocated on each channel.
  int ChannelOf(int layer, int kv_head) const;
  std::vector<double> ChannelBytes() const;

 private:
  struct Layer {
    CacheShape shape;
    std::vector<std::vector<hls_compat::Word512>> heads;  // per KV head: its HBM slice (hls)
  };
  struct Job {
    SelectTicket ticket = 0;
    const Layer* layer = nullptr;
    int layer_id = 0;
    SelectRequest request;  // pointers into host memory are used only by Submit/Wait
    int group = 0;
    ScoreIo io;
    std::vector<std::vector<hls_compat::Word512>> in;   // per head, packed inputs
    std::vector<std::vector<hls_compat::Word512>> out;  // per head, kernel outputs
    // kReference: copies of the inputs (the caller's may go once Wait gives up) and outputs.
    std::vector<uint8_t> ref_query;
    std::vector<int32_t> ref_table, ref_lens, ref_pages, ref_counts;
    CallEstimate estimate;
    Clock::time_point submitted;
    Clock::time_point completed;
    double kernel_host_ms = 0;
    absl::Status status;
    bool done = false;
    bool abandoned = false;
  };

  absl::StatusOr<Layer*> Find(int layer);
  absl::Status RunUpdate(int layer_id, Layer& layer, const int64_t* slots, int num_tokens,
                         const void* keys);
  void WorkerLoop();
  void RunJob(Job& job);

  const U55cModel model_;
  const bool paced_;
  const EmulatedFunctional functional_;
  mutable CpuPageSelector reference_;  // kReference: the digests and the functional result
  std::map<int, Layer> layers_;
  std::vector<double> channel_bytes_;
  SelectTicket next_ticket_ = 1;

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  std::map<SelectTicket, std::unique_ptr<Job>> jobs_;
  Clock::time_point device_free_;  // paced: modeled completion of the last queued request
  SelectorCosts costs_;
  bool stop_ = false;
  std::thread worker_;  // last: starts after every member above exists
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_EMULATION_EMULATED_U55C_H_
