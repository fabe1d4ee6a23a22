// mempipe backend: which PageSelector serves a placement's selector device.
//
// The CPU selector is built in. The GPU and FPGA selectors live in their own folders and
// register a factory at start-up (the bench or the Python binding calls their Register...()
// function), so this library depends on none of them:
//
//   RegisterPageSelectorFactory(Device::kFpga, "fpga (emulated U55C)", [options] {
//     return MakeFpgaSelector(options);   // fpga/fpga_selector.h: StatusOr<unique_ptr<...>>
//   });
//   MEMPIPE_ASSIGN_OR_RETURN(auto selector, MakePageSelector(Device::kFpga));
#ifndef MEMPIPE_BACKEND_SELECTOR_REGISTRY_H_
#define MEMPIPE_BACKEND_SELECTOR_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "backend/placement.h"
#include "retriever/page_selector.h"

namespace mempipe {

using PageSelectorFactory = std::function<absl::StatusOr<std::unique_ptr<PageSelector>>()>;

// Registers (or replaces) the factory for `device`; `description` shows in error messages and
// reports. Thread-safe.
void RegisterPageSelectorFactory(Device device, std::string description,
                                 PageSelectorFactory factory);

// Removes a registration (the CPU one falls back to the built-in CpuPageSelector).
void UnregisterPageSelectorFactory(Device device);

// True when a factory is registered for `device` (the built-in CPU selector does not count).
bool HasPageSelectorFactory(Device device);

// A new selector for `device`. Errors: Unimplemented naming the device when no factory is
// registered (and no built-in exists), or the factory's own error.
absl::StatusOr<std::unique_ptr<PageSelector>> MakePageSelector(Device device);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_SELECTOR_REGISTRY_H_
