// mempipe backend: which layers and batches decode sparsely -- the one home of these rules,
// used by the stage pipeline (backend/decode_pipeline.h), the bench (integration/bench/) and
// Python (mempipe._mempipe.is_dense_layer, through bindings/module.cc).
//
// Quest's policy: the first `dense_layers` layers always decode densely (their attention is
// too spread out for page selection to pay), and so does a batch whose sequences all fit the
// budget (selection would keep every page anyway). In a sparse batch, a sequence that fits
// the budget selects all of its pages (retriever/select.h), which equals dense attention.
//
//   SparsityPolicy policy{.dense_layers = 2, .selection = {.budget_tokens = 4096}};
//   MEMPIPE_RETURN_IF_ERROR(ValidateSparsityPolicy(policy, block_size));
//   if (DecodesSparse(policy, layer, seq_lens, num_seqs)) { ... }
#ifndef MEMPIPE_BACKEND_POLICY_H_
#define MEMPIPE_BACKEND_POLICY_H_

#include <cstdint>

#include "absl/status/status.h"
#include "retriever/select.h"

namespace mempipe {

struct SparsityPolicy {
  int dense_layers = 2;
  SelectionConfig selection;
};

// Checks dense_layers >= 0 (InvalidArgument naming the value).
[[nodiscard]] absl::Status ValidateDenseLayers(int dense_layers);

// Checks dense_layers >= 0 and the selection config for `block_size`.
[[nodiscard]] absl::Status ValidateSparsityPolicy(const SparsityPolicy& policy, int block_size);

// The dense-layers rule: true when `layer` always decodes densely.
bool IsDenseLayer(const SparsityPolicy& policy, int layer);

// The first layer of `num_layers` that may decode sparsely (num_layers when none does).
int FirstSparseLayer(const SparsityPolicy& policy, int num_layers);

// The short-batch rule: true when some sequence is longer than the budget, so selection can
// drop pages. seq_lens [num_seqs]
bool NeedsSelection(const SparsityPolicy& policy, const int32_t* seq_lens, int num_seqs);

// Both rules: true when `layer` decodes sparsely for a batch with these lengths.
bool DecodesSparse(const SparsityPolicy& policy, int layer, const int32_t* seq_lens, int num_seqs);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_POLICY_H_
