// Cycle counts of the RTL kernel per call, measured in Verilator simulation behind the AXI
// memory model of rtl_harness.h (HBM-like latency 100-200 clocks, the channel's read rate at the
// clock the model prices (U55cParams::PricedClockHz) for both ports together, 10% random
// back-pressure), across page counts, head dims, group sizes, dtypes and both aggregations. Writes
// a JSON and a Markdown table; progress on stderr.
//
//   fpga_rtl_cycles --json=fpga/rtl/cycles.json --md=fpga/rtl/cycles.md [--quick]
//
// Each row is one kernel call on one KV head: `seqs` sequences of `pages` pages each, k = 16
// pages kept (1 sink, 1 local), max_selected = k. Data are random (the values do not change the
// cycle count except through the top-k insertions, which never stall).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "fpga/device_layout.h"
#include "fpga/emulation/u55c_model.h"
#include "fpga/emulation/u55c_params.h"
#include "fpga/hls/kernel_common.h"
#include "tests/fpga/rtl/rtl_harness.h"

ABSL_FLAG(std::string, json, "", "write the table as JSON to this file ('' = none)");
ABSL_FLAG(std::string, md, "", "write the table as Markdown to this file ('' = none)");
ABSL_FLAG(bool, quick, false, "a small sweep (for a smoke run)");
ABSL_FLAG(uint64_t, seed, 12345, "random data and memory-model seed");
ABSL_FLAG(double, max_heldout_error, 0.15,
          "fail (exit 1) if the model's mean relative error on held-out shapes exceeds this");

namespace {

// The Markdown table's preamble: what was measured, how, and the command.
constexpr char kMarkdownPreamble[] =
    "# RTL kernel cycles per call (Verilator simulation)\n"
    "\n"
    "Measured: clocks from ap_start to ap_done of `fpga/rtl/mempipe_score_topk.sv` (MAX_TOPK "
    "1024,\n"
    "MAX_PAGES 65536) simulated by Verilator 5.006 behind the AXI memory model of\n"
    "`tests/fpga/rtl/rtl_harness.h`: read latency 100-200 clocks per burst, both masters sharing\n"
    "one pseudo-channel at the model's read rate (min(14.375 GB/s x 0.9065, 64 B x clock) / (64 B\n"
    "x clock) beats per clock at U55cParams::PricedClockHz(), the RTL's clock estimate: 1.0 at\n"
    "150 MHz), 10% random back-pressure on every slave channel. One KV head per call, page\n"
    "size 16, k = 16 pages (1 sink, 1 local), max_selected = 16, random data, max aggregation\n"
    "unless the row says sum. \"model\" is\n"
    "`ScoreLaunchWork` + `U55cModel::CuSeconds` (fpga/emulation/u55c_params.h) for the same call, "
    "in "
    "clocks;\n"
    "`fit` rows fixed pipeline_fill_clocks and row_fill_clocks, `held-out` rows were not used.\n"
    "Generated on the shared 2-core build machine of this project (simulated clocks do not depend\n"
    "on it) by:\n"
    "\n"
    "    build/tests/fpga/rtl/fpga_rtl_cycles --json=fpga/rtl/cycles.json --md=fpga/rtl/cycles.md\n"
    "\n";

using mempipe::rtl_testing::MemModel;
using mempipe::rtl_testing::RtlScoreTopk;
using mempipe::rtl_testing::ScoreTopkArgs;

struct Shape {
  const char* dtype_name;
  int dtype, head_dim, group, pages, seqs;
  int aggregation = 0;  // 0 max, 1 sum (GroupAggregation)
};

struct Row {
  Shape s;
  int row_words;
  uint64_t cycles;
  double model_cycles = 0;  // fpga/u55c_model's prediction of the same call
  bool fit = false;         // used to fit pipeline_fill_clocks (else held out)
};

// Shapes the kernel-side parameters were fitted on: fp16, head_dim 64 or 256, group 1, 4 or 16
// (one sequence per call for pipeline_fill_clocks, eight for row_fill_clocks). Everything else
// (head_dim 128, groups 2 and 8, fp32, bf16) is held out.
bool IsFitShape(const Shape& s) {
  return s.aggregation == 0 && s.dtype == 1 && s.head_dim != 128 &&
         (s.group == 1 || s.group == 4 || s.group == 16);
}

// The model's kernel clocks for the call Measure() makes (same lengths, k, max_selected).
double ModelCycles(const Shape& s, const mempipe::U55cParams& p) {
  using namespace mempipe;
  std::vector<int32_t> lens(s.seqs, s.pages * 16), table(static_cast<size_t>(s.seqs) * s.pages, 0);
  const int k = 16;
  std::vector<int32_t> pages(static_cast<size_t>(s.seqs) * k), counts(s.seqs);
  SelectionConfig config;
  config.budget_tokens = k * 16;
  config.aggregation = static_cast<GroupAggregation>(s.aggregation);
  SelectRequest r{0, QueryView{nullptr, static_cast<DType>(s.dtype), s.seqs, s.group, s.head_dim},
                  BlockTableView{table.data(), lens.data(), s.seqs, s.pages}, config,
                  SelectionView{pages.data(), counts.data(), s.seqs, 1, k}};
  const CacheShape shape{static_cast<DType>(s.dtype), s.pages * s.seqs + 1, 16, 1, s.head_dim};
  const ScoreIo io = PlanScoreIo(s.seqs, s.group, s.head_dim, s.pages, k);
  const U55cModel model(p);
  return model.CuSeconds(ScoreLaunchWork(r, shape, 0, io, p)) * p.PricedClockHz();
}

uint64_t Measure(const Shape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  MemModel mm;
  mm.seed = rng();
  // The channel's read rate in beats per kernel clock, as the model prices it.
  const mempipe::U55cParams p;
  mm.read_rate = mempipe::U55cModel(p).ChannelReadBps() / (p.axi_word_bytes * p.PricedClockHz());
  RtlScoreTopk kernel(mm);
  const int esize = s.dtype == 0 ? 4 : 2;
  const int row_bytes = s.head_dim * esize;
  const int blocks = s.pages * s.seqs + 1;
  const uint64_t dg = kernel.Alloc(static_cast<size_t>(blocks) * 2 * row_bytes);
  std::uniform_real_distribution<float> uni(-3.0f, 3.0f);
  for (size_t i = 0; i < static_cast<size_t>(blocks) * 2 * row_bytes / esize; ++i) {
    const float v = uni(rng);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if (esize == 4) {
      std::memcpy(kernel.Mem(dg) + 4 * i, &u, 4);
    } else {
      const uint16_t h = static_cast<uint16_t>(u >> 16);  // a finite bf16/fp16 bit pattern
      std::memcpy(kernel.Mem(dg) + 2 * i, &h, 2);
    }
  }
  const uint64_t q = kernel.Alloc(static_cast<size_t>(s.seqs) * s.group * s.head_dim * 4);
  for (size_t i = 0; i < static_cast<size_t>(s.seqs) * s.group * s.head_dim; ++i) {
    const float v = uni(rng);
    std::memcpy(kernel.Mem(q) + 4 * i, &v, 4);
  }
  const uint64_t tb = kernel.Alloc(static_cast<size_t>(s.seqs) * s.pages * 4);
  std::vector<int32_t> perm(blocks);
  for (int i = 0; i < blocks; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::memcpy(kernel.Mem(tb), perm.data(), static_cast<size_t>(s.seqs) * s.pages * 4);
  const uint64_t lens = kernel.Alloc(static_cast<size_t>(s.seqs) * 4);
  for (int i = 0; i < s.seqs; ++i) {
    const int32_t len = s.pages * 16;
    std::memcpy(kernel.Mem(lens) + 4 * i, &len, 4);
  }
  const int k = 16;
  const uint64_t pages = kernel.Alloc(static_cast<size_t>(s.seqs) * k * 4);
  const uint64_t counts = kernel.Alloc(static_cast<size_t>(s.seqs) * 4);
  ScoreTopkArgs a;
  a.digests = dg;
  a.queries = q;
  a.block_table = tb;
  a.seq_lens = lens;
  a.pages = pages;
  a.counts = counts;
  a.num_seqs = s.seqs;
  a.group = s.group;
  a.head_dim = s.head_dim;
  a.dtype = s.dtype;
  a.block_size = 16;
  a.max_blocks_per_seq = s.pages;
  a.max_selected = k;
  a.k = k;
  a.sinks = 1;
  a.locals = 1;
  a.aggregation = s.aggregation;
  return kernel.Run(a).cycles;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const bool quick = absl::GetFlag(FLAGS_quick);
  std::vector<Shape> shapes;
  const std::vector<int> page_counts =
      quick ? std::vector<int>{64, 256} : std::vector<int>{64, 256, 1024, 4096};
  for (int d : {64, 128, 256}) {
    for (int g : {1, 2, 4, 8, 16}) {
      for (int p : page_counts) shapes.push_back({"fp16", 1, d, g, p, 1});
    }
  }
  for (int g : {1, 4, 16}) {
    shapes.push_back({"fp16", 1, 64, g, 256, 8});  // fit: several sequences per call
    shapes.push_back({"fp16", 1, 256, g, 256, 8});
    shapes.push_back({"fp32", 0, 128, g, 1024, 1});
    shapes.push_back({"bf16", 2, 128, g, 1024, 1});
    shapes.push_back({"fp16", 1, 128, g, 256, 8});  // several sequences per call
  }
  // Sum aggregation (held out): one pipelined add per head, paced at group x 4 clocks per page.
  for (int g : {4, 16}) {
    for (int d : {64, 128}) shapes.push_back({"fp16", 1, d, g, 1024, 1, 1});
  }
  const mempipe::U55cParams params;
  const double read_rate = mempipe::U55cModel(params).ChannelReadBps() /
                           (params.axi_word_bytes * params.PricedClockHz());
  std::fprintf(stderr, "kernel clock priced at %.0f MHz: %.2f read beats per clock\n",
               params.PricedClockHz() / 1e6, read_rate);
  std::vector<Row> rows;
  uint64_t seed = absl::GetFlag(FLAGS_seed);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape& s = shapes[i];
    const int rw = s.head_dim * (s.dtype == 0 ? 4 : 2) / 64;
    const uint64_t c = Measure(s, seed++);
    const double mc = ModelCycles(s, mempipe::U55cParams{});
    rows.push_back({s, rw, c, mc, IsFitShape(s)});
    std::fprintf(stderr,
                 "[%zu/%zu] %s d=%d group=%d pages=%d seqs=%d: %llu cycles (%.2f/page), model %.0f "
                 "(%+.1f%%)%s\n",
                 i + 1, shapes.size(), s.dtype_name, s.head_dim, s.group, s.pages, s.seqs,
                 static_cast<unsigned long long>(c), static_cast<double>(c) / (s.pages * s.seqs),
                 mc, 100.0 * (mc - c) / c, rows.back().fit ? " [fit]" : "");
  }
  // Fills implied by the fit shapes: the clocks the model (without fills) does not explain, of
  // one-sequence calls (pipeline fill), then per further sequence of eight-sequence calls.
  mempipe::U55cParams nofill;
  nofill.pipeline_fill_clocks = 0;
  nofill.row_fill_clocks = 0;
  double fill_sum = 0, fill_n = 0, row_sum = 0, row_n = 0, err_sum = 0, err_max = 0, err_n = 0;
  for (const Row& r : rows) {
    if (r.fit && r.s.seqs == 1) {
      fill_sum += r.cycles - ModelCycles(r.s, nofill);
      ++fill_n;
    } else if (!r.fit) {
      const double e = std::abs(r.model_cycles - r.cycles) / r.cycles;
      err_sum += e;
      err_max = std::max(err_max, e);
      ++err_n;
    }
  }
  const double fill = fill_n > 0 ? fill_sum / fill_n : 0;
  for (const Row& r : rows) {
    if (r.fit && r.s.seqs > 1) {
      row_sum += (r.cycles - ModelCycles(r.s, nofill) - fill) / (r.s.seqs - 1);
      ++row_n;
    }
  }
  const double row_fill = row_n > 0 ? row_sum / row_n : 0;
  const double err_mean = err_n > 0 ? err_sum / err_n : 0;
  std::fprintf(stderr,
               "fit shapes: pipeline fill %.0f clocks (u55c_params.h has %d), row fill %.0f "
               "(has %d)\nheld-out shapes (%d): model error mean %.1f%%, max %.1f%%\n",
               fill, mempipe::U55cParams{}.pipeline_fill_clocks, row_fill,
               mempipe::U55cParams{}.row_fill_clocks, static_cast<int>(err_n), 100 * err_mean,
               100 * err_max);
  const std::string json = absl::GetFlag(FLAGS_json), md = absl::GetFlag(FLAGS_md);
  if (!json.empty()) {
    std::ofstream f(json);
    f << "{\n  \"source\": \"Verilator 5.006 simulation of fpga/rtl/mempipe_score_topk.sv "
         "(MAX_TOPK=1024, MAX_PAGES=65536) behind tests/fpga/rtl/rtl_harness.h's memory model: "
         "read latency 100-200 clocks, "
      << absl::StrFormat("%.2f", read_rate)
      << " read beats/clock shared (the channel at the priced clock), 10% random back-pressure; "
         "k=16 sinks=1 locals=1 block_size=16\",\n  \"rows\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      f << absl::StrFormat(
          "    {\"dtype\": \"%s\", \"head_dim\": %d, \"group\": %d, \"pages\": %d, \"seqs\": %d, "
          "\"row_words\": %d, \"aggregation\": \"%s\", \"cycles\": %d, \"model_cycles\": %.0f, "
          "\"set\": \"%s\"}%s\n",
          r.s.dtype_name, r.s.head_dim, r.s.group, r.s.pages, r.s.seqs, r.row_words,
          r.s.aggregation ? "sum" : "max", r.cycles, r.model_cycles, r.fit ? "fit" : "held-out",
          i + 1 < rows.size() ? "," : "");
    }
    f << absl::StrFormat(
        "  ],\n  \"fitted_pipeline_fill_clocks\": %.0f,\n"
        "  \"fitted_row_fill_clocks\": %.0f,\n"
        "  \"heldout_error_mean\": %.4f,\n  \"heldout_error_max\": %.4f\n}\n",
        fill, row_fill, err_mean, err_max);
  }
  if (!md.empty()) {
    std::ofstream f(md);
    f << kMarkdownPreamble;
    f << "| dtype | head_dim | group | agg | pages/seq | seqs | row words | cycles (simulated) | "
         "cycles/page | model cycles | model error | set |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const Row& r : rows) {
      f << absl::StrFormat(
          "| %s | %d | %d | %s | %d | %d | %d | %d | %.2f | %.0f | %+.1f%% | %s |\n",
          r.s.dtype_name, r.s.head_dim, r.s.group, r.s.aggregation ? "sum" : "max", r.s.pages,
          r.s.seqs, r.row_words, r.cycles, static_cast<double>(r.cycles) / (r.s.pages * r.s.seqs),
          r.model_cycles, 100.0 * (r.model_cycles - r.cycles) / r.cycles,
          r.fit ? "fit" : "held-out");
    }
    f << absl::StrFormat(
        "\nFills implied by the fit shapes: pipeline %.0f clocks per launch, %.0f per further "
        "sequence. Model error on the %d held-out shapes: mean %.1f%%, max %.1f%%.\n",
        fill, row_fill, static_cast<int>(err_n), 100 * err_mean, 100 * err_max);
  }
  if (err_mean > absl::GetFlag(FLAGS_max_heldout_error)) {
    std::fprintf(stderr, "model error on held-out shapes %.1f%% exceeds --max_heldout_error\n",
                 100 * err_mean);
    return 1;
  }
  return 0;
}
