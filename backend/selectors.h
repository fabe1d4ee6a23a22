// mempipe backend: constructs the PageSelector for a device name.
//
//   MEMPIPE_ASSIGN_OR_RETURN(std::unique_ptr<PageSelector> sel, MakePageSelector("cpu"));
#ifndef MEMPIPE_BACKEND_SELECTORS_H_
#define MEMPIPE_BACKEND_SELECTORS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "retriever/page_selector.h"

namespace mempipe {

// `device` is one of cpu|gpu|fpga. Errors: InvalidArgument for an unknown name,
// Unimplemented/Unavailable for a device this build or machine does not have.
absl::StatusOr<std::unique_ptr<PageSelector>> MakePageSelector(absl::string_view device);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_SELECTORS_H_
