// DecodePipeline against the CPU reference (ScoreAndSelect + SparseDecode over a plain loop),
// bit for bit, in every mode, under random delays and injected faults: every request completes
// exactly once, in layer order per micro-batch, with the reference's selection and output.
//
// Data are drawn fresh per run (the seed is printed); unused cache slots hold NaN so a stray
// read poisons the output, and outputs start as NaN so an unwritten one shows.
#include "backend/decode_pipeline.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

#include "attention/decode.h"
#include "backend/selector_registry.h"
#include "core/status_macros.h"
#include "gtest/gtest.h"
#include "retriever/digest.h"
#include "retriever/select.h"
#include "tests/testing/fault_injecting_selector.h"
#include "tests/testing/paged_fixture.h"

namespace mempipe {
namespace {

// Fresh per run, printed; MEMPIPE_TEST_SEED=<n> replays a run.
uint64_t FreshSeed() { return testing::TestSeed(); }

struct Geometry {
  DType dtype = DType::kFloat32;
  int layers = 3;
  int num_seqs = 6;
  int kv_heads = 2;
  int heads = 4;
  int head_dim = 64;
  int block_size = 16;
  int min_len = 20;
  int max_len = 260;
  int steps = 4;
};

// A batch of sequences with paged caches for every layer, grown one token per step, and the
// reference selections/outputs computed independently of the pipeline.
class Harness {
 public:
  Harness(const Geometry& g, uint64_t seed) : g_(g), rng_(seed) {
    max_blocks_ = (g.max_len + g.steps) / g.block_size + 2;
    num_blocks_ = g.num_seqs * max_blocks_ + 3;  // a few blocks no sequence uses
    std::vector<int32_t> physical(num_blocks_);
    std::iota(physical.begin(), physical.end(), 0);
    std::shuffle(physical.begin(), physical.end(), rng_);
    table_.assign(static_cast<size_t>(g.num_seqs) * max_blocks_, -1);
    for (int s = 0; s < g.num_seqs; ++s) {
      for (int p = 0; p < max_blocks_; ++p)
        table_[s * max_blocks_ + p] = physical[s * max_blocks_ + p];
      lens_.push_back(std::uniform_int_distribution<int>(g.min_len, g.max_len)(rng_));
    }
    for (int l = 0; l < g.layers; ++l) {
      KvCacheView c{nullptr, g.dtype, num_blocks_, g.block_size, g.kv_heads, g.head_dim};
      cache_bytes_.emplace_back(c.NumBytes());
      c.data = cache_bytes_.back().data();
      for (size_t i = 0; i < c.NumElems(); ++i) {
        StoreFromFloat(c.data, g.dtype, i, std::numeric_limits<float>::quiet_NaN());
      }
      caches_.push_back(c);
      DigestView d{nullptr, g.dtype, num_blocks_, g.kv_heads, g.head_dim};
      digest_bytes_.emplace_back(d.NumBytes(), 0);
      ref_pages_.emplace_back();
      ref_counts_.emplace_back();
    }
    // Prefill: every token of every sequence written at its slot.
    for (int s = 0; s < g.num_seqs; ++s) {
      for (int t = 0; t < lens_[s]; ++t) WriteToken(s, t, nullptr);
    }
    for (int l = 0; l < g.layers; ++l) {
      EXPECT_TRUE(BuildDigests(caches_[l], Table(), RefDigests(l)).ok());
    }
  }

  BlockTableView Table() const {
    return BlockTableView{table_.data(), lens_.data(), g_.num_seqs, max_blocks_};
  }
  const std::vector<KvCacheView>& caches() const { return caches_; }
  int max_num_seqs() const { return g_.num_seqs; }

  // Appends one token to every sequence (all layers), draws queries, and fills `in`.
  void NextStep(StepInputs& in) {
    const size_t elem = DTypeSize(g_.dtype);
    const size_t key_row = static_cast<size_t>(g_.kv_heads) * g_.head_dim;
    slots_.assign(g_.num_seqs, -1);
    new_keys_.assign(g_.layers, std::vector<uint8_t>(g_.num_seqs * key_row * elem));
    for (int s = 0; s < g_.num_seqs; ++s) {
      const int t = lens_[s]++;
      slots_[s] =
          static_cast<int64_t>(table_[s * max_blocks_ + t / g_.block_size]) * g_.block_size +
          t % g_.block_size;
      WriteToken(s, t, &new_keys_);
    }
    // One sequence sometimes has no new token this step (a negative slot is skipped).
    if (g_.num_seqs > 2 && rng_() % 3 == 0) {
      const int s = static_cast<int>(rng_() % g_.num_seqs);
      // Undo its append: the token was written, but the sequence does not count it and the
      // slot is skipped, so neither side's digest may see it; restore NaN and the length.
      --lens_[s];
      for (int l = 0; l < g_.layers; ++l) {
        for (int kv = 0; kv < 2; ++kv) {
          const size_t off = caches_[l].Offset(kv, static_cast<int>(slots_[s] / g_.block_size),
                                               static_cast<int>(slots_[s] % g_.block_size), 0);
          for (size_t i = 0; i < key_row; ++i) {
            StoreFromFloat(caches_[l].data, g_.dtype, off + i,
                           std::numeric_limits<float>::quiet_NaN());
          }
        }
      }
      slots_[s] = -1;
    }
    const size_t q_elems = static_cast<size_t>(g_.num_seqs) * g_.heads * g_.head_dim;
    queries_.assign(g_.layers, std::vector<uint8_t>(q_elems * elem));
    outputs_.assign(g_.layers, std::vector<uint8_t>(q_elems * elem));
    for (int l = 0; l < g_.layers; ++l) {
      for (size_t i = 0; i < q_elems; ++i) {
        StoreFromFloat(queries_[l].data(), g_.dtype, i, Normal());
        StoreFromFloat(outputs_[l].data(), g_.dtype, i, std::numeric_limits<float>::quiet_NaN());
      }
    }
    in = StepInputs{};
    in.table = Table();
    in.new_slots = slots_.data();
    for (int l = 0; l < g_.layers; ++l) {
      in.new_keys.push_back(new_keys_[l].data());
      in.queries.push_back(queries_[l].data());
      in.outputs.push_back(outputs_[l].data());
    }
  }

  // The reference for the step just drawn: digests updated from the cache, a fresh selection
  // (or the previous one extended to the last page), sparse decode over the whole batch.
  void Reference(bool fresh, const SelectionConfig& config, int max_selected, float scale) {
    ref_out_.assign(g_.layers, {});
    for (int l = 0; l < g_.layers; ++l) {
      ASSERT_TRUE(UpdateDigests(caches_[l], slots_.data(), g_.num_seqs, RefDigests(l)).ok());
      const int rows = g_.num_seqs * g_.kv_heads;
      SelectionView sel{nullptr, nullptr, g_.num_seqs, g_.kv_heads, max_selected};
      if (fresh) {
        ref_pages_[l].assign(static_cast<size_t>(rows) * max_selected, -1);
        ref_counts_[l].assign(rows, 0);
      }
      sel.pages = ref_pages_[l].data();
      sel.counts = ref_counts_[l].data();
      const QueryView q{queries_[l].data(), g_.dtype, g_.num_seqs, g_.heads, g_.head_dim};
      if (fresh) {
        ASSERT_TRUE(ScoreAndSelect(q, caches_[l], RefDigests(l), Table(), config, sel).ok());
      } else {
        for (int s = 0; s < g_.num_seqs; ++s) {
          const int last = NumPages(lens_[s], g_.block_size) - 1;
          for (int h = 0; h < g_.kv_heads; ++h) {
            int32_t& n = sel.Count(s, h);
            for (int p = sel.Row(s, h)[n - 1] + 1; p <= last; ++p) sel.Row(s, h)[n++] = p;
          }
        }
      }
      ref_out_[l].assign(outputs_[l].size(), 0);
      const DecodeIo io{queries_[l].data(), ref_out_[l].data(), g_.dtype,
                        g_.num_seqs,        g_.heads,           g_.head_dim};
      ASSERT_TRUE(SparseDecode(io, caches_[l], Table(),
                               PageList{sel.pages, sel.counts, g_.kv_heads, max_selected}, scale)
                      .ok());
    }
  }

  void DenseReference(float scale) {
    ref_out_.assign(g_.layers, {});
    for (int l = 0; l < g_.layers; ++l) {
      ref_out_[l].assign(outputs_[l].size(), 0);
      const DecodeIo io{queries_[l].data(), ref_out_[l].data(), g_.dtype,
                        g_.num_seqs,        g_.heads,           g_.head_dim};
      ASSERT_TRUE(DenseDecode(io, caches_[l], Table(), scale).ok());
    }
  }

  // Outputs bit-identical to the reference; selections (valid entries and counts) too.
  void ExpectMatches(const DecodePipeline* pipe) {
    for (int l = 0; l < g_.layers; ++l) {
      EXPECT_EQ(std::memcmp(outputs_[l].data(), ref_out_[l].data(), outputs_[l].size()), 0)
          << "layer " << l << " output differs from the reference";
      if (pipe == nullptr) continue;
      absl::StatusOr<SelectionView> sel = pipe->LastSelection(l);
      ASSERT_TRUE(sel.ok()) << sel.status();
      for (int s = 0; s < g_.num_seqs; ++s) {
        for (int h = 0; h < g_.kv_heads; ++h) {
          const int32_t n = ref_counts_[l][s * g_.kv_heads + h];
          ASSERT_EQ(sel->Count(s, h), n) << "layer " << l << " seq " << s << " head " << h;
          const int32_t* ref =
              ref_pages_[l].data() + (static_cast<size_t>(s) * g_.kv_heads + h) * sel->max_selected;
          for (int i = 0; i < n; ++i) {
            ASSERT_EQ(sel->Row(s, h)[i], ref[i]) << "layer " << l << " seq " << s;
          }
        }
      }
    }
  }

  const std::vector<std::vector<uint8_t>>& outputs() const { return outputs_; }

 private:
  float Normal() { return std::normal_distribution<float>(0.f, 1.f)(rng_); }

  DigestView RefDigests(int l) {
    return DigestView{digest_bytes_[l].data(), g_.dtype, num_blocks_, g_.kv_heads, g_.head_dim};
  }

  // Random key and value of token t of sequence s in every layer; keys also into `keys_out`.
  void WriteToken(int s, int t, std::vector<std::vector<uint8_t>>* keys_out) {
    const size_t row = static_cast<size_t>(g_.kv_heads) * g_.head_dim;
    const size_t elem = DTypeSize(g_.dtype);
    std::vector<uint8_t> k(row * elem), v(row * elem);
    const int64_t slot =
        static_cast<int64_t>(table_[s * max_blocks_ + t / g_.block_size]) * g_.block_size +
        t % g_.block_size;
    for (int l = 0; l < g_.layers; ++l) {
      for (size_t i = 0; i < row; ++i) {
        // Per-channel offsets make some pages clearly more relevant than others.
        StoreFromFloat(k.data(), g_.dtype, i, Normal() + ((t / g_.block_size) % 5 == 2 ? 1.5f : 0));
        StoreFromFloat(v.data(), g_.dtype, i, Normal());
      }
      ASSERT_TRUE(WriteKv(caches_[l], &slot, 1, k.data(), v.data()).ok());
      if (keys_out) std::memcpy((*keys_out)[l].data() + s * row * elem, k.data(), row * elem);
    }
  }

  Geometry g_;
  std::mt19937_64 rng_;
  int max_blocks_ = 0;
  int num_blocks_ = 0;
  std::vector<int32_t> table_, lens_;
  std::vector<std::vector<uint8_t>> cache_bytes_, digest_bytes_;
  std::vector<KvCacheView> caches_;
  std::vector<int64_t> slots_;
  std::vector<std::vector<uint8_t>> new_keys_, queries_, outputs_, ref_out_;
  std::vector<std::vector<int32_t>> ref_pages_, ref_counts_;
};

// Checks exactly-once, in-order completion per step from the observer's records.
class CompletionLog {
 public:
  void Attach(DecodePipeline& pipe) {
    pipe.SetObserver([this](const RequestRecord& r) {
      EXPECT_TRUE(r.status.ok()) << r.status;
      const auto key = std::make_tuple(r.step, r.micro_batch, r.layer);
      EXPECT_TRUE(seen_.insert(key).second) << "duplicate (step " << r.step << ", mb "
                                            << r.micro_batch << ", layer " << r.layer << ")";
      int& next = next_layer_[{r.step, r.micro_batch}];
      EXPECT_EQ(r.layer, next) << "layer order broken in micro-batch " << r.micro_batch;
      next = r.layer + 1;
      ++by_source_[r.source];
      if (r.source == SelectionSource::kFallback) ++by_reason_[r.fallback];
    });
  }
  // Every (step, micro-batch, layer) of `steps` steps seen exactly once.
  void ExpectComplete(uint64_t steps, int micro_batches, int layers) const {
    EXPECT_EQ(seen_.size(), steps * micro_batches * layers);
    for (uint64_t s = 0; s < steps; ++s) {
      for (int m = 0; m < micro_batches; ++m) {
        for (int l = 0; l < layers; ++l) {
          EXPECT_TRUE(seen_.count({s, m, l}))
              << "lost (step " << s << ", mb " << m << ", layer " << l << ")";
        }
      }
    }
  }
  int count(SelectionSource s) const {
    auto it = by_source_.find(s);
    return it == by_source_.end() ? 0 : it->second;
  }
  int count(FallbackReason r) const {
    auto it = by_reason_.find(r);
    return it == by_reason_.end() ? 0 : it->second;
  }

 private:
  std::set<std::tuple<uint64_t, int, int>> seen_;
  std::map<std::pair<uint64_t, int>, int> next_layer_;
  std::map<SelectionSource, int> by_source_;
  std::map<FallbackReason, int> by_reason_;
};

PipelineOptions Options(absl::string_view placement, PipelineMode mode, int micro_batches,
                        int reuse = 1) {
  PipelineOptions o;
  o.placement = *ParsePlacement(placement);
  o.mode = mode;
  o.micro_batches = micro_batches;
  o.reuse = reuse;
  o.policy.selection.budget_tokens = 64;  // 4 pages of 16: most sequences need a real choice
  o.policy.selection.num_sink_pages = 1;
  o.policy.selection.num_local_pages = 1;
  o.deadline_ms = 1000;
  return o;
}

float ScaleOf(const Geometry& g) { return 1.0f / std::sqrt(static_cast<float>(g.head_dim)); }

// Runs `g.steps` steps and checks each against the reference.
void RunAndCheck(Harness& h, DecodePipeline& pipe, const PipelineOptions& o, const Geometry& g) {
  ASSERT_TRUE(pipe.Prefill(h.Table()).ok());
  for (int step = 0; step < g.steps; ++step) {
    StepInputs in;
    h.NextStep(in);
    const absl::Status st = pipe.Step(in);
    ASSERT_TRUE(st.ok()) << st;
    if (o.placement.dense) {
      h.DenseReference(ScaleOf(g));
      h.ExpectMatches(nullptr);
    } else {
      h.Reference(step % o.reuse == 0, o.policy.selection, pipe.max_selected(), ScaleOf(g));
      h.ExpectMatches(&pipe);
    }
  }
}

std::unique_ptr<DecodePipeline> MakePipeline(const Harness& h, const PipelineOptions& o,
                                             const Geometry& g,
                                             std::unique_ptr<PageSelector> selector) {
  absl::StatusOr<std::unique_ptr<DecodePipeline>> pipe =
      DecodePipeline::Create(o, h.caches(), g.heads, h.max_num_seqs(), std::move(selector));
  EXPECT_TRUE(pipe.ok()) << pipe.status();
  return pipe.ok() ? std::move(*pipe) : nullptr;
}

TEST(DecodePipeline, SyncCpuMatchesReference) {
  const Geometry g;
  Harness h(g, FreshSeed());
  const PipelineOptions o = Options("cpu", PipelineMode::kSync, 1);
  auto pipe = MakePipeline(h, o, g, std::make_unique<CpuPageSelector>());
  ASSERT_NE(pipe, nullptr);
  CompletionLog log;
  log.Attach(*pipe);
  RunAndCheck(h, *pipe, o, g);
  log.ExpectComplete(g.steps, 1, g.layers);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_EQ(m.requests, static_cast<uint64_t>(g.steps * g.layers));
  EXPECT_EQ(m.selections_by_selector, m.requests);
  EXPECT_EQ(m.fallbacks, 0u);
  EXPECT_EQ(m.bytes_to_selector, 0u);  // the selector sits on the apply device
  EXPECT_EQ(m.select.count(), m.requests);
  EXPECT_EQ(m.apply.count(), m.requests);
}

TEST(DecodePipeline, DenseMatchesDenseDecode) {
  Geometry g;
  g.dtype = DType::kBFloat16;
  Harness h(g, FreshSeed());
  const PipelineOptions o = Options("dense", PipelineMode::kPipelined, 3);
  auto pipe = MakePipeline(h, o, g, nullptr);
  ASSERT_NE(pipe, nullptr);
  RunAndCheck(h, *pipe, o, g);
  EXPECT_EQ(pipe->Metrics().selections_fresh, 0u);
  EXPECT_FALSE(pipe->LastSelection(0).ok());
}

TEST(DecodePipeline, PipelinedOverlapsAPacedSelectorAndAccountsTransfers) {
  Geometry g;
  g.num_seqs = 8;
  g.dtype = DType::kBFloat16;
  // Long sequences and a large budget make each micro-batch's decode take a while, so it
  // visibly runs during the selector's paced waits even on a busy machine.
  g.layers = 2;
  g.steps = 3;
  g.min_len = 300;
  g.max_len = 400;
  Harness h(g, FreshSeed());
  PipelineOptions o = Options("fpga", PipelineMode::kPipelined, 4);
  o.policy.selection.budget_tokens = 256;
  FaultInjectionOptions f;
  f.delay_ms = 2;
  f.report_delay_as_modeled = true;
  auto pipe = MakePipeline(h, o, g, std::make_unique<FaultInjectingSelector>(f));
  ASSERT_NE(pipe, nullptr);
  CompletionLog log;
  log.Attach(*pipe);
  RunAndCheck(h, *pipe, o, g);
  log.ExpectComplete(g.steps, 4, g.layers);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_EQ(m.fallbacks, 0u);
  EXPECT_GT(m.overlap_ms, 0.0) << m.ToText();
  std::printf("%s", m.ToText().c_str());
  EXPECT_GT(m.HiddenFraction(), 0.0);
  EXPECT_LE(m.overlap_ms, std::min(m.selector_busy_ms, m.apply_busy_ms) + 1e-9);
  EXPECT_GE(m.select.min_ms(), 2.0);  // paced
  EXPECT_EQ(m.modeled_calls, m.requests);
  EXPECT_NEAR(m.modeled_device_ms, 2.0 * m.requests, 1e-9);
  // fpga -> apply: queries, table rows, lengths, keys and slots out; pages and counts back.
  EXPECT_GT(m.bytes_to_selector, 0u);
  EXPECT_GT(m.bytes_from_selector, 0u);
  EXPECT_GT(m.modeled_transfer_ms, 0.0);
  EXPECT_NE(m.apply_device.find("asked gpu"), std::string::npos);
  const std::string json = m.ToJson();
  for (const char* key : {"\"hidden_fraction\"", "\"fallbacks\"", "\"to_selector\"",
                          "\"bytes_to_selector\"", "\"modeled_device\"", "\"select\""}) {
    EXPECT_NE(json.find(key), std::string::npos) << key;
  }
  EXPECT_NE(m.ToText().find("hidden behind decoding"), std::string::npos);
}

TEST(DecodePipeline, ReuseServesSeveralStepsAndExtendsToNewPages) {
  Geometry g;
  g.steps = 7;
  // Short sequences near page boundaries, so reused selections must grow.
  g.min_len = 14;
  g.max_len = 90;
  Harness h(g, FreshSeed());
  const PipelineOptions o = Options("cpu", PipelineMode::kPipelined, 2, /*reuse=*/3);
  auto pipe = MakePipeline(h, o, g, std::make_unique<CpuPageSelector>());
  ASSERT_NE(pipe, nullptr);
  RunAndCheck(h, *pipe, o, g);
  const PipelineMetrics m = pipe->Metrics();
  // Steps 0, 3, 6 fresh; 1, 2, 4, 5 reused.
  EXPECT_EQ(m.selections_fresh, 3u * 2 * g.layers);
  EXPECT_EQ(m.selections_reused, 4u * 2 * g.layers);
  EXPECT_EQ(pipe->max_selected(), 64 / 16 + 2);
}

TEST(DecodePipeline, StressRandomDelaysErrorsAndTimeouts) {
  Geometry g;
  g.layers = 6;
  g.num_seqs = 12;
  g.steps = 4;
  const uint64_t seed = FreshSeed();
  Harness h(g, seed);
  PipelineOptions o =
      Options("prepare=fpga,relevancy=fpga,retrieval=fpga,apply=cpu", PipelineMode::kPipelined, 6);
  o.deadline_ms = 3;
  o.dead_after_failures = 1000;  // faults here are transient
  FaultInjectionOptions f;
  f.jitter_ms = 0.4;
  f.error_probability = 0.1;
  f.stall_probability = 0.1;
  f.seed = seed;
  auto pipe = MakePipeline(h, o, g, std::make_unique<FaultInjectingSelector>(f));
  ASSERT_NE(pipe, nullptr);
  CompletionLog log;
  log.Attach(*pipe);
  RunAndCheck(h, *pipe, o, g);
  log.ExpectComplete(g.steps, 6, g.layers);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_GT(m.fallbacks, 0u);
  EXPECT_GT(m.fallbacks_timeout, 0u);
  EXPECT_GT(m.fallbacks_error, 0u);
  EXPECT_EQ(m.fallbacks,
            m.fallbacks_timeout + m.fallbacks_error + m.fallbacks_dead + m.fallbacks_expired);
  EXPECT_EQ(m.selections_by_selector + m.fallbacks, m.selections_fresh);
  EXPECT_EQ(static_cast<int>(m.fallbacks), log.count(SelectionSource::kFallback));
  EXPECT_EQ(m.fallback.count(), m.fallbacks);
  EXPECT_FALSE(m.selector_dead);
}

class DeathTest : public ::testing::TestWithParam<bool> {};

TEST_P(DeathTest, DeviceThatDiesMidRunIsReplaced) {
  const bool hangs = GetParam();
  Geometry g;
  g.layers = 4;
  g.steps = 4;
  const uint64_t seed = FreshSeed();
  Harness h(g, seed);
  PipelineOptions o = Options("fpga", PipelineMode::kPipelined, 3);
  o.deadline_ms = 100;
  o.dead_after_failures = 2;
  FaultInjectionOptions f;
  f.jitter_ms = 0.2;
  f.die_after_requests = 10;  // in the first step's layers
  f.death_hangs = hangs;
  f.seed = seed;
  auto pipe = MakePipeline(h, o, g, std::make_unique<FaultInjectingSelector>(f));
  ASSERT_NE(pipe, nullptr);
  CompletionLog log;
  log.Attach(*pipe);
  RunAndCheck(h, *pipe, o, g);
  log.ExpectComplete(g.steps, 3, g.layers);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_TRUE(m.selector_dead);
  EXPECT_FALSE(m.selector_death_reason.empty());
  EXPECT_EQ(m.selections_by_selector, 10u);
  EXPECT_EQ(m.fallbacks, m.selections_fresh - 10);
  // Two failures declare it dead (the first digest update after death may do it at once);
  // from then on requests skip it.
  EXPECT_GT(m.fallbacks_dead, 0u);
  EXPECT_LE(m.fallbacks_timeout + m.fallbacks_error, 2u);
}

INSTANTIATE_TEST_SUITE_P(FailFastOrHang, DeathTest, ::testing::Bool());

TEST(DecodePipeline, FullQueuesApplyBackPressureAndLoseNothing) {
  Geometry g;
  g.layers = 4;
  g.num_seqs = 12;
  g.steps = 3;
  const uint64_t seed = FreshSeed();
  Harness h(g, seed);
  PipelineOptions o =
      Options("prepare=fpga,relevancy=fpga,retrieval=fpga,apply=cpu", PipelineMode::kPipelined, 6);
  o.queue_capacity = 1;
  FaultInjectionOptions f;
  f.delay_ms = 0.3;
  f.jitter_ms = 0.3;
  f.seed = seed;
  auto pipe = MakePipeline(h, o, g, std::make_unique<FaultInjectingSelector>(f));
  ASSERT_NE(pipe, nullptr);
  CompletionLog log;
  log.Attach(*pipe);
  RunAndCheck(h, *pipe, o, g);
  log.ExpectComplete(g.steps, 6, g.layers);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_GT(m.to_selector.full_events, 0u);
  EXPECT_LE(m.to_selector.max_depth, 1u);
  EXPECT_LE(m.to_apply.max_depth, 1u);
  EXPECT_EQ(m.to_selector.pushes, m.requests);
}

TEST(DecodePipeline, SelectionsDoNotDependOnTiming) {
  Geometry g;
  g.layers = 4;
  g.num_seqs = 8;
  g.steps = 3;
  const uint64_t seed = FreshSeed();
  // Two identical batches; one pipeline calm, one with random delays and faults.
  Harness calm(g, seed), noisy(g, seed);
  PipelineOptions o = Options("fpga", PipelineMode::kPipelined, 4);
  o.deadline_ms = 2;
  o.dead_after_failures = 1000;
  auto a = MakePipeline(calm, Options("cpu", PipelineMode::kSync, 1), g,
                        std::make_unique<CpuPageSelector>());
  FaultInjectionOptions f;
  f.jitter_ms = 1.0;
  f.error_probability = 0.2;
  f.stall_probability = 0.2;
  f.seed = seed + 1;
  auto b = MakePipeline(noisy, o, g, std::make_unique<FaultInjectingSelector>(f));
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->Prefill(calm.Table()).ok());
  ASSERT_TRUE(b->Prefill(noisy.Table()).ok());
  for (int step = 0; step < g.steps; ++step) {
    StepInputs ia, ib;
    calm.NextStep(ia);
    noisy.NextStep(ib);
    ASSERT_TRUE(a->Step(ia).ok());
    ASSERT_TRUE(b->Step(ib).ok());
    for (int l = 0; l < g.layers; ++l) {
      ASSERT_EQ(calm.outputs()[l], noisy.outputs()[l]) << "step " << step << " layer " << l;
      const SelectionView sa = *a->LastSelection(l);
      const SelectionView sb = *b->LastSelection(l);
      for (int s = 0; s < g.num_seqs; ++s) {
        for (int kh = 0; kh < g.kv_heads; ++kh) {
          ASSERT_EQ(sa.Count(s, kh), sb.Count(s, kh));
          for (int i = 0; i < sa.Count(s, kh); ++i) ASSERT_EQ(sa.Row(s, kh)[i], sb.Row(s, kh)[i]);
        }
      }
    }
  }
}

TEST(DecodePipeline, PrefillFailureDeclaresSelectorDead) {
  Geometry g;
  g.layers = 2;
  g.steps = 2;
  Harness h(g, FreshSeed());
  const PipelineOptions o = Options("fpga", PipelineMode::kSync, 1);
  FaultInjectionOptions f;
  f.die_after_requests = 0;
  auto selector = std::make_unique<FaultInjectingSelector>(f);
  // Kill it before prefill: a Submit on a selector whose death count is 0 marks it dead.
  SelectionView none;
  (void)selector->Submit(SelectRequest{0, {}, {}, {}, none});
  auto pipe = MakePipeline(h, o, g, std::move(selector));
  ASSERT_NE(pipe, nullptr);
  RunAndCheck(h, *pipe, o, g);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_TRUE(m.selector_dead);
  EXPECT_NE(m.selector_death_reason.find("BuildDigests"), std::string::npos);
  EXPECT_EQ(m.fallbacks_dead, m.requests);
}

TEST(DecodePipeline, BadOptionsAndInputsAreRejectedWithTheValue) {
  Geometry g;
  g.layers = 2;
  Harness h(g, FreshSeed());
  auto create = [&](PipelineOptions o, bool with_selector = true) {
    return DecodePipeline::Create(o, h.caches(), g.heads, h.max_num_seqs(),
                                  with_selector ? std::make_unique<CpuPageSelector>() : nullptr);
  };
  auto expect = [](const absl::Status& s, absl::string_view needle) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(needle), absl::string_view::npos) << s.message();
  };
  expect(create(Options("cpu", PipelineMode::kSync, 2)).status(), "micro_batches=2");
  expect(create(Options("cpu", PipelineMode::kPipelined, 0)).status(), "got 0");
  expect(create(Options("cpu", PipelineMode::kPipelined, 2, 0)).status(), "reuse must be >= 1");
  PipelineOptions o = Options("cpu", PipelineMode::kPipelined, 2);
  o.deadline_ms = -1;
  expect(create(o).status(), "deadline_ms");
  expect(create(Options("cpu", PipelineMode::kSync, 1), false).status(), "needs a page selector");
  o = Options("cpu", PipelineMode::kSync, 1);
  o.policy.selection.budget_tokens = 40;
  EXPECT_FALSE(create(o).ok());
  EXPECT_FALSE(ParsePipelineMode("async").ok());
  EXPECT_NE(ParsePipelineMode("async").status().message().find("'async'"), std::string::npos);

  auto pipe = MakePipeline(h, Options("cpu", PipelineMode::kPipelined, 2), g,
                           std::make_unique<CpuPageSelector>());
  ASSERT_NE(pipe, nullptr);
  ASSERT_TRUE(pipe->Prefill(h.Table()).ok());
  StepInputs in;
  h.NextStep(in);
  StepInputs bad = in;
  bad.queries.pop_back();
  expect(pipe->Step(bad), "one entry per layer (2)");
  bad = in;
  bad.table.num_seqs = 1000;
  expect(pipe->Step(bad), "got 1000");
  bad = in;
  bad.new_keys.clear();
  expect(pipe->Step(bad), "new_slots and new_keys");
  // Still usable after rejected steps.
  EXPECT_TRUE(pipe->Step(in).ok());
  pipe->Shutdown();
  pipe->Shutdown();  // idempotent
  EXPECT_EQ(pipe->Step(in).code(), absl::StatusCode::kFailedPrecondition);
}

// ---- issue 14: exceptions, garbage selections and shutdown with work in flight ----------------

// The CPU reference, made to misbehave after a correct Submit: throw from Submit or Wait, or
// report OK and leave a malformed selection in the caller's buffer (as XRT's noop shim does).
enum class Misbehaviour {
  kThrowOnSubmit,
  kThrowOnWait,
  kHugeCount,
  kDescending,
  kNoSink,
  kPastTheSequence
};
class MisbehavingSelector final : public PageSelector {
 public:
  explicit MisbehavingSelector(Misbehaviour m) : m_(m) {}
  absl::string_view Name() const override { return "misbehaving"; }
  absl::Status AddLayer(int layer, const CacheShape& shape) override {
    return ref_.AddLayer(layer, shape);
  }
  absl::Status BuildDigests(int layer, const KvCacheView& cache,
                            const BlockTableView& table) override {
    return ref_.BuildDigests(layer, cache, table);
  }
  absl::Status AppendKeys(int layer, const int64_t* slots, int n, const void* keys) override {
    return ref_.AppendKeys(layer, slots, n, keys);
  }
  absl::StatusOr<SelectTicket> Submit(const SelectRequest& r) override {
    if (m_ == Misbehaviour::kThrowOnSubmit) throw std::runtime_error("injected Submit failure");
    out_ = r.out;
    table_ = r.table;
    return ref_.Submit(r);
  }
  absl::Status Wait(SelectTicket t, absl::Time deadline) override {
    if (m_ == Misbehaviour::kThrowOnWait) throw std::runtime_error("injected Wait failure");
    MEMPIPE_RETURN_IF_ERROR(ref_.Wait(t, deadline));
    // Spoil the row of the longest sequence (the one with a real choice to make).
    int s = 0;
    for (int i = 0; i < table_.num_seqs; ++i) {
      if (table_.seq_lens[i] > table_.seq_lens[s]) s = i;
    }
    int32_t* row = out_.Row(s, 0);
    int32_t& count = out_.Count(s, 0);
    switch (m_) {
      case Misbehaviour::kHugeCount:
        count = 1057046488;
        break;
      case Misbehaviour::kDescending:
        std::swap(row[1], row[2]);
        break;
      case Misbehaviour::kNoSink: {
        // The newest `count` pages: ascending, inside the sequence, locals present, no sink.
        const int n = NumPages(table_.seq_lens[s], block_size_);
        for (int i = 0; i < count; ++i) row[i] = n - count + i;
        break;
      }
      case Misbehaviour::kPastTheSequence:
        row[count - 1] = table_.max_blocks_per_seq + 3;
        break;
      default:
        break;
    }
    ++spoiled_;
    return absl::OkStatus();
  }
  SelectorCosts Costs() const override { return ref_.Costs(); }
  int spoiled() const { return spoiled_; }

 private:
  Misbehaviour m_;
  CpuPageSelector ref_;
  SelectionView out_;
  BlockTableView table_;
  int block_size_ = 16;  // the harness's page size
  int spoiled_ = 0;
};

class GarbageSelectionTest : public ::testing::TestWithParam<Misbehaviour> {};

// Item 5: before, the pipeline labelled a garbage selection as the selector's, and the decode
// then failed the request (a huge count) or silently attended the wrong pages (a missing sink).
// Now every selection from a selector is checked, and an invalid one falls back, counted.
TEST_P(GarbageSelectionTest, FallsBackCountedAsInvalidAndMatchesTheReference) {
  Geometry g;
  g.min_len = 200;  // every sequence longer than the 4-page budget
  Harness h(g, FreshSeed());
  PipelineOptions o = Options("fpga", PipelineMode::kPipelined, 2);
  o.dead_after_failures = 1000;
  auto pipe = MakePipeline(h, o, g, std::make_unique<MisbehavingSelector>(GetParam()));
  ASSERT_NE(pipe, nullptr);
  RunAndCheck(h, *pipe, o, g);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_EQ(m.fallbacks_invalid, m.selections_fresh) << m.ToText();
  EXPECT_EQ(m.selections_by_selector, 0u);
  EXPECT_NE(m.ToText().find("invalid " + std::to_string(m.fallbacks_invalid)), std::string::npos);
}
INSTANTIATE_TEST_SUITE_P(DecodePipeline, GarbageSelectionTest,
                         ::testing::Values(Misbehaviour::kHugeCount, Misbehaviour::kDescending,
                                           Misbehaviour::kNoSink, Misbehaviour::kPastTheSequence));

class ThrowingSelectorTest : public ::testing::TestWithParam<Misbehaviour> {};

// Item 3: an exception inside the selector thread called std::terminate. Now it is a failed
// selection: fallback (bit-exact with the reference), and the selector is declared dead.
TEST_P(ThrowingSelectorTest, FallsBackAndDeclaresTheSelectorDead) {
  Geometry g;
  Harness h(g, FreshSeed());
  const PipelineOptions o = Options("fpga", PipelineMode::kPipelined, 3);
  auto pipe = MakePipeline(h, o, g, std::make_unique<MisbehavingSelector>(GetParam()));
  ASSERT_NE(pipe, nullptr);
  RunAndCheck(h, *pipe, o, g);
  const PipelineMetrics m = pipe->Metrics();
  EXPECT_TRUE(m.selector_dead);
  EXPECT_NE(m.selector_death_reason.find("injected"), std::string::npos) << m.selector_death_reason;
  EXPECT_EQ(m.selections_by_selector, 0u);
  EXPECT_EQ(m.fallbacks, m.selections_fresh);
}
INSTANTIATE_TEST_SUITE_P(DecodePipeline, ThrowingSelectorTest,
                         ::testing::Values(Misbehaviour::kThrowOnSubmit,
                                           Misbehaviour::kThrowOnWait));

// Runs `fn` on a thread and fails (then aborts, since the thread cannot be reclaimed) if it
// has not returned within `seconds`: a hang becomes a failure naming what hung.
void WithinSeconds(double seconds, const char* what, std::function<void()> fn) {
  std::atomic<bool> done{false};
  std::thread t([&] {
    fn();
    done = true;
  });
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!done && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!done) {
    std::fprintf(stderr, "FAILED: %s did not return within %.0f s\n", what, seconds);
    std::abort();
  }
  t.join();
}

class ObserverThrowsTest : public ::testing::TestWithParam<std::tuple<PipelineMode, int, int>> {};

// Item 3 (and item 9's Shutdown hang): an exception from the observer escaped Step and left
// requests in flight; every later Step failed with "arrived out of order", and with a queue
// shorter than the micro-batch count the destructor hung on a full channel. Now the exception
// is the step's error, the step still completes its requests, the next step is correct, and
// shutdown returns.
TEST_P(ObserverThrowsTest, BecomesTheStepsErrorAndThePipelineStaysUsable) {
  const auto [mode, micro_batches, queue_capacity] = GetParam();
  Geometry g;
  g.steps = 3;
  Harness h(g, FreshSeed());
  PipelineOptions o = Options("cpu", mode, micro_batches);
  o.queue_capacity = queue_capacity;
  auto pipe = MakePipeline(h, o, g, std::make_unique<CpuPageSelector>());
  ASSERT_NE(pipe, nullptr);
  ASSERT_TRUE(pipe->Prefill(h.Table()).ok());
  int calls = 0;
  pipe->SetObserver([&](const RequestRecord&) {
    if (calls++ == 0) throw std::runtime_error("observer bug");
  });
  for (int step = 0; step < g.steps; ++step) {
    StepInputs in;
    h.NextStep(in);
    absl::Status st;
    bool threw = false;
    try {
      st = pipe->Step(in);
    } catch (...) {
      threw = true;
    }
    ASSERT_FALSE(threw) << "Step let an exception escape";
    h.Reference(true, o.policy.selection, pipe->max_selected(), ScaleOf(g));
    if (step == 0) {
      EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
      EXPECT_NE(st.message().find("observer bug"), absl::string_view::npos) << st;
    } else {
      ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    }
    h.ExpectMatches(pipe.get());  // every request of the failed step ran too
  }
  EXPECT_EQ(calls, g.steps * g.layers * std::min(micro_batches, g.num_seqs));
  DecodePipeline* raw = pipe.release();
  WithinSeconds(30, "the pipeline's destructor", [raw] { delete raw; });
}
INSTANTIATE_TEST_SUITE_P(DecodePipeline, ObserverThrowsTest,
                         ::testing::Values(std::make_tuple(PipelineMode::kSync, 1, 0),
                                           std::make_tuple(PipelineMode::kPipelined, 4, 0),
                                           std::make_tuple(PipelineMode::kPipelined, 4, 1)));

TEST(SelectorRegistry, BuiltInCpuAndRegisteredFactories) {
  absl::StatusOr<std::unique_ptr<PageSelector>> cpu = MakePageSelector(Device::kCpu);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->Name(), "cpu");
  UnregisterPageSelectorFactory(Device::kFpga);
  EXPECT_FALSE(HasPageSelectorFactory(Device::kFpga));
  absl::StatusOr<std::unique_ptr<PageSelector>> none = MakePageSelector(Device::kFpga);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(none.status().message().find("'fpga'"), std::string::npos);
  RegisterPageSelectorFactory(Device::kFpga, "test", [] {
    FaultInjectionOptions f;
    f.name = "registered";
    return absl::StatusOr<std::unique_ptr<PageSelector>>(
        std::make_unique<FaultInjectingSelector>(f));
  });
  EXPECT_TRUE(HasPageSelectorFactory(Device::kFpga));
  absl::StatusOr<std::unique_ptr<PageSelector>> fpga = MakePageSelector(Device::kFpga);
  ASSERT_TRUE(fpga.ok());
  EXPECT_EQ((*fpga)->Name(), "registered");
  UnregisterPageSelectorFactory(Device::kFpga);
}

}  // namespace
}  // namespace mempipe
