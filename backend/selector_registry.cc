#include "backend/selector_registry.h"

#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace mempipe {
namespace {

struct Entry {
  std::string description;
  PageSelectorFactory factory;
};

struct Registry {
  std::mutex mu;
  std::map<Device, Entry> entries;
};

Registry& GetRegistry() {
  static Registry* registry = new Registry;  // never destroyed: usable during static teardown
  return *registry;
}

}  // namespace

void RegisterPageSelectorFactory(Device device, std::string description,
                                 PageSelectorFactory factory) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.entries[device] = Entry{std::move(description), std::move(factory)};
}

void UnregisterPageSelectorFactory(Device device) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.entries.erase(device);
}

bool HasPageSelectorFactory(Device device) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.entries.count(device) > 0;
}

absl::StatusOr<std::unique_ptr<PageSelector>> MakePageSelector(Device device) {
  PageSelectorFactory factory;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.entries.find(device);
    if (it != r.entries.end()) factory = it->second.factory;
  }
  if (factory) return factory();
  if (device == Device::kCpu) return std::unique_ptr<PageSelector>(new CpuPageSelector);
  return absl::UnimplementedError(
      absl::StrCat("the '", DeviceName(device),
                   "' selector is not part of this build (its library registers one with "
                   "RegisterPageSelectorFactory)"));
}

}  // namespace mempipe
