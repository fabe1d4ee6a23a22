#include "backend/placement.h"

#include <array>
#include <limits>
#include <optional>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/status_macros.h"

namespace mempipe {
namespace {

constexpr std::array<absl::string_view, 4> kStepNames = {"prepare", "relevancy", "retrieval",
                                                         "apply"};

Placement Uniform(Device selector, Device apply) {
  Placement p;
  p.prepare = p.relevancy = p.retrieval = selector;
  p.apply = apply;
  return p;
}

}  // namespace

absl::string_view DeviceName(Device device) {
  switch (device) {
    case Device::kCpu:
      return "cpu";
    case Device::kGpu:
      return "gpu";
    case Device::kFpga:
      return "fpga";
  }
  return "unknown";
}

absl::StatusOr<Device> ParseDevice(absl::string_view name, absl::string_view step) {
  if (name == "cpu") return Device::kCpu;
  if (name == "gpu") return Device::kGpu;
  if (name == "fpga") return Device::kFpga;
  return absl::InvalidArgumentError(
      absl::StrCat("placement ", step, "='", name, "': the device must be cpu, gpu or fpga"));
}

absl::StatusOr<Placement> ParsePlacement(absl::string_view spec) {
  spec = absl::StripAsciiWhitespace(spec);
  if (spec.empty()) {
    return absl::InvalidArgumentError(
        "placement is empty: give a preset (dense, cpu, gpu, fpga) or "
        "prepare=..,relevancy=..,retrieval=..,apply=..");
  }
  if (spec == "dense") {
    Placement p = Uniform(Device::kCpu, Device::kCpu);
    p.dense = true;
    return p;
  }
  // What PlacementToString prints for a dense placement: "dense(apply=<device>)".
  if (absl::ConsumePrefix(&spec, "dense(apply=")) {
    if (!absl::ConsumeSuffix(&spec, ")")) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement 'dense(apply=", spec, "' lacks its closing ')'"));
    }
    absl::StatusOr<Device> apply = ParseDevice(absl::StripAsciiWhitespace(spec), "apply");
    if (!apply.ok()) return apply.status();
    Placement p = Uniform(*apply, *apply);
    p.dense = true;
    return p;
  }
  if (spec == "cpu") return Uniform(Device::kCpu, Device::kCpu);
  if (spec == "gpu") return Uniform(Device::kGpu, Device::kGpu);
  if (spec == "fpga") return Uniform(Device::kFpga, Device::kGpu);
  if (!absl::StrContains(spec, '=')) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement '", spec,
                     "' is not a preset (dense, cpu, gpu, fpga) nor a list of step=device pairs"));
  }
  std::array<std::optional<Device>, 4> devices;
  for (absl::string_view pair : absl::StrSplit(spec, ',')) {
    pair = absl::StripAsciiWhitespace(pair);
    const std::vector<absl::string_view> kv = absl::StrSplit(pair, absl::MaxSplits('=', 1));
    if (kv.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement entry '", pair, "' is not of the form step=device"));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(kv[0]);
    const absl::string_view value = absl::StripAsciiWhitespace(kv[1]);
    size_t index = kStepNames.size();
    for (size_t i = 0; i < kStepNames.size(); ++i) {
      if (kStepNames[i] == key) index = i;
    }
    if (index == kStepNames.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "placement step '", key, "' is not one of prepare, relevancy, retrieval, apply"));
    }
    if (devices[index]) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement step '", key, "' is given more than once"));
    }
    MEMPIPE_ASSIGN_OR_RETURN(devices[index], ParseDevice(value, key));
  }
  for (size_t i = 0; i < kStepNames.size(); ++i) {
    if (!devices[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement '", spec, "' does not place step '", kStepNames[i], "'"));
    }
  }
  Placement p;
  p.prepare = *devices[0];
  p.relevancy = *devices[1];
  p.retrieval = *devices[2];
  p.apply = *devices[3];
  return p;
}

absl::Status ValidatePlacement(const Placement& p) {
  if (p.apply == Device::kFpga) {
    return absl::InvalidArgumentError(
        "placement apply=fpga is not supported: there is no attention kernel for the FPGA; "
        "place apply on cpu or gpu");
  }
  if (p.dense) return absl::OkStatus();
  if (p.relevancy != p.retrieval) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement relevancy=", DeviceName(p.relevancy), " and retrieval=", DeviceName(p.retrieval),
        " are apart: a page selector fuses scoring with top-k on one device (a per-layer score "
        "transfer between them is not implemented); place them on the same device"));
  }
  if (p.prepare != p.relevancy) {
    return absl::InvalidArgumentError(absl::StrCat(
        "placement prepare=", DeviceName(p.prepare), " and relevancy=", DeviceName(p.relevancy),
        " are apart: the digests live on the device that scores them (shipping every updated "
        "digest per layer is not implemented); place them on the same device"));
  }
  return absl::OkStatus();
}

std::string PlacementToString(const Placement& p) {
  if (p.dense) return absl::StrCat("dense(apply=", DeviceName(p.apply), ")");
  return absl::StrCat("prepare=", DeviceName(p.prepare), ",relevancy=", DeviceName(p.relevancy),
                      ",retrieval=", DeviceName(p.retrieval), ",apply=", DeviceName(p.apply));
}

LinkModel LinkBetween(Device a, Device b) {
  if (a == b) return LinkModel{0, std::numeric_limits<double>::infinity(), "same device"};
  const bool fpga = a == Device::kFpga || b == Device::kFpga;
  const bool gpu = a == Device::kGpu || b == Device::kGpu;
  if (fpga && gpu) {
    // No peer-to-peer path is assumed: the data bounces through host memory (two PCIe hops).
    return LinkModel{15.0, 10.0,
                     "gpu<->host<->U55C: two PCIe copies, latencies added, the slower link's "
                     "bandwidth (assumed, no P2P)"};
  }
  if (fpga) {
    // FPGA-NOTES.md: Gen3 x16 DMA 9.3-12.2 GB/s for large buffers, 0.67-0.86 GB/s for 4 KB,
    // which 5 us + n / 10 GB/s reproduces (4 KB -> 0.76 GB/s).
    return LinkModel{5.0, 10.0, "U55C PCIe Gen3 x16 (FPGA-NOTES.md DMA figures)"};
  }
  return LinkModel{10.0, 25.0, "host<->GPU PCIe, pinned copies (assumed, unverified)"};
}

}  // namespace mempipe
