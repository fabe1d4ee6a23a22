// mempipe backend: where each of the four steps runs, as configuration.
//
// A placement names a device for every step (ARCHITECTURE.md):
//   prepare=<dev>,relevancy=<dev>,retrieval=<dev>,apply=<dev>     dev in cpu | gpu | fpga
// or a preset:
//   dense  no selection; dense paged attention on the apply device (cpu)
//   cpu    prepare=cpu,relevancy=cpu,retrieval=cpu,apply=cpu
//   gpu    prepare=gpu,relevancy=gpu,retrieval=gpu,apply=gpu
//   fpga   prepare=fpga,relevancy=fpga,retrieval=fpga,apply=gpu
//
// Supported combinations (ValidatePlacement says why others are not):
//   * prepare, relevancy and retrieval on one device, the "selector device": one PageSelector
//     (retriever/page_selector.h) keeps the digests it scores and fuses scoring with top-k, so
//     splitting them would need a digest or score transfer per layer that no selector offers;
//   * apply on cpu or gpu (there is no attention kernel for the FPGA).
// Where the selector device differs from the apply device, the pipeline inserts the transfers
// (queries, block table rows, lengths and new keys to the selector; page ids back) and accounts
// them in bytes and time (LinkModel below).
//
//   MEMPIPE_ASSIGN_OR_RETURN(Placement p, ParsePlacement("prepare=fpga,relevancy=fpga,"
//                                                         "retrieval=fpga,apply=cpu"));
//   MEMPIPE_RETURN_IF_ERROR(ValidatePlacement(p));
#ifndef MEMPIPE_BACKEND_PLACEMENT_H_
#define MEMPIPE_BACKEND_PLACEMENT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mempipe {

enum class Device : int { kCpu = 0, kGpu = 1, kFpga = 2 };

absl::string_view DeviceName(Device device);
// "cpu" | "gpu" | "fpga"; the error names the bad value and the step it was given for.
absl::StatusOr<Device> ParseDevice(absl::string_view name, absl::string_view step);

struct Placement {
  bool dense = false;  // no selection (steps 1-3 unused)
  Device prepare = Device::kCpu;
  Device relevancy = Device::kCpu;
  Device retrieval = Device::kCpu;
  Device apply = Device::kCpu;

  // The device of steps 1-3 (valid placements only).
  Device selector() const { return relevancy; }
  // True when page selection crosses a device boundary in each direction.
  bool NeedsTransfer() const { return !dense && selector() != apply; }
};

// A preset name, "dense(apply=<device>)" (what PlacementToString prints for dense), or the four
// key=value pairs (each key exactly once, any order).
// Errors (InvalidArgument): empty spec, unknown preset or key, bad device, a key repeated or
// missing, a pair without '='.
absl::StatusOr<Placement> ParsePlacement(absl::string_view spec);

// OK for a supported combination; otherwise InvalidArgument naming the steps and the reason.
[[nodiscard]] absl::Status ValidatePlacement(const Placement& placement);

// "dense(apply=<device>)" or "prepare=..,relevancy=..,retrieval=..,apply=..", both of which
// ParsePlacement reads back to the same placement.
std::string PlacementToString(const Placement& placement);

// A modeled host<->device link: a copy of n bytes takes latency_us + n / bandwidth. Used only
// for time the selector does not report itself; every figure from it is labeled modeled.
struct LinkModel {
  double latency_us = 0;
  double gbytes_per_s = 1;
  const char* source = "";  // where the parameters come from

  double ModeledMs(double bytes) const {
    return bytes == 0 ? 0 : latency_us * 1e-3 + bytes / (gbytes_per_s * 1e9) * 1e3;
  }
};

// The link between two devices; zero cost for a device with itself.
LinkModel LinkBetween(Device a, Device b);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_PLACEMENT_H_
