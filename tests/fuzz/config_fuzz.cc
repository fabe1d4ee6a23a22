// libFuzzer target: placement and configuration parsing (backend/placement.h, policy.h, the
// pipeline options, the mode and aggregation names).
//
// Oracles: a placement that parses and validates prints to a spec that parses back to the same
// placement; accepted options satisfy the documented bounds.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backend/decode_pipeline.h"
#include "backend/placement.h"
#include "backend/policy.h"
#include "retriever/relevancy.h"
#include "tests/fuzz/fuzz_input.h"

namespace mempipe::fuzz {
namespace {

bool Same(const Placement& a, const Placement& b) {
  return a.dense == b.dense && a.apply == b.apply &&
         (a.dense ||
          (a.prepare == b.prepare && a.relevancy == b.relevancy && a.retrieval == b.retrieval));
}

void Run(FuzzedDataProvider& in) {
  const std::string spec = in.ConsumeRandomLengthString(96);
  absl::StatusOr<Placement> p = ParsePlacement(spec);
  if (p.ok() && ValidatePlacement(*p).ok()) {
    absl::StatusOr<Placement> again = ParsePlacement(PlacementToString(*p));
    if (!again.ok() || !Same(*p, *again)) std::abort();
  }
  (void)ParseDevice(in.ConsumeRandomLengthString(8), "fuzz");
  (void)ParsePipelineMode(in.ConsumeRandomLengthString(12));
  (void)ParseGroupAggregation(in.ConsumeRandomLengthString(6));

  PipelineOptions o;
  o.placement = p.ok() ? *p : Placement{};
  o.placement.apply = static_cast<Device>(in.ConsumeIntegralInRange<int>(-1, 3));
  o.mode = static_cast<PipelineMode>(in.ConsumeIntegralInRange<int>(-1, 2));
  o.micro_batches = in.ConsumeIntegral<int>();
  o.reuse = in.ConsumeIntegral<int>();
  o.deadline_ms = in.ConsumeBool() ? in.ConsumeFloatingPoint<double>() : 10.0;
  o.queue_capacity = in.ConsumeIntegral<int>();
  o.dead_after_failures = in.ConsumeIntegral<int>();
  o.policy.dense_layers = in.ConsumeIntegral<int>();
  o.policy.selection.budget_tokens = in.ConsumeIntegral<int>();
  o.policy.selection.num_sink_pages = in.ConsumeIntegral<int>();
  o.policy.selection.num_local_pages = in.ConsumeIntegral<int>();
  o.policy.selection.aggregation =
      static_cast<GroupAggregation>(in.ConsumeIntegralInRange<int>(-1, 2));
  o.apply_threads = in.ConsumeIntegral<int>();
  o.scale = in.ConsumeFloatingPoint<float>();
  if (ValidatePipelineOptions(o).ok()) {
    if (o.micro_batches < 1 || o.reuse < 1 || !(o.deadline_ms > 0) ||
        !std::isfinite(o.deadline_ms) || o.queue_capacity < 0 || o.dead_after_failures < 1 ||
        o.apply_threads < 1 || !(o.scale >= 0) || !std::isfinite(o.scale)) {
      std::abort();
    }
  }
  const int block_size = in.PickValueInArray({0, 16, 32, 64, 48});
  if (ValidateSparsityPolicy(o.policy, block_size).ok()) {
    if (ValidateSelectionConfig(o.policy.selection, block_size).ok() == false) std::abort();
  }
  (void)FirstSparseLayer(o.policy, in.ConsumeIntegralInRange<int>(0, 64));
}

}  // namespace
}  // namespace mempipe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  mempipe::fuzz::Run(in);
  return 0;
}
