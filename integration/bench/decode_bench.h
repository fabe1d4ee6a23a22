// mempipe backend: the decode benchmark behind `mempipe-bench`.
//
// Decodes `warmup + steps` tokens per sequence over every layer of a SyntheticContext for one
// placement and times the four steps separately:
//   prepare    digest update for the appended key (step 1; the bulk build after prefill is
//              reported on its own, once per request)
//   relevancy  Quest scores (step 2)          retrieval  top-k pages (step 3)
//   apply      decode attention, sparse or dense (step 4)
// plus `append` (the KV cache write every placement does). Placements: "dense" (no selection,
// every layer dense) and "cpu" (steps 1-4 on the CPU, sparse per SparsityPolicy).
//
//   SyntheticContext ctx(cfg);  MEMPIPE_RETURN_IF_ERROR(ctx.Prefill(nullptr));
//   MEMPIPE_ASSIGN_OR_RETURN(PlacementResult r, RunPlacement(ctx, options, "cpu", nullptr));
#ifndef MEMPIPE_INTEGRATION_BENCH_DECODE_BENCH_H_
#define MEMPIPE_INTEGRATION_BENCH_DECODE_BENCH_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "backend/apply_device.h"
#include "backend/policy.h"
#include "integration/bench/synthetic_context.h"

namespace mempipe {

struct BenchOptions {
  SparsityPolicy policy;
  int steps = 4;
  int warmup = 1;
  bool check_accuracy = true;  // compare sparse outputs with dense ones on the last step
  int threads = 1;             // host threads for CPU attention
  // Digests the selector stores and scans (retriever/digest.h). With kInt8 and check_accuracy,
  // the last step also selects with native digests (CPU reference) and reports the recall.
  DigestFormat digest_format = DigestFormat::kNative;
};

// Milliseconds per decode step (one token for every sequence), summed over layers.
struct StepBreakdown {
  double append_ms = 0;
  double prepare_ms = 0;
  double relevancy_ms = 0;
  double retrieval_ms = 0;
  double apply_ms = 0;
  // CPU time of all the process's threads during apply (wall time hides a shared machine's
  // other load; CPU time per thread does not): bytes / (apply_cpu_ms / threads) is the rate
  // the kernel reaches while it runs.
  double apply_cpu_ms = 0;
  // The same for steps 2+3 (relevancy and retrieval, Submit to Wait): the CPU time of all the
  // process's threads; for the host (cpu) selector, digest bytes / (select_cpu_ms / threads)
  // is the rate its scan reaches.
  double select_cpu_ms = 0;
  double Total() const { return append_ms + prepare_ms + relevancy_ms + retrieval_ms + apply_ms; }
  double MemoryProcessing() const { return prepare_ms + relevancy_ms + retrieval_ms; }
};

struct PlacementResult {
  std::string placement;
  std::string selector;              // device name reported by the selector, "" for dense
  std::string apply_device = "cpu";  // where step 4 ran: "cpu" (host) or the ApplyDevice's name
  StepBreakdown mean;                // mean over timed steps
  std::vector<double> step_ms;       // every timed step's total
  double median_step_ms = 0;
  double tokens_per_s = 0;             // batch / median step time
  double bulk_prepare_ms = 0;          // digest build after prefill (all layers)
  int sparse_layers = 0;               // layers that decoded sparsely on the last step
  double kv_bytes_per_step = 0;        // K/V bytes attention read on the last step
  double digest_bytes_per_step = 0;    // digest bytes scored on the last step
  std::optional<double> rel_l2_error;  // ||sparse - dense|| / ||dense|| on the last step
  // With check_accuracy, on the last step (integration/bench/selection_audit.h): recall of the
  // exact flat selection's middle pages, and the digest row pairs (page or super-page, KV head)
  // the selection's config scores, summed over sparse layers.
  std::optional<double> recall_vs_flat;
  double digest_rows_per_step = 0;
  double flat_digest_rows_per_step = 0;
  std::string digest_format = "native";  // of the selector's digests
  // Int8 digests, last step, sparse layers: of the middle pages (neither sink nor local) that
  // the native-digest selection picks, the fraction the int8 selection also picks.
  std::optional<double> digest_recall;
  // Set only when the selector's device is modeled (the emulated U55C): its modeled time and
  // energy for steps 1-3, per timed step (mean) and for the bulk digest build.
  std::optional<double> modeled_device_ms_per_step;
  std::optional<double> modeled_energy_mj_per_step;
  std::optional<double> modeled_bulk_prepare_ms;
};

// Checks the policy for the context's page size, steps > 0, warmup >= 0, and that the steps
// fit the context's room for new tokens.
[[nodiscard]] absl::Status ValidateBenchOptions(const BenchOptions& options,
                                                const SyntheticContextConfig& cfg);

// Fills the median step time, tokens/s and (when checked, over sparse layers) the relative L2
// error sqrt(err_num / err_den) from `result.step_ms` and the accumulated error sums.
void FinishPlacementResult(int batch, bool check_accuracy, double err_num, double err_den,
                           PlacementResult& result);

// Step 4's device for a placement: the registered GPU ApplyDevice (backend/apply_device.h) when
// the placement applies on the GPU or is the dense baseline and one is registered (a GPU build
// with a device: the baseline then decodes on the GPU too); null (the host decodes) otherwise.
absl::StatusOr<std::shared_ptr<ApplyDevice>> BenchApplyDevice(bool dense, Device apply);

using ProgressFn = std::function<void(int step, int total_steps, double step_ms)>;

// Runs one placement from the prompt state (the context is rewound first and after).
// Errors: an unknown placement (InvalidArgument), selector failures.
absl::StatusOr<PlacementResult> RunPlacement(SyntheticContext& ctx, const BenchOptions& options,
                                             absl::string_view placement,
                                             const ProgressFn& progress);

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_DECODE_BENCH_H_
