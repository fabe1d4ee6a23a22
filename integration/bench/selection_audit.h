// mempipe bench: what a selection read and how close it is to the exact flat selection.
//
// On the last decode step mempipe-bench audits every sparse layer's selection against the exact
// flat selection over native digests (retriever/select.h), both recomputed here on the host:
//   recall   = sum over (sequence, KV head) rows of |S ∩ F| / sum of |F|, over the middle pages
//              only (the sink and local pages both always keep) and rows with more pages than
//              the budget (shorter rows select every page);
//   digest rows scanned = page digests scored (flat: every page), or for a hierarchical config
//              the super-page plus page digests its two passes scored (retriever/hierarchical.h).
//
//   SelectionAudit audit;
//   MEMPIPE_RETURN_IF_ERROR(AuditSelection(query, cache, table, config, selection, scratch,
//   audit)); audit.Recall();
#ifndef MEMPIPE_INTEGRATION_BENCH_SELECTION_AUDIT_H_
#define MEMPIPE_INTEGRATION_BENCH_SELECTION_AUDIT_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/relevancy.h"
#include "retriever/select.h"

namespace mempipe {

struct SelectionAudit {
  double flat_middle = 0;  // middle pages the exact flat selection keeps
  double hits = 0;         // ... that the audited selection keeps too
  double digest_rows = 0;  // (page or super-page, KV head) digest row pairs scored
  double flat_digest_rows = 0;

  double Recall() const { return flat_middle > 0 ? hits / flat_middle : 1.0; }
};

// Adds one layer: rebuilds the layer's native page digests from `cache` into `scratch`, selects
// flat with `config` (its hierarchy dropped), compares with `selection`, and counts the rows
// `config` scans with digests of `format` (running the two-level reference, on digests of that
// format, when it is hierarchical). Errors: those of
// BuildDigests, ScoreAndSelect and SelectHierarchical.
[[nodiscard]] absl::Status AuditSelection(const QueryView& query, const KvCacheView& cache,
                                          const BlockTableView& table,
                                          const SelectionConfig& config,
                                          const SelectionView& selection, DigestFormat format,
                                          std::vector<uint8_t>& scratch, SelectionAudit& audit);

}  // namespace mempipe

#endif  // MEMPIPE_INTEGRATION_BENCH_SELECTION_AUDIT_H_
