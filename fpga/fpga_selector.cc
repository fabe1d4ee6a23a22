#include "fpga/fpga_selector.h"

#include "absl/strings/str_cat.h"
#include "fpga/emulation/emulated_u55c.h"
#include "fpga/emulation/hierarchical_u55c.h"
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
  const int f = options.pages_per_super_page;
  if (f != 1 && f != 2 && f != 4 && f != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages_per_super_page must be 1 (flat), 2, 4 or 8, got ", f));
  }
  if (f > 1 && options.backend != FpgaBackend::kEmulatedU55c) {
    return absl::InvalidArgumentError(
        "super-page digests run on the emulated U55C only (no HLS kernel for the second pass)");
  }
  if (options.cards < 1 || options.cards > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("cards must be in [1, 64], got ", options.cards));
  }
  if (!(options.sharding.fan_out_per_card_s >= 0) || !(options.sharding.fan_in_per_card_s >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sharding fan-out/fan-in times must be >= 0, got ", options.sharding.fan_out_per_card_s,
        " and ", options.sharding.fan_in_per_card_s));
  }
  if (options.cards > 1) {
    FpgaOptions one = options;
    one.cards = 1;
    std::vector<std::unique_ptr<PageSelector>> cards;
    for (int i = 0; i < options.cards; ++i) {
      auto card = MakeFpgaSelector(one);
      if (!card.ok()) return card.status();
      cards.push_back(*std::move(card));
    }
    return std::unique_ptr<PageSelector>(
        std::make_unique<ShardedFpgaSelector>(std::move(cards), options.sharding));
  }
  if (f > 1) {
    return std::unique_ptr<PageSelector>(
        std::make_unique<HierarchicalU55cSelector>(options.params, options.paced, f));
  }
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
