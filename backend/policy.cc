#include "backend/policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace mempipe {

absl::Status ValidateDenseLayers(int dense_layers) {
  if (dense_layers < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dense_layers must be >= 0, got ", dense_layers));
  }
  return absl::OkStatus();
}

absl::Status ValidateSparsityPolicy(const SparsityPolicy& policy, int block_size) {
  MEMPIPE_RETURN_IF_ERROR(ValidateDenseLayers(policy.dense_layers));
  return ValidateSelectionConfig(policy.selection, block_size);
}

bool IsDenseLayer(const SparsityPolicy& policy, int layer) { return layer < policy.dense_layers; }

int FirstSparseLayer(const SparsityPolicy& policy, int num_layers) {
  return std::clamp(policy.dense_layers, 0, std::max(num_layers, 0));
}

bool NeedsSelection(const SparsityPolicy& policy, const int32_t* seq_lens, int num_seqs) {
  for (int s = 0; s < num_seqs; ++s) {
    if (seq_lens[s] > policy.selection.budget_tokens) return true;
  }
  return false;
}

bool DecodesSparse(const SparsityPolicy& policy, int layer, const int32_t* seq_lens, int num_seqs) {
  return !IsDenseLayer(policy, layer) && NeedsSelection(policy, seq_lens, num_seqs);
}

}  // namespace mempipe
