// mempipe fpga: the PageSelector on a real Alveo card through XRT's native C++ API.
//
// Opens the device, loads the xclbin (the v++-built one for a card, or the project's own
// descriptive one from fpga/host/xclbin_writer.h), and binds one xrt::kernel per compute unit of
// mempipe_score_topk and mempipe_digest_update. Digests of (layer, KV head) are xrt::bo buffers
// resident in the HBM pseudo-channel of CU CuFor(layer, head) (fpga/device_layout.h). Per step,
// Submit() packs the group's queries, the block table and the lengths into one buffer per CU,
// syncs it to the card and starts one run per KV head (batched over all sequences); Wait() waits
// for the runs, syncs each CU's pages back and unpacks them. Those per-CU buffers are kept and
// reused by later steps, so a steady decode loop allocates nothing on the card. Every XRT
// exception becomes an absl::Status (Internal, or Unavailable when the device cannot be opened).
//
// On XRT's noop shim (XCL_EMULATION_MODE=noop) the runs complete but compute nothing: what this
// class then returns is not a selection. It is the real-hardware path; its tests check the
// plumbing. Costs(): host_ms and transfer_ms measured on this host (noop: the shim's cost);
// no modeled fields. Deadlines poll the runs' state, since the noop shim's timed wait ignores
// its timeout.
//
//   FpgaOptions o; o.backend = FpgaBackend::kXrt;
//   MEMPIPE_ASSIGN_OR_RETURN(auto sel, XrtPageSelector::Open(o));
#ifndef MEMPIPE_FPGA_HOST_XRT_SELECTOR_H_
#define MEMPIPE_FPGA_HOST_XRT_SELECTOR_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "core/clock.h"
#include "fpga/device_layout.h"
#include "fpga/fpga_selector.h"
#include "fpga/request_checks.h"
#include "retriever/page_selector.h"
#include "xrt/xrt_bo.h"
#include "xrt/xrt_device.h"
#include "xrt/xrt_kernel.h"

namespace mempipe {

class XrtPageSelector final : public PageSelector {
 public:
  // Errors: Unavailable if the device cannot be opened, Internal for a bad xclbin or a
  // missing kernel or compute unit.
  static absl::StatusOr<std::unique_ptr<XrtPageSelector>> Open(const FpgaOptions& options);
  ~XrtPageSelector() override;

  absl::string_view Name() const override { return "fpga-xrt"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override;
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override;
  absl::Status AppendKeys(int layer, const int64_t* slots, int num_tokens,
                          const void* keys) override;
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& request) override;
  absl::Status Wait(SelectTicket ticket, absl::Time deadline) override;
  SelectorCosts Costs() const override { return costs_; }

  // For tests: the memory bank (index into MEM_TOPOLOGY) of a layer's head digests, and the
  // bank each CU's global arguments are connected to.
  absl::StatusOr<int> DigestBank(int layer, int kv_head) const;
  absl::StatusOr<int> ScoreCuBank(int cu, int arg) const;
  int num_cus() const { return num_cus_; }
  // Input/output buffer pairs allocated so far: steps reuse idle pairs instead of allocating.
  size_t io_pairs_allocated() const { return io_pairs_allocated_; }

  // --- Test-only fault injection (issue 14) -----------------------------------------------------
  // XRT's noop shim completes every run, so a run that ends in an error state (or a wait that
  // throws) while other KV heads' runs are still in flight cannot be produced with it alone. A
  // test installs hooks that stand in for the card (tests/fpga/host/xrt_fault_test.cc):
  //   started(probe)     after each xrt::run::start, with the host views of the buffers that
  //                      run's card would read and write; may throw, as a failed start would;
  //   state(probe, s)    with the state XRT reported for a run (from xrt::run::wait or ::state);
  //                      returns the state the selector acts on; may throw, as XRT's calls can.
  // Without hooks (the default, and everywhere outside tests) XRT's states are used as they are.
  struct RunProbe {
    enum class Kind { kScore, kUpdate };
    Kind kind = Kind::kScore;
    int layer = 0;
    int kv_head = 0;
    uint64_t id = 0;        // unique per run of this selector, in start order
    uint8_t* in = nullptr;  // the run's packed inputs (host view)
    size_t in_bytes = 0;
    uint8_t* out = nullptr;  // the run's outputs (host view); null for digest updates
    size_t out_bytes = 0;
  };
  struct RunHooksForTesting {
    std::function<void(const RunProbe&)> started;
    std::function<ert_cmd_state(const RunProbe&, ert_cmd_state)> state;
  };
  void SetRunHooksForTesting(RunHooksForTesting hooks) { hooks_ = std::move(hooks); }
  // Requests and launches kept alive after an error or a missed deadline because runs may still
  // use their buffers; dropped once every run of one has finished (checked at each Wait).
  size_t abandoned_for_testing() const { return abandoned_.size(); }

 private:
  struct Layer {
    CacheShape shape;
    std::vector<xrt::bo> heads;  // [kv_heads] digest slices
  };
  // A CU's per-step buffers: packed inputs and (for scoring) outputs, in the CU's bank.
  struct IoPair {
    xrt::bo in, out;
    size_t in_bytes = 0, out_bytes = 0;
  };
  struct Pending {
    int layer = 0;
    SelectRequest request;
    ScoreIo io;
    std::vector<int> cus;      // [kv_heads] the CU each head ran on
    std::vector<IoPair> bufs;  // [kv_heads]
    std::vector<xrt::run> runs;
    std::vector<RunProbe> probes;  // [runs] what the test hooks see of each run
    Clock::time_point submitted;
    double transfer_ms = 0;
  };

  XrtPageSelector() = default;
  absl::StatusOr<Layer*> Find(int layer);
  // An idle pair on `cu` at least this large, or a new one. Throws XRT's exceptions.
  IoPair TakeIo(int cu, size_t in_bytes, size_t out_bytes);
  void ReturnIo(Pending& p);
  absl::Status RunUpdate(int layer_id, Layer& layer, const int64_t* slots, int num_tokens,
                         const void* keys);
  // Records run `p.runs.back()` as started (and tells the test hook).
  void Started(Pending& p, RunProbe::Kind kind, int layer, int kv_head, IoPair& io);
  // The state the selector acts on for run `i` of `p`, given what XRT reported.
  ert_cmd_state Observed(const Pending& p, size_t i, ert_cmd_state xrt_state) const;

  int num_cus_ = 0;
  xrt::device device_;
  std::vector<xrt::kernel> score_cus_, update_cus_;
  std::map<int, Layer> layers_;
  std::map<SelectTicket, Pending> pending_;
  std::vector<std::vector<IoPair>> idle_io_;  // [num_cus]
  size_t io_pairs_allocated_ = 0;
  std::vector<Pending> abandoned_;  // runs past their deadline, kept until the card finishes
  SelectTicket next_ticket_ = 1;
  SelectorCosts costs_;
  RunHooksForTesting hooks_;
  uint64_t next_run_id_ = 0;
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_HOST_XRT_SELECTOR_H_
