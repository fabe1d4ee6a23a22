// mempipe fpga: the timing and energy model of the emulated Alveo U55C (all results modeled).
//
// Built only from fpga/emulation/u55c_params.h. A device call is modeled as
//   host->card DMAs  +  launch  +  the slowest compute unit  +  card->host DMAs
// with DMAs serialized on the one PCIe link, and compute units running in parallel, each reading
// its own HBM pseudo-channel at min(channel rate x efficiency, one AXI word per clock). Kernel
// clocks are priced at U55cParams::PricedClockHz() and launches run on PricedCus() units (CU c
// on c mod PricedCus(), one after another): what the RTL reaches, unless the params ask for the
// Vitis-target what-if. Energy is active board power over the kernel time plus idle board power
// over the rest (estimated powers).
//
//   U55cModel model(U55cParams{});
//   double s = model.DmaSeconds(4096, DmaDirection::kToCard);   // modeled
//   CallEstimate e = model.Call({{4096}}, cu_work, {{1024}});
#ifndef MEMPIPE_FPGA_EMULATION_U55C_MODEL_H_
#define MEMPIPE_FPGA_EMULATION_U55C_MODEL_H_

#include <cstdint>
#include <vector>

#include "fpga/emulation/u55c_params.h"

namespace mempipe {

enum class DmaDirection { kToCard, kFromCard };

// What one compute-unit launch does, in the units the model needs.
struct CuLaunch {
  int cu = 0;                // which compute unit (and so which HBM pseudo-channel)
  double hbm_bytes = 0;      // bytes read from and written to HBM
  double stream_words = 0;   // clocks of the busiest streaming stage (one 512-bit word, or one
                             // (query head, digest word) pair of the RTL score core, per clock)
  double select_clocks = 0;  // clocks of a stage that overlaps the streaming ones
  double serial_clocks = 0;  // clocks that overlap nothing (the RTL select's emit pass per row)
  int rows = 0;              // sequences processed (the first pays the pipeline fill, the rest
                             // a row fill)
};

struct CallEstimate {  // every field modeled
  double to_card_s = 0;
  double launch_s = 0;
  double kernel_s = 0;  // the slowest compute unit, launches on one CU summed
  double from_card_s = 0;
  double total_s = 0;
  double energy_j = 0;
};

class U55cModel {
 public:
  explicit U55cModel(const U55cParams& params) : p_(params) {}
  const U55cParams& params() const { return p_; }

  // One DMA of `bytes` (chunked at the platform's largest transfer).
  double DmaSeconds(double bytes, DmaDirection dir) const;
  // Rate a kernel port streams from its own pseudo-channel: min(channel x efficiency, port).
  double ChannelReadBps() const;
  // Time of one compute-unit launch, from the moment it starts.
  double CuSeconds(const CuLaunch& launch) const;
  // A whole call: DMAs of the listed sizes, one launch batch of `launches`.
  CallEstimate Call(const std::vector<double>& to_card_bytes, const std::vector<CuLaunch>& launches,
                    const std::vector<double>& from_card_bytes) const;

 private:
  U55cParams p_;
};

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_EMULATION_U55C_MODEL_H_
