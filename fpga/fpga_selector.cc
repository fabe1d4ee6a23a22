#include "fpga/fpga_selector.h"

#include "absl/strings/str_cat.h"
#include "fpga/emulation/emulated_u55c.h"
#ifdef MEMPIPE_WITH_XRT
#include "fpga/host/xrt_selector.h"
#endif

namespace mempipe {
namespace {

absl::Status ValidateParams(const U55cParams& p) {
  if (p.hbm_channels <= 0 || p.num_cus < 1 || p.num_cus > p.hbm_channels) {
    return absl::InvalidArgumentError(absl::StrCat("num_cus must be in [1, ", p.hbm_channels,
                                                   "] (one per HBM pseudo-channel), got ",
                                                   p.num_cus));
  }
  const double positive[] = {p.hbm_channel_bytes,     p.hbm_channel_peak_bps, p.hbm_efficiency,
                             p.kernel_clock_hz,       p.dma_to_card_bps,      p.dma_from_card_bps,
                             p.dma_max_transfer_bytes};
  for (double v : positive) {
    if (!(v > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("U55C sizes, rates and clocks must be positive, got ", v));
    }
  }
  // The RTL's figures cap what the model prices (u55c_params.h): they must be real caps.
  if (!(p.rtl_clock_estimate_hz > 0) || p.rtl_cus_that_fit < 1 || p.score_add_stages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rtl_clock_estimate_hz must be > 0 and rtl_cus_that_fit, score_add_stages >= 1, got ",
        p.rtl_clock_estimate_hz, ", ", p.rtl_cus_that_fit, ", ", p.score_add_stages,
        " (use vitis_target_what_if for the Vitis targets)"));
  }
  if (p.hbm_efficiency > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("hbm_efficiency must be in (0, 1], got ", p.hbm_efficiency));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FpgaBackend> ParseFpgaBackend(absl::string_view name) {
  if (name == "emulated") return FpgaBackend::kEmulatedU55c;
  if (name == "xrt") return FpgaBackend::kXrt;
  return absl::InvalidArgumentError(
      absl::StrCat("FPGA backend must be 'emulated' or 'xrt', got '", name, "'"));
}

absl::StatusOr<std::unique_ptr<PageSelector>> MakeFpgaSelector(const FpgaOptions& options) {
  if (absl::Status s = ValidateParams(options.params); !s.ok()) return s;
  if (options.backend == FpgaBackend::kEmulatedU55c) {
    if (options.reference_threads < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("reference_threads must be >= 1, got ", options.reference_threads));
    }
    return std::unique_ptr<PageSelector>(std::make_unique<EmulatedU55cSelector>(
        options.params, options.paced, options.functional, options.reference_threads));
  }
#ifdef MEMPIPE_WITH_XRT
  auto xrt = XrtPageSelector::Open(options);
  if (!xrt.ok()) return xrt.status();
  return std::unique_ptr<PageSelector>(std::move(xrt).value());
#else
  return absl::UnimplementedError(
      "the XRT FPGA backend is not in this build (configure with -DMEMPIPE_XRT=on)");
#endif
}

}  // namespace mempipe
