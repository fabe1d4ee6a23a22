// mempipe fpga: the factory the pipeline and mempipe-bench use for `--placement fpga`.
//
// Two devices implement PageSelector on the FPGA path:
//   * "fpga-u55c-emulated" (default): the HLS kernels of fpga/hls/ run on a host thread against
//     emulated HBM; results are the kernels' own (bit-identical to the CPU reference), and every
//     call also reports the modeled U55C time and energy (fpga/emulation/u55c_params.h) -- labeled
//     modeled.
//   * "fpga-xrt": the real XRT runtime (when built with MEMPIPE_WITH_XRT): digests in HBM
//     buffers, launches on the card's compute units. Without a card it runs on XRT's noop shim,
//     where kernels compute nothing: use it for plumbing, never for results.
//
//   FpgaOptions opts;                 // emulated, unpaced
//   opts.paced = true;                // completion waits for the modeled device time
//   MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<PageSelector> sel, MakeFpgaSelector(opts));
//   MEMPIPE_RETURN_IF_ERROR(sel->AddLayer(0, shape));
//   ... sel->Submit(request); sel->Wait(ticket, deadline);
//   SelectorCosts c = sel->Costs();   // host_ms measured; modeled_device_ms / _energy_mj modeled
#ifndef MEMPIPE_FPGA_FPGA_SELECTOR_H_
#define MEMPIPE_FPGA_FPGA_SELECTOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fpga/emulation/emulated_u55c.h"
#include "fpga/emulation/u55c_params.h"
#include "fpga/sharded_selector.h"
#include "retriever/page_selector.h"

namespace mempipe {

enum class FpgaBackend { kEmulatedU55c, kXrt };

// "emulated" | "xrt".
absl::StatusOr<FpgaBackend> ParseFpgaBackend(absl::string_view name);

struct FpgaOptions {
  FpgaBackend backend = FpgaBackend::kEmulatedU55c;
  // The card's (or the model's) parameters; num_cus also sets how many CUs the xclbin has.
  U55cParams params;
  // Emulated: completion waits until the modeled device time has passed since submission (calls
  // queue in order, as on one command queue), so overlap in the pipeline behaves as with a card.
  bool paced = false;
  // Emulated: what computes the functional result -- the HLS kernels in C simulation (default)
  // or the multi-threaded CPU reference (same bits, much faster); reports name it.
  EmulatedFunctional functional = EmulatedFunctional::kHls;
  int reference_threads = 1;  // host threads of the reference, >= 1
  // XRT: device index, and the xclbin to load. Empty: the project's own descriptive xclbin
  // (fpga/host/xclbin_writer.h), which has the kernels' interfaces but no hardware -- noop shim
  // only.
  unsigned device_index = 0;
  std::string xclbin_path;
  // KV heads sharded over this many cards (fpga/sharded_selector.h), each built from these
  // options with cards = 1: with the emulated backend N emulated U55Cs, each with its own HBM,
  // PCIe link and launches; modeled time is the slowest card's plus the host's fan-out/fan-in
  // (`sharding`), energy the cards' sum. 1 = one card.
  int cards = 1;
  ShardingParams sharding;
  // Emulated only: keep super-page digests of this many pages (2, 4 or 8) beside the page
  // digests and serve hierarchical requests (retriever/hierarchical.h) with the CPU reference,
  // priced as two passes (fpga/emulation/hierarchical_u55c.h). 1 = the HLS kernels, flat only.
  int pages_per_super_page = 1;
};

// Builds the selector `options` ask for. Errors: InvalidArgument for bad parameters (num_cus
// outside [1, hbm_channels], non-positive rates, cards outside [1, 64], pages_per_super_page
// not 1, 2, 4 or 8, or > 1 with XRT); Unimplemented for kXrt in a build without XRT;
// Unavailable/Internal with XRT's message when the device or xclbin cannot be opened.
absl::StatusOr<std::unique_ptr<PageSelector>> MakeFpgaSelector(const FpgaOptions& options);

}  // namespace mempipe

#endif  // MEMPIPE_FPGA_FPGA_SELECTOR_H_
