// mempipe backend: the decode benchmark driven through the stage pipeline (backend/
// decode_pipeline.h), for `mempipe-bench --placement ... --mode ...`.
//
// Same workload and timing conventions as RunPlacement (integration/bench/decode_bench.h): warm-up
// plus timed decode steps over every layer of a SyntheticContext, the first `dense_layers` dense.
// The differences: the placement may be any preset or explicit list, selection and decode run on
// their own threads (sync, or pipelined over micro-batches, or with selections reused), and the
// step time is the wall time of the KV append plus DecodePipeline::Step (stages overlap, so the
// per-step breakdown columns are busy times, not parts of a sum).
//
//   PipelineBenchOptions p;  p.placement = "fpga";  p.mode = PipelineMode::kPipelined;
//   p.micro_batches = 4;
//   MEMPIPE_ASSIGN_OR_RETURN(PipelinePlacementResult r, RunPipelinePlacement(ctx, opt, p, {}));
//   std::cout << r.metrics.ToText();
#ifndef MEMPIPE_INTEGRATION_BENCH_PIPELINE_BENCH_H_
#define MEMPIPE_INTEGRATION_BENCH_PIPELINE_BENCH_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "backend/decode_pipeline.h"
#include "backend/pipeline_metrics.h"
#include "integration/bench/decode_bench.h"
#include "integration/bench/synthetic_context.h"

namespace mempipe {

struct PipelineBenchOptions {
  std::string placement = "cpu";  // preset or step=device list (backend/placement.h)
  PipelineMode mode = PipelineMode::kSync;
  int micro_batches = 1;
  int reuse = 1;
  double deadline_ms = 1000;
};

struct PipelinePlacementResult {
  PlacementResult result;   // the row of the bench table; `placement` names spec and mode
  PipelineMetrics metrics;  // over the timed steps only
};

// One run of `mempipe-bench --pipelines`: "<placement>[:sync|:pipelined][:micro_batches=N]
// [:reuse=C]", parts left out taken from `defaults`. The placement may hold '=' and ','
// (prepare=..,apply=..) but no ':'. Errors (InvalidArgument, naming the run and the part): an
// empty placement, an unknown part, a value that is not an integer. Values are range-checked
// later, with the other pipeline options (ValidatePipelineOptions).
absl::StatusOr<PipelineBenchOptions> ParsePipelineRun(absl::string_view run,
                                                      const PipelineBenchOptions& defaults);

// Errors: a bad placement or pipeline option (InvalidArgument), a selector device this program
// has none for (Unimplemented), selector or decode failures that are not recoverable by
// fallback.
absl::StatusOr<PipelinePlacementResult> RunPipelinePlacement(SyntheticContext& ctx,
                                                             const BenchOptions& options,
                                                             const PipelineBenchOptions& pipeline,
                                                             const ProgressFn& progress);

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_PIPELINE_BENCH_H_
