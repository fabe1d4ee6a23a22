#include "backend/selectors.h"

#include "absl/strings/str_cat.h"
#include "backend/placement.h"
#include "backend/selector_registry.h"

namespace mempipe {

absl::StatusOr<std::unique_ptr<PageSelector>> MakePageSelector(absl::string_view device) {
  if (device == "cpu" || device == "gpu" || device == "fpga") {
    // The registry (backend/selector_registry.h) knows the selectors this program links in.
    return MakePageSelector(*ParseDevice(device, "selector"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("selector device must be cpu, gpu or fpga, got '", device, "'"));
}

}  // namespace mempipe
