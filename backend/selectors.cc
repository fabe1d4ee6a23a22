#include "backend/selectors.h"

#include "absl/strings/str_cat.h"

namespace mempipe {

absl::StatusOr<std::unique_ptr<PageSelector>> MakePageSelector(absl::string_view device) {
  if (device == "cpu") return std::make_unique<CpuPageSelector>();
  if (device == "gpu" || device == "fpga") {
    return absl::UnimplementedError(
        absl::StrCat("the '", device, "' selector is not part of this build"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("selector device must be cpu, gpu or fpga, got '", device, "'"));
}

}  // namespace mempipe
