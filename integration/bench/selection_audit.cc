#include "integration/bench/selection_audit.h"

#include <algorithm>

#include "core/status_macros.h"
#include "retriever/digest.h"
#include "retriever/hierarchical.h"

namespace mempipe {

absl::Status AuditSelection(const QueryView& query, const KvCacheView& cache,
                            const BlockTableView& table, const SelectionConfig& config,
                            const SelectionView& selection, DigestFormat format,
                            std::vector<uint8_t>& scratch, SelectionAudit& audit) {
  const DigestView dv0{nullptr, cache.dtype, cache.num_blocks, cache.num_kv_heads, cache.head_dim};
  scratch.resize(dv0.NumBytes());
  DigestView dv = dv0;
  dv.data = scratch.data();
  MEMPIPE_RETURN_IF_ERROR(BuildDigests(cache, table, dv));
  SelectionConfig flat = config;
  flat.hierarchy = PageHierarchy{};
  const int k = config.PagesPerHead(cache.block_size);
  const size_t rows = static_cast<size_t>(table.num_seqs) * cache.num_kv_heads;
  std::vector<int32_t> pages(rows * k), counts(rows);
  const SelectionView exact{pages.data(), counts.data(), table.num_seqs, cache.num_kv_heads, k};
  MEMPIPE_RETURN_IF_ERROR(ScoreAndSelect(query, cache, dv, table, flat, exact));
  for (int s = 0; s < table.num_seqs; ++s) {
    const int n = NumPages(table.seq_lens[s], cache.block_size);
    audit.flat_digest_rows += static_cast<double>(n) * cache.num_kv_heads;
    if (n <= k) continue;
    const int lo = config.num_sink_pages, hi = n - config.num_local_pages;
    for (int h = 0; h < cache.num_kv_heads; ++h) {
      const int32_t* f = exact.Row(s, h);
      const int32_t* a = selection.Row(s, h);
      const int32_t* a_end = a + selection.Count(s, h);
      for (int i = 0; i < exact.Count(s, h); ++i) {
        if (f[i] < lo || f[i] >= hi) continue;
        audit.flat_middle += 1;
        if (std::binary_search(a, a_end, f[i])) audit.hits += 1;
      }
    }
  }
  if (config.hierarchy.Flat()) {
    double scanned = 0;
    for (int s = 0; s < table.num_seqs; ++s) {
      scanned += static_cast<double>(NumPages(table.seq_lens[s], cache.block_size));
    }
    audit.digest_rows += scanned * cache.num_kv_heads;
    return absl::OkStatus();
  }
  const int f = config.hierarchy.pages_per_super_page;
  std::vector<uint8_t> codes, exact_rows;
  std::vector<float> scales;
  DigestView pv = dv;
  if (format == DigestFormat::kInt8) {
    pv.format = DigestFormat::kInt8;
    codes.resize(pv.NumBytes());
    scales.resize(pv.ScaleBytes() / sizeof(float));
    exact_rows.resize(pv.ExactBytes());
    pv.data = codes.data();
    pv.scales = scales.data();
    pv.exact = exact_rows.data();
    MEMPIPE_RETURN_IF_ERROR(BuildDigests(cache, table, pv));
  }
  const SuperDigestBuffers super(pv, f);
  MEMPIPE_RETURN_IF_ERROR(BuildSuperDigests(pv, table, cache.block_size, f, super.view()));
  HierarchyStats stats;
  MEMPIPE_RETURN_IF_ERROR(
      SelectHierarchical(query, cache, pv, super.view(), table, config, exact, &stats));
  audit.digest_rows += static_cast<double>(stats.super_rows_scored + stats.page_rows_scored);
  return absl::OkStatus();
}

}  // namespace mempipe
