#include "backend/policy.h"

#include "absl/strings/str_cat.h"

namespace mempipe {

absl::Status ValidateSparsityPolicy(const SparsityPolicy& policy, int block_size) {
  if (policy.dense_layers < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dense_layers must be >= 0, got ", policy.dense_layers));
  }
  return ValidateSelectionConfig(policy.selection, block_size);
}

bool DecodesSparse(const SparsityPolicy& policy, int layer, const int32_t* seq_lens, int num_seqs) {
  if (layer < policy.dense_layers) return false;
  for (int s = 0; s < num_seqs; ++s) {
    if (seq_lens[s] > policy.selection.budget_tokens) return true;
  }
  return false;
}

}  // namespace mempipe
