#include "backend/apply_device.h"

#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace mempipe {
namespace {

struct Entry {
  std::string description;
  ApplyDeviceFactory factory;
};

std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}

std::map<Device, Entry>& Registry() {
  static auto* registry = new std::map<Device, Entry>();
  return *registry;
}

}  // namespace

void RegisterApplyDeviceFactory(Device device, std::string description,
                                ApplyDeviceFactory factory) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry()[device] = Entry{std::move(description), std::move(factory)};
}

bool HasApplyDevice(Device device) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  return Registry().count(device) > 0;
}

absl::StatusOr<std::unique_ptr<ApplyDevice>> MakeApplyDevice(Device device) {
  ApplyDeviceFactory factory;
  {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto it = Registry().find(device);
    if (it == Registry().end()) {
      return absl::UnimplementedError(absl::StrCat(
          "no apply device is registered for ", DeviceName(device),
          device == Device::kCpu ? " (the CPU decodes on the host itself)"
                                 : " (a build without its kernels, or no device present)"));
    }
    factory = it->second.factory;
  }
  return factory();
}

}  // namespace mempipe
