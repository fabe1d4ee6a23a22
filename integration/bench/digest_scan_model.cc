// digest-scan-model: bytes the FPGA scans and its modeled selection time per decode step, native
// against int8 digests, for contexts too long to run through the emulated card (1M tokens).
// Every time here is MODELED (fpga/emulation/u55c_model.h, the same ScoreLaunchWork and
// U55cModel::Call the emulated U55C prices each request with); bytes are counted from the layout.
//
//   digest-scan-model                                      # Llama-3-8B shape, 32K..1M, batch 1, 8
//   digest-scan-model --context=1048576 --batch=1 --json=out.json
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "fpga/device_layout.h"
#include "fpga/emulation/u55c_model.h"
#include "nlohmann/json.hpp"
#include "retriever/page_selector.h"

ABSL_FLAG(int, layers, 32, "Transformer layers");
ABSL_FLAG(int, dense_layers, 2, "First layers that decode densely (select nothing)");
ABSL_FLAG(int, num_heads, 32, "Query heads per layer");
ABSL_FLAG(int, num_kv_heads, 8, "KV heads per layer");
ABSL_FLAG(int, head_dim, 128, "Head dimension: 64, 128 or 256");
ABSL_FLAG(std::string, dtype, "bf16", "Cache dtype of the native digests: fp32, fp16 or bf16");
ABSL_FLAG(int, page_size, 16, "Tokens per page");
ABSL_FLAG(int, budget, 4096, "Token budget per (sequence, KV head)");
ABSL_FLAG(std::string, context, "32768,131072,1048576", "Comma-separated contexts (tokens)");
ABSL_FLAG(std::string, batch, "1,8", "Comma-separated batch sizes");
ABSL_FLAG(std::string, json, "", "Also write the rows to this JSON file");

namespace mempipe {
namespace {

std::vector<int> Ints(const std::string& text) {
  std::vector<int> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(s, &v) || v <= 0) {
      std::fprintf(stderr, "digest-scan-model: '%s' is not a positive integer\n",
                   std::string(s).c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

int Main() {
  auto dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) {
    std::fprintf(stderr, "digest-scan-model: %s\n", std::string(dtype.status().message()).c_str());
    return 2;
  }
  const int layers = absl::GetFlag(FLAGS_layers), dense = absl::GetFlag(FLAGS_dense_layers);
  const int heads = absl::GetFlag(FLAGS_num_heads), kv = absl::GetFlag(FLAGS_num_kv_heads);
  const int d = absl::GetFlag(FLAGS_head_dim), bs = absl::GetFlag(FLAGS_page_size);
  const int group = heads / kv;
  const U55cModel model{U55cParams{}};
  SelectionConfig config;
  config.budget_tokens = absl::GetFlag(FLAGS_budget);
  const int k = config.PagesPerHead(bs);
  nlohmann::json rows = nlohmann::json::array();
  std::printf(
      "modeled U55C selection per decode step (%d sparse layers, %d KV heads, d %d, page %d, "
      "%s native digests; all times MODELED):\n",
      layers - dense, kv, d, bs, std::string(DTypeName(*dtype)).c_str());
  std::printf("%9s %5s %7s %14s %12s %12s %14s\n", "context", "batch", "digest", "scanned GB",
              "HBM GB", "modeled ms", "vs native");
  for (int context : Ints(absl::GetFlag(FLAGS_context))) {
    for (int batch : Ints(absl::GetFlag(FLAGS_batch))) {
      const int pages = NumPages(context, bs);
      std::vector<int32_t> table(static_cast<size_t>(batch) * pages), lens(batch, context);
      for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
      std::vector<uint8_t> q(static_cast<size_t>(batch) * heads * d * 4);
      std::vector<int32_t> sel(static_cast<size_t>(batch) * kv * k), cnt(batch * kv);
      double native_ms = 0;
      for (DigestFormat f : {DigestFormat::kNative, DigestFormat::kInt8}) {
        CacheShape shape{*dtype, batch * pages, bs, kv, d};
        shape.digest_format = f;
        const SelectRequest r{0, QueryView{q.data(), DType::kFloat32, batch, heads, d},
                              BlockTableView{table.data(), lens.data(), batch, pages}, config,
                              SelectionView{sel.data(), cnt.data(), batch, kv, k}};
        const ScoreIo io = PlanScoreIo(batch, group, d, pages, k);
        double step_s = 0, hbm = 0;
        for (int l = dense; l < layers; ++l) {
          std::vector<double> to_card, from_card;
          std::vector<CuLaunch> launches;
          for (int h = 0; h < kv; ++h) {
            to_card.push_back(static_cast<double>(io.in_bytes));
            from_card.push_back(static_cast<double>(io.out_bytes));
            launches.push_back(
                ScoreLaunchWork(r, shape, CuFor(l, h, kv, model.params().num_cus), io));
            hbm += launches.back().hbm_bytes;
          }
          step_s += model.Call(to_card, launches, from_card).total_s;
        }
        const double scanned =
            static_cast<double>(layers - dense) * kv * batch * pages * ScanWordsOf(shape) * 64.0;
        const double ms = step_s * 1e3;
        if (f == DigestFormat::kNative) native_ms = ms;
        std::printf("%9d %5d %7s %14.3f %12.3f %12.3f %13.2fx\n", context, batch,
                    std::string(DigestFormatName(f)).c_str(), scanned / 1e9, hbm / 1e9, ms,
                    native_ms / ms);
        rows.push_back({{"context", context},
                        {"batch", batch},
                        {"digest_dtype", std::string(DigestFormatName(f))},
                        {"digest_bytes_scanned", scanned},
                        {"hbm_bytes", hbm},
                        {"modeled_fpga_ms_per_step", ms},
                        {"speedup_vs_native", native_ms / ms}});
      }
    }
  }
  std::printf(
      "scanned: digest records read per step (native 2 x head_dim x dtype bytes per page and KV "
      "head; int8 %d codes + one 64-byte scale word); HBM: the launches' modeled HBM traffic "
      "(digests plus queries, tables and selections)\n",
      2 * d);
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    nlohmann::json j = {{"note", "all times modeled (fpga/emulation/u55c_model.h), not measured"},
                        {"rows", rows}};
    std::ofstream(path) << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace mempipe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return mempipe::Main();
}
