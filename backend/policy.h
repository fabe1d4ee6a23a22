// mempipe backend: which layers and batches decode sparsely.
//
// Quest's policy: the first `dense_layers` layers always decode densely (their attention is
// too spread out for page selection to pay), and so does a batch whose sequences all fit the
// budget (selection would keep every page anyway). In a sparse batch, a sequence that fits
// the budget selects all of its pages (retriever/select.h), which equals dense attention.
//
//   SparsityPolicy policy{.dense_layers = 2, .selection = {.budget_tokens = 4096}};
//   if (DecodesSparse(policy, layer, seq_lens, num_seqs, block_size)) { ... }
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

// Checks dense_layers >= 0 and the selection config for `block_size`.
[[nodiscard]] absl::Status ValidateSparsityPolicy(const SparsityPolicy& policy, int block_size);

// True when `layer` decodes sparsely for a batch with these lengths.
//   seq_lens [num_seqs]
bool DecodesSparse(const SparsityPolicy& policy, int layer, const int32_t* seq_lens, int num_seqs);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_POLICY_H_
