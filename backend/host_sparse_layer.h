// mempipe backend: a sparse decode layer on the host in one parallel call (steps 2, 3 and 4).
//
// The cpu placement's sparse layer is a scan of the digests, a top-k per (sequence, KV head)
// and attention over the selected pages. Run apart they are three parallel calls on the host
// threads, each with its fixed cost (waking the threads, waiting for the last). Here rows are
// selected where their scan ends (ScoreAndSelectThen) and attended right there (SparseDecodeRows),
// so the layer is one call: with no more threads than rows each thread scans, selects and attends
// its own range of rows (the attention's prefetch running on from row to row, as SparseDecode's
// does); with more, each row's pages are scanned in chunks and whichever thread finishes its last
// chunk selects and attends it. Selection and output are bit-identical to ScoreAndSelect followed
// by SparseDecode.
//
//   SelectionConfig config;  // flat; budget 512 tokens
//   MEMPIPE_RETURN_IF_ERROR(HostSparseLayer(io, cache, digests, table, config, sel, scale));
//
// Where a row can select more than one decode chunk of pages (budget > kDecodeChunkTokens,
// rounded to pages) or the config is hierarchical, it runs ScoreAndSelect and then SparseDecode:
// SparseDecode splits long rows over the threads, which one row per thread cannot.
#ifndef MEMPIPE_BACKEND_HOST_SPARSE_LAYER_H_
#define MEMPIPE_BACKEND_HOST_SPARSE_LAYER_H_

#include "absl/status/status.h"
#include "attention/decode.h"
#include "core/paged_kv.h"
#include "retriever/digest.h"
#include "retriever/select.h"

namespace mempipe {

// True where HostSparseLayer runs as one call: a flat config whose pages per head fit in one
// decode chunk.
bool HostSparseLayerFused(const SelectionConfig& config, int block_size);

// Selects into `out` (as ScoreAndSelect, on io.num_threads host threads) and writes io.out (as
// SparseDecode over that selection). Errors: those of ScoreAndSelect and SparseDecode, naming the
// bad value; io.query is the selection's query.
[[nodiscard]] absl::Status HostSparseLayer(const DecodeIo& io, const KvCacheView& cache,
                                           const DigestView& digests, const BlockTableView& table,
                                           const SelectionConfig& config, const SelectionView& out,
                                           float scale);

}  // namespace mempipe

#endif  // MEMPIPE_BACKEND_HOST_SPARSE_LAYER_H_
